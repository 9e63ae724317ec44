"""Activation names, their kernel ids and their reference PyTorch modules/functions."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

# Ids match kernels/activations.py.
ACTIVATION_IDS = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5,
                  "relu6": 6, "hardswish": 7, "hardsigmoid": 8, "sigmoid": 9, "mish": 10, "elu": 11,
                  "prelu": 12}
# Modules with no parameter -> name (ELU's alpha travels in the slope slot, see resolve_activation).
_PLAIN_MODULES = {nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
                  nn.Sigmoid: "sigmoid", nn.Mish: "mish"}
_ALIASES = {None: "identity", "none": "identity", "linear": "identity", "swish": "silu", "leakyrelu": "leaky_relu"}
DEFAULT_LEAKY_SLOPE = 0.01


def _check_slope(slope, name: str = "negative_slope") -> float:
    """A LeakyReLU slope: a finite real number (not a string, a bool or NaN)."""
    if isinstance(slope, bool) or not isinstance(slope, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(slope).__name__} {slope!r}")
    if not math.isfinite(float(slope)):
        raise ValueError(f"{name} must be finite, got {slope!r}")
    return float(slope)


def resolve_activation(act: Union[str, None, nn.Module], slope: Optional[float] = None) -> Tuple[str, float]:
    """Normalise an activation given by name (or as a torch module) to ``(name, slope)``.

    ``slope`` (LeakyReLU's negative slope), when given, must be a finite real number."""
    if slope is not None:
        slope = _check_slope(slope)
    if isinstance(act, nn.Module):
        if type(act) is nn.Identity:
            return "identity", 0.0
        if type(act) is nn.ReLU:
            return "relu", 0.0
        if type(act) is nn.LeakyReLU:
            return "leaky_relu", _check_slope(act.negative_slope, "LeakyReLU.negative_slope")
        if type(act) is nn.SiLU:
            return "silu", 0.0
        if type(act) is nn.GELU:
            return ("gelu_tanh" if act.approximate == "tanh" else "gelu"), 0.0
        if type(act) in _PLAIN_MODULES:
            return _PLAIN_MODULES[type(act)], 0.0
        if type(act) is nn.ELU:
            return "elu", _check_slope(act.alpha, "ELU.alpha")
        if type(act) is nn.PReLU:  # the learned slope is the module's weight (see PReLUWeight)
            return "prelu", 0.0
        raise ValueError(f"act: unsupported activation module {type(act).__name__}; "
                         f"supported: {sorted(ACTIVATION_IDS)}")
    key = act.lower() if isinstance(act, str) else act
    name = _ALIASES.get(key, key)
    if name not in ACTIVATION_IDS:
        raise ValueError(f"act must be one of {sorted(ACTIVATION_IDS)} (or None), got {act!r}")
    if name == "leaky_relu":
        return name, DEFAULT_LEAKY_SLOPE if slope is None else float(slope)
    if name == "elu":  # ELU's alpha is passed as the slope
        return name, 1.0 if slope is None else float(slope)
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
    if name in ("relu6", "hardswish", "hardsigmoid", "mish"):
        return getattr(F, name)(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "elu":
        return F.elu(x, slope)
    if name == "prelu":  # slope: the learned weight, a tensor of 1 or C values
        if not isinstance(slope, torch.Tensor):
            slope = torch.tensor([float(slope)], dtype=x.dtype, device=x.device)
        return F.prelu(x, slope.to(x.dtype))
    raise ValueError(f"unknown activation {name!r}")


def activation_module(name: str, slope: float = 0.0, weight: Optional[torch.Tensor] = None) -> nn.Module:
    """A plain torch module for ``name`` (used when converting fused modules back); ``weight``:
    PReLU's learned slope (a Parameter is moved in as the very object, so optimizers keep it)."""
    if name == "prelu":
        act = nn.PReLU(weight.numel() if weight is not None else 1)
        if weight is not None:
            act.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach().reshape(-1))
        return act
    return {
        "identity": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU,
        "leaky_relu": lambda: nn.LeakyReLU(slope), "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid,
        "mish": nn.Mish, "elu": lambda: nn.ELU(slope),
    }[name]()


DEFAULT_PRELU_INIT = 0.25  # nn.PReLU's init


class PReLUWeight:
    """The learned slope of a fused module whose activation is PReLU (a mixin of nn.Modules).

    A module built with ``act="prelu"`` (``prelu_parameters`` = 1 or C slopes, 0.25 each, as
    nn.PReLU) or with ``act=nn.PReLU(...)`` (its weight copied) owns the Parameter ``act_weight``.
    :func:`fusedskip.convert` instead calls :meth:`borrow_act_weight` with the PReLU's slot, so the
    slope stays a parameter of that slot under its original state_dict key (``<act>.weight``) and
    the fused module reads it from there. :attr:`prelu_weight` is the slope in use (None when the
    activation is not PReLU).
    """

    def _init_act_weight(self, act, name: str, channels: int, prelu_parameters: int, factory: dict) -> None:
        if name != "prelu":
            self.register_parameter("act_weight", None)
            return
        if isinstance(act, nn.PReLU):
            weight = act.weight.detach().clone()
        else:
            if prelu_parameters not in (1, channels):
                raise ValueError(f"prelu_parameters must be 1 or the channel count {channels}, "
                                 f"got {prelu_parameters!r}")
            weight = torch.full((prelu_parameters,), DEFAULT_PRELU_INIT, **factory)
        if weight.numel() not in (1, channels):
            raise ValueError(f"act: nn.PReLU must have 1 or {channels} parameters, got {weight.numel()}")
        self.act_weight = nn.Parameter(weight.reshape(-1).to(**{k: v for k, v in factory.items() if v is not None}))

    def borrow_act_weight(self, owner: nn.Module) -> None:
        """Read the PReLU slope from ``owner.weight`` (not registered here: no state_dict key)."""
        weight = getattr(owner, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"owner must hold the PReLU slope as .weight, got {type(owner).__name__}")
        self.register_parameter("act_weight", None)
        object.__setattr__(self, "_act_weight_owner", owner)

    @property
    def prelu_weight(self) -> Optional[torch.Tensor]:
        owner = self.__dict__.get("_act_weight_owner")
        return owner.weight if owner is not None else self.act_weight
