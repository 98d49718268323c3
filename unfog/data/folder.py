"""Image+caption folders: `metadata.jsonl` ({"file_name", "text"} per line, the layout
image-folder loaders in this field read) or plain `name.png` + `name.txt` pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UnfogError
from ..images import rgb, upright

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Item:
    path: Path
    text: str


def bucket_sizes(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as kohya's scripts make them: (width, height), both multiples of
    `step`, about resolution² pixels, from 1:2 to 2:1."""
    step = min(step, resolution)
    sizes = set()
    for w in range(max(step, resolution // 2 // step * step), 2 * resolution + 1, step):
        h = min(2 * resolution, resolution * resolution // w // step * step)
        if h >= max(step, resolution // 2) and max(w, h) <= 2 * min(w, h):
            sizes |= {(w, h), (h, w)}  # each shape in both orientations
    return sorted(sizes)


def _load_image(path: Path, resolution: int, size: tuple[int, int] | None = None, buckets: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Resize to cover the target and center-crop, return uint8 (H, W, 3). The target is
    resolution × resolution, or with `buckets` the bucket whose aspect ratio is nearest the image's."""
    with Image.open(path) as im:
        im = rgb(upright(im))  # as the photo is shown, 16-bit images scaled
        w, h = im.size
        if buckets:
            tw, th = min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(w / h)))
        else:
            tw, th = resolution, resolution
        # The centred region of the target's aspect ratio, resized straight to the target: resizing
        # the whole image to cover it first made a 100000×1 strip 6.4 M × 64 pixels (2 GB).
        cw, ch = min(w, h * tw / th), min(h, w * th / tw)
        left, top = (w - cw) / 2, (h - ch) / 2
        if (cw, ch) == (tw, th) and left == int(left) and top == int(top):
            return np.asarray(im.crop((int(left), int(top), int(left) + tw, int(top) + th)), dtype=np.uint8)
        return np.asarray(im.resize((tw, th), Image.BICUBIC, box=(left, top, left + cw, top + ch)), dtype=np.uint8)


class ImageCaptionFolder:
    """All readable image+caption pairs of a folder, loaded into memory at `resolution`.

    Unreadable images and images without a caption raise an error naming the file, or with
    `skip_bad=True` are counted in `skipped` and left out.
    """

    def __init__(self, root: str | Path, resolution: int, *, skip_bad: bool = False, hflip: bool = False, buckets: int | None = None):
        """`buckets`: group the images into aspect-ratio buckets with sides multiples of this
        (e.g. 64) instead of centre-cropping squares; a batch then comes from one bucket."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise UnfogError(f"dataset folder {self.root} does not exist")
        self.resolution = resolution
        self.hflip = hflip
        self.skipped: list[tuple[str, str]] = []
        items = self._metadata_items() if (self.root / "metadata.jsonl").is_file() else self._pair_items()
        images, texts = [], []
        for item in items:
            if isinstance(item, tuple):  # (file, problem) found while listing
                self._bad(*item, skip_bad)
                continue
            try:
                images.append(_load_image(item.path, resolution, buckets=bucket_sizes(resolution, buckets) if buckets else None))
                texts.append(item.text)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self._bad(str(item.path), f"cannot be read as an image ({e})", skip_bad)
        if not images:
            raise UnfogError(f"dataset folder {self.root} holds no usable image+caption pairs")
        self.texts = texts
        self.by_size: dict[tuple[int, int], list[int]] = {}  # (height, width) → indices
        for i, im in enumerate(images):
            self.by_size.setdefault(im.shape[:2], []).append(i)
        self.images_list = [torch.from_numpy(im.copy()).permute(2, 0, 1).contiguous() for im in images]  # PIL arrays are read-only

    def _bad(self, name: str, problem: str, skip: bool) -> None:
        if not skip:
            raise UnfogError(f"dataset file {name} {problem}; fix or remove it, or pass --skip-bad to skip such files")
        self.skipped.append((name, problem))

    def _metadata_items(self):
        meta = self.root / "metadata.jsonl"
        for n, raw in enumerate(meta.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines(), 1):  # (a Windows editor's BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield (f"{meta}:{n}", "is not UTF-8 text (save the file as UTF-8)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
                if not isinstance(name, str) or not name:
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                yield (f"{meta}:{n}", 'is not a JSON object with "file_name" and "text"')
                continue
            if not isinstance(text, str) or not text.strip():
                yield (str(self.root / str(name)), "has no caption in metadata.jsonl")
                continue
            path = self.root / name
            yield Item(path, text) if path.is_file() else (str(path), "is listed in metadata.jsonl but missing")

    def _pair_items(self):
        for path in sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                yield (str(path), f"has no caption file {txt.name}")
                continue
            try:
                text = txt.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError:
                yield (str(path), f"has a caption file {txt.name} that is not UTF-8 text (save it as UTF-8)")
                continue
            yield Item(path, text) if text else (str(path), f"has an empty caption file {txt.name}")

    def __len__(self) -> int:
        return len(self.texts)

    def images(self, indices: list[int]) -> torch.Tensor:
        """uint8 images (B, 3, H, W); index i wraps around the folder."""
        idx = [i % len(self) for i in indices]
        sizes = {tuple(self.images_list[i].shape[1:]) for i in idx}
        if len(sizes) > 1:
            raise UnfogError(f"a batch must come from one aspect-ratio bucket; these images have sizes {sorted(sizes)}")
        images = torch.stack([self.images_list[i] for i in idx])
        if self.hflip:
            flip = torch.tensor([(i // len(self)) % 2 == 1 for i in indices])
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images

    def captions(self, indices: list[int], epoch_seed: int = 0) -> list[str]:
        return [self.texts[i % len(self)] for i in indices]
