"""Data (offline datasets, splits, seeded noise, batching) and metrics (PSNR/SSIM known values,
per-image averaging, library agreement, accuracy)."""
import math
import os

import numpy as np
import pytest
import torch

from fusedskip.data import DataError, ImageSet, Noise, eval_batches, global_batches, load_dataset, rank_slice
from fusedskip.metrics import MetricSums, accuracy, psnr, ssim


# ----------------------------------------------------------------------------------------------
# PSNR
# ----------------------------------------------------------------------------------------------
def test_psnr_known_values_and_per_image_average():
    target = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    assert float(psnr(target + 0.1, target)) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01
    assert float(psnr(target + 0.01, target)) == pytest.approx(40.0, abs=1e-9)
    # two images: averaged per image (30 dB), not pooled over the batch (≈ 23.0 dB)
    pred = torch.cat([target + 0.1, target + 0.01])
    tgt = torch.cat([target, target])
    assert float(psnr(pred, tgt)) == pytest.approx(30.0, abs=1e-9)
    assert psnr(pred, tgt, reduction="none").tolist() == pytest.approx([20.0, 40.0])
    pooled = 10 * math.log10(1 / ((0.01 + 0.0001) / 2))
    assert abs(float(psnr(pred, tgt)) - pooled) > 6
    # data range 255
    assert float(psnr(target * 255 + 25.5, target * 255, data_range=255.0)) == pytest.approx(20.0, abs=1e-9)
    assert math.isinf(float(psnr(target, target)))


def test_psnr_clamps_predictions_and_quantizes():
    target = torch.zeros(1, 1, 8, 8)
    pred = torch.full((1, 1, 8, 8), -0.5)  # clamped to 0 → identical
    assert math.isinf(float(psnr(pred, target)))
    assert float(psnr(pred, target, clamp=False)) == pytest.approx(10 * math.log10(1 / 0.25))
    # 8-bit rounding: an error under half a level vanishes
    assert math.isinf(float(psnr(target + 0.4 / 255, target, quantize=True)))


# ----------------------------------------------------------------------------------------------
# SSIM
# ----------------------------------------------------------------------------------------------
def _camera_crop(size=64):
    import skimage.data

    img = skimage.data.camera()[200:200 + size, 200:200 + size].astype(np.float64) / 255.0
    return torch.from_numpy(img)[None, None]


