"""Cross-rank synchronised BatchNormAct2d (nn.SyncBatchNorm semantics, activation kept).

:func:`convert_sync_batchnorm` marks every :class:`~fusedskip.BatchNormAct2d` in a model as
synchronised (``sync = True`` and ``process_group``); in training under an initialised
``torch.distributed`` with more than one rank, those modules then compute their batch
statistics over the union of all ranks' batches:

* forward: each rank reduces its batch to per-channel ``(count, mean, M2)`` (the fused
  statistics kernel, or torch ops on the reference path); one all_gather; Chan's formula merges
  the ranks (ranks may have different batch sizes, empty ones included); running statistics are
  updated with the global unbiased variance; then the fused normalise + activation;
* backward: the two per-channel sums Σdy' and Σdy'·x̂ are all-reduced (one all_reduce) before
  the dx pass. dγ, dβ, the gate gradient and a PReLU slope's gradient stay local sums, as in
  nn.SyncBatchNorm (DDP all-reduces parameter gradients). A residual added after the norm does
  not enter the statistics: it is local to each rank, like the activation.

The result equals ``nn.SyncBatchNorm`` followed by the activation. Unlike torch's
``nn.SyncBatchNorm.convert_sync_batchnorm`` (which replaces every ``_BatchNorm`` subclass with a
bare SyncBatchNorm and silently drops fused activations), this keeps the module and its
activation, and it synchronises the plain BatchNorm layers of the model as well (torch's
SyncBatchNorm, or on the CPU, where torch's cannot train in a process group, a BatchNormAct2d
with the identity activation; see ``plain``); whatever it cannot synchronise is named in a
RuntimeWarning. BatchNormAct2d is not a ``_BatchNorm`` subclass, so running torch's converter
afterwards (e.g. Lightning's ``sync_batchnorm=True``) leaves fused ones intact.
Synchronisation of the fused modules works on any device and backend with collectives (gloo on
the CPU included); eval mode never synchronises.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import backend
from .activations import apply_activation_reference
from .ops.batch_norm_act import (
    ActArg,
    BatchNormAct2d,
    _act_arg,
    _batch_norm_act_triton,
    _momentum_factor,
    _validate,
    _validate_post_norm,
    batch_norm_act,
)
from .ops.gated_skip import GateArg, _gated_sum_acc

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm", "sync_batch_norm_act", "merge_stats"]


class _SyncGroup:
    """The collectives a synchronised batch norm needs, over one process group."""

    def __init__(self, process_group=None):
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)

    def gather_stats(self, count: int, mean: torch.Tensor, m2: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ranks' ``(counts [R], means [R, C], M2 [R, C])`` from this rank's, in one all_gather."""
        c = mean.numel()
        payload = torch.cat([mean.new_full((1,), float(count)), mean.reshape(-1), m2.reshape(-1).to(mean.dtype)])
        if dist.get_backend(self.group) == "gloo":  # gloo has no all_gather_into_tensor
            parts = [torch.empty_like(payload) for _ in range(self.world_size)]
            dist.all_gather(parts, payload, group=self.group)
            gathered = torch.stack(parts)
        else:
            gathered = payload.new_empty(self.world_size, payload.numel())
            dist.all_gather_into_tensor(gathered, payload, group=self.group)
        return gathered[:, 0], gathered[:, 1:c + 1], gathered[:, c + 1:]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks in place and return it."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


