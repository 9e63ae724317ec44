"""Activation names, their kernel ids and their reference PyTorch modules/functions."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

# Ids match kernels/activations.py.
ACTIVATION_IDS = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5}
_ALIASES = {None: "identity", "none": "identity", "linear": "identity", "swish": "silu", "leakyrelu": "leaky_relu"}
DEFAULT_LEAKY_SLOPE = 0.01


def resolve_activation(act: Union[str, None, nn.Module], slope: Optional[float] = None) -> Tuple[str, float]:
    """Normalise an activation given by name (or as a torch module) to ``(name, slope)``."""
    if isinstance(act, nn.Module):
        if type(act) is nn.Identity:
            return "identity", 0.0
        if type(act) is nn.ReLU:
            return "relu", 0.0
        if type(act) is nn.LeakyReLU:
            return "leaky_relu", float(act.negative_slope)
        if type(act) is nn.SiLU:
            return "silu", 0.0
        if type(act) is nn.GELU:
            return ("gelu_tanh" if act.approximate == "tanh" else "gelu"), 0.0
        raise ValueError(f"act: unsupported activation module {type(act).__name__}; "
                         f"supported: {sorted(ACTIVATION_IDS)}")
    key = act.lower() if isinstance(act, str) else act
    name = _ALIASES.get(key, key)
    if name not in ACTIVATION_IDS:
        raise ValueError(f"act must be one of {sorted(ACTIVATION_IDS)} (or None), got {act!r}")
    if name == "leaky_relu":
        return name, DEFAULT_LEAKY_SLOPE if slope is None else float(slope)
    return name, 0.0


def apply_activation_reference(x: torch.Tensor, name: str, slope: float = 0.0) -> torch.Tensor:
    """The reference PyTorch activation ``name``."""
    if name == "identity":
        return x
    if name == "relu":
        return F.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, slope)
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def activation_module(name: str, slope: float = 0.0) -> nn.Module:
    """A plain torch module for ``name`` (used when converting fused modules back)."""
    return {
        "identity": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU,
        "leaky_relu": lambda: nn.LeakyReLU(slope), "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    }[name]()
