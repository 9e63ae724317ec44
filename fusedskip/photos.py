"""Natural photographs for denoising, fully offline: a small "Kodak-like" protocol.

The photographs are the ones scikit-image's wheel ships in ``skimage/data`` (read through
``skimage.data.<name>()``, which finds them in the package without pooch or a network). Nothing
is fetched at run time. Which ones, and how they are used:

=================  ===================  ===========  ==========================================
image              size                 mode         role
=================  ===================  ===========  ==========================================
camera             512×512              grey         test (grey)
coins              303×384              grey         test (grey)
astronaut          512×512              colour       test (grey and colour)
coffee             400×600              colour       test (grey and colour)
chelsea            300×451              colour       test (grey and colour)
rocket             427×640              colour       validation (grey and colour)
moon               512×512              grey         training (grey)
brick              512×512              grey         training (grey)
grass              512×512              grey         training (grey)
gravel             512×512              grey         training (grey)
page               191×384              grey         training (grey)
text               172×448              grey         training (grey)
clock              300×400              grey         training (grey)
motorcycle_left    500×741              colour       training (grey and colour)
motorcycle_right   500×741              colour       training (grey and colour)
hubble_deep_field  872×1000             colour       training (grey and colour)
immunohistochemistry 512×512            colour       training (grey and colour)
retina             1411×1411            colour       training (grey and colour)
=================  ===================  ===========  ==========================================

Grey runs (``channels=1``) use every image, colour ones converted to luminance (scikit-image's
``rgb2gray``); colour runs (``channels=3``) use the colour photographs only. Training: random
``size``×``size`` patches (seeded; random horizontal flips) of the training images. Validation:
patches of the validation image. Test: the **whole** held-out photographs (or their centre
``test_crop``×``test_crop`` crops, to save time on a CPU), evaluated at σ 15 / 25 / 50 with
seeded noise (:meth:`fusedskip.data.Noise.eval_noisy`) under the KAIR/DnCNN protocol (noisy
input not clipped, output clipped to [0, 1], per-image PSNR/SSIM averaged). This is a stand-in
for Kodak-17/24 or BSD68 (which are not bundled anywhere and so cannot be used offline): five
test photographs, so its numbers are not comparable with published tables.

:func:`load_photo_folder` reads the user's own test photographs (e.g. Kodak24) from a folder
instead: one mode (all grey or all colour) and one size, or clear errors.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, DataError, ImageData, ImageSet, _center_crop

PHOTOS_TEST_GREY = ("camera", "coins", "astronaut", "coffee", "chelsea")
PHOTOS_TEST_COLOUR = ("astronaut", "coffee", "chelsea")
PHOTOS_VAL = ("rocket",)
PHOTOS_TRAIN_GREY_ONLY = ("moon", "brick", "grass", "gravel", "page", "text", "clock")
PHOTOS_TRAIN_COLOUR = ("motorcycle_left", "motorcycle_right", "hubble_deep_field", "immunohistochemistry", "retina")
GREY_PHOTOS = frozenset(("camera", "coins") + PHOTOS_TRAIN_GREY_ONLY)
MAX_SIGMA = 255.0


def check_sigma(sigma: float, name: str = "sigma") -> float:
    """σ on the 0–255 scale: a finite number in [0, 255] (ValueError otherwise)."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number on the 0-255 scale, got {sigma!r}") from None
    if not (0.0 <= value <= MAX_SIGMA):
        raise ValueError(f"{name} must lie in [0, 255] (noise standard deviation on the 0-255 scale), got {sigma!r}")
    return value


def photo_names(channels: int) -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]:
    """(train, val, test) image names of the protocol for grey (1) or colour (3) runs."""
    if channels == 1:
        return PHOTOS_TRAIN_GREY_ONLY + PHOTOS_TRAIN_COLOUR, PHOTOS_VAL, PHOTOS_TEST_GREY
    if channels == 3:
        return PHOTOS_TRAIN_COLOUR, PHOTOS_VAL, PHOTOS_TEST_COLOUR
    raise DataError(f"photos: channels must be 1 (grey) or 3 (colour), got {channels!r}")


def read_photo(name: str, channels: int) -> torch.Tensor:
    """One bundled photograph as uint8 ``[channels, H, W]`` (grey from colour by luminance)."""
    import skimage.data
    from skimage.color import rgb2gray

    if channels == 3 and name in GREY_PHOTOS:
        raise DataError(f"photos: {name!r} is a grey photograph; it cannot serve a colour (3-channel) run")
    if name in ("motorcycle_left", "motorcycle_right"):  # one bundled stereo pair
        img = np.asarray(skimage.data.stereo_motorcycle()[0 if name == "motorcycle_left" else 1])
    else:
        img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 3:
        img = img[..., :3]
        if channels == 1:
            img = (rgb2gray(img) * 255.0).round().clip(0, 255).astype(np.uint8)
    img = img[..., None] if img.ndim == 2 else img
    return torch.from_numpy(np.ascontiguousarray(img.astype(np.uint8))).permute(2, 0, 1).contiguous()


