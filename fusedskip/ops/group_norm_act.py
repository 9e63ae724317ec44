"""Fused GroupNorm + activation, optionally preceded by a gated additive skip.

``y = act(GroupNorm(h))`` with ``h = x`` or ``h = x + a ⊙ skip`` (the skip is fused: ``h`` is
never written to memory). Side by side here: the reference PyTorch path, the torch.library ops
that launch the Triton kernels (``fusedskip/kernels/group_norm_act.py``), the autograd Function,
the functional :func:`group_norm_act` and the modules :class:`GroupNormAct` and
:class:`InstanceNormAct2d`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from .. import backend
from .._checks import check_activation, check_per_channel
from ..activations import ACTIVATION_IDS, apply_activation_reference, resolve_activation
from ..conversion.interop import fx_leaf_call, refuse_script
from ..kernels import group_norm_act as kernels
from ..kernels.launch import acc_dtype, register_op
from ._autograd import create_graph_requested, differentiable_grads
from .gated_skip import GateArg, _gated_sum_acc, _skip_gate_tensor

ActArg = Union[str, None, nn.Module]


# --------------------------------------------------------------------------------------------
# Validation (before any launch; errors name the argument)
# --------------------------------------------------------------------------------------------
def _check_num_groups(num_groups, channels: int, name: str = "num_groups") -> None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"{name} must be an int, got {type(num_groups).__name__}")
    if num_groups <= 0:
        raise ValueError(f"{name} must be positive, got {num_groups}")
    if channels % num_groups != 0:
        raise ValueError(f"{name}={num_groups} must divide the number of channels {channels}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (float, int)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return float(eps)


def _check_group_sizes(x: torch.Tensor, num_groups: int) -> None:
    """torch's F.group_norm rules, in both backends: H·W > 0, and more than one value in
    N·(C/G)·H·W (a single value has no variance)."""
    n, c, h, w = x.shape
    if h * w == 0:
        raise ValueError(f"x must have H·W > 0 for group_norm_act (as F.group_norm), got input size {list(x.shape)}")
    if n * (c // num_groups) * h * w == 1:
        raise ValueError(f"Expected more than 1 value per group (N·C/G·H·W > 1, as F.group_norm), "
                         f"got input size {list(x.shape)} with num_groups={num_groups}")


def _check_affine(x: torch.Tensor, weight, bias) -> None:
    channels = x.shape[1]
    if weight is not None:
        check_per_channel("weight", weight, channels, x.device, allow_scalar=False)
    if bias is not None:
        check_per_channel("bias", bias, channels, x.device, allow_scalar=False)


# --------------------------------------------------------------------------------------------
# Reference path: plain PyTorch, differentiated by autograd.
# --------------------------------------------------------------------------------------------
def group_norm_act_reference(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5, act: ActArg = "relu", negative_slope: Optional[float] = None,
    skip: Optional[torch.Tensor] = None, gate: Optional[GateArg] = None,
) -> torch.Tensor:
    """``act(F.group_norm(x [+ gate ⊙ skip]))`` in PyTorch ops, computed in fp32 (fp64 for fp64
    inputs) and cast back to x's dtype. Same arguments as :func:`group_norm_act`."""
    name, slope = resolve_activation(act, negative_slope)
    acc = acc_dtype(x)
    h = _gated_sum_acc(x, skip, gate)
    if h.numel():
        # GroupNorm is invariant to a constant shift per (n, group): centring on the detached
        # group mean changes neither the output nor the gradients, and protects F.group_norm
        # (whose CPU kernel computes E[x²] − E[x]²) from cancellation when |mean| ≫ std.
        n, c = h.shape[:2]
        # Per-channel means, then per group (equal counts per channel): no view of h, whose
        # layout may be channels_last (a reshape there breaks under torch.compile's AOT tracing).
        shift = h.detach().mean(dim=(2, 3)).unflatten(1, (num_groups, c // num_groups)).mean(-1)
        h = h - shift.repeat_interleave(c // num_groups, dim=1)[:, :, None, None]
    z = F.group_norm(h, num_groups, None if weight is None else weight.to(acc),
                     None if bias is None else bias.to(acc), eps)
    return apply_activation_reference(z, name, slope).to(x.dtype)


# --------------------------------------------------------------------------------------------
# torch.library ops around the kernel launches, for torch.compile (``launch.register_op``: a
# triton_op that Inductor sees into on PyTorch >= 2.6, an opaque custom op otherwise; no graph
# breaks either way; fake implementations give shapes, dtypes and layouts). Eager calls launch
# the kernels directly from the autograd Function, outside the torch.library layer.
# --------------------------------------------------------------------------------------------
@register_op("group_norm_act_forward")
def group_norm_act_forward(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    num_groups: int, eps: float, act: str, negative_slope: float, launcher,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``; mean/rstd are [N, num_groups] in the accumulation dtype."""
    return kernels.group_norm_act_forward(x, weight, bias, skip, gate, num_groups, eps,
                                          ACTIVATION_IDS[act], negative_slope, launcher=launcher)


@group_norm_act_forward.register_fake
def _(x, weight, bias, skip, gate, num_groups, eps, act, negative_slope):
    stats = x.new_empty((x.shape[0], num_groups), dtype=acc_dtype(x))
    return torch.empty_like(x, memory_format=torch.preserve_format), stats, torch.empty_like(stats)


@register_op("group_norm_act_backward")
def group_norm_act_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    skip: Optional[torch.Tensor], gate: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    num_groups: int, act: str, negative_slope: float,
    need_dx: bool, need_dskip: bool, need_dgate: bool, need_dweight: bool, need_dbias: bool, launcher,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dskip, dgate, dweight, dbias)``; gradients not asked for are empty tensors."""
    grads = kernels.group_norm_act_backward(
        grad, x, weight, bias, skip, gate, mean, rstd, num_groups, ACTIVATION_IDS[act], negative_slope,
        need_dx, need_dskip, need_dgate, need_dweight, need_dbias, launcher=launcher)
    # Custom ops cannot return None: absent gradients come back as empty tensors.
    return tuple(gr if gr is not None else x.new_empty(0) for gr in grads)


@group_norm_act_backward.register_fake
def _(grad, x, weight, bias, skip, gate, mean, rstd, num_groups, act, negative_slope,
      need_dx, need_dskip, need_dgate, need_dweight, need_dbias):
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.preserve_format) if needed and t is not None else x.new_empty(0)

    has_skip = skip is not None
    return (like(x, need_dx), like(skip, need_dskip and has_skip), like(gate, need_dgate and has_skip),
            like(weight, need_dweight), like(bias, need_dbias))


class GroupNormActFunction(torch.autograd.Function):
    """Autograd Function of the fused op ``y = act(γ ⊙ x̂ + β)``, ``x̂ = GN-normalised h``,
    ``h = x (+ a ⊙ skip)``.

    Saves only x (and skip, gate), the parameters and fp32 (mean, rstd); the backward recomputes
    h, x̂, z and act'(z). Gradients (dz = dy·act'(z), g = γ·dz, means over each group):
    ``dh = rstd·(g − mean(g) − x̂·mean(g·x̂))``, ``dx = dh``, ``dskip = a·dh``,
    ``da = Σ dh·skip``, ``dγ = Σ dz·x̂``, ``dβ = Σ dz``.

    Inputs: ``x, weight, bias, skip, gate`` (tensors or None; ``gate`` in the accumulation
    dtype with 1 or C values), then ``num_groups, eps, act`` (a name of
    :data:`fusedskip.activations.ACTIVATION_IDS`) and ``negative_slope`` (float).
    Eager calls launch the kernels directly (cached launch plans); under torch.compile the
    torch.library ops run.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, skip, gate, num_groups: int, eps: float, act: str, negative_slope: float):
        if torch.compiler.is_compiling():
            y, mean, rstd = torch.ops.fusedskip.group_norm_act_forward(
                x, weight, bias, skip, gate, num_groups, eps, act, negative_slope)
        else:
            y, mean, rstd = kernels.group_norm_act_forward(
                x, weight, bias, skip, gate, num_groups, eps, ACTIVATION_IDS[act], negative_slope)
        ctx.save_for_backward(x, weight, bias, skip, gate, mean, rstd)
        ctx.num_groups = num_groups
        ctx.eps = eps
        ctx.act = act
        ctx.negative_slope = negative_slope
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, skip, gate, mean, rstd = ctx.saved_tensors
        if create_graph_requested():  # the kernels' gradients are not differentiable again
            grads = differentiable_grads(
                grad, (x, weight, bias, skip, gate), ctx.needs_input_grad[:5],
                lambda: group_norm_act_reference(x, ctx.num_groups, weight, bias, ctx.eps, ctx.act,
                                                 ctx.negative_slope, skip, gate))
            return grads + (None,) * 4
        need_dx, need_dw, need_db, need_dskip, need_dgate = ctx.needs_input_grad[:5]
        if torch.compiler.is_compiling():
            dx, dskip, dgate, dw, db = torch.ops.fusedskip.group_norm_act_backward(
                grad, x, weight, bias, skip, gate, mean, rstd, ctx.num_groups, ctx.act, ctx.negative_slope,
                need_dx, need_dskip, need_dgate, need_dw, need_db)
        else:
            dx, dskip, dgate, dw, db = kernels.group_norm_act_backward(
                grad, x, weight, bias, skip, gate, mean, rstd, ctx.num_groups, ACTIVATION_IDS[ctx.act],
                ctx.negative_slope, need_dx, need_dskip, need_dgate, need_dw, need_db)
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
                dskip if need_dskip else None, dgate if need_dgate else None, None, None, None, None)


# --------------------------------------------------------------------------------------------
# Functional
# --------------------------------------------------------------------------------------------
def group_norm_act(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5, act: ActArg = "relu", negative_slope: Optional[float] = None,
    skip: Optional[torch.Tensor] = None, gate: Optional[GateArg] = None,
) -> torch.Tensor:
    """Fused GroupNorm + activation, optionally with a gated skip added first:

        h = x + a ⊙ skip        (only when ``skip`` is given; never materialised)
        y = act(γ ⊙ (h − μ_{n,g}) · rstd_{n,g} + β),   rstd = 1 / sqrt(var_{n,g} + eps)

    with μ, var (biased) over each group of C/G channels × H × W of each sample, as
    ``nn.GroupNorm``. ``num_groups = C`` is InstanceNorm, ``num_groups = 1`` LayerNorm over C·H·W.

    Args:
        x: ``[N, C, H, W]`` float16 / bfloat16 / float32 / float64, any strides (NCHW and
            channels_last run without copies; y keeps x's layout). With ``skip``, x is ``up``.
        num_groups: G, a positive divisor of C.
        weight, bias: γ, β of shape ``(C,)`` or None; any float dtype (fp32 parameters with
            bf16/fp16 x, as under autocast, are fine).
        eps: added to the variance.
        act: ``"identity"``/None, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``,
            ``"gelu_tanh"``, or the matching torch module (``nn.ReLU()``, ``nn.GELU("tanh")``, ...).
        negative_slope: LeakyReLU's slope (default 0.01); ignored by other activations.
        skip: optional tensor of x's shape, device and dtype, added as ``a ⊙ skip`` before the norm.
        gate: ``a``: a float or a tensor of 1 or C values (default 1.0); only with ``skip``.

    Statistics and arithmetic are fp32 (fp64 for fp64 inputs); y has x's dtype.
    Gradients (dz = dy·act'(z), g = γ·dz, means over each group): ``∂L/∂h = rstd·(g − mean(g)
    − x̂·mean(g·x̂))``, ``∂L/∂x = ∂L/∂h``, ``∂L/∂skip = a·∂L/∂h``, ``∂L/∂a = Σ ∂L/∂h·skip``,
    ``∂L/∂γ = Σ dz·x̂``, ``∂L/∂β = Σ dz``; reductions are deterministic (no float atomics).

    Runs the Triton kernels or the reference path as :mod:`fusedskip.backend` decides.
    Raises ``TypeError``/``ValueError`` naming the argument before any launch, also for what
    F.group_norm rejects (H·W = 0, a single value per group). Under ``create_graph=True`` the
    backward is built from differentiable torch ops (exact second derivatives).
    """
    check_activation("x", x)
    name, slope = resolve_activation(act, negative_slope)
    _check_num_groups(num_groups, x.shape[1])
    _check_group_sizes(x, num_groups)
    eps = _check_eps(eps)
    _check_affine(x, weight, bias)
    a = _skip_gate_tensor(x, skip, gate)
    if backend.use_triton(x):
        return GroupNormActFunction.apply(x, weight, bias, skip, a, num_groups, eps, name, slope)
    return group_norm_act_reference(x, num_groups, weight, bias, eps, name, slope, skip, a)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class GroupNormAct(nn.Module):
    """``act(nn.GroupNorm(num_groups, num_channels, eps, affine)(x))`` in one fused op.

    Parameters ``weight`` (γ, ones) and ``bias`` (β, zeros) of shape ``(num_channels,)`` carry
    nn.GroupNorm's names, so state_dicts load either way. ``act`` is a name or a torch activation
    module (see :func:`group_norm_act`); ``negative_slope`` is LeakyReLU's.
    Input ``[N, C, H, W]``, output of the same shape, dtype and memory layout.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: ActArg = "relu", negative_slope: Optional[float] = None, device=None, dtype=None):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels <= 0:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        _check_num_groups(num_groups, num_channels)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = _check_eps(eps)
        self.affine = bool(affine)
        self.act, self.negative_slope = resolve_activation(act, negative_slope)
        if self.affine:
            factory = {"device": device, "dtype": dtype}
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, as nn.GroupNorm."""
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    @property
    def act_name(self) -> str:
        """The activation's name (BatchNormAct2d's attribute name for it)."""
        return self.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        traced = fx_leaf_call(self, x)
        if traced is not None:  # torch.fx tracing: one call_module node, like torch's own norms
            return traced
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != self.num_channels:
            raise ValueError(f"x must have {self.num_channels} channels for this {type(self).__name__}, "
                             f"got {x.shape[1]}")
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.act, self.negative_slope)

    def __prepare_scriptable__(self):
        refuse_script(self)  # raises: explicit, names the module and the way out (unconvert)

    def extra_repr(self) -> str:
        act = f"{self.act}({self.negative_slope})" if self.act == "leaky_relu" else self.act
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, act={act}"


class InstanceNormAct2d(GroupNormAct):
    """``act(nn.InstanceNorm2d(num_features, eps, affine=affine)(x))``: GroupNormAct with one
    group per channel, nn.InstanceNorm2d's arguments and parameter names (``weight``/``bias``
    when ``affine``). Instance statistics are used in training and eval alike; running
    statistics (``track_running_stats=True``) are not supported. ``momentum`` is accepted for
    signature compatibility and unused. Input must be 4-D ``[N, C, H, W]``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, track_running_stats: bool = False, act: ActArg = "relu",
                 negative_slope: Optional[float] = None, device=None, dtype=None):
        if track_running_stats:
            raise ValueError("InstanceNormAct2d does not support track_running_stats=True (running "
                             "statistics); use nn.InstanceNorm2d followed by the activation instead")
        super().__init__(num_features, num_features, eps, affine, act, negative_slope, device, dtype)
        self.num_features = num_features
        self.momentum = momentum

    def extra_repr(self) -> str:
        act = f"{self.act}({self.negative_slope})" if self.act == "leaky_relu" else self.act
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, act={act}"