def merge_stats(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan's parallel merge of per-rank statistics: ``(mean [C], M2 [C], total count)``.

    M2 = Σ_r M2_r + Σ_r n_r·(mean_r − mean)²: exact and stable (no E[x²] − E[x]²); ranks with
    n_r = 0 have zero weight.
    """
    counts = counts.to(means.dtype).reshape(-1, 1)
    total = counts.sum()
    mean = (counts * means).sum(0) / total.clamp_min(1)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return mean, m2, total


class _SyncBatchNormReference(torch.autograd.Function):
    """Reference synchronised batch norm (no activation) in torch ops, for the reference backend.

    Input in the accumulation dtype; mirrors torch's SyncBatchNorm Function (gather in forward,
    all_reduce of Σdy and Σdy·x̂ in backward) but runs on any device.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor: float, eps: float, sync: _SyncGroup):
        n, c, h, w = x.shape
        count = n * h * w
        if x.numel() > 0:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            m2 = var * count
        else:
            mean = m2 = x.new_zeros(c)
        counts, means, m2s = sync.gather_stats(count, mean, m2)
        mean, m2, total_t = merge_stats(counts, means, m2s)
        total = int(total_t.item())
        if total == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input size 1 "
                             "(summed over ranks)")
        rstd = torch.rsqrt(m2 / max(total, 1) + eps)
        if running_mean is not None and total > 0:
            with torch.no_grad():
                unbiased = m2 / (total - 1)
                running_mean.copy_((factor * mean + (1 - factor) * running_mean.to(mean.dtype)).to(running_mean.dtype))
                running_var.copy_((factor * unbiased + (1 - factor) * running_var.to(mean.dtype)).to(running_var.dtype))
        shape = (1, -1, 1, 1)
        y = (x - mean.reshape(shape)) * rstd.reshape(shape)
        if weight is not None:
            y = y * weight.to(x.dtype).reshape(shape)
        if bias is not None:
            y = y + bias.to(x.dtype).reshape(shape)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.sync, ctx.total = sync, total
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
        sum_dy = grad.sum(dim=(0, 2, 3))
        sum_dyx = (grad * xhat).sum(dim=(0, 2, 3))
        dx = None
        if ctx.needs_input_grad[0]:
            sums = ctx.sync.all_reduce_(torch.stack([sum_dy, sum_dyx]))
            k = rstd if weight is None else rstd * weight.to(x.dtype)
            m = max(ctx.total, 1)
            dx = k.reshape(shape) * (grad - (sums[0] / m).reshape(shape) - xhat * (sums[1] / m).reshape(shape))
        dw = sum_dyx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None


