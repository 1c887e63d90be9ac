"""Reading images people really have (any mode, EXIF-rotated, 16-bit, huge) into the tensors the
model takes. A file that is not a readable image (truncated, empty, not an image at all, too many
pixels) raises `DataError` naming the file, whatever the decoder's own exception was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from mmqa.errors import DataError


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> upright 8-bit RGB (alpha composited on white; 16-bit, 32-bit and float
    scaled by their maximum)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 / max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only to their straight form
        img = img.convert(img.mode[:-1] + "A")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """The image at `path` as upright RGB. `draft_size`: JPEGs may decode at a reduced scale (no
    smaller than this), which reads every byte of the file but is several times faster: enough
    to check that a file decodes (`mmqa.data.validate`)."""
    try:
        with Image.open(path) as f:
            if draft_size is not None:
                f.draft("RGB", (draft_size, draft_size))
            f.load()
            return to_rgb(f)
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise many types (OSError, SyntaxError, struct.error, ...)
        why = "empty file" if _is_empty(path) else f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: not a readable image ({why})") from e


def _is_empty(path: str | Path) -> bool:
    try:
        return Path(path).stat().st_size == 0
    except (OSError, TypeError, ValueError):
        return False


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] by dividing by 255. Not v2.ToDtype(scale=True), which multiplies by
    1/255: one rounding apart, and enough to move a 20-epoch run's test VQA accuracy by 0.02."""
    return x.float() / 255.0


class ImageTransform:
    """PIL RGB -> normalised float tensor (3, S, S), with torchvision's v2 transforms: a bicubic resize
    to S x S, scaled to [0, 1], normalised by the image encoder's mean and std. No flips: spatial
    questions depend on left and right."""

    def __init__(self, image_size: int, mean: list[float], std: list[float]):
        self.size = image_size
        self.mean, self.std = list(mean), list(std)
        self.pipeline = v2.Compose([
            v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.PILToTensor(),  # (3, S, S) uint8
            v2.Lambda(unit_float),  # (3, S, S) float in [0, 1]
            v2.Normalize(self.mean, self.std),
        ])

    def __call__(self, img: Image.Image) -> torch.Tensor:  # -> (3, S, S)
        return self.pipeline(img)
