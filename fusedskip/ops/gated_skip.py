"""Gated additive skip fusion ``out = up + a ⊙ skip`` (the Additive U-Net's skip connection).

Side by side here: the reference PyTorch path, the torch.library ops (torch.compile's route to the
Triton kernels in ``fusedskip/kernels/gated_skip.py``), the autograd Function (eager launches), the functional
:func:`gated_skip_add` and the module :class:`GatedSkip`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Tuple, Union

import torch
from torch import nn

from .. import backend
from .._checks import check_activation, check_per_channel, check_same_shape_device_dtype
from ..kernels import gated_skip as kernels
from ..kernels.launch import acc_dtype, register_op
from ._autograd import create_graph_requested

GateArg = Union[float, int, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Reference path: plain PyTorch, differentiated by autograd.
# --------------------------------------------------------------------------------------------
def _gated_sum_acc(up: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[GateArg]) -> torch.Tensor:
    """``up + gate ⊙ skip`` computed with PyTorch ops in the accumulation dtype (fp32, fp64 for fp64
    inputs); ``up`` alone without a skip. Also the input of the norms' reference paths. ``gate``: a
    tensor of 1 or C values, a float, or None (1.0)."""
    acc = acc_dtype(up)
    h = up.to(acc)
    if skip is None:
        return h
    a = 1.0 if gate is None else gate
    a = a.to(acc).reshape(1, -1, 1, 1) if isinstance(a, torch.Tensor) else float(a)
    return h + a * skip.to(acc)


def gated_skip_add_reference(up: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``up + gate ⊙ skip`` in PyTorch ops, accumulated in fp32 (fp64 for fp64 inputs)."""
    return _gated_sum_acc(up, skip, gate).to(up.dtype)


# --------------------------------------------------------------------------------------------
# torch.library ops around the kernel launches, for torch.compile (``launch.register_op``: a
# triton_op that Inductor sees into on PyTorch >= 2.6, an opaque custom op otherwise); eager
# calls launch the kernels directly from the autograd Function.
# --------------------------------------------------------------------------------------------
@register_op("gated_skip_add_forward")
def gated_skip_add_forward(up: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor, launcher) -> torch.Tensor:
    return kernels.gated_skip_forward(up, skip, gate, launcher=launcher)


@gated_skip_add_forward.register_fake
def _(up, skip, gate):
    return torch.empty_like(up, memory_format=torch.preserve_format)


@register_op("gated_skip_add_backward")
def gated_skip_add_backward(
    grad: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor, need_dskip: bool, need_dgate: bool, launcher,
) -> Tuple[torch.Tensor, torch.Tensor]:
    dskip, dgate = kernels.gated_skip_backward(grad, skip, gate, need_dskip, need_dgate, launcher=launcher)
    # Gradients not asked for come back as empty tensors (custom ops cannot return None).
    return (dskip if dskip is not None else skip.new_empty(0),
            dgate if dgate is not None else gate.new_empty(0))


@gated_skip_add_backward.register_fake
def _(grad, skip, gate, need_dskip, need_dgate):
    dskip = torch.empty_like(skip, memory_format=torch.preserve_format) if need_dskip else skip.new_empty(0)
    return dskip, (torch.empty_like(gate) if need_dgate else gate.new_empty(0))


