"""Denoising and classification metrics, computed as the denoising literature does.

* PSNR per image, then averaged over images (not pooled over the batch); images in [0, 1] with
  data range 1.0; predictions clamped to [0, 1]; optional 8-bit quantisation (``quantize=True``:
  ×255, round, the KAIR/DnCNN protocol). Computed in float64.
* SSIM with an 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, per image then averaged;
  colour SSIM = mean over channels. Implementations (maintained libraries, configured for that
  window): ``"skimage"`` (default: ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)``, which averages the map without the 5-pixel
  border, like MATLAB's/KAIR's 'valid' filtering) or ``"torchmetrics"`` (reflect-pads and averages
  the whole map: slightly different values, faster on a GPU, imports slowly).
* Accuracy = fraction of correct arg-max predictions.

:class:`MetricSums` accumulates per-image sums and counts, all-reduces them across processes
and turns them into means.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch

SSIM_IMPLEMENTATIONS = ("skimage", "torchmetrics")
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _prepare(pred: torch.Tensor, target: torch.Tensor, data_range: float, clamp: bool, quantize: bool):
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() == 3:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    if pred.dim() != 4:
        raise ValueError(f"expected [N, C, H, W] images, got shape {tuple(pred.shape)}")
    pred = pred.detach().double()
    target = target.detach().double()
    if clamp:
        pred = pred.clamp(0.0, data_range)
    if quantize:
        levels = 255.0 / data_range
        pred = (pred * levels).round() / levels
        target = (target * levels).round() / levels
    return pred, target


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, clamp: bool = True,
         quantize: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image (``reduction="none"``) or averaged over images.

    An image equal to its target has infinite PSNR (returned as ``inf``).
    """
    pred, target = _prepare(pred, target, data_range, clamp, quantize)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    values = 10.0 * torch.log10(data_range ** 2 / mse)
    return values.mean() if reduction == "mean" else values


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, clamp: bool = True,
         quantize: bool = False, implementation: str = "skimage", reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (11×11 Gaussian window, σ 1.5), per image or averaged over images.

    Images must be at least 11 pixels on each side.
    """
    if implementation not in SSIM_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {SSIM_IMPLEMENTATIONS}, got {implementation!r}")
    pred, target = _prepare(pred, target, data_range, clamp, quantize)
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM with an {SSIM_WINDOW}×{SSIM_WINDOW} window needs images of at least "
                         f"{SSIM_WINDOW}×{SSIM_WINDOW}, got {tuple(pred.shape[-2:])}")
    if implementation == "skimage":
        from skimage.metrics import structural_similarity

        p, t = pred.cpu().numpy(), target.cpu().numpy()
        values = []
        for i in range(p.shape[0]):
            per_channel = [structural_similarity(p[i, c], t[i, c], data_range=data_range, gaussian_weights=True,
                                                 sigma=SSIM_SIGMA, use_sample_covariance=False, K1=0.01, K2=0.03)
                           for c in range(p.shape[1])]
            values.append(float(np.mean(per_channel)))
        out = torch.tensor(values, dtype=torch.float64)
    else:
        from torchmetrics.functional.image import structural_similarity_index_measure

        out = structural_similarity_index_measure(pred, target, gaussian_kernel=True, sigma=SSIM_SIGMA,
                                                  kernel_size=SSIM_WINDOW, data_range=data_range, k1=0.01, k2=0.03,
                                                  reduction="none").double().cpu()
    return out.mean() if reduction == "mean" else out


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``labels`` the arg-max of ``logits`` gets right."""
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(1) == labels).double().mean())


class MetricSums:
    """Per-image sums for PSNR/SSIM (and correct counts for accuracy) across batches and processes."""

    KEYS = ("psnr", "ssim", "input_psnr", "correct", "n_images", "n_ssim", "n_labelled")

    def __init__(self, ssim_impl: str = "skimage", quantize: bool = False, with_ssim: bool = True):
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.ssim_impl, self.quantize, self.with_ssim = ssim_impl, quantize, with_ssim

    def update(self, denoised: torch.Tensor, clean: torch.Tensor, noisy: Optional[torch.Tensor] = None,
               logits: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> None:
        self.sums["psnr"] += float(psnr(denoised, clean, quantize=self.quantize, reduction="none").sum())
        if noisy is not None:
            self.sums["input_psnr"] += float(psnr(noisy, clean, quantize=self.quantize, reduction="none").sum())
        if self.with_ssim and min(clean.shape[-2:]) >= SSIM_WINDOW:
            self.sums["ssim"] += float(ssim(denoised, clean, quantize=self.quantize, implementation=self.ssim_impl,
                                            reduction="none").sum())
            self.sums["n_ssim"] += clean.shape[0]
        self.sums["n_images"] += clean.shape[0]
        if logits is not None and labels is not None:
            self.sums["correct"] += float((logits.argmax(1).cpu() == labels.cpu()).sum())
            self.sums["n_labelled"] += len(labels)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            self.sums = dict(zip(self.KEYS, t.cpu().tolist()))

    def compute(self) -> Dict[str, float]:
        n, nl = self.sums["n_images"], self.sums["n_labelled"]
        out = {"psnr": self.sums["psnr"] / n if n else math.nan,
               "input_psnr": self.sums["input_psnr"] / n if n else math.nan,
               "n_images": int(n)}
        if self.with_ssim:
            ns = self.sums["n_ssim"]
            out["ssim"] = self.sums["ssim"] / ns if ns else math.nan  # NaN: images under 11×11
        if nl:
            out["accuracy"] = self.sums["correct"] / nl
        return out
