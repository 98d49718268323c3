"""Image conversion between PIL and tensors, and grids: the one small module every layer may use."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image → (1, 3, H, W) in [-1, 1]; the inverse of to_pil."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` at (width, height), resampled with Lanczos if it is not that size already."""
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def mask_from_pil(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """A PIL mask → (1, 1, H, W) of 0/1 at (width, height), where 1 (white) marks pixels to repaint."""
    gray = resized(mask.convert("L"), width, height)
    return (torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255)[None, None] >= 0.5).float()


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images pasted row by row, `columns` wide (default: one row)."""
    columns = columns or len(images)
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    out = Image.new("RGB", (columns * w, rows * h), "white")
    for k, im in enumerate(images):
        out.paste(im, ((k % columns) * w, (k // columns) * h))
    return out


def save(image: Image.Image, target, text: dict[str, str] | None = None, format: str | None = None) -> None:
    """Save `image` to a path or file object; PNGs carry `text` as text chunks (the generation
    settings), other formats are written without them."""
    from PIL.PngImagePlugin import PngInfo

    is_png = (format or "").upper() == "PNG" or str(getattr(target, "suffix", target)).lower().endswith(".png")
    info = None
    if is_png and text:
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, str(value))  # international text: prompts may hold any Unicode
    image.save(target, format=format, pnginfo=info) if info is not None else image.save(target, format=format)
