"""DnCNN, the residual denoising CNN of Zhang et al., "Beyond a Gaussian Denoiser: Residual
Learning of Deep CNN for Image Denoising" (IEEE TIP 2017), as a baseline for AddUNet.

Layout (the paper's, KAIR's ``DnCNN``): conv-ReLU, (conv-BN-ReLU) × (depth − 2), conv; the
network predicts the noise and the model returns ``noisy − prediction``. The paper uses
depth 17 and width 64 for σ-specific grey models; fusedskip's study states the depth and width
it trains with. Blocks are fusedskip ConvNormAct modules (fused kernels on a GPU, the reference
PyTorch path elsewhere), like the U-Nets', so a comparison isolates the architecture.

It speaks the trainer's model interface: ``(denoised, None)`` from ``forward``, ``config`` for
:func:`fusedskip.models.build_model`, no skips (``gates() == []``), denoising only.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .blocks import conv_norm_act, normalise_norm

# Options of the U-Nets that the trainer's model defaults pass to every model; they do not
# apply to DnCNN, which accepts them so ``build_model`` can build it from the same config.
UNET_ONLY_OPTIONS = frozenset((
    "variant", "fusion", "convs_per_block", "last_act", "stem_act", "encoder_update", "gate", "gate_init",
    "residual", "classifier_hidden", "classifier_dropout", "width_mult", "max_width", "down", "up", "mid_block",
    "fusion_norm", "negative_slope"))


class DnCNN(nn.Module):
    """DnCNN: ``depth`` conv layers of ``width`` channels, residual (noise-predicting) output.

    Args:
        in_channels: image channels (1 grey, 3 colour); ``out_channels`` must equal it.
        width: feature channels of the hidden layers (paper: 64).
        depth: conv layers in all, at least 3 (paper: 17 for σ-specific grey models).
        kernel_size: odd kernel side (paper: 3).
        norm: norm of the middle layers (``"batch"`` as in the paper, ``"group"``, ``None``).
        num_classes: must be 0 (DnCNN is a denoiser only).
    """

    def __init__(self, in_channels: int = 1, out_channels: Optional[int] = None, width: int = 64, depth: int = 17,
                 kernel_size: int = 3, norm: Optional[str] = "batch", num_groups: int = 32, act: str = "relu",
                 num_classes: int = 0, **unet_options: Any):
        super().__init__()
        unknown = sorted(set(unet_options) - UNET_ONLY_OPTIONS)
        if unknown:
            raise ValueError(f"unknown DnCNN options {unknown}")
        for name, value in (("in_channels", in_channels), ("width", width), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if depth < 3:
            raise ValueError(f"DnCNN depth counts all conv layers and must be >= 3, got {depth}")
        if isinstance(kernel_size, (list, tuple)):
            if len(set(kernel_size)) != 1:
                raise ValueError(f"DnCNN takes one kernel size, got {list(kernel_size)}")
            kernel_size = int(kernel_size[0])
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        if num_classes:
            raise ValueError("DnCNN is a denoiser only: num_classes must be 0 (train it with task='denoise')")
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels != in_channels:
            raise ValueError("DnCNN predicts the noise: out_channels must equal in_channels")
        norm = normalise_norm(norm)
        layers: List[nn.Module] = [conv_norm_act(in_channels, width, kernel_size, norm=None, act=act)]
        layers += [conv_norm_act(width, width, kernel_size, norm=norm, num_groups=num_groups, act=act)
                   for _ in range(depth - 2)]
        layers.append(nn.Conv2d(width, in_channels, kernel_size, padding=kernel_size // 2))
        self.body = nn.Sequential(*layers)
        self.in_channels = self.out_channels = in_channels
        self.depth, self.num_classes = depth, 0
        self.widths = [width]
        self.variant, self.fusion, self.residual = "dncnn", "none", True
        self.config: Dict[str, Any] = {"name": "dncnn", "in_channels": in_channels, "out_channels": out_channels,
                                       "width": width, "depth": depth, "kernel_size": kernel_size, "norm": norm,
                                       "num_groups": num_groups, "act": act, "num_classes": 0}

    size_multiple = 1

    def forward(self, noisy: torch.Tensor):
        if not isinstance(noisy, torch.Tensor) or noisy.dim() != 4 or noisy.shape[1] != self.in_channels:
            got = tuple(noisy.shape) if isinstance(noisy, torch.Tensor) else type(noisy).__name__
            raise ValueError(f"input must be [N, {self.in_channels}, H, W], got {got}")
        return noisy - self.body(noisy), None

    def gates(self, learned: bool = False) -> list:
        """No skips, no gates."""
        return []

    def shared_parameters(self) -> List[nn.Parameter]:
        return list(self.parameters())

    def task_parameters(self) -> Dict[str, List[nn.Parameter]]:
        return {"denoise": []}

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.widths[0]}, residual=True"
