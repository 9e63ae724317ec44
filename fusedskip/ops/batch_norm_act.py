"""Fused BatchNorm2d + activation ``y = act(BN(x))``, optionally on a gated skip sum
``x = up + a·skip`` that is recomputed in every pass and never materialised, optionally with a
residual added after the norm (``act(BN(x) + residual)``), with PReLU's learned slope
(``act_weight``, 1 or C values) among the activations.

Side by side here: the reference PyTorch path (F.batch_norm + activation), the torch.library
ops that launch the Triton kernels (``fusedskip/kernels/batch_norm_act.py``), the autograd
Function, the functional :func:`batch_norm_act` and the module :class:`BatchNormAct2d`.
Cross-rank synchronisation (SyncBatchNorm semantics) lives in :mod:`fusedskip.distributed`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from .. import backend
from .._checks import (
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
from ..conversion.interop import fx_leaf_call, refuse_script, warn_if_unsynchronised
from ..kernels import batch_norm_act as kernels
from ..kernels.launch import acc_dtype, gate_gradient, register_op
from ._autograd import activation_name, create_graph_requested, differentiable_grads
from .gated_skip import GateArg, _gated_sum_acc, _skip_gate_tensor

ActArg = Union[str, None, nn.Module]


def _values_per_channel(x: torch.Tensor) -> int:
    n, _, h, w = x.shape
    return n * h * w


# --------------------------------------------------------------------------------------------
# Validation (shared with fusedskip.distributed): clear errors before any launch.
# --------------------------------------------------------------------------------------------
def _validate(x, running_mean, running_var, weight, bias, training, momentum, eps, act, negative_slope,
              skip, gate, num_batches_tracked, single_value_check: bool = True, count_check: bool = True
              ) -> Tuple[str, float, Optional[torch.Tensor]]:
    """Check every argument; return (activation name, slope, gate as a 1-D acc-dtype tensor or None).

    ``single_value_check``: raise torch's error for one value per channel in training (off for
    synchronised batch norm, where only the count summed over ranks matters). ``count_check``:
    for ``momentum=None`` in training, require ``num_batches_tracked >= 1`` (one host read, as
    nn.BatchNorm2d's own ``1 / float(num_batches_tracked)``; off when the caller increments it
    after validating, as BatchNormAct2d does)."""
    check_activation("x", x)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__} {training!r}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            check_per_channel(name, t, channels, x.device, allow_scalar=False)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False "
                         "(eval mode normalises with the running statistics)")
    if not isinstance(eps, (float, int)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if training and eps <= 0:  # torch's rule (rstd = 1/√(var + eps) is infinite for a constant channel)
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps!r}")
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative moving average) needs num_batches_tracked")
    elif not isinstance(momentum, (float, int)) or isinstance(momentum, bool) or not math.isfinite(momentum):
        raise ValueError(f"momentum must be a finite float or None, got {momentum!r}")
    if num_batches_tracked is not None and (not isinstance(num_batches_tracked, torch.Tensor)
                                            or num_batches_tracked.numel() != 1):
        raise ValueError("num_batches_tracked must be a one-element tensor")
    if count_check and momentum is None and training and running_mean is not None:
        _check_count(num_batches_tracked)
    name, slope = resolve_activation(act, negative_slope)
    gate_t = _skip_gate_tensor(x, skip, gate)
    if training and single_value_check and _values_per_channel(x) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    return name, slope, gate_t


def _validate_post_norm(x: torch.Tensor, name: str, act: ActArg, residual: Optional[torch.Tensor],
                        act_weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Check the residual and the PReLU slope (:mod:`fusedskip._checks`); return the slope in use
    for ``name == "prelu"``, else None. Shared with fusedskip.distributed; raises before any launch."""
    check_residual(x, residual)
    return resolve_prelu_weight(act, name, act_weight, x.shape[1], x.device)


def _act_arg(name: str, slope: float, act_weight: Optional[torch.Tensor]):
    """The reference activation's parameter: the slope tensor for PReLU, the float slope otherwise."""
    return act_weight if name == "prelu" else slope


def _check_count(num_batches_tracked: torch.Tensor) -> None:
    """momentum=None in training: the running-average factor 1/num_batches_tracked needs a count >= 1
    (one host read, as nn.BatchNorm2d's own ``1 / float(num_batches_tracked)``; skipped while compiling)."""
    if not torch.compiler.is_compiling() and int(num_batches_tracked.reshape(())) < 1:
        raise ValueError(f"num_batches_tracked must be >= 1 for momentum=None (the running-average factor is "
                         f"1/num_batches_tracked; increment it for this batch first, as nn.BatchNorm2d does), "
                         f"got {int(num_batches_tracked.reshape(()))}")