def sync_batch_norm_act(
    x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, training: bool = True,
    momentum: Optional[float] = 0.1, eps: float = 1e-5, act: ActArg = "relu",
    negative_slope: Optional[float] = None, skip: Optional[torch.Tensor] = None, gate: Optional[GateArg] = None,
    *, num_batches_tracked: Optional[torch.Tensor] = None, process_group=None,
    residual: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`fusedskip.batch_norm_act` with batch statistics synchronised over ``process_group``
    (default: the world). Every rank of the group must call it (collectives). Arguments as
    :func:`fusedskip.batch_norm_act` (``residual`` and the PReLU slope ``act_weight`` included:
    they do not enter the synchronised statistics, and the slope's gradient stays a local sum);
    ``training=False`` runs unsynchronised like nn.SyncBatchNorm. A single value per channel is
    allowed on one rank as long as the ranks hold more in total.
    """
    name, slope, gate_t = _validate(x, running_mean, running_var, weight, bias, training, momentum, eps, act,
                                    negative_slope, skip, gate, num_batches_tracked, single_value_check=not training)
    act_weight = _validate_post_norm(x, name, act, residual, act_weight)
    if not training:
        return batch_norm_act(x, running_mean, running_var, weight, bias, False, momentum, eps, name, slope,
                              skip, gate, num_batches_tracked=num_batches_tracked, residual=residual,
                              act_weight=act_weight)
    sync = _SyncGroup(process_group)
    if backend.use_triton(x):
        return _batch_norm_act_triton(x, running_mean, running_var, weight, bias, True, momentum, eps, name, slope,
                                      skip, gate_t, num_batches_tracked, sync, residual=residual,
                                      act_weight=act_weight)
    xa = _gated_sum_acc(x, skip, gate_t)
    y = _SyncBatchNormReference.apply(xa, weight, bias, running_mean, running_var,
                                      _momentum_factor(momentum, num_batches_tracked), float(eps), sync)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return apply_activation_reference(y, name, _act_arg(name, slope, act_weight)).to(x.dtype)


PLAIN_MODES = ("auto", "torch", "fused", "keep")


def convert_sync_batchnorm(module: nn.Module, process_group=None, *, plain: str = "auto") -> nn.Module:
    """Synchronise every BatchNorm in ``module`` across ranks, fused ones keeping their activation.

    * :class:`~fusedskip.BatchNormAct2d` modules are kept (activation, tensors and state_dict keys
      unchanged) and marked ``sync = True`` with ``process_group`` (None: the whole world).
    * Plain BatchNorm layers (``nn.BatchNorm1d/2d/3d``, subclasses that keep their forward) are
      synchronised too, as ``plain`` says:

      - ``"torch"``: torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` (same tensors). Torch's
        SyncBatchNorm trains synchronised only on GPU / XPU / HPU / MPS tensors: on the CPU in a
        process group of world size > 1 it raises.
      - ``"fused"``: exact ``nn.BatchNorm2d`` becomes ``BatchNormAct2d(act="identity", sync=True)``
        with the same tensors (same maths; runs on any device and backend, gloo included;
        ``fusedskip.unconvert`` turns it into an ``nn.SyncBatchNorm``); the others go to torch's.
      - ``"auto"`` (default): ``"torch"``, except for layers on the CPU while a process group is
        initialised (torch's module could not train there): exact BatchNorm2d as ``"fused"``,
        other BatchNorms left with a warning.
      - ``"keep"``: plain layers are left (a warning lists them).

    A ``_BatchNorm`` subclass with its own forward (timm's BatchNormAct2d) is never replaced by a
    bare SyncBatchNorm (torch's converter would drop what its forward adds): it is left with a
    RuntimeWarning naming it (run :func:`fusedskip.convert` first, or timm's converter). Every
    layer left unsynchronised is named in one RuntimeWarning; nothing is skipped silently.
    Idempotent; returns ``module`` (or its replacement when ``module`` itself is a plain BatchNorm).
    """
    if plain not in PLAIN_MODES:
        raise ValueError(f"plain must be one of {PLAIN_MODES}, got {plain!r}")
    for m in module.modules():
        if isinstance(m, BatchNormAct2d):
            m.sync = True
            m.process_group = process_group
    left: list = []
    memo: dict = {}
    out = _sync_tree(module, "", process_group, plain, left, memo)
    if left:
        shown = "; ".join(f"{path or '<root>'} ({why})" for path, why in left[:4])
        more = f"; and {len(left) - 4} more" if len(left) > 4 else ""
        warnings.warn(f"fusedskip.convert_sync_batchnorm left {len(left)} BatchNorm layer(s) computing per-process "
                      f"statistics: {shown}{more}", RuntimeWarning, stacklevel=2)
    return out


def _sync_tree(m: nn.Module, path: str, process_group, plain: str, left: list, memo: dict) -> nn.Module:
    """``m`` with its plain BatchNorms synchronised (children replaced in their slots)."""
    if id(m) in memo:
        return memo[id(m)]
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
        new, why = _sync_plain(m, process_group, plain)
        if why is not None:
            left.append((path, why))
    else:
        new = m
        for name, child in list(m._modules.items()):
            if child is not None:
                synced = _sync_tree(child, f"{path}.{name}" if path else name, process_group, plain, left, memo)
                if synced is not child:
                    m._modules[name] = synced
    memo[id(m)] = new
    return new


_TORCH_SYNC_DEVICES = ("cuda", "xpu", "hpu", "mps")  # where torch's SyncBatchNorm can synchronise


def _sync_plain(bn: nn.Module, process_group, plain: str):
    """``(module, None)`` with ``bn`` synchronised, or ``(bn, reason)`` when it is left."""
    cls = type(bn)
    if cls.forward is not nn.modules.batchnorm._BatchNorm.forward:
        return bn, (f"{cls.__name__} has its own forward: a bare SyncBatchNorm would drop it (fusedskip.convert "
                    "it first, or use its library's converter)")
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        return bn, "uninitialised lazy BatchNorm (run one forward first)"
    if plain == "keep":
        return bn, "plain='keep'"
    mode = plain
    if plain == "auto":
        tensors = list(bn.parameters(recurse=False)) + list(bn.buffers(recurse=False))
        device = tensors[0].device.type if tensors else None
        accelerated = device is None or device in _TORCH_SYNC_DEVICES + (torch._C._get_privateuse1_backend_name(),)
        mode = "torch" if accelerated or not (dist.is_available() and dist.is_initialized()) else "fused-only"
    if mode in ("fused", "fused-only") and cls is nn.BatchNorm2d:
        from .conversion.core import fuse_norm_alone

        try:
            fused = fuse_norm_alone(bn)
        except ValueError as exc:
            if mode == "fused-only":
                return bn, f"on the CPU, where torch's SyncBatchNorm cannot train, and not fusable: {exc}"
        else:
            fused.sync = True
            fused.process_group = process_group
            return fused, None
    if mode == "fused-only":
        return bn, (f"{cls.__name__} on the CPU in an initialised process group: torch's SyncBatchNorm cannot train "
                    "there and fusedskip synchronises 2-D BatchNorm only")
    return nn.SyncBatchNorm.convert_sync_batchnorm(bn, process_group), None


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: every BatchNormAct2d computes local statistics again."""
    for m in module.modules():
        if isinstance(m, BatchNormAct2d):
            m.sync = False
            m.process_group = None
    return module