class GatedSkipAddFunction(torch.autograd.Function):
    """Autograd Function of the fused op: ``d_up = g``, ``d_skip = a·g``, ``d_a = Σ g·skip``.

    ``gate`` is the gate value ``a`` itself (fp32, one or C values); gradients to a gate's
    parameters (softplus/sigmoid of β) flow through autograd on those C-element tensors.
    Eager calls launch the kernels directly; under torch.compile the torch.library ops run.
    """

    @staticmethod
    def forward(ctx, up: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(skip, gate)
        if torch.compiler.is_compiling():
            return torch.ops.fusedskip.gated_skip_add_forward(up, skip, gate)
        return kernels.gated_skip_forward(up, skip, gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        skip, gate = ctx.saved_tensors
        need_dup, need_dskip, need_dgate = ctx.needs_input_grad
        if create_graph_requested():  # the kernel's gradients are not differentiable again: torch ops
            return (grad if need_dup else None,) + _gated_skip_grads_torch(grad, skip, gate, need_dskip, need_dgate)
        if torch.compiler.is_compiling():
            dskip, dgate = torch.ops.fusedskip.gated_skip_add_backward(grad, skip, gate, need_dskip, need_dgate)
        else:
            dskip, dgate = kernels.gated_skip_backward(grad, skip, gate, need_dskip, need_dgate)
        return (grad if need_dup else None,
                dskip if need_dskip else None,
                dgate if need_dgate else None)


def _gated_skip_grads_torch(grad, skip, gate, need_dskip: bool, need_dgate: bool):
    """(d_skip, d_gate) in differentiable torch ops (backward under ``create_graph=True``)."""
    acc = gate.dtype
    g = grad.to(acc)
    dskip = (g * gate.reshape(1, -1, 1, 1)).to(skip.dtype) if need_dskip else None
    dgate = None
    if need_dgate:
        per_channel = (g * skip.to(acc)).sum(dim=(0, 2, 3))
        dgate = (per_channel.sum() if gate.numel() == 1 else per_channel).reshape(gate.shape)
    return dskip, dgate


# --------------------------------------------------------------------------------------------
# Functional
# --------------------------------------------------------------------------------------------
def _gate_tensor(gate: GateArg, up: torch.Tensor) -> torch.Tensor:
    """Validate ``gate`` and return it as a 1-D accumulation-dtype tensor of 1 or C values."""
    channels = up.shape[1]
    if isinstance(gate, bool) or not isinstance(gate, (float, int, torch.Tensor)):
        raise TypeError(f"gate must be a float or a tensor of 1 or {channels} values, got {type(gate).__name__}")
    if not isinstance(gate, torch.Tensor):
        if not math.isfinite(gate):
            raise ValueError(f"gate must be finite, got {gate}")
        return _constant_gate(float(gate), up)
    check_per_channel("gate", gate, channels, up.device, allow_scalar=True)
    if gate.dim() != 1:  # () -> (1,); a 1-D gate is used as it is (no view, no copy per call)
        gate = gate.reshape(-1)
    acc = acc_dtype(up)
    return gate if gate.dtype == acc else gate.to(acc)


_CONSTANT_GATES: dict = {}


def _constant_gate(value: float, up: torch.Tensor) -> torch.Tensor:
    """A float gate as a one-value accumulation-dtype tensor on ``up``'s device. Eager calls on plain
    tensors share one read-only tensor per (value, dtype, device) instead of a ``torch.full`` (an
    allocation and a fill launch) per call; traced calls (torch.compile, fake or subclass tensors)
    build it afresh so it belongs to the trace."""
    acc = acc_dtype(up)
    if type(up) is not torch.Tensor or torch.compiler.is_compiling():
        return torch.full((1,), value, dtype=acc, device=up.device)
    key = (value, acc, up.device)
    gate = _CONSTANT_GATES.get(key)
    if gate is None:
        if len(_CONSTANT_GATES) >= 256:  # a stream of distinct values (e.g. a sweep): start afresh
            _CONSTANT_GATES.clear()
        with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, usable by autograd later
            gate = _CONSTANT_GATES[key] = torch.full((1,), value, dtype=acc, device=up.device)
    return gate


def _skip_gate_tensor(x: torch.Tensor, skip: Optional[torch.Tensor],
                      gate: Optional[GateArg]) -> Optional[torch.Tensor]:
    """Validate the optional skip a fused norm adds first (``x + gate ⊙ skip``) and return its gate
    as :func:`_gate_tensor` does (1.0 by default); None without a skip."""
    if skip is None:
        if gate is not None:
            raise ValueError("gate scales skip (x + gate·skip): pass skip as well (or leave gate as None)")
        return None
    check_activation("skip", skip)
    check_same_shape_device_dtype("x", x, "skip", skip)
    return _gate_tensor(1.0 if gate is None else gate, x)


def gated_skip_add(up: torch.Tensor, skip: torch.Tensor, gate: GateArg = 1.0) -> torch.Tensor:
    """Gated additive skip fusion: ``out[n, c, h, w] = up[n, c, h, w] + a[c] · skip[n, c, h, w]``.

    Args:
        up: decoder tensor ``[N, C, H, W]``, float16 / bfloat16 / float32 / float64, any strides
            (NCHW and channels_last run without copies; the output keeps ``up``'s layout).
        skip: encoder tensor of exactly ``up``'s shape, device and dtype (never broadcast).
        gate: the gate value ``a``: a Python float (fixed), or a tensor of shape ``()``, ``(1,)``
            (one scalar) or ``(C,)`` (per channel), typically ``softplus(β)`` from
            :class:`GatedSkip`. Arithmetic is in fp32 (fp64 for fp64 inputs).

    Gradients: ``∂L/∂up = g``, ``∂L/∂skip = a · g`` and ``∂L/∂a[c] = Σ_{n,h,w} g · skip``
    (summed over channels too for a scalar gate), reduced in fp32 through per-program partial
    buffers, deterministic (no float atomics). ``g`` is the incoming gradient.

    Runs the Triton kernels or the reference path as :mod:`fusedskip.backend` decides.
    Raises ``TypeError``/``ValueError`` naming the argument for non-4-D, integer, mismatched or
    wrongly shaped inputs, before any launch. Empty tensors are allowed.
    """
    check_activation("up", up)
    check_activation("skip", skip)
    check_same_shape_device_dtype("up", up, "skip", skip)
    a = _gate_tensor(gate, up)
    if backend.use_triton(up):
        return GatedSkipAddFunction.apply(up, skip, a)
    return gated_skip_add_reference(up, skip, a)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------
GATE_KINDS = ("softplus", "softplus_channel", "sigmoid_channel")


class GatedSkip(nn.Module):
    """Learned gated additive skip: ``out = up + a ⊙ skip``, the Additive U-Net's replacement for
    concatenating ``skip`` onto ``up``.

    Gate ``a`` (parameter ``beta``):
      * ``"softplus"`` (default, the paper's): ``a = softplus(β)`` with one scalar β per skip;
      * ``"softplus_channel"``: ``a[c] = softplus(β[c])``, one β per channel;
      * ``"sigmoid_channel"``: ``a[c] = sigmoid(β[c])``, a per-channel gate in (0, 1);
      * a float: a fixed gate with no parameter.

    β is initialised so that ``a = init`` (default 1 for softplus gates, 0.5 for sigmoid).

    Gradients: ``∂L/∂up = g``, ``∂L/∂skip = a·g``, ``∂L/∂β = a'(β) · Σ g·skip`` (over N, H, W and,
    for the scalar gate, C), where ``a'`` is sigmoid(β) for softplus and a(1−a) for sigmoid.

    Inference-time override (:meth:`override_gate`): scale the learned gate or replace it with a
    fixed value, e.g. to measure how much a skip contributes. Overrides refuse to run in training
    mode so they cannot leak into a training run unnoticed.

    Args:
        channels: number of channels C (required for the per-channel gates; checked if given).
        gate: one of ``"softplus"``, ``"softplus_channel"``, ``"sigmoid_channel"`` or a float.
        init: initial gate value ``a`` (not β).
    """

    def __init__(self, channels: Optional[int] = None, gate: Union[str, float] = "softplus",
                 init: Optional[float] = None):
        super().__init__()
        if channels is not None and (not isinstance(channels, int) or channels <= 0):
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.gate_scale: Optional[float] = None
        self.gate_value: Optional[float] = None
        if isinstance(gate, (float, int)) and not isinstance(gate, bool):
            if init is not None:
                raise ValueError("init applies to learned gates only; a fixed gate is its own value")
            self.kind = "fixed"
            self.fixed_value = float(gate)
            self.register_parameter("beta", None)
            return
        if gate not in GATE_KINDS:
            raise ValueError(f"gate must be one of {GATE_KINDS} or a float, got {gate!r}")
        self.kind = gate
        if gate != "softplus" and channels is None:
            raise ValueError(f"gate {gate!r} has one value per channel: pass channels")
        size = 1 if gate == "softplus" else channels
        if gate == "sigmoid_channel":
            init = 0.5 if init is None else float(init)
            if not 0.0 < init < 1.0:
                raise ValueError(f"init must lie in (0, 1) for a sigmoid gate, got {init}")
            beta0 = math.log(init / (1.0 - init))
        else:
            init = 1.0 if init is None else float(init)
            if init <= 0.0:
                raise ValueError(f"init must be > 0 for a softplus gate, got {init}")
            beta0 = init + math.log(-math.expm1(-init))  # softplus⁻¹, stable for large init
        self.beta = nn.Parameter(torch.full((size,), beta0))

    def learned_gate(self) -> Union[float, torch.Tensor]:
        """The gate the parameters give, ignoring any override (1 or C values; a float if fixed)."""
        if self.kind == "fixed":
            return self.fixed_value
        if self.kind == "sigmoid_channel":
            return torch.sigmoid(self.beta)
        return nn.functional.softplus(self.beta)

    def gate(self) -> Union[float, torch.Tensor]:
        """The gate applied in forward: the learned gate with any inference override applied."""
        if self.gate_value is not None:
            return self.gate_value
        a = self.learned_gate()
        return a * self.gate_scale if self.gate_scale is not None else a

    @contextlib.contextmanager
    def override_gate(self, value: Optional[float] = None, scale: Optional[float] = None) -> Iterator[None]:
        """Within the block, use gate ``value`` (or the learned gate times ``scale``) in eval mode."""
        if (value is None) == (scale is None):
            raise ValueError("override_gate takes exactly one of value= or scale=")
        previous = (self.gate_value, self.gate_scale)
        self.gate_value = None if value is None else float(value)
        self.gate_scale = None if scale is None else float(scale)
        try:
            yield
        finally:
            self.gate_value, self.gate_scale = previous

    def forward_gate(self, up: torch.Tensor) -> Union[float, torch.Tensor]:
        """The gate for a forward on ``up``, after the checks every user of this gate needs."""
        if self.training and (self.gate_value is not None or self.gate_scale is not None):
            raise RuntimeError("GatedSkip gate override is for inference: call .eval() first or clear it")
        if (self.channels is not None and isinstance(up, torch.Tensor) and up.dim() == 4
                and up.shape[1] != self.channels):
            raise ValueError(f"up must have {self.channels} channels for this GatedSkip, got {up.shape[1]}")
        return self.gate()

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return gated_skip_add(up, skip, self.forward_gate(up))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gate={self.kind if self.kind != 'fixed' else self.fixed_value}"