def test_ssim_constant_images_closed_form():
    """Constant images a, b: every window has zero variance, SSIM = (2ab + C1) / (a² + b² + C1)."""
    a = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    b = torch.full((1, 1, 16, 16), 0.6, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    assert float(ssim(b, a)) == pytest.approx(expected, rel=1e-9)
    assert float(ssim(b, a, implementation="torchmetrics")) == pytest.approx(expected, rel=1e-5)
    assert float(ssim(a, a)) == pytest.approx(1.0)


def test_ssim_matches_skimage_gaussian_configuration():
    from skimage.metrics import structural_similarity

    clean = _camera_crop()
    g = torch.Generator().manual_seed(0)
    noisy = (clean + 25 / 255 * torch.randn(clean.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = float(ssim(noisy, clean))
    direct = structural_similarity(noisy[0, 0].numpy(), clean[0, 0].numpy(), data_range=1.0, gaussian_weights=True,
                                   sigma=1.5, use_sample_covariance=False)
    assert ours == pytest.approx(direct, abs=1e-12)
    # the default 7×7 uniform window gives another value: the Gaussian configuration matters
    uniform = structural_similarity(noisy[0, 0].numpy(), clean[0, 0].numpy(), data_range=1.0)
    assert abs(uniform - ours) > 1e-3
    # torchmetrics (reflect padding, whole map) agrees closely
    tm = float(ssim(noisy, clean, implementation="torchmetrics"))
    assert tm == pytest.approx(ours, abs=0.02)
    # per image, colour = mean over channels
    pair = torch.cat([noisy, clean])
    assert ssim(pair, torch.cat([clean, clean]), reduction="none").tolist() == pytest.approx([ours, 1.0])
    rgb = noisy.expand(1, 3, -1, -1)
    assert float(ssim(rgb, clean.expand(1, 3, -1, -1))) == pytest.approx(ours)


def test_ssim_rejects_small_images_and_bad_implementation():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="11"):
        ssim(x, x)
    with pytest.raises(ValueError, match="implementation"):
        ssim(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), implementation="matlab")


def test_metric_sums_and_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    target = torch.full((4, 1, 12, 12), 0.5, dtype=torch.float64)
    sums = MetricSums()
    sums.update(target[:2] + 0.1, target[:2], noisy=target[:2] + 0.1, logits=logits[:2], labels=labels[:2])
    sums.update(target[2:] + 0.01, target[2:], logits=logits[2:], labels=labels[2:])
    sums.all_reduce()  # no process group: no-op
    out = sums.compute()
    assert out["psnr"] == pytest.approx(30.0) and out["n_images"] == 4 and out["accuracy"] == pytest.approx(2 / 3)
    small = MetricSums()
    small.update(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    assert math.isnan(small.compute()["ssim"])  # under 11×11: not computed, reported as NaN


# ----------------------------------------------------------------------------------------------
# Noise and batching
# ----------------------------------------------------------------------------------------------
def test_eval_noise_seeded_per_image():
    clean = torch.rand(6, 1, 16, 16)
    noise = Noise(25)
    a = noise.eval_noisy(clean, range(6), seed=3)
    b = noise.eval_noisy(clean, range(6), seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # every evaluation sees the same noisy images
    # independent of batch composition and order
    part = noise.eval_noisy(clean[[4, 1]], [4, 1], seed=3)
    torch.testing.assert_close(part, a[[4, 1]], rtol=0, atol=0)
    assert not torch.equal(noise.eval_noisy(clean, range(6), seed=4), a)
    assert not torch.equal(a[0] - clean[0], a[1] - clean[1])
    # σ on the 0-255 scale, noisy images not clipped
    big = Noise(25).eval_noisy(torch.full((4, 1, 64, 64), 0.5), range(4), seed=0)
    assert float((big - 0.5).std()) * 255 == pytest.approx(25, rel=0.03)
    assert float(Noise(50).eval_noisy(torch.zeros(1, 1, 32, 32), [0]).min()) < 0
    assert float(Noise(50, clip=True).eval_noisy(torch.zeros(1, 1, 32, 32), [0]).min()) == 0


def test_training_noise_and_blind_range():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(Noise(15).sample((2, 1, 8, 8), g1), Noise(15).sample((2, 1, 8, 8), g2))
    blind = Noise((5, 50))
    assert blind.blind and blind.describe() == "σ∈[5, 50]" and blind.to_config() == [5.0, 50.0]
    n = blind.sample((200, 1, 32, 32), torch.Generator().manual_seed(0))
    stds = n.flatten(1).std(1) * 255
    assert stds.min() > 4 and stds.max() < 52 and stds.std() > 5
    for bad in (-1, (10, 5), (1, 2, 3), float("nan")):
        with pytest.raises(ValueError):
            Noise(bad)


def test_global_batches_and_rank_slices():
    a = global_batches(50, 8, seed=1, epoch=2)
    b = global_batches(50, 8, seed=1, epoch=2)
    assert len(a) == 6 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(global_batches(50, 8, seed=1, epoch=3)))
    assert len(set(torch.cat(a).tolist())) == 48  # drop_last, no repeats
    batch = a[0]
    parts = [batch[rank_slice(batch, r, 2)] for r in range(2)]
    torch.testing.assert_close(torch.cat(parts), batch)
    shards = [torch.cat(list(eval_batches(10, 3, r, 2))) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))


# ----------------------------------------------------------------------------------------------
# Datasets (offline)
# ----------------------------------------------------------------------------------------------
def test_digits_default_dataset():
    data = load_dataset("digits")
    assert data.num_classes == 10 and data.channels == 1
    assert (len(data.train), len(data.val), len(data.test)) == (1257, 180, 360)
    clean, labels = data.train.get([0, 1, 2])
    assert clean.shape == (3, 1, 16, 16) and clean.dtype == torch.float32 and labels.dtype == torch.long
    assert 0 <= float(clean.min()) and float(clean.max()) <= 1
    assert torch.bincount(data.test.labels, minlength=10).min() >= 30  # stratified
    again = load_dataset("digits")
    torch.testing.assert_close(again.test.images, data.test.images)  # deterministic split
    big = load_dataset("digits", size=32, channels=3, limit=100)
    assert big.train.get([0])[0].shape == (1, 3, 32, 32) and len(big.train) == 100


def test_skimage_photographs():
    data = load_dataset("skimage", size=24)
    assert data.num_classes == 0 and data.channels == 1
    assert data.train.get([0])[0].shape == (1, 1, 24, 24)
    assert not data.test.uniform and data.test.names[:2] == ["camera", "astronaut"]
    camera, label = data.test.get([0])
    assert camera.shape == (1, 1, 512, 512) and label is None
    colour = load_dataset("skimage", size=24, channels=3)
    assert colour.test.get([1])[0].shape == (1, 3, 512, 512)


def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        os.makedirs(tmp_path / "labelled" / cls)
        for i in range(6):
            _write_png(tmp_path / "labelled" / cls / f"{i}.png", rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    (tmp_path / "labelled" / "cats" / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="unreadable"):
        data = load_dataset("folder", root=str(tmp_path / "labelled"), size=16)
    assert data.num_classes == 2 and data.class_names == ["cats", "dogs"] and data.channels == 3
    assert len(data.train) + len(data.val) + len(data.test) == 12
    assert data.train.get([0])[0].shape == (1, 3, 16, 16)
    with pytest.warns(UserWarning, match="unreadable"):
        gray = load_dataset("folder", root=str(tmp_path / "labelled"), size=16, channels=1)
    assert gray.channels == 1
    os.makedirs(tmp_path / "flat")
    for i in range(3):
        _write_png(tmp_path / "flat" / f"{i}.png", rng.integers(0, 255, (20, 20), dtype=np.uint8))
    flat = load_dataset("folder", root=str(tmp_path / "flat"), size=16)
    assert flat.num_classes == 0 and flat.channels == 1 and len(flat.train) == 3


def test_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no readable images"):
        load_dataset("folder", root=str(tmp_path / "empty"))
    (tmp_path / "empty" / "bad.jpg").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="none readable"):
        load_dataset("folder", root=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", root=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="--root"):
        load_dataset("folder")
    # torchvision sets: nothing downloads unless asked
    with pytest.raises(DataError, match="--download"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10", root=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="channels"):
        load_dataset("digits", channels=2)


def _fake_mnist(root, n_train=30, n_test=10):
    """Tiny MNIST-format (idx) files where torchvision looks for them: no network."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())


def test_torchvision_dataset_from_root(tmp_path):
    _fake_mnist(tmp_path)
    data = load_dataset("mnist", root=str(tmp_path))
    assert data.num_classes == 10 and data.channels == 1
    assert (len(data.train), len(data.val), len(data.test)) == (27, 3, 10)
    assert data.train.images.dtype == torch.uint8 and data.train.get([0])[0].shape == (1, 1, 28, 28)
    padded = load_dataset("mnist", root=str(tmp_path), size=32, channels=3)
    x, y = padded.test.get([0, 1])
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]
    assert float(x[..., :2, :].abs().max()) == 0.0  # 28 → 32 by zero padding


def test_imageset_variable_sizes():
    s = ImageSet([torch.zeros(1, 8, 8, dtype=torch.uint8), torch.full((1, 4, 6), 255, dtype=torch.uint8)])
    assert not s.uniform and len(s) == 2
    x, y = s.get([1])
    assert x.shape == (1, 1, 4, 6) and float(x.max()) == 1.0 and y is None
    with pytest.raises(ValueError):
        s.get([0, 1])