def _momentum_factor(momentum: Optional[float], num_batches_tracked: Optional[torch.Tensor]) -> float:
    """The running-average factor torch uses: momentum, or 1/num_batches_tracked (momentum=None)."""
    if momentum is not None:
        return float(momentum)
    return 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0


# --------------------------------------------------------------------------------------------
# Reference path: plain PyTorch, differentiated by autograd.
# --------------------------------------------------------------------------------------------
def batch_norm_act_reference(
    x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, training: bool = False,
    momentum: Optional[float] = 0.1, eps: float = 1e-5, act: ActArg = "relu",
    negative_slope: Optional[float] = None, skip: Optional[torch.Tensor] = None, gate: Optional[GateArg] = None,
    *, num_batches_tracked: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
    act_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``act(F.batch_norm(x) + residual)`` computed in fp32 (fp64 for fp64 input), returned in x's
    dtype (PReLU: ``F.prelu`` with ``act_weight``).

    Same arguments and semantics as :func:`batch_norm_act`; running statistics (any float
    dtype) are updated in place exactly as ``F.batch_norm`` does.
    """
    name, slope, gate_t = _validate(x, running_mean, running_var, weight, bias, training, momentum, eps, act,
                                    negative_slope, skip, gate, num_batches_tracked)
    act_weight = _validate_post_norm(x, name, act, residual, act_weight)
    acc = acc_dtype(x)
    xa = _gated_sum_acc(x, skip, gate_t)
    # In training F.batch_norm updates copies that are written back: autograd then never saves the
    # caller's buffers, which may be updated again in place before backward.
    rm = running_mean.to(acc, copy=training).contiguous() if running_mean is not None else None
    rv = running_var.to(acc, copy=training).contiguous() if running_var is not None else None
    factor = _momentum_factor(momentum, num_batches_tracked) if training else 0.0  # unused in eval
    y = _batch_norm_core(xa, rm, rv, weight, bias, training, factor, eps)
    if training and running_mean is not None and rm is not running_mean:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    if residual is not None:
        y = y + residual.to(acc)
    return apply_activation_reference(y, name, _act_arg(name, slope, act_weight)).to(x.dtype)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (see :func:`_batch_norm_core`)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _batch_norm_core(xa, rm, rv, weight, bias, training: bool, factor: float, eps: float) -> torch.Tensor:
    """``F.batch_norm`` on the accumulation-dtype input ``xa`` (``rm``/``rv``: contiguous, in its
    dtype, or None), output in xa's layout.

    Shielded from two bugs of torch's CPU batch_norm backward: a wrong dx when H = 1 and the
    input's and upstream gradient's strides disagree on the channels_last ambiguity, and NaN dx
    for a strided weight (``buf[1::2]``) with channels_last input. It gets contiguous NCHW
    input, contiguous parameters and (through :class:`_ContiguousGrad`) a contiguous gradient."""
    acc = xa.dtype
    w = None if weight is None else weight.to(acc).contiguous()
    b = None if bias is None else bias.to(acc).contiguous()
    y = F.batch_norm(xa.contiguous(), rm, rv, w, b, training, factor, eps)
    if y.requires_grad:
        y = _ContiguousGrad.apply(y)
    if xa.dim() == 4 and not xa.is_contiguous() and xa.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


# --------------------------------------------------------------------------------------------
# torch.library ops around the kernel launches, for torch.compile (``launch.register_op``: a
# triton_op that Inductor sees into on PyTorch >= 2.6, an opaque custom op otherwise; fake
# implementations give shapes and layouts). Running statistics are declared as mutated, so
# compiled graphs see the in-place update. Eager calls launch from the autograd Function.
# --------------------------------------------------------------------------------------------
@register_op("batch_norm_act_stats", mutates_args=("running_mean", "running_var"))
def batch_norm_act_stats(
    x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float, launcher,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.batch_norm_stats(x, skip, gate, running_mean, running_var, num_batches_tracked, momentum, eps,
                                    launcher=launcher)


@batch_norm_act_stats.register_fake
def _(x, skip, gate, running_mean, running_var, num_batches_tracked, momentum, eps):
    c = x.shape[1]
    acc = acc_dtype(x)
    return (x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc))


@register_op("batch_norm_act_merge_stats", mutates_args=("running_mean", "running_var"))
def batch_norm_act_merge_stats(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor,
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float, launcher,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return kernels.batch_norm_merge_stats(counts, means, m2s, running_mean, running_var, num_batches_tracked,
                                          momentum, eps, launcher=launcher)


@batch_norm_act_merge_stats.register_fake
def _(counts, means, m2s, running_mean, running_var, num_batches_tracked, momentum, eps):
    c = means.shape[1]
    return means.new_empty(c), means.new_empty(c)


# The residual and the PReLU slope come last, optional (schema defaults None): callers that do
# not use them keep their argument lists. ``launcher`` is keyword-only (register_op passes it).
@register_op("batch_norm_act_apply")
def batch_norm_act_apply(
    x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor], mean: torch.Tensor,
    scale_src: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    from_var: bool, eps: float, act: int, slope: float, residual: Optional[torch.Tensor] = None,
    act_weight: Optional[torch.Tensor] = None, *, launcher,
) -> torch.Tensor:
    return kernels.batch_norm_apply(x, skip, gate, mean, scale_src, weight, bias, from_var, eps, act, slope,
                                    residual, act_weight, launcher=launcher)


@batch_norm_act_apply.register_fake
def _(x, skip, gate, mean, scale_src, weight, bias, from_var, eps, act, slope, residual=None, act_weight=None):
    return torch.empty_like(x, memory_format=torch.preserve_format)


@register_op("batch_norm_act_backward_reduce")
def batch_norm_act_backward_reduce(
    grad: torch.Tensor, x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    act: int, slope: float, gate_sums: bool, need_dgate: bool, inv_count: float, training: bool,
    residual: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None, need_dres: bool = False,
    *, launcher,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sums, dgate, dres = kernels.batch_norm_backward_reduce(grad, x, skip, gate, mean, rstd, weight, bias, act, slope,
                                                           gate_sums, need_dgate, inv_count, training, residual,
                                                           act_weight, need_dres, launcher=launcher)
    # A gradient not asked for comes back as an empty tensor (custom ops cannot return None).
    return sums, (dgate if dgate is not None else mean.new_empty(0)), (dres if dres is not None else x.new_empty(0))


@batch_norm_act_backward_reduce.register_fake
def _(grad, x, skip, gate, mean, rstd, weight, bias, act, slope, gate_sums, need_dgate, inv_count, training,
      residual=None, act_weight=None, need_dres=False):
    sums = x.new_empty((kernels.sum_rows(gate_sums, act), x.shape[1]), dtype=acc_dtype(x))
    dres = (torch.empty_like(residual, memory_format=torch.preserve_format) if need_dres and residual is not None
            else x.new_empty(0))
    return sums, (torch.empty_like(gate) if need_dgate else mean.new_empty(0)), dres


@register_op("batch_norm_act_backward_dx")
def batch_norm_act_backward_dx(
    grad: torch.Tensor, x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    sums: torch.Tensor, inv_count: float, training: bool, act: int, slope: float, need_dx: bool, need_dskip: bool,
    residual: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None, need_dres: bool = False,
    *, launcher,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dskip, dres = kernels.batch_norm_backward_dx(grad, x, skip, gate, mean, rstd, weight, bias, sums, inv_count,
                                                     training, act, slope, need_dx, need_dskip, residual, act_weight,
                                                     need_dres, launcher=launcher)
    # Gradients not asked for come back as empty tensors (custom ops cannot return None).
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dskip, dres))


@batch_norm_act_backward_dx.register_fake
def _(grad, x, skip, gate, mean, rstd, weight, bias, sums, inv_count, training, act, slope, need_dx, need_dskip,
      residual=None, act_weight=None, need_dres=False):
    dx = torch.empty_like(x, memory_format=torch.preserve_format) if need_dx else x.new_empty(0)
    dskip = torch.empty_like(skip, memory_format=torch.preserve_format) if need_dskip else x.new_empty(0)
    dres = torch.empty_like(residual, memory_format=torch.preserve_format) if need_dres else x.new_empty(0)
    return dx, dskip, dres


def _call(name: str, *args):
    """Run a step of the op: the kernels module's launcher directly in eager (no torch.library
    dispatch on the hot path), the torch.library op while torch.compile traces."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fusedskip, "batch_norm_act_" + name)(*args)
    return _EAGER[name](*args)


