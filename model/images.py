"""Real sample images for calibration and demos, from scikit-image's bundled data, and image I/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m3vit.errors import UsageError

# Colour photographs that ship inside the scikit-image wheel (no download).
SAMPLE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "retina", "color")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _as_rgb(img: np.ndarray, where: str) -> np.ndarray:
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise UsageError(f"{where}: expected an RGB image (H x W x 3), got shape {tuple(img.shape)}")
    img = img[..., :3]
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    return img.astype(np.float32)


def sample_images() -> list[tuple[str, np.ndarray]]:
    """(name, H x W x 3 float in [0, 1]) for each bundled sample photograph."""
    from skimage import data

    out = []
    for name in SAMPLE_NAMES:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            out.append((name, _as_rgb(np.asarray(fn()), f"skimage sample '{name}'")))
        except Exception:  # a sample that needs a download is skipped, not fetched
            continue
    return out


def read_image(path: str | Path) -> np.ndarray:
    """An image file (PNG/JPEG/...) or an .npy array (H x W x 3 in [0,1], or 3 x H x W) as H x W x 3."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"image {path} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path)
            if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
                arr = arr.transpose(1, 2, 0)
            return _as_rgb(arr, str(path))
        from PIL import Image

        with Image.open(path) as im:
            return _as_rgb(np.asarray(im.convert("RGB")), str(path))
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"image {path} cannot be read: {exc}") from None


def image_folder(folder: str | Path) -> list[tuple[str, np.ndarray]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(p.name, read_image(p)) for p in files]


def to_input(img: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize (bilinear, antialiased) and normalise with the ImageNet statistics: 1 x 3 x H x W."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]


def input_batch(size: tuple[int, int], n: int, seed: int = 0, real: bool = True) -> list[tuple[str, torch.Tensor]]:
    """n inputs: the bundled photographs first (if real), then seeded random images."""
    out: list[tuple[str, torch.Tensor]] = []
    if real:
        out = [(name, to_input(img, size)) for name, img in sample_images()[:n]]
    g = torch.Generator().manual_seed(seed)
    while len(out) < n:
        out.append((f"random{len(out)}", torch.randn(1, 3, *size, generator=g)))
    return out
