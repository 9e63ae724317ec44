"""VMSANet: the variable multi-scale attention fusion network of Net-Opt-MTL (Ji, Sun, Meng, Pang,
Tian, Pattern Recognition 162, 111423, 2025; github.com/SyqxhSt/Net-Opt-MTL), for any set of tasks.

Backbone: MTAN (Liu, Johns, Davison, CVPR 2019) on SegNet. A shared encoder/decoder of
Conv3×3-BN-ReLU blocks (filters [64, 128, 256, 512, 512]; one extra conv at levels 0–1, two at
2–4) with max-pool indices / max-unpool, and per task and level a soft attention mask
(1×1 conv-BN-ReLU → 1×1 conv-BN-sigmoid) that selects the task's features from the shared ones,
linked through shared attention blocks (Conv3×3-BN-ReLU). Net-Opt-MTL adds two modules:

* :class:`CACM` (channel attention at several channel scales) after every shared encoder and
  decoder stage: ``x · σ(s0 + s2 + s4 + s8 + s16)``; ``s0`` is an SE path (GAP → 1×1 C→C/16 →
  GELU → 1×1 → C), ``s_d`` a depthwise-separable conv C → C/d (DW3×3-BN-LeakyReLU(0.1),
  PW1×1-BN-LeakyReLU(0.1)) → GAP → GELU → 1×1 C/d → C.
* :class:`VMSM` (ASPP-like multi-scale block, dilation d = depthwise stride d, d ∈ {2, 4, 6}),
  replacing the encoder-side shared attention blocks. **In the released forward pass every VMSM
  call is commented out**, and its fuse sums b1 + b(d=2) + pool only: ``fusion="released"``
  reproduces that module, ``"intended"`` sums all five branches, ``"concat"`` concatenates
  b1, the sum of the dilated branches and the pooled branch (the commented ``fuse_1`` variant).

``VMSANet(tasks, use_cacm=False, use_vmsm=False)`` is plain MTAN, so the 2×2 ablation is two
flags. Every Conv-BN-act uses fusedskip's :class:`~fusedskip.ops.ConvNormAct` (the fused norm +
activation); PReLU (one learnable slope, as released) and the attention sigmoid follow as plain
torch ops because the kernels' activations take a fixed slope and have no sigmoid.

Deviations from the released code, none of which changes a case the released code runs:
channel reductions are clamped to at least one channel (the released code builds zero-channel
convs below 16 channels), and a VMSM depthwise stride-d conv on a map smaller than its 3×3
kernel zero-pads the map up to 3 pixels (the released code raises there); attention blocks of
custom filter lists map decoder level l to ``filters[l-1]`` where the released list is hard-wired.

Heads return raw outputs (no log-softmax: losses take logits). A task is given as an int (the
output channels of the released dense head, Conv3×3(f0, f0) → Conv1×1(f0, out)) or as any
module taking the task's final feature ``[B, f0, H, W]``.

Cross-task hook: ``cross_task`` is applied to the T task branches after decoder step
``cross_task_stage`` (0 = deepest, at 1/16 of the input side; 4 = full resolution; the channel
count there is :meth:`VMSANet.decoder_channels`, the side ``H / 2^(4 − stage)``). Give a kind of
:class:`fusedskip.mtl.kem.CrossTaskFusion` (``"kem"``, ``"stable_kem"``, ``"cross_attention"``;
``None`` / ``"none"``: no module) with ``cross_task_options`` for it — recorded in ``config``, so
:meth:`VMSANet.from_config` rebuilds it from a checkpoint — or any module mapping the list of the
tasks' features ``[B, C, H, W]`` to a list of the same shapes (recorded by class name only). The
module is built after the network's own initialisation, so with a given seed the rest of the
network starts from the same weights with or without it. It mixes the tasks: its parameters are
*shared* parameters (:meth:`VMSANet.shared_parameters`), not any task's.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..mtl.kem import CROSS_TASK_KINDS, build_cross_task
from ..ops.conv_norm_act import ConvNormAct

MTAN_FILTERS = (64, 128, 256, 512, 512)
VMSM_FUSIONS = ("released", "intended", "concat")
VMSM_RATES = (2, 4, 6)
CACM_SCALES = (2, 4, 8, 16)


def conv_bn(cin: int, cout: int, kernel: int = 3, act: str = "relu", slope: Optional[float] = None,
            **conv) -> ConvNormAct:
    """Conv (with bias, as the released code) → BatchNorm → act, fused norm + act."""
    return ConvNormAct(cin, cout, kernel, bias=True, norm="batch", act=act, negative_slope=slope, **conv)


class ConvBNPReLU(nn.Module):
    """Conv → BN (fused, no activation) → PReLU with one learnable slope (torch's default)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, **conv):
        super().__init__()
        self.conv = conv_bn(cin, cout, kernel, act="identity", **conv)
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3×3 (stride s) → BN → LeakyReLU(0.1), pointwise 1×1 → BN → LeakyReLU(0.1).

    ``padding`` 1 (CACM) or 0 (VMSM's strided branches, which zero-pad maps smaller than the
    kernel up to its size; see the module docstring)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, padding: int = 1):
        super().__init__()
        self.depthwise = conv_bn(cin, cin, 3, act="leaky_relu", slope=0.1, stride=stride, padding=padding, groups=cin)
        self.pointwise = conv_bn(cin, cout, 1, act="leaky_relu", slope=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        need = 3 - 2 * self.depthwise.conv.padding[0]
        if h < need or w < need:
            x = F.pad(x, (0, max(need - w, 0), 0, max(need - h, 0)))
        return self.pointwise(self.depthwise(x))


def _reduced(channels: int, d: int) -> int:
    return max(1, channels // d)


class CACM(nn.Module):
    """Channel attention at several channel scales: ``x · σ(s0 + Σ_d s_d)`` (module docstring).

    Submodule order follows the released class, so state_dicts map one to one."""

    def __init__(self, channels: int, reduction: int = 16, scales: Sequence[int] = CACM_SCALES):
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, _reduced(channels, reduction), 1)
        self.fc2 = nn.Conv2d(_reduced(channels, reduction), channels, 1)
        self.dws = nn.ModuleList(DepthwiseSeparable(channels, _reduced(channels, d)) for d in scales)
        self.linear = nn.ModuleList(nn.Conv2d(_reduced(channels, d), channels, 1) for d in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(F.gelu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        for dws, linear in zip(self.dws, self.linear):
            logits = logits + linear(F.gelu(F.adaptive_avg_pool2d(dws(x), 1)))
        return x * torch.sigmoid(logits)


class VMSM(nn.Module):
    """Variable multi-scale module ``VMSM(dim, in_dim)``: ``x' = PReLU(BN(conv3×3 dim → in_dim))``,
    branches on x' with d = in_dim // 2 channels: b1 (1×1), for each rate r a dilated 3×3
    (dilation r) → depthwise-separable stride r (no padding) → bilinear resize back, and b5
    (GAP → 1×1 → resize); then a 1×1 conv-BN-PReLU fuse back to in_dim (module docstring for
    ``fusion``)."""

    def __init__(self, dim: int, in_dim: int, fusion: str = "released", rates: Sequence[int] = VMSM_RATES):
        super().__init__()
        if fusion not in VMSM_FUSIONS:
            raise ValueError(f"fusion must be one of {VMSM_FUSIONS}, got {fusion!r}")
        if fusion == "released" and len(rates) < 1:
            raise ValueError("fusion 'released' needs at least one dilation rate")
        self.fusion = fusion
        self.rates = tuple(int(r) for r in rates)
        d = _reduced(in_dim, 2)
        self.down_conv = ConvBNPReLU(dim, in_dim, 3, padding=1)
        self.conv1 = ConvBNPReLU(in_dim, d, 1)
        self.dilated = nn.ModuleList(ConvBNPReLU(in_dim, d, 3, dilation=r, padding=r) for r in self.rates)
        self.pool_conv = ConvBNPReLU(in_dim, d, 1)
        self.fuse = ConvBNPReLU(3 * d if fusion == "concat" else d, in_dim, 1)
        self.strided = nn.ModuleList(DepthwiseSeparable(d, d, stride=r, padding=0) for r in self.rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down_conv(x)
        size = x.shape[-2:]
        b1 = self.conv1(x)
        branches = [F.interpolate(dws(conv(x)), size=size, mode="bilinear", align_corners=False)
                    for conv, dws in zip(self.dilated, self.strided)]
        pooled = F.interpolate(self.pool_conv(F.adaptive_avg_pool2d(x, 1)), size=size, mode="bilinear",
                               align_corners=False)
        if self.fusion == "released":
            return self.fuse(b1 + branches[0] + pooled)
        if self.fusion == "intended":
            return self.fuse(b1 + sum(branches) + pooled)
        return self.fuse(torch.cat((b1, sum(branches), pooled), dim=1))


class AttentionMask(nn.Module):
    """MTAN's task attention: 1×1 conv-BN-ReLU → 1×1 conv-BN → sigmoid."""

    def __init__(self, cin: int, mid: int, cout: int):
        super().__init__()
        self.hidden = conv_bn(cin, mid, 1)
        self.out = conv_bn(mid, cout, 1, act="identity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.hidden(x)))


def dense_head(channels: int, out_channels: int) -> nn.Sequential:
    """The released prediction layer: Conv3×3(f0, f0) → Conv1×1(f0, out), no norm, no activation."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, out_channels, 1))


class VMSANet(nn.Module):
    """MTAN-SegNet with optional CACM and VMSM for any tasks (module docstring).

    Args:
        tasks: mapping task name → output channels (released dense head) or a head module.
        in_channels: image channels.
        filters: the five level widths (released: 64, 128, 256, 512, 512).
        use_cacm, use_vmsm, vmsm_fusion, vmsm_rates, cacm_reduction: the Net-Opt-MTL modules.
        cross_task: ``None`` / ``"none"``, a :class:`~fusedskip.mtl.kem.CrossTaskFusion` kind
            (``"kem"``, ``"stable_kem"``, ``"cross_attention"``) or a module (module docstring).
        cross_task_options: keyword options of that kind's module (a kind string only).
        cross_task_stage: decoder step 0..4 after which the module runs.
        residual_tasks: tasks whose head predicts the residual of the input (image restoration:
            ``output = x − head(features)``, so an untrained head returns the noisy input rather
            than a grey field); their heads must have ``in_channels`` outputs.
    """

    levels = 5

    def __init__(self, tasks: Mapping[str, Union[int, nn.Module]], in_channels: int = 3,
                 filters: Sequence[int] = MTAN_FILTERS, use_cacm: bool = True, use_vmsm: bool = True,
                 vmsm_fusion: str = "released", vmsm_rates: Sequence[int] = VMSM_RATES, cacm_reduction: int = 16,
                 cross_task: Union[None, str, nn.Module] = None, cross_task_options: Optional[Mapping] = None,
                 cross_task_stage: int = 4, residual_tasks: Sequence[str] = ()):
        super().__init__()
        self._check_args(tasks, filters, cross_task_stage)
        unknown = [t for t in residual_tasks if t not in tasks]
        if unknown:
            raise ValueError(f"residual_tasks names tasks the model does not have: {unknown}")
        self.residual_tasks = tuple(residual_tasks)
        kind, options = _cross_task_kind(cross_task, cross_task_options)
        f = [int(c) for c in filters]
        self.filters, self.task_names = tuple(f), list(tasks)
        self.use_cacm, self.use_vmsm, self.vmsm_fusion = bool(use_cacm), bool(use_vmsm), vmsm_fusion
        self.cross_task_stage = int(cross_task_stage)
        self._build_shared(in_channels, f)
        self.encoder_cacm = nn.ModuleList(CACM(c, cacm_reduction) for c in f) if use_cacm else None
        # decoder CACMs in step order (deepest first), channels f3, f2, f1, f0, f0 as released
        self.decoder_cacm = nn.ModuleList(CACM(f[max(3 - j, 0)], cacm_reduction) for j in range(5)) if use_cacm \
            else None
        if use_vmsm:
            self.encoder_block_att = nn.ModuleList(VMSM(f[lv], f[min(lv + 1, 4)], vmsm_fusion, vmsm_rates)
                                                   for lv in range(5))
        else:
            self.encoder_block_att = nn.ModuleList(conv_bn(f[lv], f[min(lv + 1, 4)]) for lv in range(5))
        self.decoder_block_att = nn.ModuleList(conv_bn(f[lv], f[max(lv - 1, 0)]) for lv in range(5))
        self.encoder_att = nn.ModuleDict({t: nn.ModuleList(
            AttentionMask(f[lv] if lv == 0 else 2 * f[lv], f[lv], f[lv]) for lv in range(5)) for t in tasks})
        self.decoder_att = nn.ModuleDict({t: nn.ModuleList(
            AttentionMask(2 * f[0] if lv == 0 else f[lv] + f[lv - 1], f[max(lv - 1, 0)], f[max(lv - 1, 0)])
            for lv in range(5)) for t in tasks})
        self.heads = nn.ModuleDict({t: dense_head(f[0], h) if isinstance(h, int) else h for t, h in tasks.items()})
        self._init_weights()
        # built last: the network above draws the same initial weights with or without it
        if isinstance(cross_task, nn.Module):
            self.cross_task: Optional[nn.Module] = cross_task
        elif kind is None:
            self.cross_task = None
        else:
            self.cross_task = build_cross_task(kind, self.decoder_channels(self.cross_task_stage, f), options)
        self.config = {"name": "vmsanet", "in_channels": int(in_channels), "filters": f,
                       "tasks": {t: h if isinstance(h, int) else type(h).__name__ for t, h in tasks.items()},
                       "use_cacm": self.use_cacm, "use_vmsm": self.use_vmsm, "vmsm_fusion": vmsm_fusion,
                       "vmsm_rates": [int(r) for r in vmsm_rates], "cacm_reduction": int(cacm_reduction),
                       "cross_task": type(cross_task).__name__ if isinstance(cross_task, nn.Module) else kind,
                       "cross_task_stage": int(cross_task_stage)}
        if self.residual_tasks:  # only when used: configs without it stay as they were
            self.config["residual_tasks"] = list(self.residual_tasks)
        if kind is not None and not isinstance(cross_task, nn.Module):
            self.config["cross_task_options"] = options
        elif isinstance(cross_task, nn.Module):
            self.config["cross_task_module"] = True

    @classmethod
    def from_config(cls, config: Mapping, heads: Optional[Mapping[str, nn.Module]] = None,
                    cross_task: Optional[nn.Module] = None) -> "VMSANet":
        """Rebuild a model from its :attr:`config` (as checkpoints store it). Tasks recorded as
        output channels get the released dense head; tasks with ``config["task_kinds"]`` entries
        (set by :class:`~fusedskip.training.problems.DenseProblem`) the trainer's
        :func:`~fusedskip.training.tasks.task_head`; any other custom head must come in ``heads``,
        and a custom cross-task module (recorded by class name only) in ``cross_task``."""
        from ..training.tasks import Task, task_head

        if not isinstance(config, Mapping) or config.get("name") != "vmsanet":
            raise ValueError(f"config must be a VMSANet config (name 'vmsanet'), got {config!r:.80}")
        f = [int(c) for c in config["filters"]]
        kinds, given = dict(config.get("task_kinds") or {}), dict(heads or {})
        tasks: Dict[str, Union[int, nn.Module]] = {}
        for name, head in config["tasks"].items():
            if name in given:
                tasks[name] = given[name]
            elif name in kinds:
                tasks[name] = task_head(Task(name, kinds[name][0], int(kinds[name][1])), f[0])
            elif isinstance(head, int):
                tasks[name] = head
            else:
                raise ValueError(f"task {name!r} had a custom head ({head}): pass it in heads={{{name!r}: module}}")
        if config.get("cross_task_module") and cross_task is None:
            raise ValueError(f"the model had a custom cross-task module ({config.get('cross_task')}): pass it as "
                             "cross_task=")
        model = cls(tasks, config["in_channels"], f, use_cacm=config["use_cacm"], use_vmsm=config["use_vmsm"],
                    vmsm_fusion=config["vmsm_fusion"], vmsm_rates=config["vmsm_rates"],
                    cacm_reduction=config["cacm_reduction"],
                    cross_task=cross_task if config.get("cross_task_module") else config.get("cross_task"),
                    cross_task_options=config.get("cross_task_options"),
                    cross_task_stage=config.get("cross_task_stage", 4),
                    residual_tasks=config.get("residual_tasks", ()))
        if kinds:
            model.config["task_kinds"] = {k: list(v) for k, v in kinds.items()}
        return model

    @staticmethod
    def _check_args(tasks, filters, stage) -> None:
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError(f"tasks must be a non-empty mapping name → output channels or head module, got {tasks!r}")
        for name, head in tasks.items():
            if not isinstance(name, str) or "." in name or not name:
                raise ValueError(f"task names must be non-empty strings without '.', got {name!r}")
            if not isinstance(head, nn.Module) and (not isinstance(head, int) or isinstance(head, bool) or head < 1):
                raise ValueError(f"task {name!r}: give output channels (int >= 1) or a head module, got {head!r}")
        if len(filters) != 5 or any(int(c) < 1 for c in filters):
            raise ValueError(f"filters must be five positive widths, got {tuple(filters)}")
        if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 4:
            raise ValueError(f"cross_task_stage must be a decoder step 0..4 (an int), got {stage!r}")

    def _build_shared(self, cin: int, f: List[int]) -> None:
        def block(c: int, n: int) -> nn.Module:
            return conv_bn(c, c) if n == 1 else nn.Sequential(*(conv_bn(c, c) for _ in range(n)))

        self.encoder_block = nn.ModuleList(conv_bn(cin if lv == 0 else f[lv - 1], f[lv]) for lv in range(5))
        self.decoder_block = nn.ModuleList(conv_bn(f[lv], f[max(lv - 1, 0)]) for lv in range(5))
        self.conv_block_enc = nn.ModuleList(block(f[lv], 1 if lv < 2 else 2) for lv in range(5))
        self.conv_block_dec = nn.ModuleList(block(f[max(lv - 1, 0)], 1 if lv < 2 else 2) for lv in range(5))

    def _init_weights(self) -> None:
        """Released init: Xavier-normal conv weights, zero biases; norms weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def decoder_channels(stage: int, filters: Sequence[int] = MTAN_FILTERS) -> int:
        """Channels of the task features after decoder step ``stage`` (the cross-task hook's C)."""
        return int(filters[max(4 - stage - 1, 0)])

    @property
    def size_multiple(self) -> int:
        return 2 ** self.levels

    def cross_task_shapes(self, image_size: Sequence[int]) -> List[tuple]:
        """The shapes ``[1, C, h, w]`` of the T task features the cross-task module sees for
        ``image_size`` (H, W) inputs (h = H / 2^(4 − stage))."""
        div = 2 ** (4 - self.cross_task_stage)
        c = self.decoder_channels(self.cross_task_stage, self.filters)
        return [(1, c, int(image_size[0]) // div, int(image_size[1]) // div)] * len(self.task_names)

    @torch.no_grad()
    def check_cross_task(self, image_size: Sequence[int]) -> None:
        """Run the cross-task module once on zero features of the shapes ``image_size`` inputs
        give (batch 1), so bad options (e.g. KEM's ``topk`` above the tasks' token count) raise
        ValueError here, before any training; nothing without a module."""
        if self.cross_task is None:
            return
        shapes = self.cross_task_shapes(image_size)
        p = next(self.cross_task.parameters(), None)
        feats = [torch.zeros(s, dtype=p.dtype if p is not None else torch.float32,
                             device=p.device if p is not None else None) for s in shapes]
        try:
            self.cross_task(feats)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(f"cross_task at decoder stage {self.cross_task_stage} (T = {len(shapes)} tasks of "
                             f"{shapes[0][2]}×{shapes[0][3]} = {shapes[0][2] * shapes[0][3]} tokens, C = "
                             f"{shapes[0][1]}): {exc}") from None


    def shared_parameters(self) -> List[nn.Parameter]:
        """Everything but the task attention masks and heads (the MTL methods' shared set),
        the cross-task module included."""
        own = {id(p) for ps in self.task_parameters() for p in ps}
        return [p for p in self.parameters() if id(p) not in own and p.requires_grad]

    def task_parameters(self) -> List[List[nn.Parameter]]:
        """Per task (in ``task_names`` order): its attention masks and head (trainable parameters;
        the conv biases a BatchNorm absorbs are frozen and left out)."""
        return [[p for p in (*self.encoder_att[t].parameters(), *self.decoder_att[t].parameters(),
                             *self.heads[t].parameters()) if p.requires_grad] for t in self.task_names]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"VMSANet takes [B, C, H, W] with H and W multiples of 32, got {tuple(x.shape)}")
        first, post, ups, decs = self._shared(x)
        feats = self._encoder_attention(first, post)
        feats = self._decoder_attention(feats, ups, decs)
        out = {t: self.heads[t](feat) for t, feat in zip(self.task_names, feats)}
        for t in self.residual_tasks:
            if out[t].shape != x.shape:
                raise ValueError(f"residual task {t!r}: its head gives {tuple(out[t].shape)}, the input is "
                                 f"{tuple(x.shape)}")
            out[t] = x - out[t]
        return out

    def _shared(self, x: torch.Tensor):
        first, post, indices = [], [], []
        for lv in range(5):
            h = self.encoder_block[lv](x)
            y = self.conv_block_enc[lv](h)
            if self.encoder_cacm is not None:
                y = self.encoder_cacm[lv](y)
            first.append(h)
            post.append(y)
            x, idx = F.max_pool2d(y, 2, 2, return_indices=True)
            indices.append(idx)
        ups, decs = [], []
        for j in range(5):
            lv = 4 - j
            up = F.max_unpool2d(x, indices[lv], 2, 2)
            y = self.conv_block_dec[lv](self.decoder_block[lv](up))
            if self.decoder_cacm is not None:
                y = self.decoder_cacm[j](y)
            ups.append(up)
            decs.append(y)
            x = y
        return first, post, ups, decs

    def _encoder_attention(self, first, post) -> List[torch.Tensor]:
        feats: List[torch.Tensor] = []
        for t in self.task_names:
            a = None
            for lv in range(5):
                mask_in = first[lv] if lv == 0 else torch.cat((first[lv], a), dim=1)
                a = F.max_pool2d(self.encoder_block_att[lv](self.encoder_att[t][lv](mask_in) * post[lv]), 2, 2)
            feats.append(a)
        return feats

    def _decoder_attention(self, feats, ups, decs) -> List[torch.Tensor]:
        for j in range(5):
            lv = 4 - j
            new = []
            for t, a in zip(self.task_names, feats):
                a = self.decoder_block_att[lv](F.interpolate(a, scale_factor=2, mode="bilinear", align_corners=True))
                new.append(self.decoder_att[t][lv](torch.cat((ups[j], a), dim=1)) * decs[j])
            feats = new
            if self.cross_task is not None and j == self.cross_task_stage:
                feats = list(self.cross_task(feats))
                if len(feats) != len(self.task_names):
                    raise ValueError(f"cross_task returned {len(feats)} features for {len(self.task_names)} tasks")
        return feats


def _cross_task_kind(cross_task, options) -> tuple:
    """(kind or None, options dict) of the ``cross_task`` argument; ValueError for bad ones."""
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"cross_task_options must be a mapping of keyword options, got {options!r}")
    options = dict(options or {})
    if isinstance(cross_task, nn.Module):
        if options:
            raise ValueError("cross_task_options configure a cross_task kind; a module is passed built")
        return None, options
    if cross_task in (None, False, "none"):
        if options:
            raise ValueError(f"cross_task_options {sorted(options)} given without a cross_task kind")
        return None, options
    if cross_task not in CROSS_TASK_KINDS:
        raise ValueError(f"cross_task must be None, a module or one of {CROSS_TASK_KINDS}, got {cross_task!r}")
    return cross_task, options


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