_EAGER = {
    "stats": kernels.batch_norm_stats,
    "merge_stats": kernels.batch_norm_merge_stats,
    "apply": kernels.batch_norm_apply,
    "backward_reduce": kernels.batch_norm_backward_reduce,
    "backward_dx": kernels.batch_norm_backward_dx,
}


class BatchNormActFunction(torch.autograd.Function):
    """Autograd Function of the fused op (Triton kernels).

    Forward (training): batch statistics (optionally merged across ranks by ``sync``, an object
    from :mod:`fusedskip.distributed` with ``gather_stats`` and ``all_reduce_``), running-stat
    update, then ``act((x − mean)·rstd·γ + β + residual)`` (PReLU: slope ``act_weight``). Eval:
    the running statistics. Saved for backward: the input(s), the residual, γ, β, the slope and
    the per-channel statistics only.

    Backward, with z = x̂·γ + β + residual, dy' = dy·act'(z), x̂ = (x − mean)·rstd and M values
    per channel: dβ = Σ dy', dγ = Σ dy'·x̂ (local sums: DDP reduces parameter gradients),
    dx = γ·rstd·(dy' − Σdy'/M − x̂·Σ(dy'·x̂)/M) with the sums all-reduced under sync (training),
    dx = γ·rstd·dy' (eval); with a skip: d_up = dx, d_skip = a·dx, d_a = Σ dx·skip (in the reduce
    kernel; from all-reduced sums on the host under sync); d_residual = dy' (written by the reduce
    kernel, which the dx kernel then reads in place of dy and the residual; by the dx kernel in eval
    without parameter gradients; dy itself for the identity activation); PReLU d_slope =
    Σ dy·z·[z ≤ 0] per channel (a row of the reduce kernel's sums; summed over channels for a single
    slope; local, like dγ).
    """

    @staticmethod
    def forward(ctx, x, skip, gate, weight, bias, running_mean, running_var, num_batches_tracked,
                training: bool, momentum: float, eps: float, act: int, slope: float, sync=None, residual=None,
                act_weight=None):
        count = _values_per_channel(x)
        if training:
            if sync is None:
                mean, rstd, _ = _call("stats", x, skip, gate, running_mean, running_var, num_batches_tracked,
                                      momentum, eps)
            else:
                local_mean, _, local_m2 = _call("stats", x, skip, gate, None, None, None, 0.0, eps)
                counts, means, m2s = sync.gather_stats(count, local_mean, local_m2)
                count = int(counts.sum().item())  # one host sync, as torch's SyncBatchNorm has
                if count == 1:
                    raise ValueError("Expected more than 1 value per channel when training, got input size 1 "
                                     "(summed over ranks)")
                mean, rstd = _call("merge_stats", counts, means, m2s, running_mean, running_var,
                                   num_batches_tracked, momentum, eps)
            scale_src, from_var = rstd, False
        else:
            mean, scale_src, from_var = running_mean, running_var, True
        out = _call("apply", x, skip, gate, mean, scale_src, weight, bias, from_var, eps, act, slope, residual,
                    act_weight)
        ctx.save_for_backward(x, skip, gate, weight, bias, mean, scale_src, residual, act_weight)
        ctx.training, ctx.eps, ctx.act, ctx.slope, ctx.sync, ctx.count = training, eps, act, slope, sync, count
        return out

    @staticmethod
    def backward(ctx, grad):
        if create_graph_requested():  # the kernels' gradients are not differentiable again
            return _create_graph_backward(ctx, grad)
        x, skip, gate, weight, bias, mean, scale_src, residual, act_weight = ctx.saved_tensors
        need_dx, need_dskip, need_dgate, need_dw, need_db = ctx.needs_input_grad[:5]
        need_dres, need_dslope = _post_norm_needs(ctx)
        training, sync = ctx.training, ctx.sync
        acc = acc_dtype(x)
        rstd = scale_src if training else torch.rsqrt(scale_src.to(acc) + ctx.eps)
        sync_dx = training and sync is not None and (need_dx or need_dskip or need_dgate)
        inv_count = 1.0 / max(ctx.count, 1)
        sums = global_sums = dgate = None
        identity = ctx.act == ACTIVATION_IDS["identity"]
        dres = grad if need_dres and identity else None  # d act(z)/d residual = grad: nothing to compute
        if (training and (need_dx or need_dskip)) or need_dw or need_db or need_dgate or need_dslope:
            # The gate gradient comes from the kernel, except under sync (it needs the global sums).
            # d_residual = dy' too when the residual needs it: the dx step then reads dy' instead of
            # grad and the residual (7 passes, not 8).
            sums, dgate, dyp = _call("backward_reduce", grad, x, skip, gate, mean, rstd, weight, bias, ctx.act,
                                     ctx.slope, bool(need_dgate), bool(need_dgate and not sync_dx), inv_count,
                                     training, residual, act_weight, bool(need_dres and not identity))
            dres = dyp if need_dres and not identity else dres
            global_sums = sums
            if sync_dx:
                global_sums = sync.all_reduce_(sums[:2].clone())
                if need_dgate:
                    dgate = _sync_gate_gradient(sums, global_sums, rstd, weight, gate, inv_count, acc)
        dx = dskip = None
        if need_dx or need_dskip or (need_dres and dres is None):
            sums_dx = global_sums if global_sums is not None else mean.new_zeros(2, x.shape[1])
            if dres is not None and not identity:  # dy' is in memory: the identity activation on it
                dx, dskip, _ = _call("backward_dx", dres, x, skip, gate, mean, rstd, weight, bias, sums_dx,
                                     inv_count, training, ACTIVATION_IDS["identity"], 0.0, bool(need_dx),
                                     bool(need_dskip), None, None, False)
            else:
                dx, dskip, dres_dx = _call("backward_dx", grad, x, skip, gate, mean, rstd, weight, bias, sums_dx,
                                           inv_count, training, ctx.act, ctx.slope, bool(need_dx), bool(need_dskip),
                                           residual, act_weight, bool(need_dres and dres is None))
                dres = dres if dres is not None else dres_dx
        dw = sums[1].to(weight.dtype) if need_dw else None
        db = sums[0].to(bias.dtype) if need_db else None
        dslope = gate_gradient(sums[-1], act_weight) if need_dslope else None  # the PReLU row is the last
        return (dx if need_dx else None, dskip if need_dskip else None, dgate if need_dgate else None, dw, db,
                None, None, None, None, None, None, None, None, None, dres if need_dres else None, dslope)