def random_patches(images: Sequence[torch.Tensor], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size``×``size`` patches (uint8), images taken in turn, random h-flips."""
    channels = images[0].shape[0]
    for img in images:
        if min(img.shape[-2:]) < size:
            raise DataError(f"photos: patch size {size} exceeds an image of {tuple(img.shape[-2:])}")
    out = torch.empty((count, channels, size, size), dtype=torch.uint8)
    for k in range(count):
        img = images[k % len(images)]
        h, w = img.shape[-2:]
        y = int(torch.randint(0, h - size + 1, (1,), generator=generator))
        x = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        patch = img[:, y:y + size, x:x + size]
        out[k] = patch.flip(-1) if bool(torch.rand(1, generator=generator) < 0.5) else patch
    return out


def load_photos(size: int = 40, channels: Optional[int] = None, seed: int = 0, patches: int = 4096,
                val_patches: int = 64, test_crop: Optional[int] = None, test_dir: Optional[str] = None) -> ImageData:
    """The bundled-photograph protocol (module docstring) as :class:`fusedskip.data.ImageData`.

    ``size``: training patch side; ``patches``: training patches (seeded by ``seed``);
    ``test_crop``: centre-crop test photographs to this side (None: whole images);
    ``test_dir``: evaluate on the photographs of this folder instead (:func:`load_photo_folder`).
    """
    channels = 1 if channels is None else channels
    train_names, val_names, test_names = photo_names(channels)
    if not isinstance(size, int) or size < 8:
        raise DataError(f"photos: patch size must be an int >= 8, got {size!r}")
    if patches < 1 or val_patches < 1:
        raise DataError(f"photos: patches and val_patches must be >= 1, got {patches} and {val_patches}")
    g = torch.Generator().manual_seed(int(seed))
    train = ImageSet(random_patches([read_photo(n, channels) for n in train_names], patches, size, g))
    val = ImageSet(random_patches([read_photo(n, channels) for n in val_names], val_patches, size, g))
    if test_dir is not None:
        test_imgs, test_names = load_photo_folder(test_dir, channels, crop=test_crop)
        source = f"photographs from {test_dir}"
    else:
        test_imgs = [read_photo(n, channels) for n in test_names]
        source = "scikit-image's bundled photographs"
    if test_crop and test_dir is None:
        small = [n for n, t in zip(test_names, test_imgs) if min(t.shape[-2:]) < test_crop]
        if small:
            raise DataError(f"photos: test_crop {test_crop} exceeds the size of {', '.join(small[:3])}")
        test_imgs = [_center_crop(t, test_crop) for t in test_imgs]
    test = ImageSet(test_imgs, names=list(test_names))
    mode = "grey" if channels == 1 else "colour"
    what = "whole images" if not test_crop else f"centre {test_crop}×{test_crop} crops"
    notes = [f"photos ({mode}): {patches} random {size}×{size} training patches of {', '.join(train_names)}; "
             f"{val_patches} validation patches of {', '.join(val_names)}; test = {what} of {', '.join(test_names)} "
             f"({source}); a small Kodak-like protocol, not comparable with published Kodak/BSD68 tables"]
    return ImageData("photos", train, val, test, channels, 0, [], notes)


def load_photo_folder(root: str, channels: Optional[int] = None,
                      crop: Optional[int] = None) -> Tuple[List[torch.Tensor], List[str]]:
    """The photographs in folder ``root`` (not recursive) as uint8 ``[C, H, W]`` tensors and names.

    All must share one mode (grey or colour) and one size (after the centre ``crop``, if given);
    ``channels`` (1 or 3), when given, must match the folder's mode. Unreadable files, mixed modes
    or sizes, images smaller than ``crop`` raise DataError.
    """
    from PIL import Image

    if not root or not os.path.isdir(root):
        raise DataError(f"photo folder {root!r} does not exist or is not a directory")
    files = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"photo folder {root!r} holds no files with an image extension ({', '.join(IMAGE_EXTENSIONS)})")
    images, modes = [], {}
    for name in files:
        try:
            with Image.open(os.path.join(root, name)) as im:
                im.load()
                grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
                arr = np.asarray(im.convert("L" if grey else "RGB"))
        except Exception as exc:
            raise DataError(f"photo folder {root!r}: cannot read {name!r} ({type(exc).__name__}: {exc})") from None
        modes.setdefault("grey" if grey else "colour", name)
        t = torch.from_numpy(arr.copy())
        images.append(t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous())
    if len(modes) > 1:
        raise DataError(f"photo folder {root!r} mixes grey and colour images (e.g. {modes['grey']!r} is grey, "
                        f"{modes['colour']!r} is colour); keep one mode per folder")
    folder_channels = images[0].shape[0]
    if channels is not None and channels != folder_channels:
        raise DataError(f"photo folder {root!r} holds {'grey' if folder_channels == 1 else 'colour'} images but "
                        f"{channels} channel(s) were asked for (the model's input channels)")
    if crop:
        small = [n for t, n in zip(images, files) if min(t.shape[-2:]) < crop]
        if small:
            raise DataError(f"photo folder {root!r}: crop {crop} exceeds the size of {', '.join(small[:3])}")
        images = [_center_crop(t, crop) for t in images]
    sizes = {tuple(t.shape[-2:]): n for t, n in zip(images, files)}
    if len(sizes) > 1:
        (s1, n1), (s2, n2) = list(sizes.items())[:2]
        raise DataError(f"photo folder {root!r} mixes image sizes ({n1!r} is {s1[0]}×{s1[1]}, {n2!r} is "
                        f"{s2[0]}×{s2[1]}); crop them to one size first, or pass a test crop")
    return images, files
