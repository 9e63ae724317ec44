"""Fused GroupNorm + activation, optionally preceded by a gated additive skip and followed by a
per-(sample, channel) scale and shift and a residual add.

``y = act(GroupNorm(h)·(1 + scale) + shift + residual)`` with ``h = x`` or ``h = x + a ⊙ skip``
(the skip is fused: ``h`` is never written to memory; scale, shift and residual are optional;
``act`` may be PReLU with its learned slope). Side by side here: the reference PyTorch path, the
torch.library ops that launch the Triton kernels (``fusedskip/kernels/group_norm_act.py``), the
autograd Function, the functional :func:`group_norm_act` and the modules :class:`GroupNormAct`
and :class:`InstanceNormAct2d`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from .. import backend
from .._checks import (
    FLOAT_DTYPES,
    check_activation,
    check_per_channel,
    check_residual,
    conform_residual,
    resolve_prelu_weight,
)
from ..activations import (
    ACTIVATION_IDS,
    DEFAULT_PRELU_INIT,
    PReLUWeight,
    apply_activation_reference,
    resolve_activation,
)
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


def _check_per_sample_channel(name: str, t, x: torch.Tensor) -> None:
    """``scale`` / ``shift``: one float value per (sample, channel), [N, C] or [N, C, 1, 1]."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    n, c = x.shape[:2]
    if tuple(t.shape) not in ((n, c), (n, c, 1, 1)):
        raise ValueError(f"{name} must have shape [N, C] = {[n, c]} or [N, C, 1, 1] = {[n, c, 1, 1]} "
                         f"(one value per sample and channel), got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


# --------------------------------------------------------------------------------------------
# Reference path: plain PyTorch, differentiated by autograd.
# --------------------------------------------------------------------------------------------
def group_norm_act_reference(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5, act: ActArg = "relu", negative_slope: Optional[float] = None,
    skip: Optional[torch.Tensor] = None, gate: Optional[GateArg] = None, *,
    residual: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``act(F.group_norm(x [+ gate ⊙ skip])·(1 + scale) + shift + residual)`` in PyTorch ops,
    computed in fp32 (fp64 for fp64 inputs) and cast back to x's dtype. Same arguments as
    :func:`group_norm_act`."""
    name, slope = resolve_activation(act, negative_slope)
    act_weight = resolve_prelu_weight(act, name, act_weight, x.shape[1], x.device)
    acc = acc_dtype(x)
    h = _gated_sum_acc(x, skip, gate)
    if h.numel():
        # GroupNorm is invariant to a constant shift per (n, group): centring on the detached
        # group mean changes neither the output nor the gradients, and protects F.group_norm
        # (whose CPU kernel computes E[x²] − E[x]²) from cancellation when |mean| ≫ std.
        n, c = h.shape[:2]
        # Per-channel means, then per group (equal counts per channel): no view of h, whose
        # layout may be channels_last (a reshape there breaks under torch.compile's AOT tracing).
        centre = h.detach().mean(dim=(2, 3)).unflatten(1, (num_groups, c // num_groups)).mean(-1)
        h = h - centre.repeat_interleave(c // num_groups, dim=1)[:, :, None, None]
    z = F.group_norm(h, num_groups, None if weight is None else weight.to(acc),
                     None if bias is None else bias.to(acc), eps)
    n, c = z.shape[:2]
    if scale is not None:
        z = z * (1.0 + scale.to(acc).reshape(n, c, 1, 1))
    if shift is not None:
        z = z + shift.to(acc).reshape(n, c, 1, 1)
    if residual is not None:
        z = z + residual.to(acc)
    return apply_activation_reference(z, name, act_weight if name == "prelu" else slope).to(x.dtype)


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
    num_groups: int, eps: float, act: str, negative_slope: float,
    residual: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None, *, launcher,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``; mean/rstd are [N, num_groups] in the accumulation dtype."""
    return kernels.group_norm_act_forward(x, weight, bias, skip, gate, num_groups, eps,
                                          ACTIVATION_IDS[act], negative_slope, launcher=launcher,
                                          residual=residual, scale=scale, shift=shift, act_weight=act_weight)


@group_norm_act_forward.register_fake
def _(x, weight, bias, skip, gate, num_groups, eps, act, negative_slope,
      residual=None, scale=None, shift=None, act_weight=None):
    stats = x.new_empty((x.shape[0], num_groups), dtype=acc_dtype(x))
    return torch.empty_like(x, memory_format=torch.preserve_format), stats, torch.empty_like(stats)


@register_op("group_norm_act_backward")
def group_norm_act_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    skip: Optional[torch.Tensor], gate: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    num_groups: int, act: str, negative_slope: float,
    need_dx: bool, need_dskip: bool, need_dgate: bool, need_dweight: bool, need_dbias: bool,
    residual: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None,
    need_dres: bool = False, need_dscale: bool = False, need_dshift: bool = False, need_dslope: bool = False,
    *, launcher,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dskip, dgate, dweight, dbias, dresidual, dscale, dshift, dact_weight)``; gradients
    not asked for are empty tensors."""
    grads = kernels.group_norm_act_backward(
        grad, x, weight, bias, skip, gate, mean, rstd, num_groups, ACTIVATION_IDS[act], negative_slope,
        need_dx, need_dskip, need_dgate, need_dweight, need_dbias, launcher=launcher,
        residual=residual, scale=scale, shift=shift, act_weight=act_weight,
        need_dres=need_dres, need_dscale=need_dscale, need_dshift=need_dshift, need_dslope=need_dslope)
    # Custom ops cannot return None: absent gradients come back as empty tensors.
    return tuple(gr if gr is not None else x.new_empty(0) for gr in grads)


@group_norm_act_backward.register_fake
def _(grad, x, weight, bias, skip, gate, mean, rstd, num_groups, act, negative_slope,
      need_dx, need_dskip, need_dgate, need_dweight, need_dbias,
      residual=None, scale=None, shift=None, act_weight=None,
      need_dres=False, need_dscale=False, need_dshift=False, need_dslope=False):
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.preserve_format) if needed and t is not None else x.new_empty(0)

    def dense(t, needed):  # the kernels write these dense in t's shape
        return t.new_empty(t.shape) if needed and t is not None else x.new_empty(0)

    has_skip = skip is not None
    return (like(x, need_dx), like(skip, need_dskip and has_skip), like(gate, need_dgate and has_skip),
            like(weight, need_dweight), like(bias, need_dbias), like(residual, need_dres),
            dense(scale, need_dscale), dense(shift, need_dshift), dense(act_weight, need_dslope))


class GroupNormActFunction(torch.autograd.Function):
    """Autograd Function of the fused op ``y = act(u)``, ``u = (γ ⊙ x̂ + β)·(1 + scale) + shift
    + residual``, ``x̂ = GN-normalised h``, ``h = x (+ a ⊙ skip)``.

    Saves only x (and skip, gate, residual, scale, shift, act_weight), the parameters and fp32
    (mean, rstd); the backward recomputes h, x̂, u and act'(u). Gradients (du = dy·act'(u),
    γ' = γ·(1 + scale), g = γ'·du, means over each group; A = Σ du·x̂, B = Σ du per (n, c)):
    ``dh = rstd·(g − mean(g) − x̂·mean(g·x̂))``, ``dx = dh``, ``dskip = a·dh``,
    ``da = Σ dh·skip``, ``dγ = Σ_n (1 + scale)·A``, ``dβ = Σ_n (1 + scale)·B``,
    ``dresidual = du``, ``dscale = γ·A + β·B``, ``dshift = B``, ``dact_weight = Σ dy·u (u ≤ 0)``.

    Inputs: ``x, weight, bias, skip, gate`` (tensors or None; ``gate`` in the accumulation
    dtype with 1 or C values), then ``num_groups, eps, act`` (a name of
    :data:`fusedskip.activations.ACTIVATION_IDS`) and ``negative_slope`` (float), then the
    optional ``residual, scale, shift, act_weight`` (validated by :func:`group_norm_act`).
    Eager calls launch the kernels directly (cached launch plans); under torch.compile the
    torch.library ops run.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, skip, gate, num_groups: int, eps: float, act: str, negative_slope: float,
                residual=None, scale=None, shift=None, act_weight=None):
        extras = dict(residual=residual, scale=scale, shift=shift, act_weight=act_weight)
        if torch.compiler.is_compiling():
            y, mean, rstd = torch.ops.fusedskip.group_norm_act_forward(
                x, weight, bias, skip, gate, num_groups, eps, act, negative_slope, residual, scale, shift, act_weight)
        else:
            y, mean, rstd = kernels.group_norm_act_forward(
                x, weight, bias, skip, gate, num_groups, eps, ACTIVATION_IDS[act], negative_slope, **extras)
        ctx.save_for_backward(x, weight, bias, skip, gate, mean, rstd, residual, scale, shift, act_weight)
        ctx.num_groups = num_groups
        ctx.eps = eps
        ctx.act = act
        ctx.negative_slope = negative_slope
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, skip, gate, mean, rstd, residual, scale, shift, act_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5] + ctx.needs_input_grad[9:13]
        if create_graph_requested():  # the kernels' gradients are not differentiable again
            grads = differentiable_grads(
                grad, (x, weight, bias, skip, gate, residual, scale, shift, act_weight), needs,
                lambda: group_norm_act_reference(x, ctx.num_groups, weight, bias, ctx.eps, ctx.act,
                                                 ctx.negative_slope, skip, gate, residual=residual, scale=scale,
                                                 shift=shift, act_weight=act_weight))
            return grads[:5] + (None,) * 4 + grads[5:]
        need_dx, need_dw, need_db, need_dskip, need_dgate, need_dres, need_dscale, need_dshift, need_dslope = needs
        # The identity activation: d_residual = dy itself (no kernel writes it, none reads the residual).
        grad_as_dres = need_dres and ctx.act == "identity"
        need_dres = need_dres and not grad_as_dres
        if torch.compiler.is_compiling():
            out = torch.ops.fusedskip.group_norm_act_backward(
                grad, x, weight, bias, skip, gate, mean, rstd, ctx.num_groups, ctx.act, ctx.negative_slope,
                need_dx, need_dskip, need_dgate, need_dw, need_db, residual, scale, shift, act_weight,
                need_dres, need_dscale, need_dshift, need_dslope)
        else:
            out = kernels.group_norm_act_backward(
                grad, x, weight, bias, skip, gate, mean, rstd, ctx.num_groups, ACTIVATION_IDS[ctx.act],
                ctx.negative_slope, need_dx, need_dskip, need_dgate, need_dw, need_db,
                residual=residual, scale=scale, shift=shift, act_weight=act_weight, need_dres=need_dres,
                need_dscale=need_dscale, need_dshift=need_dshift, need_dslope=need_dslope)
        dx, dskip, dgate, dw, db, dres, dscale, dshift, dslope = (
            gr if need else None for gr, need in zip(out, (need_dx, need_dskip, need_dgate, need_dw, need_db,
                                                            need_dres, need_dscale, need_dshift, need_dslope)))
        return dx, dw, db, dskip, dgate, None, None, None, None, grad if grad_as_dres else dres, dscale, dshift, dslope


