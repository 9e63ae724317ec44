"""Building blocks of the U-Nets, assembled from fusedskip modules.

``conv_norm_act`` returns :class:`fusedskip.ops.conv_norm_act.ConvNormAct` (fused conv-epilogue /
norm + activation kernels on a GPU, the reference PyTorch path elsewhere). Fusion modules (gated
additive skip, gated skip + norm + activation, concatenation) share one interface:
``fuse(up, skip) -> tensor``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..ops.conv_norm_act import ConvNormAct
from ..ops.gated_skip import GatedSkip
from ..ops.skip_norm_act import SkipNormAct

NORMS = ("batch", "group", "instance", None)


def normalise_norm(norm: Optional[str]) -> Optional[str]:
    if norm is None or (isinstance(norm, str) and norm.lower() in ("none", "identity", "")):
        return None
    key = norm.lower() if isinstance(norm, str) else norm
    aliases = {"bn": "batch", "batchnorm": "batch", "gn": "group", "groupnorm": "group",
               "in": "instance", "instancenorm": "instance"}
    key = aliases.get(key, key)
    if key not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return key


def group_count(channels: int, num_groups: int) -> int:
    """The largest divisor of ``channels`` not above ``num_groups`` (GroupNorm needs a divisor)."""
    g = max(1, min(int(num_groups), channels))
    while channels % g:
        g -= 1
    return g


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                  norm: Optional[str] = "batch", num_groups: int = 32, act="relu",
                  negative_slope: Optional[float] = None) -> nn.Module:
    norm = normalise_norm(norm)
    kwargs = dict(kernel_size=kernel_size, stride=stride, norm=norm, act=act)
    if norm == "group":
        kwargs["num_groups"] = group_count(out_channels, num_groups)
    if negative_slope is not None:
        kwargs["negative_slope"] = negative_slope
    return ConvNormAct(in_channels, out_channels, **kwargs)


class ConvBlock(nn.Sequential):
    """``n`` × ConvNormAct (conv-BN-ReLU ×2 by default); ``last_act=False`` drops the final act."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 2, kernel_size: int = 3,
                 norm: Optional[str] = "batch", num_groups: int = 32, act="relu",
                 negative_slope: Optional[float] = None, last_act: bool = True):
        if n < 1:
            raise ValueError(f"convs_per_block must be >= 1, got {n}")
        layers = []
        for i in range(n):
            layer_act = act if (last_act or i < n - 1) else None
            layers.append(conv_norm_act(in_channels if i == 0 else out_channels, out_channels, kernel_size,
                                        norm=norm, num_groups=num_groups, act=layer_act,
                                        negative_slope=negative_slope))
        super().__init__(*layers)


class ConcatFuse(nn.Module):
    """The concatenative U-Net skip: ``cat([up, skip], dim=1)`` (the baseline)."""

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([up, skip], dim=1)


def gated_skip_of(fuse: nn.Module) -> Optional[GatedSkip]:
    """The GatedSkip inside a fusion module (itself, or a SkipNormAct's ``skip``), else None."""
    if isinstance(fuse, GatedSkip):
        return fuse
    inner = getattr(fuse, "skip", None)
    return inner if isinstance(inner, GatedSkip) else None


def make_fuse(fusion: str, channels: int, gate: Union[str, float], gate_init: Optional[float],
              norm: Optional[str], num_groups: int, act, negative_slope: Optional[float]) -> nn.Module:
    if fusion == "gated":
        return GatedSkip(channels, gate=gate, init=gate_init)
    if fusion == "concat":
        return ConcatFuse()
    if fusion == "gated_norm_act":
        norm = normalise_norm(norm) or "group"
        kwargs = dict(act=act, gate=gate, gate_init=gate_init)
        if negative_slope is not None:
            kwargs["negative_slope"] = negative_slope
        if norm == "batch":
            kwargs["norm"] = "batch"
        else:  # group norm; instance norm = one channel per group
            groups = channels if norm == "instance" else group_count(channels, num_groups)
            kwargs.update(norm="group", num_groups=groups)
        return SkipNormAct(channels, **kwargs)
    raise ValueError(f"fusion must be one of ('gated', 'gated_norm_act', 'concat'), got {fusion!r}")


class Upsample(nn.Module):
    """×2 up-sampling (interpolation or transposed conv) with a 1×1 projection where widths differ."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "bilinear"):
        super().__init__()
        if mode not in ("bilinear", "nearest", "transpose"):
            raise ValueError(f"up must be 'bilinear', 'nearest' or 'transpose', got {mode!r}")
        self.mode = mode
        if mode == "transpose":
            self.proj = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.proj = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        if self.mode == "transpose":
            x = self.proj(x)
            if tuple(x.shape[-2:]) != tuple(size):
                x = nn.functional.interpolate(x, size=size, mode="nearest")
            return x
        kw = {"align_corners": False} if self.mode == "bilinear" else {}
        x = nn.functional.interpolate(x, size=size, mode=self.mode, **kw)
        return self.proj(x) if self.proj is not None else x


def make_down(mode: str, channels: int, norm, num_groups, act, negative_slope) -> nn.Module:
    if mode == "maxpool":
        return nn.MaxPool2d(2)
    if mode == "avgpool":
        return nn.AvgPool2d(2)
    if mode == "conv":
        return conv_norm_act(channels, channels, 3, stride=2, norm=norm, num_groups=num_groups, act=act,
                             negative_slope=negative_slope)
    raise ValueError(f"down must be 'maxpool', 'avgpool' or 'conv', got {mode!r}")


def per_level(value: Union[int, Sequence[int]], depth: int, name: str):
    if isinstance(value, int) and not isinstance(value, bool):
        values = [value] * depth
    else:
        values = [int(v) for v in value]
        if len(values) != depth:
            raise ValueError(f"{name} needs one value per level ({depth}), got {len(values)}")
    for v in values:
        if v < 1 or v % 2 == 0:
            raise ValueError(f"{name} values must be odd positive ints, got {values}")
    return values


def softplus_inverse(a: float) -> float:
    return a + math.log(-math.expm1(-a))
