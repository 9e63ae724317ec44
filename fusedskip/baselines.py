"""Denoising baselines evaluated under the same protocol as the learned models.

Classical denoisers (:data:`CLASSICAL`), each told the true σ ("σ-matched"):

* ``noisy``: the noisy input itself (what any denoiser must beat).
* ``nlm``: scikit-image ``denoise_nl_means`` with ``sigma = σ``, ``h = 0.8 σ`` (the value
  scikit-image's documentation suggests for ``fast_mode``), 5×5 patches, search distance 6.
* ``tv``: scikit-image ``denoise_tv_chambolle``; the weight is ``c · σ/255`` with ``c`` picked per
  σ from :data:`TV_FACTORS` by PSNR on validation images (:func:`tune_tv`), 1.0 before tuning.
* ``wavelet``: BayesShrink soft thresholding of an orthonormal Haar (``db1``) decomposition with
  ``max_level − 3`` levels and the true σ: scikit-image's ``denoise_wavelet`` defaults. It runs
  scikit-image's own function when PyWavelets is installed, else :func:`haar_bayes_shrink`, the
  same algorithm written here with numpy (PyWavelets is not a dependency of fusedskip).
* ``bm3d``: the PyPI ``bm3d`` package (non-commercial licence, never a dependency), only when it
  is importable; ``available_classical()`` lists what runs here.

All take and return float images in [0, 1] shaped ``[C, H, W]`` (numpy), σ on the 0–255 scale.
:func:`evaluate_classical` draws the same seeded noisy images as ``fusedskip.train.evaluate``
(``Noise.eval_noisy`` per image index) and scores them with the same :class:`MetricSums`.

The learned baselines are models: :class:`fusedskip.models.DnCNN` (Zhang et al. 2017 layout),
:class:`fusedskip.models.ConcatUNet`, and AddUNet's paper and hierarchical forms.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .data import ImageSet, Noise
from .metrics import MetricSums
from .photos import check_sigma

TV_FACTORS = (0.5, 1.0, 1.5, 2.0, 3.0)


def _check_image(img: np.ndarray, name: str = "image") -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"{name} must be a [C, H, W] array with C = 1 (grey) or 3 (colour), got shape {img.shape}")
    if min(img.shape[1:]) < 2:
        raise ValueError(f"{name} must be at least 2×2 pixels, got {img.shape[1:]}")
    return img.astype(np.float64, copy=False)


def identity(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """The noisy input (the baseline every denoiser must beat)."""
    check_sigma(sigma)
    return _check_image(noisy, "noisy")


def nlm(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """Non-local means, σ-matched (``sigma = σ``, ``h = 0.8 σ``, fast mode, 5×5 patches, distance 6)."""
    from skimage.restoration import denoise_nl_means

    s = check_sigma(sigma) / 255.0
    img = _check_image(noisy, "noisy")
    if s == 0:
        return img
    out = denoise_nl_means(np.moveaxis(img, 0, -1), h=0.8 * s, sigma=s, fast_mode=True, patch_size=5,
                           patch_distance=6, channel_axis=-1)
    return np.moveaxis(out, -1, 0) if out.ndim == 3 else out[None]


def tv(noisy: np.ndarray, sigma: float, factor: float = 1.0) -> np.ndarray:
    """Total-variation denoising (Chambolle) with weight ``factor · σ/255``."""
    from skimage.restoration import denoise_tv_chambolle

    s = check_sigma(sigma) / 255.0
    img = _check_image(noisy, "noisy")
    if s == 0:
        return img
    out = denoise_tv_chambolle(np.moveaxis(img, 0, -1), weight=factor * s, channel_axis=-1)
    return np.moveaxis(out, -1, 0)


def _haar_step(x: np.ndarray, axis: int):
    """One orthonormal Haar analysis step along ``axis`` (odd lengths: symmetric extension, as
    PyWavelets' default mode does for db1)."""
    if x.shape[axis] % 2:
        last = np.take(x, [-1], axis=axis)
        x = np.concatenate([x, last], axis=axis)
    even = np.take(x, np.arange(0, x.shape[axis], 2), axis=axis)
    odd = np.take(x, np.arange(1, x.shape[axis], 2), axis=axis)
    return (even + odd) / math.sqrt(2.0), (even - odd) / math.sqrt(2.0)


def _haar_inverse_step(a: np.ndarray, d: np.ndarray, axis: int, length: int) -> np.ndarray:
    even, odd = (a + d) / math.sqrt(2.0), (a - d) / math.sqrt(2.0)
    shape = list(a.shape)
    shape[axis] *= 2
    out = np.empty(shape, dtype=a.dtype)
    idx_even = [slice(None)] * a.ndim
    idx_odd = [slice(None)] * a.ndim
    idx_even[axis], idx_odd[axis] = slice(0, None, 2), slice(1, None, 2)
    out[tuple(idx_even)], out[tuple(idx_odd)] = even, odd
    return np.take(out, np.arange(length), axis=axis)


def _bayes_soft(band: np.ndarray, var: float) -> np.ndarray:
    """BayesShrink threshold var / σ_x (σ_x² = max(E[band²] − var, eps)), soft thresholding."""
    thresh = var / math.sqrt(max(float(np.mean(band * band)) - var, np.finfo(band.dtype).eps))
    return np.sign(band) * np.maximum(np.abs(band) - thresh, 0.0)


def haar_bayes_shrink(channel: np.ndarray, sigma01: float) -> np.ndarray:
    """BayesShrink of one 2-D channel: Haar decomposition with ``max(floor(log2(min side)) − 3, 1)``
    levels, each detail sub-band soft-thresholded with its own threshold, approximation kept."""
    levels = max(int(math.floor(math.log2(min(channel.shape)))) - 3, 1)
    var = sigma01 ** 2
    approx, stack = channel, []
    for _ in range(levels):
        shape = approx.shape
        lo, hi = _haar_step(approx, 0)
        ll, lh = _haar_step(lo, 1)
        hl, hh = _haar_step(hi, 1)
        stack.append((shape, _bayes_soft(lh, var), _bayes_soft(hl, var), _bayes_soft(hh, var)))
        approx = ll
    for shape, lh, hl, hh in reversed(stack):
        lo = _haar_inverse_step(approx, lh, 1, shape[1])
        hi = _haar_inverse_step(hl, hh, 1, shape[1])
        approx = _haar_inverse_step(lo, hi, 0, shape[0])
    return approx


def wavelet(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """Wavelet BayesShrink (db1, soft, true σ), channel by channel."""
    s = check_sigma(sigma) / 255.0
    img = _check_image(noisy, "noisy")
    if s == 0:
        return img
    if importlib.util.find_spec("pywt") is not None:
        from skimage.restoration import denoise_wavelet

        out = denoise_wavelet(np.moveaxis(img, 0, -1), sigma=s, wavelet="db1", mode="soft", method="BayesShrink",
                              channel_axis=-1, convert2ycbcr=False, rescale_sigma=True)
        return np.moveaxis(out, -1, 0)
    return np.stack([haar_bayes_shrink(c, s) for c in img])


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D (the optional PyPI ``bm3d`` package; grey ``bm3d``, colour ``bm3d_rgb``)."""
    import bm3d

    s = check_sigma(sigma) / 255.0
    img = _check_image(noisy, "noisy")
    if s == 0:
        return img
    if img.shape[0] == 1:
        return np.asarray(bm3d.bm3d(img[0], sigma_psd=s))[None]
    return np.moveaxis(np.asarray(bm3d.bm3d_rgb(np.moveaxis(img, 0, -1), s)), -1, 0)


CLASSICAL: Dict[str, Callable[..., np.ndarray]] = {"noisy": identity, "nlm": nlm, "tv": tv, "wavelet": wavelet,
                                                   "bm3d": bm3d_denoise}
DESCRIPTIONS = {
    "noisy": "noisy input",
    "nlm": "non-local means (skimage, σ-matched: h = 0.8σ)",
    "tv": "TV Chambolle (skimage, weight c·σ, c tuned on validation)",
    "wavelet": "wavelet BayesShrink (db1, true σ)",
    "bm3d": "BM3D (optional bm3d package)",
}


def available_classical() -> List[str]:
    """Classical baselines that run here (``bm3d`` only when the optional package imports)."""
    names = ["noisy", "nlm", "tv", "wavelet"]
    if importlib.util.find_spec("bm3d") is not None:
        names.append("bm3d")
    return names


def wavelet_implementation() -> str:
    return ("scikit-image denoise_wavelet (PyWavelets)" if importlib.util.find_spec("pywt") is not None
            else "fusedskip.baselines.haar_bayes_shrink (numpy; PyWavelets not installed)")


def _denoiser(name: str, options: Optional[Dict[str, float]] = None) -> Callable[[np.ndarray, float], np.ndarray]:
    if name not in CLASSICAL:
        raise ValueError(f"unknown classical baseline {name!r}; choose from {', '.join(CLASSICAL)}")
    if name == "bm3d" and "bm3d" not in available_classical():
        raise ValueError("the bm3d baseline needs the optional PyPI package bm3d (pip install bm3d; "
                         "non-commercial licence)")
    fn = CLASSICAL[name]
    if options:
        return lambda img, sigma: fn(img, sigma, **options)
    return fn


def evaluate_classical(name: str, images: ImageSet, sigma: float, *, seed: int = 1234, limit: Optional[int] = None,
                       ssim_impl: str = "skimage", options: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """PSNR/SSIM (per image, averaged) of classical baseline ``name`` at noise σ on ``images``,
    with the noisy images ``fusedskip.train.evaluate`` uses for the same ``seed``."""
    check_sigma(sigma)
    fn = _denoiser(name, options)
    noise = Noise(float(sigma))
    sums = MetricSums(ssim_impl=ssim_impl)
    n = len(images) if limit is None else min(limit, len(images))
    for i in range(n):
        clean, _ = images.get([i])
        noisy = noise.eval_noisy(clean, [i], seed)
        out = fn(noisy[0].numpy(), sigma)
        sums.update(torch.from_numpy(np.ascontiguousarray(out)).float()[None], clean, noisy)
    return sums.compute()


def tune_tv(images: ImageSet, sigma: float, *, seed: int = 4321, limit: int = 64,
            factors: Sequence[float] = TV_FACTORS) -> float:
    """The TV weight factor (weight = factor · σ/255) with the best mean PSNR on ``images``
    (validation images, a noise seed of their own)."""
    best, best_psnr = 1.0, -math.inf
    for f in factors:
        p = evaluate_classical("tv", images, sigma, seed=seed, limit=limit, options={"factor": f})["psnr"]
        if p > best_psnr:
            best, best_psnr = float(f), p
    return best


def check_channels(images: ImageSet, model_channels: int, what: str = "images") -> None:
    """A clear error when grey/colour images meet a model built for the other."""
    if images.channels != model_channels:
        kind = {1: "grey (1 channel)", 3: "colour (3 channels)"}
        raise ValueError(f"{what} are {kind.get(images.channels, f'{images.channels}-channel')} but the model takes "
                         f"{kind.get(model_channels, f'{model_channels}-channel')} input")
