"""ConvNormAct: ``act(norm(conv(x)))`` with the convolution on cuDNN (through a plain nn.Conv2d)
and the norm + activation fused (BatchNormAct2d, GroupNormAct or an InstanceNorm-style GroupNormAct).

Conv bias and norms. A per-channel constant b_c added before a norm is removed exactly by the
norm's mean subtraction when every normalisation group holds a single channel:

* BatchNorm (statistics per channel over N, H, W): absorbed. In training the batch mean carries
  b and cancels it; the *running* mean of a torch conv(bias) → BN pair also carries b, so the
  bias still matters in eval. ConvNormAct therefore never adds it to the activations but feeds it
  to the norm as ``input_bias``: it joins the running-mean update (training) and is subtracted
  from the running mean (eval) — the C-element equivalent of adding it, exactly what a torch
  conv(bias) → BN → act computes in every mode, so checkpoints move between the two.
* InstanceNorm / GroupNorm with one channel per group (statistics per (n, c)): absorbed
  completely (no running statistics): dropped.
* GroupNorm with more than one channel per group: NOT absorbed. GN subtracts the group mean, and
  a bias that differs between the channels of a group shifts them relative to each other and
  changes the group variance. The bias is applied by the convolution.

``bias=None`` (default) means no conv bias when a norm follows and a bias without a norm. With
``bias=True`` and an absorbing norm the bias stays in the state_dict (``conv.bias``, checkpoint
compatibility) but is frozen (``requires_grad=False``): its gradient is exactly zero in training.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..activations import activation_module, resolve_activation
from .batch_norm_act import ActArg, BatchNormAct2d
from .group_norm_act import GroupNormAct, InstanceNormAct2d

NORM_KINDS = ("batch", "group", "instance", None)
IntPair = Union[int, Tuple[int, int]]


class ConvNormAct(nn.Module):
    """``act(norm(conv(x)))``: an nn.Conv2d (cuDNN through torch) followed by a fused norm +
    activation.

    Submodules: ``conv`` (plain nn.Conv2d) and ``norm``: :class:`BatchNormAct2d` (``"batch"``),
    ``GroupNormAct(num_groups, C)`` (``"group"``), ``InstanceNormAct2d``
    = nn.InstanceNorm2d(affine=True) + act (``"instance"``), or the plain activation module
    (``None``). state_dict keys are therefore ``conv.weight`` [``conv.bias``], ``norm.weight``,
    ``norm.bias``, ``norm.running_mean``, ``norm.running_var``, ``norm.num_batches_tracked``,
    as for ``conv``/``norm`` pairs of torch modules.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: as nn.Conv2d.
        padding: None (default) pads ``dilation·(k − 1)/2`` per side ("same" size for odd
            kernels at stride 1), else as nn.Conv2d.
        bias: None = only without a norm; True/False forces it (see the module docstring for
            which norms absorb it).
        norm: ``"batch"``, ``"group"``, ``"instance"`` or None.
        num_groups: groups of the GroupNorm (must divide out_channels).
        act, negative_slope: the activation (name or torch module; see fusedskip.activations).
        eps, momentum: of the norm (momentum for BatchNorm only).

    Eval mode: :meth:`fold_bn` folds the BatchNorm into the conv weights (one-way).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair = 3, stride: IntPair = 1,
                 padding: Optional[Union[IntPair, str]] = None, dilation: IntPair = 1, groups: int = 1,
                 bias: Optional[bool] = None, norm: Optional[str] = "batch", num_groups: int = 32,
                 act: ActArg = "relu", negative_slope: Optional[float] = None, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1):
        super().__init__()
        if norm not in NORM_KINDS:
            raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")
        if norm == "group" and (not isinstance(num_groups, int) or num_groups <= 0 or out_channels % num_groups):
            raise ValueError(f"num_groups must be a positive divisor of out_channels={out_channels}, "
                             f"got {num_groups!r}")
        act_name, slope = resolve_activation(act, negative_slope)
        if padding is None:
            padding = tuple(d * (k - 1) // 2 for k, d in zip(_pair(kernel_size), _pair(dilation)))
        if bias is None:
            bias = norm is None
        self.norm_kind = norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias=bool(bias))
        # Per-channel constants vanish in norms whose groups hold one channel (module docstring).
        absorbing = norm in ("batch", "instance") or (norm == "group" and num_groups == out_channels)
        self.bias_absorbed = bool(bias) and absorbing
        if self.bias_absorbed:
            self.conv.bias.requires_grad_(False)
        self.folded = False
        neg = slope if act_name == "leaky_relu" else None
        if norm == "batch":
            self.norm = BatchNormAct2d(out_channels, eps=eps, momentum=momentum, act=act_name, negative_slope=neg)
        elif norm == "group":
            self.norm = GroupNormAct(num_groups, out_channels, eps=eps, affine=True, act=act_name, negative_slope=neg)
        elif norm == "instance":
            self.norm = InstanceNormAct2d(out_channels, eps=eps, affine=True, act=act_name, negative_slope=neg)
        else:
            self.norm = activation_module(act_name, slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if not self.bias_absorbed:
            return self.norm(conv(x))
        z = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        if self.norm_kind == "batch":  # the bias still shapes the running mean (module docstring)
            return self.norm(z, input_bias=conv.bias)
        return self.norm(z)

    @torch.no_grad()
    def fold_bn(self) -> "ConvNormAct":
        """Fold the BatchNorm's running statistics and affine into the conv (eval, one-way).

        Afterwards ``conv`` carries ``W' = W·γ/√(σ² + eps)`` and ``b' = (b − μ)·γ/√(σ² + eps) + β``
        (torch.nn.utils.fusion.fuse_conv_bn_weights; ``b`` = the conv bias or 0) and ``norm`` is
        the plain activation module, so eval outputs are unchanged and one cuDNN conv with bias
        plus an activation remain. One-way: the BatchNorm parameters and buffers leave the module
        and its state_dict (which then has ``conv.weight``, ``conv.bias`` only); build a new
        ConvNormAct to train with BatchNorm again. Returns ``self``.
        """
        if self.folded or self.norm_kind != "batch":
            raise ValueError("fold_bn() folds a BatchNorm: this ConvNormAct has none"
                             + (" (already folded)" if self.folded else f" (norm={self.norm_kind!r})"))
        if self.training:
            raise RuntimeError("fold_bn() folds the running statistics, which only eval mode uses: call .eval() first")
        bn = self.norm
        if bn.running_mean is None:
            raise ValueError("fold_bn() needs running statistics (track_running_stats=True)")
        conv = self.conv
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        conv.weight = weight
        conv.bias = bias
        self.norm = activation_module(bn.act_name, bn.negative_slope, bn.prelu_weight)
        self.bias_absorbed = False
        self.folded = True
        return self

    def extra_repr(self) -> str:
        extra = ", conv bias absorbed by the norm" if self.bias_absorbed else ""
        return f"norm={self.norm_kind!r}{', folded' if self.folded else ''}{extra}"
