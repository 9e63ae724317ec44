"""Benchmark cases, declared once and used by both the pytest-benchmark suite and the runner.

A case names an op (or a whole model), the passes it is timed in, its shapes per size set, how
to make its inputs, how to build its fused module (timed as provider ``fusedskip`` on the Triton
backend and as ``reference`` on fusedskip's reference backend) and its eager PyTorch equivalent
(provider ``eager``; ``compile`` and ``compile-max-autotune`` are torch.compile of the eager
module). A case's ``requires`` check names what it needs beyond fusedskip itself (a
third-party library for the converted models); a case that cannot run is skipped with its
reason.

Providers
  fusedskip             the fused Triton kernels (``fusedskip.use_backend("triton")``); CUDA only
  reference             the same fusedskip module on its reference PyTorch path
  eager                 plain torch modules (e.g. ``nn.GroupNorm`` + ``nn.SiLU``)
  compile               ``torch.compile(eager, dynamic=False)``
  compile-max-autotune  ``torch.compile(eager, dynamic=False, options=max-autotune-no-cudagraphs
                        + max_autotune_conv_backends="ATEN")``: Inductor's max-autotune without its
                        CUDA graphs, whose static-input copies and output overwrites break timing
                        with rotated inputs and retained graphs; CUDA graphs are a separate timing
                        option applied to every provider alike (``--cuda-graphs``). Conv templates
                        are left out as performance.md §3 advises (pytorch/pytorch#173068).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

PROVIDERS = ("fusedskip", "reference", "eager", "compile", "compile-max-autotune")
COMPILE_PROVIDERS = ("compile", "compile-max-autotune")
FUSED_BACKENDS = {"fusedskip": "triton", "reference": "reference"}
SIZES = ("tiny", "cpu", "quick", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
OP_PASSES = ("fwd", "bwd", "full")
MODEL_PASSES = ("train", "infer")


class Unavailable(Exception):
    """A case or provider that cannot run here; the message is the stated reason."""


# --------------------------------------------------------------------------------------------
# Shapes: U-Net stages (batch 1–16, channels 32–512, spatial 32–256).
# --------------------------------------------------------------------------------------------
OP_SHAPES: Dict[str, List[Tuple[int, int, int, int]]] = {
    "tiny": [(1, 32, 8, 8)],                                   # the normal test run
    "cpu": [(1, 32, 32, 32), (2, 64, 64, 64)],                 # CPU reference timings
    # N·G ≪ #SMs at batch 1; ≥ 64 MB tensors (bandwidth targets); an L2-sized deep stage.
    "quick": [(1, 64, 256, 256), (16, 64, 256, 256), (16, 128, 128, 128), (16, 512, 32, 32)],
    "full": [(n, c, s, s) for n in (1, 4, 16)
             for c, s in ((32, 256), (64, 256), (128, 128), (256, 64), (512, 32))],
}
# (N, C_in, H, W, width)
MODEL_SHAPES: Dict[str, List[Tuple[int, int, int, int, int]]] = {
    "tiny": [(2, 3, 32, 32, 8)],     # batch 2: training BatchNorm needs > 1 value at 1x1
    "cpu": [(2, 3, 64, 64, 16)],
    "quick": [(16, 3, 256, 256, 64)],
    "full": [(1, 3, 256, 256, 64), (4, 3, 256, 256, 64), (16, 3, 256, 256, 64)],
}


def shape_label(shape: Sequence[int]) -> str:
    if len(shape) == 5:
        return "x".join(map(str, shape[:4])) + f"/w{shape[4]}"
    return "x".join(map(str, shape))


@dataclass
class Impl:
    """A built provider: ``fn(*inputs)`` runs it; gradients are taken w.r.t. the inputs that
    require grad and ``params``; ``module`` gets ``.train()``/``.eval()`` per pass."""
    fn: Callable[..., Any]
    params: List[torch.Tensor]
    module: Optional[nn.Module] = None
    backend: Optional[str] = None
    note: str = ""


@dataclass
class Case:
    name: str
    kind: str                                   # "op" or "model"
    title: str
    passes: Tuple[str, ...]
    requires: Callable[[], None]                # raises Unavailable(reason) when the case cannot run
    inputs: Callable[..., Tuple[torch.Tensor, ...]]  # (shape, dtype, layout, device, grad)
    build_fused: Optional[Callable[..., Impl]]  # (shape, dtype, layout, device) -> Impl
    build_eager: Optional[Callable[..., Impl]]
    byte_model: Optional[str] = None
    providers: Tuple[str, ...] = PROVIDERS
    shapes: Dict[str, list] = field(default_factory=lambda: OP_SHAPES)
    conv_kernel: int = 0                        # >0: byte-model dims carry c_out and k
    rotate_inputs: bool = True                  # models: activations ≫ L2 anyway, one input set
    note: str = ""

    def dims(self, shape: Sequence[int]) -> Dict[str, int]:
        n, c, h, w = shape[:4]
        d = {"n": n, "c": c, "h": h, "w": w}
        if self.conv_kernel:
            d.update(c_out=c, k=self.conv_kernel)
        return d

    def check(self) -> None:
        self.requires()

    def available(self) -> Optional[str]:
        """None when the case can run, else the reason it is skipped."""
        try:
            self.requires()
        except Unavailable as exc:
            return str(exc)
        return None


CASES: Dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.name in CASES:
        raise ValueError(f"duplicate benchmark case {case.name!r}")
    CASES[case.name] = case
    return case


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def import_attr(module: str, attr: Optional[str] = None) -> Any:
    """Import ``module`` (and ``attr``), turning any failure into Unavailable with its reason."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"ImportError: {exc}") from None
    except Exception as exc:  # a half-written module must not stop the other cases
        raise Unavailable(f"importing {module} failed: {type(exc).__name__}: {exc}") from None
    if attr is None:
        return mod
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise Unavailable(f"ImportError: cannot import name {attr!r} from {module!r}") from None


