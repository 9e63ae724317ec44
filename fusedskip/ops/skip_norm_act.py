"""The fused skip → norm → activation chain of an Additive U-Net decoder stage:

    y = act(Norm(up + a ⊙ skip))

with GatedSkip's learned gate ``a``. For GroupNorm the whole chain is one fused op
(:func:`fusedskip.ops.group_norm_act.group_norm_act` with ``skip=``): the forward reads ``up``
and ``skip`` once for the statistics and once for the output, never writing ``up + a ⊙ skip``;
the backward recomputes it. For BatchNorm it hands ``up``, ``skip`` and the gate to
:class:`~fusedskip.ops.batch_norm_act.BatchNormAct2d`, whose kernels fuse the skip the same way.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
from torch import nn

from .._checks import check_activation, check_same_shape_device_dtype
from .batch_norm_act import BatchNormAct2d
from .gated_skip import GatedSkip
from .group_norm_act import ActArg, GroupNormAct, group_norm_act

NORM_KINDS = ("group", "batch")


class SkipNormAct(nn.Module):
    """``act(Norm(up + a ⊙ skip))``: a gated additive skip followed by a normalisation and an
    activation, fused into one op for GroupNorm.

    Submodules (their state_dict keys follow): ``skip``, a :class:`GatedSkip` holding the gate
    (``skip.beta``), and ``norm``, a :class:`GroupNormAct` (``norm.weight``, ``norm.bias``, the
    names of nn.GroupNorm) or, for ``norm="batch"``, a ``BatchNormAct2d`` (nn.BatchNorm2d's names).

    Gradients: with h = up + a ⊙ skip, ``∂L/∂up = ∂L/∂h``, ``∂L/∂skip = a·∂L/∂h`` and
    ``∂L/∂β_gate = a'(β)·Σ ∂L/∂h·skip``; the norm's gradients as in :func:`group_norm_act`.

    Gate overrides behave as GatedSkip's: :meth:`override_gate` (delegating to ``self.skip``)
    replaces or scales the gate in eval mode and raises in training mode.

    Args:
        channels: C of ``up`` and ``skip``.
        norm: ``"group"`` (fused) or ``"batch"``.
        num_groups: GroupNorm's G (must divide C); unused for BatchNorm.
        eps, affine: the norm's.
        act, negative_slope: the activation, by name or torch module (see :func:`group_norm_act`).
        gate, gate_init: GatedSkip's ``gate`` kind (or a fixed float) and initial gate value.
        momentum, track_running_stats: BatchNorm's running statistics; unused for GroupNorm.
    """

    def __init__(self, channels: int, norm: str = "group", num_groups: int = 32, eps: float = 1e-5,
                 affine: bool = True, act: ActArg = "silu", negative_slope: Optional[float] = None,
                 gate: Union[str, float] = "softplus", gate_init: Optional[float] = None,
                 momentum: Optional[float] = 0.1, track_running_stats: bool = True):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if norm not in NORM_KINDS:
            raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")
        self.channels = channels
        self.norm_kind = norm
        self.skip = GatedSkip(channels, gate=gate, init=gate_init)
        if norm == "group":
            self.norm = GroupNormAct(num_groups, channels, eps=eps, affine=affine, act=act,
                                     negative_slope=negative_slope)
        else:
            self.norm = BatchNormAct2d(
                num_features=channels, eps=eps, momentum=momentum, affine=affine,
                track_running_stats=track_running_stats, act=act, negative_slope=negative_slope)

    def gate(self) -> Union[float, torch.Tensor]:
        """The gate applied in forward (GatedSkip's, overrides included)."""
        return self.skip.gate()

    def override_gate(self, value: Optional[float] = None,
                      scale: Optional[float] = None) -> contextlib.AbstractContextManager:
        """GatedSkip.override_gate: within the block use gate ``value`` or the learned gate × ``scale`` (eval only)."""
        return self.skip.override_gate(value=value, scale=scale)

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        check_activation("up", up)
        check_activation("skip", skip)
        check_same_shape_device_dtype("up", up, "skip", skip)
        # GatedSkip's own checks (override only in eval, channel count), since the fused paths
        # take its gate without calling its forward.
        gate = self.skip.forward_gate(up)
        if self.norm_kind == "batch":
            return self.norm(up, skip, gate)
        n = self.norm
        return group_norm_act(up, n.num_groups, n.weight, n.bias, n.eps, n.act, n.negative_slope,
                              skip=skip, gate=gate, act_weight=n.prelu_weight)

    def extra_repr(self) -> str:
        return f"{self.channels}, norm={self.norm_kind}"
