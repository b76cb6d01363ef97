"""Image transforms with PIL and numpy only (torchvision wheels do not match every torch build)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

_FILTERS = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
}
MIN_SIDE = 8  # images smaller than this on a side are skipped as "tiny image"
# Pillow refuses images above 2 x Image.MAX_IMAGE_PIXELS (~179 megapixels) as decompression bombs.
TOO_LARGE = "image too large"
NOT_UTF8 = "caption not UTF-8"  # (skip causes the data modules share)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grey images (PNG ``I;16``, and ``I``) are scaled by 255/65535: Pillow's own
    conversion clips them at 255, which turns every non-black pixel white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


class BadSample(Exception):
    """A sample that cannot be used; ``cause`` is its category in the skip summary."""

    def __init__(self, cause: str, where: str):
        super().__init__(f"{cause}: {where}")
        self.cause, self.where = cause, where


class ImageTransform:
    """Resize the short side to ``resolution``, crop a square (center or random), optionally flip,
    scale to [-1, 1]. Randomness comes from the caller's generator, so results do not depend on
    which data-loader worker runs them."""

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 interpolation: str = "bilinear"):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.filter = _FILTERS[interpolation]

    def open(self, path: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        try:
            with Image.open(path) as im:
                im.load()
                return self.apply(im, gen, path)
        except FileNotFoundError:
            raise BadSample("missing image", path) from None
        except Image.DecompressionBombError:
            raise BadSample(TOO_LARGE, path) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            raise BadSample("corrupt image", path) from None

    def apply(self, im: Image.Image, gen: torch.Generator, where: str = "?") -> dict[str, torch.Tensor]:
        """``pixel_values`` in [-1, 1], plus SDXL's micro-conditioning inputs: ``original_size`` (h, w)
        of the source image and ``crop_top_left`` (top, left) of the crop in the resized image."""
        if min(im.size) < MIN_SIDE:
            raise BadSample("tiny image", where)
        im = to_rgb(im)
        r = self.resolution
        w, h = im.size
        scale = r / min(w, h)
        nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
        im = im.resize((nw, nh), self.filter)
        if self.center_crop:
            top, left = (nh - r) // 2, (nw - r) // 2
        else:
            top = int(torch.randint(0, nh - r + 1, (1,), generator=gen))
            left = int(torch.randint(0, nw - r + 1, (1,), generator=gen))
        im = im.crop((left, top, left + r, top + r))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if self.random_flip and bool(torch.rand(1, generator=gen) < 0.5):
            x = x.flip(-1)
            left = nw - r - left  # the crop as seen in the flipped image (as diffusers' SDXL scripts do)
        return {"pixel_values": x, "original_size": torch.tensor([h, w]), "crop_top_left": torch.tensor([top, left])}
