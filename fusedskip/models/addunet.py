"""AddUNet, the Additive U-Net of "Multi-Task Learning with Additive U-Net for Image Denoising and
Classification" (arXiv 2602.12649), its hierarchical variant and a concatenative baseline.

Paper form (``variant="paper"``; constant width and resolution)::

    x_1     = stem(noisy)
    r_i     = Enc_i(x_i),  x_{i+1} = x_i − r_i                 i = 1..L  (subtractive encoder)
    u_0     = x_{L+1}
    u_{j+1} = Dec_j(u_j + softplus(β_j) · r_{L−j})              j = 0..L−1 (gated additive skips)
    denoised = head_1x1(u_L)            (or noisy − head_1x1(u_L) with residual=True)
    logits   = classifier(GAP(x_{L+1}))  (deepest encoder state; absent when num_classes=0)

Hierarchical form (``variant="hierarchical"``; classic U-Net shape): level i runs Enc_i at
1/2^(i−1) resolution and width w_i = min(width·mult^(i−1), max_width), skips r_i = Enc_i(·), a
down-sampling between levels, a middle block at the deepest resolution (the classifier's input),
and decoder stages ``u ← Dec(fuse(Up(u), r_i))`` where Up up-samples ×2 and projects the width
with a 1×1 conv where widths differ.

``fusion`` picks the skip: ``"gated"`` (GatedSkip, the paper's), ``"gated_norm_act"``
(SkipNormAct: act(norm(up + a·skip)) before the decoder block) or ``"concat"`` (the
concatenative baseline, :class:`ConcatUNet`, same depth and width; its decoder blocks take 2×
the channels). Everything else is identical, so comparisons isolate the skip.

Blocks are ConvNormAct modules, so the fused Triton kernels run inside the model on a GPU and
the reference PyTorch path elsewhere, with the same parameters and state_dict either way.

The model returns ``(denoised, logits)``; ``logits`` is ``None`` when ``num_classes == 0``.
Skips are numbered from the shallowest (1, fed by Enc_1) to the deepest (L):
:meth:`AddUNet.gates` lists their gate values in that order.

Cross-task exchange (``cross_task``, off by default): a
:class:`~fusedskip.mtl.kem.CrossTaskFusion` (``"kem"``, ``"stable_kem"`` or
``"cross_attention"``, with ``cross_task_options``) between the two branches where they first
have features of their own at the bottleneck's width. The two task features are

* denoising: ``u_1``, the output of the first (deepest) decoder step (paper form: full
  resolution; hierarchical: the resolution of the deepest skip r_L, 1/2^(L−1)), and
* classification: the deepest state ``x_{L+1}`` the classifier pools (paper form: full
  resolution; hierarchical: 1/2^L, after the middle block),

both with the deepest width ``w_L`` (token counts may differ: KEM and the dense baseline take
tasks of different sizes). The module returns both updated (residually): the decoder continues
from the new ``u_1``, the classifier pools the new deep state. It needs a classifier
(``num_classes >= 2``). Its parameters mix the two tasks, so they are *shared* parameters
(:meth:`AddUNet.shared_parameters`); it is built after everything else, so with a given seed the
rest of the model starts from the same weights with or without it. Cost: KEM O(K · tokens ·
w_L); ``"cross_attention"`` O(tokens² · w_L), and the paper form keeps full resolution, so the
dense baseline holds a (2·H·W)² attention matrix per image.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from ..mtl.kem import CROSS_TASK_KINDS, build_cross_task
from .blocks import ConvBlock, Upsample, conv_norm_act, gated_skip_of, make_down, make_fuse, normalise_norm, per_level
from .dncnn import DnCNN

VARIANTS = ("paper", "hierarchical")
FUSIONS = ("gated", "gated_norm_act", "concat")


class AddUNet(nn.Module):
    """Additive U-Net for joint denoising and classification.

    Args:
        in_channels: image channels (1 gray, 3 colour).
        out_channels: output channels (default ``in_channels``).
        width: feature width C (paper form: every level; hierarchical: level 1).
        depth: number of encoder blocks / skips L.
        num_classes: classes of the classification head; 0 = single-task denoising.
        variant: ``"paper"`` (constant width and resolution) or ``"hierarchical"``.
        fusion: ``"gated"``, ``"gated_norm_act"`` or ``"concat"``.
        kernel_size: one odd int, or one per level (decoder blocks mirror the encoder's).
        convs_per_block: ConvNormAct layers per encoder/decoder block (2: conv-BN-ReLU ×2).
        norm: ``"batch"``, ``"group"``, ``"instance"`` or ``None``; ``num_groups`` for group norm
            (reduced to a divisor of the width when needed).
        act, negative_slope: activation of every block (names of :mod:`fusedskip.activations`).
        last_act: whether each block ends with the activation (False: ...-conv-BN).
        stem_act: activation after the stem conv (``None`` for a linear stem).
        encoder_update: ``"subtract"`` (x_{i+1} = x_i − r_i, paper form default) or ``"plain"``
            (x_{i+1} = r_i; the only choice for the hierarchical form).
        gate, gate_init: GatedSkip's gate kind (``"softplus"`` scalar per skip by default,
            ``"softplus_channel"``, ``"sigmoid_channel"`` or a fixed float) and initial value.
        residual: predict the noise and return ``noisy − prediction``.
        classifier_hidden: hidden width of the classifier MLP (0: GAP + linear).
        classifier_dropout: dropout before the classifier's last linear layer.
        width_mult, max_width, down, up, mid_block: hierarchical form only.
        fusion_norm: the norm of ``fusion="gated_norm_act"`` (``"group"``, ``"batch"`` or
            ``"instance"``; default: ``norm``, or group norm when ``norm`` is None).
        cross_task: ``None`` / ``"none"`` (default) or a CrossTaskFusion kind between the
            denoising and classification branches (module docstring); needs ``num_classes >= 2``.
        cross_task_options: keyword options of that kind's module (e.g. ``{"topk": 16}``).
    """

    def __init__(self, in_channels: int = 1, out_channels: Optional[int] = None, width: int = 32,
                 depth: int = 4, num_classes: int = 0, variant: str = "paper", fusion: str = "gated",
                 kernel_size: Union[int, Sequence[int]] = 3, convs_per_block: int = 2,
                 norm: Optional[str] = "batch", num_groups: int = 32, act: Optional[str] = "relu",
                 negative_slope: Optional[float] = None, last_act: bool = True,
                 stem_act: Optional[str] = "relu", encoder_update: Optional[str] = None,
                 gate: Union[str, float] = "softplus", gate_init: Optional[float] = None,
                 residual: bool = False, classifier_hidden: int = 0, classifier_dropout: float = 0.0,
                 width_mult: int = 2, max_width: Optional[int] = None, down: str = "maxpool",
                 up: str = "bilinear", mid_block: bool = True, fusion_norm: Optional[str] = None,
                 cross_task: Optional[str] = None, cross_task_options: Optional[Dict[str, Any]] = None):
        super().__init__()
        cross_task, cross_task_options = _check_cross_task(cross_task, cross_task_options, num_classes)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        for name, value in (("in_channels", in_channels), ("width", width), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 0 or num_classes == 1:
            raise ValueError(f"num_classes must be 0 (denoising only) or >= 2, got {num_classes!r}")
        out_channels = in_channels if out_channels is None else out_channels
        if residual and out_channels != in_channels:
            raise ValueError("residual=True needs out_channels == in_channels")
        if encoder_update is None:
            encoder_update = "subtract" if variant == "paper" else "plain"
        if encoder_update not in ("subtract", "plain"):
            raise ValueError(f"encoder_update must be 'subtract' or 'plain', got {encoder_update!r}")
        if variant == "hierarchical" and encoder_update != "plain":
            raise ValueError("the hierarchical variant changes width between levels: encoder_update must be 'plain'")
        norm = normalise_norm(norm)
        kernels = per_level(kernel_size, depth, "kernel_size")

        self.variant, self.fusion, self.depth = variant, fusion, depth
        self.in_channels, self.out_channels, self.num_classes = in_channels, out_channels, num_classes
        self.residual, self.encoder_update = residual, encoder_update
        if variant == "paper":
            widths = [width] * depth
        else:
            widths = [width * width_mult ** i for i in range(depth)]
            if max_width is not None:
                widths = [min(w, max_width) for w in widths]
        self.widths = widths
        block = dict(n=convs_per_block, norm=norm, num_groups=num_groups, act=act,
                     negative_slope=negative_slope, last_act=last_act)
        unit = dict(norm=norm, num_groups=num_groups, act=act, negative_slope=negative_slope)

        self.stem = conv_norm_act(in_channels, widths[0], kernels[0], norm=None, act=stem_act,
                                  negative_slope=negative_slope)
        self.encoders = nn.ModuleList()
        for i in range(depth):
            w_in = widths[max(i - 1, 0)]
            self.encoders.append(ConvBlock(w_in, widths[i], kernel_size=kernels[i], **block))
        if variant == "hierarchical":
            self.downs = nn.ModuleList(make_down(down, widths[i], **unit) for i in range(depth))
            self.mid = ConvBlock(widths[-1], widths[-1], kernel_size=kernels[-1], **block) if mid_block else None
            self.ups = nn.ModuleList(Upsample(widths[min(k + 1, depth - 1)], widths[k], up)
                                     for k in reversed(range(depth)))
        else:
            self.downs, self.mid, self.ups = None, None, None
        # fuses[j] / decoders[j] serve decoder step j, which takes skip r_{L−j} (level k = L−1−j).
        self.fuses = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for j in range(depth):
            k = depth - 1 - j
            w = widths[k]
            fuse_unit = dict(unit, norm=normalise_norm(fusion_norm) if fusion_norm is not None else norm)
            self.fuses.append(make_fuse(fusion, w, gate, gate_init, **fuse_unit))
            self.decoders.append(ConvBlock(2 * w if fusion == "concat" else w, w, kernel_size=kernels[k], **block))
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        deep = widths[-1]
        if num_classes:
            layers: List[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            if classifier_hidden:
                layers += [nn.Linear(deep, classifier_hidden), nn.ReLU()]
            if classifier_dropout:
                layers.append(nn.Dropout(classifier_dropout))
            layers.append(nn.Linear(classifier_hidden or deep, num_classes))
            self.classifier = nn.Sequential(*layers)
        else:
            self.classifier = None
        # built last: the model above draws the same initial weights with or without it
        self.cross_task = None if cross_task is None else build_cross_task(cross_task, widths[-1], cross_task_options)
        # JSON-able constructor arguments: rebuild with build_model(model.config).
        frame = inspect.currentframe()
        args = {name: frame.f_locals[name] for name in inspect.signature(AddUNet.__init__).parameters if name != "self"}
        args.update(out_channels=out_channels, encoder_update=encoder_update, norm=norm, kernel_size=kernels,
                    fusion_norm=normalise_norm(fusion_norm) if fusion_norm is not None else None)
        if cross_task is None:  # off: the config is what it was before the option existed
            del args["cross_task"], args["cross_task_options"]
        else:
            args.update(cross_task=cross_task, cross_task_options=cross_task_options)
        self.config: Dict[str, Any] = {"name": "addunet", **_jsonable(args)}

    # ------------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (1 for the paper form)."""
        return 2 ** self.depth if self.variant == "hierarchical" else 1

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"input must be a 4-D tensor [N, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels but the model expects {self.in_channels}")
        m = self.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"the hierarchical model of depth {self.depth} needs H and W divisible by {m}, "
                             f"got {tuple(x.shape[-2:])} (pad the input, e.g. with fusedskip.models.pad_to_multiple)")

    def encode(self, noisy: torch.Tensor):
        """Run the shared encoder: returns (skips r_1..r_L, deepest state)."""
        self._check_input(noisy)
        x = self.stem(noisy)
        skips = []
        for i, enc in enumerate(self.encoders):
            r = enc(x)
            skips.append(r)
            if self.variant == "hierarchical":
                x = self.downs[i](r)
            else:
                x = x - r if self.encoder_update == "subtract" else r
        if self.mid is not None:
            x = self.mid(x)
        return skips, x

    def decoder_step(self, j: int, u: torch.Tensor, skips: List[torch.Tensor]) -> torch.Tensor:
        """Decoder step j (0 = deepest): up-sample (hierarchical), fuse skip r_{L−j}, decode."""
        skip = skips[self.depth - 1 - j]
        if self.ups is not None:
            u = self.ups[j](u, skip.shape[-2:])
        return self.decoders[j](self.fuses[j](u, skip))

    def decode(self, skips: List[torch.Tensor], deep: torch.Tensor) -> torch.Tensor:
        """The denoising branch without cross-task exchange: head(decoder steps 0..L−1)."""
        u = deep
        for j in range(self.depth):
            u = self.decoder_step(j, u, skips)
        return self.head(u)

    def forward(self, noisy: torch.Tensor):
        skips, deep = self.encode(noisy)
        if self.cross_task is None:
            out = self.decode(skips, deep)
        else:  # module docstring: exchange between u_1 (denoising) and the deep state (classification)
            u = self.decoder_step(0, deep, skips)
            u, deep = self.cross_task([u, deep])
            for j in range(1, self.depth):
                u = self.decoder_step(j, u, skips)
            out = self.head(u)
        if self.residual:
            out = noisy - out
        logits = self.classifier(deep) if self.classifier is not None else None
        return out, logits

    def cross_task_shapes(self, image_size: Sequence[int]) -> List[tuple]:
        """Shapes ``[1, w_L, h, w]`` of the (denoising, classification) features the cross-task
        module sees for ``image_size`` (H, W) inputs."""
        h, w = int(image_size[0]), int(image_size[1])
        if self.variant == "paper":
            return [(1, self.widths[-1], h, w)] * 2
        d = 2 ** (self.depth - 1)
        return [(1, self.widths[-1], h // d, w // d), (1, self.widths[-1], h // (2 * d), w // (2 * d))]

    @torch.no_grad()
    def check_cross_task(self, image_size: Sequence[int]) -> None:
        """Run the cross-task module once on zero features of the shapes ``image_size`` inputs
        give (batch 1), so bad options (e.g. KEM's ``topk`` above the token count) raise
        ValueError before any training; nothing without a module."""
        if self.cross_task is None:
            return
        p = next(self.cross_task.parameters())
        shapes = self.cross_task_shapes(image_size)
        try:
            self.cross_task([torch.zeros(s, dtype=p.dtype, device=p.device) for s in shapes])
        except (ValueError, TypeError, RuntimeError) as exc:
            tokens = " + ".join(str(s[2] * s[3]) for s in shapes)
            raise ValueError(f"cross_task on {image_size[0]}×{image_size[1]} images (denoising + classification "
                             f"tokens {tokens}, C = {shapes[0][1]}): {exc}") from None

    # ------------------------------------------------------------------------------------------
    def gate_modules(self) -> List[Optional[nn.Module]]:
        """GatedSkip of each skip, shallowest (skip 1) first; None entries for concat skips."""
        return [gated_skip_of(self.fuses[self.depth - 1 - k]) for k in range(self.depth)]

    @torch.no_grad()
    def gates(self, learned: bool = False) -> List[Union[float, List[float], None]]:
        """Gate value of each skip, shallowest first: a float for scalar gates, a list for
        per-channel gates, None for concatenative skips. ``learned=True`` ignores overrides."""
        values: List[Union[float, List[float], None]] = []
        for g in self.gate_modules():
            if g is None:
                values.append(None)
                continue
            a = g.learned_gate() if learned else g.gate()
            if isinstance(a, torch.Tensor):
                a = a.detach().float().cpu().tolist()
                a = a[0] if len(a) == 1 else a
            values.append(float(a) if isinstance(a, (int, float)) else a)
        return values

    @contextlib.contextmanager
    def override_gates(self, value: Union[None, float, Sequence[Optional[float]]] = None,
                       scale: Union[None, float, Sequence[Optional[float]]] = None) -> Iterator[None]:
        """Inference-time gate override (eval mode only): replace (``value``) or scale (``scale``)
        the gates. A float applies to every skip; a sequence gives one entry per skip, shallowest
        first, ``None`` leaving that skip alone. E.g. ``override_gates(value=[0, None, None])``
        removes the shallowest skip of a depth-3 model."""
        if (value is None) == (scale is None):
            raise ValueError("override_gates takes exactly one of value= or scale=")
        given = value if value is not None else scale
        per_skip = list(given) if isinstance(given, (list, tuple)) else [given] * self.depth
        if len(per_skip) != self.depth:
            raise ValueError(f"override_gates needs one entry per skip ({self.depth}), got {len(per_skip)}")
        modules = self.gate_modules()
        with contextlib.ExitStack() as stack:
            for g, v in zip(modules, per_skip):
                if v is None:
                    continue
                if g is None:
                    raise ValueError("this model's skips are not gated (fusion='concat'): nothing to override")
                kw = {"value": float(v)} if value is not None else {"scale": float(v)}
                stack.enter_context(g.override_gate(**kw))
            yield

    # ------------------------------------------------------------------------------------------
    def shared_modules(self) -> List[nn.Module]:
        mods: List[nn.Module] = [self.stem, self.encoders]
        if self.downs is not None:
            mods.append(self.downs)
        if self.mid is not None:
            mods.append(self.mid)
        if self.cross_task is not None:
            mods.append(self.cross_task)
        return mods

    def shared_parameters(self) -> List[nn.Parameter]:
        """What both tasks use: stem, encoder blocks (and down-sampling, middle block) and the
        cross-task module when there is one."""
        return [p for m in self.shared_modules() for p in m.parameters()]

    def task_parameters(self) -> Dict[str, List[nn.Parameter]]:
        """Task-specific parameters: ``denoise`` (skip gates, decoder, up-sampling, head) and,
        with a classifier, ``classify``."""
        shared = {id(p) for p in self.shared_parameters()}
        classify = [] if self.classifier is None else list(self.classifier.parameters())
        cls_ids = {id(p) for p in classify}
        denoise = [p for p in self.parameters() if id(p) not in shared and id(p) not in cls_ids]
        out = {"denoise": denoise}
        if self.classifier is not None:
            out["classify"] = classify
        return out

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, fusion={self.fusion}, depth={self.depth}, widths={self.widths}, "
                f"num_classes={self.num_classes}, residual={self.residual}")


class ConcatUNet(AddUNet):
    """The concatenative U-Net baseline: AddUNet with ``fusion="concat"`` (same depth, width,
    blocks, encoder and heads; decoder blocks take ``cat([u, r])``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("fusion", "concat")
        if kwargs["fusion"] != "concat":
            raise ValueError("ConcatUNet is the fusion='concat' model; use AddUNet for gated skips")
        super().__init__(*args, **kwargs)
        self.config["name"] = "concat-unet"


MODELS = {"addunet": AddUNet, "concat-unet": ConcatUNet, "dncnn": DnCNN}  # DnCNN: a baseline (models/dncnn.py)


def build_model(config: Dict[str, Any]) -> AddUNet:
    """Build a model from its ``.config`` dict (as stored in checkpoints)."""
    config = dict(config)
    name = config.pop("name", "addunet")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    allowed = set(inspect.signature(AddUNet.__init__).parameters) - {"self"}
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}")
    if name == "concat-unet":
        config.pop("fusion", None)
    if config.get("cross_task") in (None, "none") and not config.get("cross_task_options"):
        config.pop("cross_task", None)  # off: every model accepts its absence
        config.pop("cross_task_options", None)
    return MODELS[name](**config)


def _check_cross_task(kind, options, num_classes: int):
    """(kind or None, options dict) of AddUNet's cross-task arguments; ValueError for bad ones."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"cross_task_options must be a dict of keyword options, got {options!r}")
    kind = None if kind in (None, False, "none") else kind
    if kind is None:
        if options:
            raise ValueError(f"cross_task_options {sorted(options)} given without a cross_task kind")
        return None, None
    if kind not in CROSS_TASK_KINDS:
        raise ValueError(f"cross_task must be None or one of {CROSS_TASK_KINDS}, got {kind!r}")
    if num_classes < 2:
        raise ValueError(f"cross_task={kind!r} exchanges features between the denoising and classification "
                         "branches: it needs a classifier (num_classes >= 2, joint training)")
    return kind, dict(options or {})


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect"):
    """Pad H and W up to multiples of ``multiple``; returns (padded, (h, w)) to crop back."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    return nn.functional.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"model option {value!r} is not JSON-able (pass names, not modules)")