# --------------------------------------------------------------------------------------------
# Functional
# --------------------------------------------------------------------------------------------
def group_norm_act(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5, act: ActArg = "relu", negative_slope: Optional[float] = None,
    skip: Optional[torch.Tensor] = None, gate: Optional[GateArg] = None, *,
    residual: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused GroupNorm + activation, optionally with a gated skip added first and a
    per-(sample, channel) scale / shift and a residual added before the activation:

        h = x + a ⊙ skip        (only when ``skip`` is given; never materialised)
        z = γ ⊙ (h − μ_{n,g}) · rstd_{n,g} + β,   rstd = 1 / sqrt(var_{n,g} + eps)
        y = act(z · (1 + scale) + shift + residual)

    with μ, var (biased) over each group of C/G channels × H × W of each sample, as
    ``nn.GroupNorm``. ``num_groups = C`` is InstanceNorm, ``num_groups = 1`` LayerNorm over C·H·W.
    ``act(norm(x) + residual)`` is MONAI's UnetResBlock (InstanceNorm, LeakyReLU) and ResNet-style
    blocks; ``silu(norm(x)·(1 + scale) + shift)`` diffusers' ResnetBlock2D with
    ``time_embedding_norm="scale_shift"``.

    Args:
        x: ``[N, C, H, W]`` float16 / bfloat16 / float32 / float64, any strides (NCHW and
            channels_last run without copies; y keeps x's layout). With ``skip``, x is ``up``.
        num_groups: G, a positive divisor of C.
        weight, bias: γ, β of shape ``(C,)`` or None; any float dtype (fp32 parameters with
            bf16/fp16 x, as under autocast, are fine).
        eps: added to the variance.
        act: ``"identity"``/None, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``,
            ``"gelu_tanh"``, ``"prelu"``, ..., or the matching torch module (``nn.ReLU()``,
            ``nn.GELU("tanh")``, ``nn.PReLU(C)`` (its weight is the slope unless ``act_weight``
            is given), ...).
        negative_slope: LeakyReLU's slope (default 0.01); ignored by other activations.
        skip: optional tensor of x's shape, device and dtype, added as ``a ⊙ skip`` before the norm.
        gate: ``a``: a float or a tensor of 1 or C values (default 1.0); only with ``skip``.
        residual: optional tensor of x's shape, device and dtype (any strides), added after the
            norm (read once in the forward).
        scale, shift: optional per-(sample, channel) values, ``[N, C]`` or ``[N, C, 1, 1]``, any
            float dtype, on x's device (either alone: the other is 0).
        act_weight: PReLU's learned slope, 1 or C values (only with ``act="prelu"``, which needs it).

    Statistics and arithmetic are fp32 (fp64 for fp64 inputs); y has x's dtype.
    Gradients (du = dy·act'(u) with u the activation's input, γ' = γ·(1 + scale), g = γ'·du,
    means over each group; A = Σ_hw du·x̂, B = Σ_hw du per (n, c)): ``∂L/∂h = rstd·(g − mean(g)
    − x̂·mean(g·x̂))``, ``∂L/∂x = ∂L/∂h``, ``∂L/∂skip = a·∂L/∂h``, ``∂L/∂a = Σ ∂L/∂h·skip``,
    ``∂L/∂γ = Σ_n (1 + scale)·A``, ``∂L/∂β = Σ_n (1 + scale)·B``, ``∂L/∂residual = du``,
    ``∂L/∂scale = γ·A + β·B``, ``∂L/∂shift = B``, ``∂L/∂act_weight = Σ dy·u over u ≤ 0`` (per
    channel, or over all for one slope); reductions are deterministic (no float atomics).

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
    check_residual(x, residual)
    _check_per_sample_channel("scale", scale, x)
    _check_per_sample_channel("shift", shift, x)
    act_weight = resolve_prelu_weight(act, name, act_weight, x.shape[1], x.device)
    if backend.use_triton(x):
        return GroupNormActFunction.apply(x, weight, bias, skip, a, num_groups, eps, name, slope,
                                          residual, scale, shift, act_weight)
    return group_norm_act_reference(x, num_groups, weight, bias, eps, name, slope, skip, a, residual=residual,
                                    scale=scale, shift=shift, act_weight=act_weight)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class GroupNormAct(nn.Module, PReLUWeight):
    """``act(nn.GroupNorm(num_groups, num_channels, eps, affine)(x))`` in one fused op, optionally
    with a per-(sample, channel) scale / shift and a residual before the activation
    (``forward(x, residual=, scale=, shift=)``, see :func:`group_norm_act`).

    Parameters ``weight`` (γ, ones) and ``bias`` (β, zeros) of shape ``(num_channels,)`` carry
    nn.GroupNorm's names, so state_dicts load either way. ``act`` is a name or a torch activation
    module (see :func:`group_norm_act`); ``negative_slope`` is LeakyReLU's. With PReLU
    (``act="prelu"``: ``prelu_parameters`` slopes of 0.25; ``act=nn.PReLU(...)``: its weight copied)
    the module owns the slope as the Parameter ``act_weight``, unless :meth:`borrow_act_weight`
    makes it read the slope of another module (then no state_dict key here; see
    :class:`fusedskip.activations.PReLUWeight`).
    Input ``[N, C, H, W]``, output of the same shape, dtype and memory layout.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: ActArg = "relu", negative_slope: Optional[float] = None, device=None, dtype=None,
                 prelu_parameters: int = 1):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels <= 0:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        _check_num_groups(num_groups, num_channels)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = _check_eps(eps)
        self.affine = bool(affine)
        self.act, self.negative_slope = resolve_activation(act, negative_slope)
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._init_act_weight(act, self.act, num_channels, prelu_parameters, factory)

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, as nn.GroupNorm; an owned PReLU slope back to nn.PReLU's 0.25."""
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)
        if self.act_weight is not None:
            nn.init.constant_(self.act_weight, DEFAULT_PRELU_INIT)

    @property
    def act_name(self) -> str:
        """The activation's name (BatchNormAct2d's attribute name for it)."""
        return self.act

    def forward(self, x: torch.Tensor, *, residual: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        traced = fx_leaf_call(self, x, residual=residual, scale=scale, shift=shift)
        if traced is not None:  # torch.fx tracing: one call_module node, like torch's own norms
            return traced
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != self.num_channels:
            raise ValueError(f"x must have {self.num_channels} channels for this {type(self).__name__}, "
                             f"got {x.shape[1]}")
        if isinstance(x, torch.Tensor):
            x, residual = conform_residual(x, residual)  # broadcast / promote as eager's add would
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.act, self.negative_slope,
                              residual=residual, scale=scale, shift=shift, act_weight=self.prelu_weight)

    def __prepare_scriptable__(self):
        refuse_script(self)  # raises: explicit, names the module and the way out (unconvert)

    def _act_repr(self) -> str:
        if self.act == "leaky_relu":
            return f"{self.act}({self.negative_slope})"
        if self.act == "prelu":
            weight = self.prelu_weight
            return f"prelu(num_parameters={weight.numel() if weight is not None else '?'})"
        return self.act

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, act={self._act_repr()}"


class InstanceNormAct2d(GroupNormAct):
    """``act(nn.InstanceNorm2d(num_features, eps, affine=affine)(x))``: GroupNormAct with one
    group per channel, nn.InstanceNorm2d's arguments and parameter names (``weight``/``bias``
    when ``affine``), and GroupNormAct's residual / scale / shift / PReLU options. Instance
    statistics are used in training and eval alike; running statistics
    (``track_running_stats=True``) are not supported. ``momentum`` is accepted for signature
    compatibility and unused. Input must be 4-D ``[N, C, H, W]``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = False, track_running_stats: bool = False, act: ActArg = "relu",
                 negative_slope: Optional[float] = None, device=None, dtype=None, prelu_parameters: int = 1):
        if track_running_stats:
            raise ValueError("InstanceNormAct2d does not support track_running_stats=True (running "
                             "statistics); use nn.InstanceNorm2d followed by the activation instead")
        super().__init__(num_features, num_features, eps, affine, act, negative_slope, device, dtype,
                         prelu_parameters)
        self.num_features = num_features
        self.momentum = momentum

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, act={self._act_repr()}"