def always() -> None:
    """``requires`` of the op cases: fusedskip's ops are part of the package."""


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def activation(shape, dtype, layout, device, grad: bool) -> torch.Tensor:
    n, c, h, w = shape[:4]
    x = to_layout(torch.randn((n, c, h, w), device=device, dtype=dtype), layout)
    return x.requires_grad_(grad)


def one_input(shape, dtype, layout, device, grad):
    return (activation(shape, dtype, layout, device, grad),)


def two_inputs(shape, dtype, layout, device, grad):
    return (activation(shape, dtype, layout, device, grad), activation(shape, dtype, layout, device, grad))


def model_input(shape, dtype, layout, device, grad):
    return (activation(shape, dtype, layout, device, False),)


def place(module: nn.Module, dtype, layout, device) -> nn.Module:
    module = module.to(device=device, dtype=dtype)
    if layout == "channels_last":
        module = module.to(memory_format=torch.channels_last)
    return module


def module_impl(module: nn.Module, dtype, layout, device, note: str = "") -> Impl:
    module = place(module, dtype, layout, device)
    return Impl(module, [p for p in module.parameters() if p.requires_grad], module, note=note)


def softplus_inverse(a: float) -> float:
    return a + float(torch.log(-torch.expm1(torch.tensor(-a, dtype=torch.float64))))