def _post_norm_needs(ctx) -> Tuple[bool, bool]:
    """needs_input_grad of the residual and the PReLU slope (inputs 14 and 15; False when a caller
    of BatchNormActFunction.apply passed neither)."""
    needs = tuple(ctx.needs_input_grad) + (False,) * 16
    return bool(needs[14]), bool(needs[15])


def _sync_gate_gradient(sums, global_sums, rstd, weight, gate, inv_count: float, acc):
    """Σ dx·skip under SyncBatchNorm: local skip sums with the all-reduced Σdy', Σdy'·x̂."""
    k1 = rstd.to(acc) if weight is None else rstd.to(acc) * weight.to(acc)
    per_channel = sums[2] - global_sums[0] * inv_count * sums[3] - global_sums[1] * inv_count * sums[4]
    return gate_gradient(k1 * per_channel, gate)


def _create_graph_backward(ctx, grad):
    """BatchNormActFunction's backward under ``create_graph=True``: the reference computation's
    gradients in differentiable torch ops (``_autograd.differentiable_grads``), recomputed from the
    saved input(s), parameters and, in eval, running statistics; running statistics are not
    updated again. Loud for synchronised batch norm, whose statistics span ranks."""
    if ctx.sync is not None:
        raise RuntimeError("double backward (create_graph=True) through synchronised batch_norm_act is not "
                           "supported: compute the gradient penalty without SyncBatchNorm (e.g. in eval mode)")
    x, skip, gate, weight, bias, mean, scale_src, residual, act_weight = ctx.saved_tensors
    acc = acc_dtype(x)
    name = activation_name(ctx.act)

    def recompute():
        xa = _gated_sum_acc(x, skip, gate)
        rm, rv = (None, None) if ctx.training else (mean.to(acc).contiguous(), scale_src.to(acc).contiguous())
        y = _batch_norm_core(xa, rm, rv, weight, bias, ctx.training, 0.0, ctx.eps)
        if residual is not None:
            y = y + residual.to(acc)
        return apply_activation_reference(y, name, _act_arg(name, ctx.slope, act_weight)).to(x.dtype)

    needs = tuple(ctx.needs_input_grad[:5]) + _post_norm_needs(ctx)
    grads = differentiable_grads(grad, (x, skip, gate, weight, bias, residual, act_weight), needs, recompute)
    return grads[:5] + (None,) * 9 + grads[5:]


