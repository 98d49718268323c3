"""Image conversion between PIL and tensors, and grids: the one small module every layer may use."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def rgb(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """image in 8-bit `mode` ("RGB" or "L"). PIL's own convert clips 16- and 32-bit integer
    images (a 16-bit grayscale PNG, mode I;16) at 255, so mid-grey came out white; they are scaled
    from their 16-bit range first."""
    if image.mode.startswith("I"):
        scaled = np.clip(np.asarray(image, dtype=np.float64) / 257, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(scaled, "L")
    return image if image.mode == mode else image.convert(mode)


def upright(image: Image.Image) -> Image.Image:
    """A photo as it is shown: turned by its EXIF orientation (phones store pixels sideways and
    say so there), as image viewers and diffusers' load_image do. An image with nothing to turn
    is returned itself, with what its file carried (a PNG's text chunks)."""
    return image if image.getexif().get(0x0112, 1) == 1 else ImageOps.exif_transpose(image)


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image → (1, 3, H, W) in [-1, 1]; the inverse of to_pil."""
    return torch.from_numpy(np.asarray(rgb(image), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` at (width, height), resampled with Lanczos if it is not that size already."""
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def mask_from_pil(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """A PIL mask → (1, 1, H, W) of 0/1 at (width, height), where 1 (white) marks pixels to repaint."""
    gray = resized(rgb(mask, "L"), width, height)
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
    extra = {"pnginfo": info} if info is not None else {}
    if not isinstance(target, (str, os.PathLike)):
        image.save(target, format=format, **extra)
        return
    # To a sibling first, then renamed over the target: a write that fails (a full disk) leaves
    # neither a truncated image nor a damaged earlier file at the target.
    target = Path(target).resolve() if Path(target).is_symlink() else Path(target)  # through a link, as a plain save writes
    tmp = target.with_name(f".{secrets.token_hex(6)}.part")  # short: a target name near the filesystem's limit still fits
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the usual mode, less the umask
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(fd, os.stat(target).st_mode & 0o7777)  # an image being replaced keeps its mode
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=format or Image.registered_extensions().get(target.suffix.lower()), **extra)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
