"""Evaluation of an AddUNet (denoising PSNR/SSIM with seeded noise, accuracy) and sample rows."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..data import ImageSet, Noise, eval_batches
from ..metrics import MetricSums
from ..models import AddUNet, pad_to_multiple
from .distributed import DistInfo


def unwrap(model: nn.Module) -> AddUNet:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@torch.no_grad()
def denoise(model: AddUNet, noisy: torch.Tensor):
    """Forward in eval mode, padding H, W to the model's multiple (reflect) and cropping back."""
    padded, (h, w) = pad_to_multiple(noisy, model.size_multiple)
    out, logits = model(padded)
    return out[..., :h, :w], logits


@torch.no_grad()
def evaluate(model: nn.Module, images: ImageSet, noise: Noise, *, seed: int = 1234, batch_size: int = 64,
             device: torch.device = torch.device("cpu"), ssim_impl: str = "skimage", quantize: bool = False,
             info: Optional[DistInfo] = None, limit: Optional[int] = None, with_ssim: bool = True) -> Dict[str, float]:
    """PSNR/SSIM per image averaged, input PSNR, accuracy — with seeded noise (same noisy
    images at every evaluation); shards images over processes and all-reduces the sums."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    info = info or DistInfo()
    n = len(images) if limit is None else min(limit, len(images))
    sums = MetricSums(ssim_impl=ssim_impl, quantize=quantize, with_ssim=with_ssim)
    try:
        for idx in eval_batches(n, batch_size, info.rank, info.world, images.uniform):
            clean, labels = images.get(idx)
            noisy = noise.eval_noisy(clean, idx.tolist(), seed)
            out, logits = denoise(net, noisy.to(device))
            sums.update(out.float().cpu(), clean, noisy, None if logits is None else logits.float().cpu(), labels)
        sums.all_reduce()
    finally:
        net.train(was_training)
    return sums.compute()


@torch.no_grad()
def sample_images(model: nn.Module, images: ImageSet, noise: Noise, seed: int, device: torch.device, n: int = 8):
    """(noisy, denoised, clean, labels, predictions) of the first ``n`` images, for figures."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    rows = []
    try:
        for i in range(min(n, len(images))):
            clean, labels = images.get([i])
            noisy = noise.eval_noisy(clean, [i], seed)
            out, logits = denoise(net, noisy.to(device))
            rows.append((noisy[0], out[0].float().cpu().clamp(0, 1), clean[0],
                         None if labels is None else int(labels[0]),
                         None if logits is None else int(logits.argmax(1)[0])))
    finally:
        net.train(was_training)
    return rows