# --------------------------------------------------------------------------------------------
# Functional
# --------------------------------------------------------------------------------------------
def batch_norm_act(
    x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, training: bool = False,
    momentum: Optional[float] = 0.1, eps: float = 1e-5, act: ActArg = "relu",
    negative_slope: Optional[float] = None, skip: Optional[torch.Tensor] = None, gate: Optional[GateArg] = None,
    *, num_batches_tracked: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
    act_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused batch norm + activation: ``y = act((x − μ_c)/√(σ²_c + eps)·γ_c + β_c [+ residual])``.

    Args:
        x: ``[N, C, H, W]`` float16 / bfloat16 / float32 / float64, any strides (NCHW and
            channels_last run without copies; the output keeps x's dense layout and dtype).
            With ``skip``, ``x`` is the decoder tensor ``up`` and the op normalises
            ``up + gate·skip`` without materialising it.
        running_mean, running_var: per-channel buffers (any float dtype) or None. Updated in
            place in training: ``r ← (1 − f)·r + f·batch_stat`` with the unbiased batch variance,
            f = momentum (or 1/num_batches_tracked for ``momentum=None``), as F.batch_norm does.
            An empty batch leaves them alone.
        weight, bias: γ, β (C values, e.g. fp32 under autocast with fp16/bf16 x) or None.
        training: normalise with batch statistics (True) or with the running ones (False).
        momentum: float, or None for a cumulative moving average (pass num_batches_tracked,
            already incremented for this batch, as nn.BatchNorm2d does).
        eps: added to the variance.
        act: ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``, ``"gelu_tanh"``,
            ``"prelu"``, ... (or None / a torch activation module); ``negative_slope`` for
            leaky_relu (0.01).
        skip, gate: optional skip tensor (x's shape, dtype, device) and gate ``a`` (float, or a
            tensor of 1 or C values; 1.0 by default). Added before the norm.
        residual: optional tensor (x's shape, dtype and device, any strides) added after the norm
            and before the activation; read once in the forward, its gradient is dy·act'(z).
        act_weight: PReLU's learned slope (1 or C values, any float dtype), required for
            ``act="prelu"``; for ``act=nn.PReLU(...)`` the module's weight is used when None.
            Only valid with PReLU.

    Statistics are fp32 (fp64 for fp64 input), Welford/Chan-merged, deterministic.
    Gradients (dy' = dy·act'(z), x̂ the normalised input, M = N·H·W): dβ = Σ dy', dγ = Σ dy'·x̂,
    dx = γ·rstd·(dy' − mean(dy') − x̂·mean(dy'·x̂)) in training, γ·rstd·dy' in eval;
    with a skip d_up = dx, d_skip = a·dx, d_a = Σ dx·skip; d_residual = dy'; PReLU
    d_act_weight = Σ dy·z·[z ≤ 0] per channel (z the pre-activation; over all channels for one slope).

    Runs the Triton kernels or the reference path as :mod:`fusedskip.backend` decides. Raises
    ``TypeError``/``ValueError`` for bad shapes, dtypes or devices, a non-bool ``training``,
    ``eps = 0`` in training (as torch), ``num_batches_tracked < 1`` with ``momentum=None`` in
    training, a residual unlike x, an ``act_weight`` without PReLU (or PReLU without one, or one
    of the wrong size or device), and torch's "Expected more than 1 value per channel when
    training" error, before any launch. Under ``create_graph=True`` the backward is built from differentiable torch ops
    (exact second derivatives, e.g. for a gradient penalty); otherwise it runs the kernels.
    """
    name, slope, gate_t = _validate(x, running_mean, running_var, weight, bias, training, momentum, eps, act,
                                    negative_slope, skip, gate, num_batches_tracked)
    act_weight = _validate_post_norm(x, name, act, residual, act_weight)
    if not backend.use_triton(x):
        return batch_norm_act_reference(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                        name, slope, skip, gate_t, num_batches_tracked=num_batches_tracked,
                                        residual=residual, act_weight=act_weight)
    return _batch_norm_act_triton(x, running_mean, running_var, weight, bias, training, momentum, eps, name, slope,
                                  skip, gate_t, num_batches_tracked, residual=residual, act_weight=act_weight)


def _batch_norm_act_triton(x, running_mean, running_var, weight, bias, training: bool, momentum: Optional[float],
                           eps: float, name: str, slope: float, skip, gate_t, num_batches_tracked, sync=None,
                           residual=None, act_weight=None):
    """The Triton path of :func:`batch_norm_act` on validated arguments (``gate_t`` from
    :func:`_validate`, ``act_weight`` from :func:`_validate_post_norm`); ``sync`` merges the batch
    statistics across ranks (fusedskip.distributed)."""
    use_cma = momentum is None and training and running_mean is not None
    # The kernels index the C-element parameter and statistics vectors densely: strided views
    # (e.g. weight[::2]) go through a contiguous copy; updated statistics are copied back.
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    rm, rv = running_mean, running_var
    strided_stats = rm is not None and not (rm.is_contiguous() and rv.is_contiguous())
    if strided_stats:
        rm, rv = rm.contiguous(), rv.contiguous()
    out = BatchNormActFunction.apply(
        x, skip, gate_t, weight, bias, rm, rv,
        num_batches_tracked if use_cma else None, bool(training), 0.0 if momentum is None else float(momentum),
        float(eps), ACTIVATION_IDS[name], float(slope), sync, residual, act_weight)
    if strided_stats and training:
        running_mean.copy_(rm)
        running_var.copy_(rv)
    return out


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------
class BatchNormAct2d(nn.Module, PReLUWeight):
    """BatchNorm2d fused with an activation: ``act(BN(x))``, or ``act(BN(up + a·skip))``, or with
    a residual added after the norm ``act(BN(x) + residual)``.

    Parameters and buffers carry exactly nn.BatchNorm2d's names (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so state_dicts load either way.
    It deliberately does *not* subclass ``nn.BatchNorm2d``: torch's
    ``SyncBatchNorm.convert_sync_batchnorm`` replaces every ``_BatchNorm`` subclass with a bare
    SyncBatchNorm and would silently drop the activation. Use
    :func:`fusedskip.convert_sync_batchnorm` to synchronise statistics across ranks (it sets
    ``sync``/``process_group``); torch's converter leaves these modules alone.

    Semantics follow nn.BatchNorm2d: batch statistics in training (and in eval when
    ``track_running_stats=False``), running statistics otherwise; momentum ``None`` is a
    cumulative average over ``num_batches_tracked``.

    Args:
        num_features: channels C.
        eps, momentum, affine, track_running_stats: as nn.BatchNorm2d.
        act: activation name or torch module (see :func:`batch_norm_act`); ``negative_slope``
            for leaky_relu.
        prelu_parameters: for ``act="prelu"``, the number of learned slopes (1 or
            ``num_features``, 0.25 each as nn.PReLU); they are the Parameter ``act_weight``
            (state_dict key ``act_weight``, present only when the module owns the slope: after
            :meth:`borrow_act_weight` the slope is read from its owner). ``act=nn.PReLU(...)``
            copies that module's weight.
    """

    _version = 2  # nn.BatchNorm2d's state_dict version (num_batches_tracked present)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, act: ActArg = "relu", negative_slope: Optional[float] = None,
                 device=None, dtype=None, prelu_parameters: int = 1):
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.act_name, self.negative_slope = resolve_activation(act, negative_slope)
        # Set by fusedskip.convert_sync_batchnorm (like nn.SyncBatchNorm's process_group).
        self.sync = False
        self.process_group = None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()
        self._init_act_weight(act, self.act_name, num_features, prelu_parameters, factory)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)
        if getattr(self, "act_weight", None) is not None:  # an owned PReLU slope: nn.PReLU's init
            nn.init.constant_(self.act_weight, DEFAULT_PRELU_INIT)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # As nn.BatchNorm2d: checkpoints from before version 2 have no num_batches_tracked.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (self.num_batches_tracked if self.num_batches_tracked is not None
                                   and self.num_batches_tracked.device != torch.device("meta")
                                   else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _sync_needed(self, bn_training: bool) -> bool:
        if not (self.sync and bn_training and self.training):
            return False
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group or dist.group.WORLD) > 1

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None, gate: Optional[GateArg] = None,
                *, input_bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """``act(BN(x))``, or ``act(BN(x + gate·skip))`` with ``skip``, plus ``residual`` after
        the norm: ``act(BN(·) + residual)``. Like eager's add, a residual that broadcasts to x's
        shape is expanded and a wider dtype promotes the computation (``_checks.conform_residual``).

        ``input_bias`` (C values, used by ConvNormAct for a conv bias that the norm absorbs):
        behave exactly as if the input were ``x + input_bias[c]``. Batch statistics cancel it, so
        it only enters the running mean (training) and the running-statistics normalisation
        (eval); it receives no gradient.
        """
        traced = fx_leaf_call(self, x, skip, gate, input_bias=input_bias, residual=residual)
        if traced is not None:  # torch.fx tracing: one call_module node, like torch's own norms
            return traced
        check_activation("x", x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"x must have {self.num_features} channels for this BatchNormAct2d, got {x.shape[1]}")
        x, residual, skip = conform_residual(x, residual, skip)  # broadcast / promote as eager's add would
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        counting = self.training and self.track_running_stats
        if input_bias is not None:
            check_per_channel("input_bias", input_bias, self.num_features, x.device, allow_scalar=False)
        sync_needed = self._sync_needed(bn_training)
        # Every check before any state changes: a rejected call must not count a batch.
        name, slope, gate_t = _validate(
            x, running_mean, running_var, self.weight, self.bias, bn_training, self.momentum, self.eps,
            self.act_name, self.negative_slope, skip, gate, self.num_batches_tracked if counting else None,
            single_value_check=not sync_needed, count_check=False)
        act_weight = _validate_post_norm(x, name, self.act_name, residual, self.prelu_weight)
        use_triton = backend.use_triton(x)  # raises here for a backend that cannot run on x's device
        nbt = None
        if counting:
            self.num_batches_tracked.add_(1)
            nbt = self.num_batches_tracked if self.momentum is None else None
            if nbt is not None and bn_training:  # the count check _validate left for after the increment
                _check_count(nbt)
        if input_bias is not None:
            input_bias = input_bias.detach()
            if not bn_training:  # normalise x + b with running mean μ  ⇔  normalise x with μ − b
                running_mean = running_mean - input_bias.to(running_mean.dtype)
        if sync_needed:
            from ..distributed import sync_batch_norm_act
            out = sync_batch_norm_act(x, running_mean, running_var, self.weight, self.bias, bn_training,
                                      self.momentum, self.eps, self.act_name, self.negative_slope, skip, gate,
                                      num_batches_tracked=nbt, process_group=self.process_group,
                                      residual=residual, act_weight=act_weight)
        else:
            if bn_training and self.training:
                warn_if_unsynchronised(self)
            if use_triton:  # validated above: straight to the kernels (batch_norm_act would check it all again)
                out = _batch_norm_act_triton(x, running_mean, running_var, self.weight, self.bias, bn_training,
                                             self.momentum, self.eps, name, slope, skip, gate_t, nbt,
                                             residual=residual, act_weight=act_weight)
            else:
                out = batch_norm_act(x, running_mean, running_var, self.weight, self.bias, bn_training,
                                     self.momentum, self.eps, self.act_name, self.negative_slope, skip, gate,
                                     num_batches_tracked=nbt, residual=residual, act_weight=act_weight)
        if input_bias is not None and bn_training and running_mean is not None and x.numel() > 0:
            self._absorb_input_bias(input_bias, running_mean)
        return out

    def _absorb_input_bias(self, input_bias: torch.Tensor, running_mean: torch.Tensor) -> None:
        """After a training step on x: the batch mean of x + b is mean(x) + b, so add the
        running-average factor's share of ``input_bias`` to the running mean."""
        with torch.no_grad():
            if self.momentum is None:
                running_mean.add_(input_bias.to(running_mean.dtype) / self.num_batches_tracked)
            else:
                running_mean.add_(input_bias.to(running_mean.dtype), alpha=self.momentum)

    @property
    def act(self) -> str:
        return self.act_name

    def __prepare_scriptable__(self):
        refuse_script(self)  # raises: explicit, names the module and the way out (unconvert)

    def extra_repr(self) -> str:
        act = self.act_name + (f"({self.negative_slope})" if self.act_name == "leaky_relu" else "")
        if self.act_name == "prelu":
            borrowed = ", borrowed" if self.act_weight is None else ""
            act += f"(num_parameters={self.prelu_weight.numel()}{borrowed})"
        sync = f", sync=True, process_group={self.process_group}" if self.sync else ""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, act={act}{sync}")