# --------------------------------------------------------------------------------------------
# Eager equivalents: plain torch modules, the way a user writes these blocks today.
# --------------------------------------------------------------------------------------------
class EagerGatedSkip(nn.Module):
    """``up + softplus(β)·skip`` with one scalar β (GatedSkip's default gate)."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.full((1,), softplus_inverse(1.0)))

    def forward(self, up, skip):
        return up + F.softplus(self.beta) * skip


class EagerSkipNormAct(nn.Module):
    """``act(norm(up + softplus(β)·skip))`` from nn modules."""

    def __init__(self, norm: nn.Module, act: nn.Module):
        super().__init__()
        self.beta = nn.Parameter(torch.full((1,), softplus_inverse(1.0)))
        self.norm, self.act = norm, act

    def forward(self, up, skip):
        return self.act(self.norm(up + F.softplus(self.beta) * skip))


# Fused counterpart of the chain-A functional batch_norm_act(skip=, gate=), holding the same
# parameters as the eager module (SkipNormAct(norm='batch') composes GatedSkip and BatchNormAct2d
# instead of calling the fused skip path).
class FusedSkipBatchNormAct(nn.Module):
    def __init__(self, channels: int, act: str = "relu", eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        from fusedskip import batch_norm_act
        self.fn = batch_norm_act
        self.act, self.eps, self.momentum = act, eps, momentum
        self.beta = nn.Parameter(torch.full((1,), softplus_inverse(1.0)))
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, up, skip):
        return self.fn(up, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                       self.momentum, self.eps, self.act, 0.0, skip=skip, gate=F.softplus(self.beta))


# --------------------------------------------------------------------------------------------
# Op cases
# --------------------------------------------------------------------------------------------
def _gated_skip_fused(shape, dtype, layout, device):
    from fusedskip import GatedSkip
    return module_impl(GatedSkip(shape[1]), dtype, layout, device)


register(Case(
    "gated_skip", "op", "gated additive skip out = up + a·skip (GatedSkip, scalar softplus gate)",
    OP_PASSES, always, two_inputs,
    _gated_skip_fused, lambda s, d, lay, dev: module_impl(EagerGatedSkip(), d, lay, dev),
    byte_model="gated_skip"))


def _gn_act_fused(shape, dtype, layout, device):
    from fusedskip import GroupNormAct
    return module_impl(GroupNormAct(32, shape[1], eps=1e-5, affine=True, act="silu"), dtype, layout, device)


register(Case(
    "gn_silu", "op", "GroupNorm(32) + SiLU (GroupNormAct)", OP_PASSES,
    always, one_input, _gn_act_fused,
    lambda s, d, lay, dev: module_impl(nn.Sequential(nn.GroupNorm(32, s[1], eps=1e-5), nn.SiLU()), d, lay, dev),
    byte_model="group_norm_act"))


def _bn_act_fused(shape, dtype, layout, device):
    from fusedskip import BatchNormAct2d
    module = BatchNormAct2d(shape[1], eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, act="relu")
    return module_impl(module, dtype, layout, device)


def _bn_act_eager(shape, dtype, layout, device):
    module = nn.Sequential(nn.BatchNorm2d(shape[1], eps=1e-5, momentum=0.1), nn.ReLU())
    return module_impl(module, dtype, layout, device)


register(Case(
    "bn_relu", "op", "BatchNorm2d (training, batch statistics) + ReLU (BatchNormAct2d)", OP_PASSES,
    always, one_input, _bn_act_fused, _bn_act_eager,
    byte_model="batch_norm_act"))

register(Case(
    "bn_relu_eval", "op", "BatchNorm2d (eval, running statistics) + ReLU (BatchNormAct2d)", ("infer",),
    always, one_input, _bn_act_fused, _bn_act_eager,
    byte_model="batch_norm_act_eval"))

def _skip_norm_act_fused(shape, dtype, layout, device):
    from fusedskip import SkipNormAct
    return module_impl(SkipNormAct(shape[1], norm="group", num_groups=32, act="silu"), dtype, layout, device)


register(Case(
    "skip_gn_silu", "op", "skip -> GroupNorm(32) -> SiLU: act(GN(up + a·skip)) (SkipNormAct, scalar softplus gate)",
    OP_PASSES, always, two_inputs, _skip_norm_act_fused,
    lambda s, d, lay, dev: module_impl(EagerSkipNormAct(nn.GroupNorm(32, s[1], eps=1e-5), nn.SiLU()), d, lay, dev),
    byte_model="skip_group_norm_act"))

register(Case(
    "skip_bn_relu", "op", "skip → BatchNorm2d → ReLU: act(BN(up + a·skip)) (batch_norm_act(skip=, gate=))",
    OP_PASSES, always, two_inputs,
    lambda s, d, lay, dev: module_impl(FusedSkipBatchNormAct(s[1]), d, lay, dev),
    lambda s, d, lay, dev: module_impl(EagerSkipNormAct(nn.BatchNorm2d(s[1], eps=1e-5), nn.ReLU()), d, lay, dev),
    byte_model="skip_batch_norm_act"))


class ResidualNormAct(nn.Module):
    """``act(norm(x) + residual)``: eager (norm, add, act modules) or fused (the norm module takes
    ``residual=``)."""

    def __init__(self, norm: nn.Module, act: Optional[nn.Module] = None):
        super().__init__()
        self.norm, self.act = norm, act

    def forward(self, x, residual):
        if self.act is None:
            return self.norm(x, residual=residual)
        return self.act(self.norm(x) + residual)


class ScaleShiftNormAct(nn.Module):
    """``act(norm(x)·(1 + scale) + shift)`` with per-(n, c) scale/shift (diffusers' scale_shift)."""

    def __init__(self, norm: nn.Module, n: int, c: int, act: Optional[nn.Module] = None):
        super().__init__()
        self.norm, self.act = norm, act
        self.scale = nn.Parameter(0.1 * torch.randn(n, c, 1, 1))
        self.shift = nn.Parameter(0.1 * torch.randn(n, c, 1, 1))

    def forward(self, x):
        if self.act is None:
            return self.norm(x, scale=self.scale, shift=self.shift)
        return self.act(self.norm(x) * (1 + self.scale) + self.shift)


def _bn_residual(fused: bool):
    def impl(shape, dtype, layout, device):
        from fusedskip import BatchNormAct2d
        c = shape[1]
        module = (ResidualNormAct(BatchNormAct2d(c, act="relu")) if fused else
                  ResidualNormAct(nn.BatchNorm2d(c), nn.ReLU()))
        return module_impl(module, dtype, layout, device)
    return impl


def _gn_scale_shift(fused: bool):
    def impl(shape, dtype, layout, device):
        from fusedskip import GroupNormAct
        n, c = shape[0], shape[1]
        module = (ScaleShiftNormAct(GroupNormAct(32, c, act="silu"), n, c) if fused else
                  ScaleShiftNormAct(nn.GroupNorm(32, c), n, c, nn.SiLU()))
        return module_impl(module, dtype, layout, device)
    return impl


register(Case(
    "bn_residual_relu", "op", "BatchNorm2d (training) + residual add + ReLU: relu(BN(x) + r) "
    "(BatchNormAct2d residual=)",
    OP_PASSES, always, two_inputs, _bn_residual(True), _bn_residual(False),
    byte_model="batch_norm_residual_act"))

register(Case(
    "gn_scale_shift_silu", "op", "GroupNorm(32) → ·(1 + scale) + shift → SiLU, per-(n, c) scale/shift "
    "(GroupNormAct scale=, shift=)", OP_PASSES, always, one_input, _gn_scale_shift(True), _gn_scale_shift(False),
    byte_model="group_norm_scale_shift_act"))


def _conv_norm_act(norm: str, act: str):
    def fused(shape, dtype, layout, device):
        from fusedskip import ConvNormAct
        module = ConvNormAct(shape[1], shape[1], kernel_size=3, norm=norm, act=act, num_groups=32, bias=False,
                             padding=1)
        return module_impl(module, dtype, layout, device)

    def eager(shape, dtype, layout, device):
        c = shape[1]
        norm_mod = nn.BatchNorm2d(c, eps=1e-5) if norm == "batch" else nn.GroupNorm(32, c, eps=1e-5)
        act_mod = nn.ReLU() if act == "relu" else nn.SiLU()
        return module_impl(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), norm_mod, act_mod),
                           dtype, layout, device)
    return fused, eager


for _name, _norm, _act, _title in (("conv_bn_relu", "batch", "relu", "BatchNorm2d (training) + ReLU"),
                                   ("conv_gn_silu", "group", "silu", "GroupNorm(32) + SiLU")):
    _f, _e = _conv_norm_act(_norm, _act)
    register(Case(
        _name, "op", f"ConvNormAct: conv3×3 C→C (no bias) → {_title}", OP_PASSES,
        always, one_input, _f, _e,
        byte_model="conv_norm_act", conv_kernel=3))

# Model cases register themselves on import.
from . import models  # noqa: E402,F401
