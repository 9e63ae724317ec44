"""Input validation shared by every op: clear errors that name the argument, before any launch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_activation(name: str, t, ndim: int = 4, layout: str = "[N, C, H, W]") -> None:
    """``t`` must be a floating-point tensor with ``ndim`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}: "
                        f"convert it with {name}.to_dense() first")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_shape_device_dtype(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two activations that combine element-wise: no broadcasting, one device, one dtype."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a} (no broadcasting): "
            f"{name_a} is {tuple(a.shape)}, {name_b} is {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on {name_a}'s device {a.device}, got {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have {name_a}'s dtype {a.dtype}, got {b.dtype}")


def check_per_channel(name: str, t, channels: int, device: torch.device, allow_scalar: bool) -> None:
    """A parameter with one value per channel (or a single value when ``allow_scalar``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    ok = (t.dim() == 1 and t.shape[0] == channels) or (allow_scalar and t.numel() == 1 and t.dim() <= 1)
    if not ok:
        expected = f"shape ({channels},)" + (", () or (1,)" if allow_scalar else "")
        raise ValueError(f"{name} must have {expected} for {channels} channels, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the activations' device {device}, got {t.device}")


def conform_residual(x: torch.Tensor, residual: Optional[torch.Tensor], *others: Optional[torch.Tensor]):
    """A fused module's ``residual`` made to match ``x`` as eager ``norm(x) + residual`` would:
    broadcast to x's shape (an error naming ``residual`` if it does not broadcast to it) and both
    in the promoted dtype (so the output dtype is eager's). ``others`` (a pre-norm skip) follow
    x's dtype. Returns ``(x, residual, *others)``; nothing changes for a same-shape, same-dtype
    residual (the converted ResNet blocks' case), so the fused op sees the tensors unchanged."""
    if residual is None:
        return (x, residual, *others)
    check_activation("residual", residual)
    if residual.shape != x.shape:
        try:
            ok = torch.broadcast_shapes(residual.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"residual must broadcast to x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        residual = residual.expand(x.shape)
    dtype = torch.promote_types(x.dtype, residual.dtype)
    if dtype != x.dtype:
        x = x.to(dtype)
        others = tuple(None if t is None else t.to(dtype) for t in others)
    return (x, residual.to(dtype), *others)


def check_residual(x: torch.Tensor, residual) -> None:
    """A residual added after the norm: x's shape, dtype and device (any strides), or None."""
    if residual is not None:
        check_activation("residual", residual)
        check_same_shape_device_dtype("x", x, "residual", residual)


def resolve_prelu_weight(act, name: str, act_weight, channels: int, device) -> Optional[torch.Tensor]:
    """PReLU's learned slope for an op with activation ``name``: ``act_weight``, else the weight of
    an ``nn.PReLU`` given as ``act``; 1 or C values on x's device. None for other activations,
    which must not get one; PReLU must."""
    if act_weight is None and isinstance(act, nn.PReLU):
        act_weight = act.weight
    if name != "prelu":
        if act_weight is not None:
            raise ValueError(f"act_weight is PReLU's learned slope: it needs act='prelu' (or nn.PReLU), "
                             f"got act={name!r}")
        return None
    if act_weight is None:
        raise ValueError("act='prelu' needs its learned slope: it needs act_weight (1 or C values) or "
                         "act=nn.PReLU(...)")
    check_per_channel("act_weight", act_weight, channels, device, allow_scalar=True)
    return act_weight
