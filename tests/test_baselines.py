"""Denoising baselines (classical, DnCNN) and the bundled-photograph protocol, on tiny images."""
import importlib.util
import math

import numpy as np
import pytest
import torch

from fusedskip import baselines as bl
from fusedskip.data import DataError, ImageSet, load_dataset
from fusedskip.models import DnCNN, build_model
from fusedskip.photos import GREY_PHOTOS, check_sigma, load_photo_folder, load_photos, photo_names


def smooth_image(channels=1, h=24, w=28, seed=0):
    """A smooth non-constant image in [0.2, 0.8] (gradients + blobs): easy to denoise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for c in range(channels):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        img = 0.5 + 0.2 * np.sin(3 * x + c) * np.cos(2 * y) + 0.1 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) * 20)
        out.append(img)
    return np.clip(np.stack(out), 0.2, 0.8)


def psnr(a, b):
    return 10 * math.log10(1.0 / float(np.mean((np.clip(a, 0, 1) - b) ** 2)))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["nlm", "tv", "wavelet"])
def test_classical_denoisers_beat_the_noisy_input(name, channels):
    clean = smooth_image(channels)
    noisy = clean + np.random.default_rng(1).normal(0, 25 / 255, clean.shape)
    out = bl.CLASSICAL[name](noisy, 25.0)
    assert out.shape == clean.shape
    assert psnr(out, clean) > psnr(noisy, clean) + 2.0, name


def test_haar_transform_is_orthonormal_and_inverts_on_odd_shapes():
    x = np.random.default_rng(0).normal(size=(7, 9)) + 0.3
    for axis in (0, 1):
        a, d = bl._haar_step(x, axis)
        back = bl._haar_inverse_step(a, d, axis, x.shape[axis])
        np.testing.assert_allclose(back, x, atol=1e-12)
    a, d = bl._haar_step(x[:6, :8], 1)  # even length: energy is preserved exactly
    assert math.isclose((a ** 2).sum() + (d ** 2).sum(), (x[:6, :8] ** 2).sum(), rel_tol=1e-12)
    # zero noise variance: nothing is thresholded, the image comes back
    np.testing.assert_allclose(bl.haar_bayes_shrink(x, 0.0), x, atol=1e-10)


@pytest.mark.skipif(importlib.util.find_spec("pywt") is None, reason="PyWavelets not installed")
def test_haar_bayes_shrink_matches_scikit_image():
    from skimage.restoration import denoise_wavelet

    clean = smooth_image(1, 32, 40)[0]
    noisy = clean + np.random.default_rng(2).normal(0, 0.1, clean.shape)
    ref = denoise_wavelet(noisy, sigma=0.1, wavelet="db1", mode="soft", method="BayesShrink", rescale_sigma=True)
    np.testing.assert_allclose(np.clip(bl.haar_bayes_shrink(noisy, 0.1), 0, 1), ref, atol=1e-6)


def test_sigma_and_image_checks():
    img = smooth_image()
    for bad in (-1.0, 256.0, float("nan"), "x"):
        with pytest.raises(ValueError, match=r"\[0, 255\]|0-255"):
            bl.nlm(img, bad)
    assert check_sigma(0) == 0.0 and check_sigma(255) == 255.0
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        bl.tv(img[0], 25.0)
    with pytest.raises(ValueError, match="unknown classical baseline"):
        bl.evaluate_classical("bm4d", ImageSet(torch.rand(1, 1, 16, 16)), 25.0)
    if "bm3d" not in bl.available_classical():
        with pytest.raises(ValueError, match="optional PyPI package bm3d"):
            bl.evaluate_classical("bm3d", ImageSet(torch.rand(1, 1, 16, 16)), 25.0)


def test_evaluate_classical_uses_the_evaluation_noise():
    images = ImageSet(torch.from_numpy(np.stack([smooth_image(1, 16, 16, s) for s in range(3)])).float())
    noisy = bl.evaluate_classical("noisy", images, 25.0, seed=7)
    assert noisy["psnr"] == pytest.approx(noisy["input_psnr"]) and noisy["n_images"] == 3
    tv = bl.evaluate_classical("tv", images, 25.0, seed=7)
    assert tv["input_psnr"] == pytest.approx(noisy["input_psnr"])  # the same noisy images
    assert tv["psnr"] > noisy["psnr"]
    assert bl.tune_tv(images, 25.0, limit=3) in bl.TV_FACTORS
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        bl.evaluate_classical("noisy", images, 300.0)


def test_channel_mismatch_is_a_clear_error():
    grey = ImageSet(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"grey \(1 channel\).*colour \(3 channels\)"):
        bl.check_channels(grey, 3, "test photographs")
    bl.check_channels(grey, 1)


def test_dncnn_layout_residual_output_and_build_model():
    m = DnCNN(in_channels=1, width=8, depth=5)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    norms = [x for x in m.modules() if "BatchNorm" in type(x).__name__]
    assert len(convs) == 5 and len(norms) == 3  # conv-ReLU, 3 × conv-BN-ReLU, conv
    torch.nn.init.zeros_(convs[-1].weight)
    torch.nn.init.zeros_(convs[-1].bias)
    x = torch.rand(2, 1, 9, 11)
    out, logits = m.eval()(x)
    assert logits is None and torch.equal(out, x)  # predicts the noise: zero prediction = identity
    rebuilt = build_model(dict(m.config, variant="paper", gate="softplus"))  # trainer defaults pass through
    assert isinstance(rebuilt, DnCNN) and rebuilt.config == m.config and rebuilt.gates() == []
    with pytest.raises(ValueError, match="num_classes must be 0"):
        DnCNN(num_classes=10)
    with pytest.raises(ValueError, match="unknown DnCNN options"):
        DnCNN(bogus=1)
    with pytest.raises(ValueError, match=r"input must be \[N, 1, H, W\]"):
        m(torch.rand(1, 3, 8, 8))


def test_photos_protocol_lists_and_loads():
    train, val, test = photo_names(1)
    assert not set(train) & set(test) and not set(val) & set(test + train)
    train3, _, test3 = photo_names(3)
    assert not set(train3 + test3) & GREY_PHOTOS
    d = load_photos(size=16, channels=3, patches=6, val_patches=2, test_crop=32)
    assert d.train.images.shape == (6, 3, 16, 16) and d.val.images.shape == (2, 3, 16, 16)
    assert len(d.test) == len(test3) and all(t.shape == (3, 32, 32) for t in d.test.images)
    a = load_photos(size=16, patches=4, val_patches=1, test_crop=24, seed=3)
    b = load_photos(size=16, patches=4, val_patches=1, test_crop=24, seed=3)
    assert torch.equal(a.train.images, b.train.images)  # seeded patches
    with pytest.raises(DataError, match="channels must be 1 .* or 3"):
        load_photos(channels=2)


def _write(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_photo_folder_bad_input(tmp_path):
    grey, colour = tmp_path / "grey", tmp_path / "colour"
    grey.mkdir()
    colour.mkdir()
    rng = np.random.default_rng(0)
    _write(grey / "a.png", rng.integers(0, 255, (20, 24), dtype=np.uint8))
    _write(grey / "b.png", rng.integers(0, 255, (20, 24), dtype=np.uint8))
    _write(colour / "c.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    images, names = load_photo_folder(str(grey))
    assert names == ["a.png", "b.png"] and images[0].shape == (1, 20, 24)
    with pytest.raises(DataError, match="holds grey images but 3 channel"):
        load_photo_folder(str(grey), channels=3)
    _write(grey / "d.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="mixes grey and colour"):
        load_photo_folder(str(grey))
    (grey / "d.png").unlink()
    _write(grey / "e.png", rng.integers(0, 255, (30, 18), dtype=np.uint8))
    with pytest.raises(DataError, match=r"mixes image sizes .*20×24.*30×18"):
        load_photo_folder(str(grey))
    images, _ = load_photo_folder(str(grey), crop=16)  # a common crop makes them one size
    assert {tuple(t.shape) for t in images} == {(1, 16, 16)}
    with pytest.raises(DataError, match="exceeds the size"):
        load_photo_folder(str(grey), crop=19)
    with pytest.raises(DataError, match="no files with an image extension"):
        load_photo_folder(str(tmp_path))
    data = load_dataset("photos", root=str(colour), size=16, channels=3, limit=4)
    assert data.test.names == ["c.png"] and len(data.train) == 4
