"""Prompt adherence on emoji-scenes (docs/specs/emoji-scenes.md, Evaluation).

The image is segmented against its background (the median of the 1-px border): pixels further
than FOREGROUND_DISTANCE from it are foreground; 8-connected parts within MERGE_GAP empty pixels
of each other form one object. Each object's crop is named by a small CNN (175 sprite names,
unfog/assets/emoji-sprites/classifier.safetensors, trained by scripts/train_emoji_classifier.py
on crops made exactly as here). A prompt's objects are matched to the segmented ones by the
classifier's probabilities; size, position and relation are measured on the matched objects'
boxes by the rules of shapes-v1, the background on the border, a style on the objects' pixels.
`validate` measures the evaluator itself on rendered scenes that follow, or break, a prompt.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.emoji import (
    BACKGROUNDS, GROUPS, SEPIA, SIZE, SIZES, SPRITES_DIR, STYLES, Prompt, caption, random_prompt, sprites,
)
from ..data.shapes import POSITION_PHRASES, RELATIONS
from ..errors import UnfogError
from .shapes import check_world_model, generate, unknown_words, world_pixels

FOREGROUND_DISTANCE = 40  # RGB distance from the background above which a pixel is an object's
MERGE_GAP = 2  # parts with at most this many empty pixels between them are one object
MIN_PIXELS = 12  # smaller objects are specks, not objects
CROP_PAD = 2
CROP_SIZE = 32
MAX_OBJECTS = 4  # the largest objects considered when matching a prompt's objects
# Recognised means the classifier's first choice, with at least this probability: a blob that is
# "most like a zebra" at 7 % (a near tie with a wrench) is not a zebra to a person.
MIN_CONFIDENCE = 0.5
SPLIT_PENALTY = 0.5  # log-probability charged for matching a prompt object to part of a segmented object
SMALL_BELOW = 23  # longer side in pixels: small 18±2, big 28±2
RELATION_GAP = 6
BACKGROUND_DISTANCE = 40
GRAY_RESIDUAL = 10.0  # median distance of the object pixels from the gray axis, at most, for "grayscale"
SEPIA_RESIDUAL = 8.0  # … from the sepia axis (luminance × SEPIA), for "sepia"
CLASSIFIER_PATH = SPRITES_DIR / "classifier.safetensors"
KEYS = ["exists", "object", "size", "position", "relation", "background", "style", "followed"]


def eval_prompts(n: int, seed: int) -> list[Prompt]:
    """n prompts from the canonical grammar, half with one object and half with two."""
    rng = random.Random(f"emoji-eval/{seed}")
    return [random_prompt(rng, objects=1 if k < (n + 1) // 2 else 2) for k in range(n)]


# ---- segmentation ---------------------------------------------------------------------------


@dataclass
class Found:
    """An object the segmentation found: its box (x0, y0, x1, y1; x1, y1 exclusive), pixel count,
    the centre of its box, its longer side, its pixels (a boolean mask) and its 8-connected parts
    (masks, largest first)."""

    box: tuple[int, int, int, int]
    pixels: int
    cx: float
    cy: float
    side: int
    mask: np.ndarray = field(repr=False)
    parts: list[np.ndarray] = field(default_factory=list, repr=False)

    @classmethod
    def from_mask(cls, mask: np.ndarray, parts: list[np.ndarray] | None = None) -> "Found":
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        return cls((x0, y0, x1, y1), len(xs), (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0), mask, parts or [mask])


def _labels(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask (-1 off the mask): each pixel ends with the
    smallest flat index in its component, by min-propagation with pointer jumping."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big, dtype=np.int64).reshape(h, w), big)
    flat = np.empty(big + 1, np.int64)
    flat[big] = big
    while True:
        p = np.pad(lab, 1, constant_values=big)
        m = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy != 1 or dx != 1:
                    np.minimum(m, p[dy : dy + h, dx : dx + w], out=m)
        flat[:big] = np.where(mask, m, big).ravel()
        for _ in range(4):  # pointer jumping: a pixel takes its label's label
            flat[:big] = flat[flat[:big]]
        m = flat[:big].reshape(h, w).copy()
        if np.array_equal(m, lab):
            return np.where(mask, lab, -1)
        lab = m


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    h, w = mask.shape
    out = mask.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def segment(image, parts: bool = True) -> tuple[np.ndarray, list[Found]]:
    """The background colour (the median of the 1-px border, float RGB) and the objects on it,
    largest first. Objects are foreground pixels (RGB distance from the background above
    FOREGROUND_DISTANCE), 8-connected, with parts at most MERGE_GAP empty pixels apart joined
    (sprites such as cherries have separate parts); objects under MIN_PIXELS are dropped.
    `parts=False` skips finding each object's 8-connected parts (Found.parts is then [mask])."""
    pixels = world_pixels(image, SIZE).astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    fg = ((pixels - background) ** 2).sum(-1) > FOREGROUND_DISTANCE**2
    if not fg.any():
        return background, []
    near = fg
    for _ in range((MERGE_GAP + 1) // 2):  # dilating by one pixel joins pixels two empty pixels apart
        near = _dilate(near)
    objects = np.where(fg, _labels(near), -1)
    part_labels = _labels(fg) if parts else objects
    ids, counts = np.unique(objects[fg], return_counts=True)
    found = []
    for k in np.argsort(-counts, kind="stable"):
        if counts[k] < MIN_PIXELS:
            break
        mask = objects == ids[k]
        part_ids, part_counts = np.unique(part_labels[mask], return_counts=True)
        order = np.argsort(-part_counts, kind="stable")
        found.append(Found.from_mask(mask, [part_labels == part_ids[j] for j in order] if len(part_ids) > 1 else [mask]))
    return background, found


def crop(pixels: np.ndarray, background, box: tuple[int, int, int, int], hide: np.ndarray | None = None, size: int = CROP_SIZE) -> np.ndarray:
    """The classifier's view of the object in `box`: the box padded by CROP_PAD, made square about
    its centre, outside the image filled with the background colour, the pixels in `hide` (other
    objects) too, resized to size × size. uint8 (size, size, 3)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) + 2 * CROP_PAD
    sx, sy = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    h, w = pixels.shape[:2]
    bg = np.clip(np.rint(np.asarray(background, np.float32)), 0, 255).astype(np.uint8)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = bg
    ax0, ay0, ax1, ay1 = max(sx, 0), max(sy, 0), min(sx + side, w), min(sy + side, h)
    region = pixels[ay0:ay1, ax0:ax1].astype(np.uint8)
    if hide is not None:
        region = np.where(hide[ay0:ay1, ax0:ax1, None], bg, region)
    out[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx] = region
    return np.asarray(Image.fromarray(out).resize((size, size), Image.BILINEAR))


# ---- the sprite classifier -------------------------------------------------------------------


def build_classifier(widths: tuple[int, ...] = (32, 64, 128, 256), classes: int = 175):
    """conv3×3-BN-ReLU stages (max-pooled between), global average pool, linear → logits.
    Input: (B, 3, 32, 32) float, pixels / 127.5 - 1."""
    from torch import nn

    layers: list = []
    prev = 3
    for k, w in enumerate(widths):
        if k:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(prev, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        prev = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, classes)]
    return nn.Sequential(*layers)


def save_classifier(net, names: list[str], widths: tuple[int, ...], path: str | Path) -> None:
    """float16 safetensors with the class names and widths in the metadata, written atomically."""
    import os

    import torch
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"names": json.dumps(names), "widths": json.dumps(list(widths)), "crop_size": str(CROP_SIZE)})
    os.replace(tmp, path)


@lru_cache(maxsize=2)
def load_classifier(path: str | None = None):
    """(network in eval mode, class names), read once. The names must be the sprite set's."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path) if path else CLASSIFIER_PATH
    if not p.is_file():
        raise UnfogError(f"the emoji-scenes sprite classifier {p} is missing; reinstall unfog from a full checkout, or train it: "
                         "python scripts/train_emoji_classifier.py")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        names, widths = json.loads(meta["names"]), tuple(json.loads(meta["widths"]))
        state = load_file(str(p))
    except Exception as e:  # safetensors and json raise their own types
        raise UnfogError(f"cannot read the sprite classifier {p}: {e}") from None
    if names != sprites().names:
        raise UnfogError(f"the sprite classifier {p} was trained for a different sprite set ({len(names)} names) than "
                         f"unfog/assets/emoji-sprites ({len(sprites().names)}); retrain it: python scripts/train_emoji_classifier.py")
    net = build_classifier(widths, len(names))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.eval(), names


def classify(crops: np.ndarray, path: str | None = None) -> np.ndarray:
    """Log-probabilities (N, 175) over the sprite names for uint8 crops (N, 32, 32, 3). Batches
    under 64 crops run on one thread (a few crops on two threads of a busy machine took 50×
    longer)."""
    import torch

    net, names = load_classifier(path)
    if len(crops) == 0:
        return np.zeros((0, len(names)), np.float32)
    threads = torch.get_num_threads()
    if len(crops) < 64:
        torch.set_num_threads(1)
    try:
        out = []
        with torch.inference_mode():
            for k in range(0, len(crops), 1024):
                x = torch.from_numpy(np.ascontiguousarray(crops[k : k + 1024])).permute(0, 3, 1, 2).float() / 127.5 - 1
                out.append(torch.log_softmax(net(x), -1).numpy())
        return np.concatenate(out)
    finally:
        torch.set_num_threads(threads)


# ---- checking a prompt -----------------------------------------------------------------------


def _position_holds(pos: str, cx: float, cy: float) -> bool:
    return {
        "left": cx < 26, "right": cx > 38, "top": cy < 26, "bottom": cy > 38,
        "center": 20 <= cx <= 44 and 20 <= cy <= 44,
    }[pos]


def _relation_holds(relation: str, a: Found, b: Found, gap: float = RELATION_GAP) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    return {"left of": dx >= gap, "right of": -dx >= gap, "above": dy >= gap, "below": -dy >= gap}[relation]


def _nearest_background(colour) -> tuple[str, float]:
    dists = {name: float(np.sqrt(((np.asarray(colour, np.float32) - np.array(rgb, np.float32)) ** 2).sum())) for name, rgb in BACKGROUNDS.items()}
    name = min(dists, key=dists.get)
    return name, dists[name]


def _axis_residual(rgb: np.ndarray, axis) -> np.ndarray:
    u = np.asarray(axis, np.float32)
    u = u / np.linalg.norm(u)
    return np.linalg.norm(rgb - (rgb @ u)[:, None] * u, axis=-1)


def style_residuals(pixels: np.ndarray, mask: np.ndarray, background) -> tuple[float, float]:
    """Median distances of the object pixels' colours from the gray axis and from the sepia axis
    (luminance × SEPIA): small for a grayscale / sepia sprite. Only interior pixels count (the
    outline mixes with the background), unless too few remain."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    core = mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    if core.sum() >= 20:
        rgb = pixels[core].astype(np.float32)
    else:  # a thin sprite: the half of its pixels furthest from the background are the least mixed with it
        rgb = pixels[mask].astype(np.float32)
        if len(rgb) == 0:
            return math.inf, math.inf
        far = ((rgb - np.asarray(background, np.float32)) ** 2).sum(-1)
        rgb = rgb[far >= np.median(far)]
    return float(np.median(_axis_residual(rgb, (1, 1, 1)))), float(np.median(_axis_residual(rgb, SEPIA)))


def _style_holds(style: str, gray: float, sepia: float) -> bool:
    if style == "grayscale":
        return gray <= GRAY_RESIDUAL
    return sepia <= SEPIA_RESIDUAL and sepia < gray


@dataclass
class _Candidate:
    found: Found
    source: int  # index of the segmented object it is (part of)
    seeds: frozenset  # which of that object's parts it holds
    split: bool


def _candidates(found: list[Found], split: bool) -> list[_Candidate]:
    """The largest MAX_OBJECTS objects, and with `split` also each two-way split of an object
    made of several parts (two sprites closer than MERGE_GAP are one object to the segmentation)."""
    out = []
    for i, f in enumerate(found[:MAX_OBJECTS]):
        seeds = [m for m in f.parts if m.sum() >= MIN_PIXELS][:MAX_OBJECTS]
        out.append(_Candidate(f, i, frozenset(range(max(1, len(seeds)))), False))
        if not split or len(seeds) < 2:
            continue
        # the other parts go with the nearest seed part
        rest = [m for m in f.parts if not any(m is s for s in seeds)]
        groups = [s.copy() for s in seeds]
        if rest:
            near = [_distance_map(s) for s in seeds]
            for m in rest:
                groups[int(np.argmin([d[m].min() for d in near]))] |= m
        for bits in range(2 ** (len(seeds) - 1) - 1):
            side = {0} | {j for j in range(1, len(seeds)) if bits >> (j - 1) & 1}
            other = set(range(len(seeds))) - side
            for s in (side, other):
                mask = np.logical_or.reduce([groups[j] for j in s])
                out.append(_Candidate(Found.from_mask(mask), i, frozenset(s), True))
    return out


def _distance_map(mask: np.ndarray) -> np.ndarray:
    """Chebyshev distance of every pixel to the mask (capped at 64)."""
    d = np.where(mask, 0, SIZE).astype(np.int32)
    cur = mask
    for k in range(1, SIZE):
        nxt = _dilate(cur)
        new = nxt & ~cur
        if not new.any():
            break
        d[new] = k
        cur = nxt
    return d


def _prepare(image, prompt: Prompt) -> dict:
    """Segment the image and crop every candidate for the prompt's objects."""
    pixels = world_pixels(image, SIZE)
    background, found = segment(pixels)
    cands = _candidates(found, split=len(prompt.objects) > 1)
    everything = np.logical_or.reduce([f.mask for f in found]) if found else np.zeros(pixels.shape[:2], bool)
    crops = [crop(pixels, background, c.found.box, everything & ~c.found.mask) for c in cands]
    return {"pixels": pixels, "background": background, "found": found, "candidates": cands,
            "crops": np.stack(crops) if crops else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)}


def _match(prep: dict, prompt: Prompt, logp: np.ndarray) -> dict:
    """Match the prompt's objects to candidates: one object to the candidate most probably it;
    two to the pair of disjoint candidates with the largest summed log-probability (a part of a
    segmented object costs SPLIT_PENALTY). Adds "objects": per prompt object None or {found,
    name (the classifier's argmax), logp (of the prompt's name), split}."""
    s = sprites()
    wanted = [s.index(o.name) for o in prompt.objects]
    cands = prep["candidates"]
    matched: list[int | None] = [None] * len(wanted)
    if cands and len(wanted) == 1:
        matched[0] = int(np.argmax(logp[:, wanted[0]]))
    elif cands:
        pen = np.array([SPLIT_PENALTY if c.split else 0.0 for c in cands])
        a, b = logp[:, wanted[0]] - pen, logp[:, wanted[1]] - pen
        total = a[:, None] + b[None, :]
        for i, ci in enumerate(cands):
            for j, cj in enumerate(cands):
                if ci.source == cj.source and ci.seeds & cj.seeds:
                    total[i, j] = -np.inf
        if np.isfinite(total).any():
            matched = [int(m) for m in np.unravel_index(int(np.argmax(total)), total.shape)]
        else:  # one object for two prompt objects: it goes to the one it looks more like
            k = int(np.argmax(np.maximum(a, b)))
            matched[0 if a[k] >= b[k] else 1] = k
    objects = [None if m is None else {"found": cands[m].found, "name": s.names[int(np.argmax(logp[m]))], "logp": float(logp[m, w]),
                                       "split": cands[m].split} for w, m in zip(wanted, matched)]
    return {k: v for k, v in prep.items() if k != "crops"} | {"objects": objects}


def _analyse_many(images, prompts: list[Prompt], chunk: int = 256) -> list[dict]:
    """_prepare each image, classify the crops of `chunk` images in one batch, _match."""
    out = []
    for start in range(0, len(prompts), chunk):
        preps = [_prepare(im, p) for im, p in zip(images[start : start + chunk], prompts[start : start + chunk])]
        logp = classify(np.concatenate([q["crops"] for q in preps]))
        ends = np.cumsum([len(q["crops"]) for q in preps])
        out += [_match(q, p, logp[e - len(q["crops"]) : e]) for q, p, e in zip(preps, prompts[start : start + chunk], ends)]
    return out


def analyse(image, prompt: Prompt) -> dict:
    """check's measurements: the background colour, the segmented objects, the candidates, and
    for each prompt object the matched object (or None) with the classifier's name for it."""
    return _analyse_many([image], [prompt])[0]


def _results(a: dict, prompt: Prompt) -> dict[str, bool]:
    results: dict[str, bool] = {}
    matched = a["objects"]
    for k, (o, m) in enumerate(zip(prompt.objects, matched)):
        sfx = f".{k}" if len(prompt.objects) > 1 else ""
        results["exists" + sfx] = m is not None
        results["object" + sfx] = m is not None and m["name"] == o.name and m["logp"] >= math.log(MIN_CONFIDENCE)
        if o.size:
            results["size" + sfx] = m is not None and ("small" if m["found"].side < SMALL_BELOW else "big") == o.size
    if prompt.position:
        m = matched[0]
        results["position"] = m is not None and _position_holds(prompt.position, m["found"].cx, m["found"].cy)
    if prompt.relation:
        results["relation"] = all(m is not None for m in matched) and _relation_holds(prompt.relation, matched[0]["found"], matched[1]["found"])
    if prompt.background:
        name, dist = _nearest_background(a["background"])
        results["background"] = name == prompt.background and dist <= BACKGROUND_DISTANCE
    if prompt.style:
        masks = [m["found"].mask for m in matched if m is not None]
        ok = bool(masks)
        if ok:
            gray, sepia = style_residuals(a["pixels"], np.logical_or.reduce(masks), a["background"])
            ok = _style_holds(prompt.style, gray, sepia)
        results["style"] = ok
    return results


def check_many(images, prompts: list[Prompt]) -> list[dict[str, bool]]:
    """check for many images, classifying their crops in batches."""
    return [_results(a, p) for a, p in zip(_analyse_many(images, prompts), prompts)]


def check(image, prompt: Prompt) -> dict[str, bool]:
    """Each attribute the prompt states → whether the image shows it. Keys: exists, object,
    size (per prompt object, suffixed .0/.1 for two objects), position, relation, background,
    style (a prompt without a style is not checked for one)."""
    return _results(analyse(image, prompt), prompt)


# ---- scores ----------------------------------------------------------------------------------


def score(images, prompts: list[Prompt]) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy, the share of prompts fully followed and the prompt count, for
    one-object and two-object prompts separately; and under "by_group" the share of prompt objects
    recognised ("object") and their count ("n") per sprite group."""
    s = sprites()
    groups: dict[str, dict[str, list[bool]]] = {}
    by_group: dict[str, list[bool]] = {g: [] for g in GROUPS}
    for prompt, result in zip(prompts, check_many(images, prompts)):
        g = groups.setdefault("one-object" if len(prompt.objects) == 1 else "two-object", {})
        for key, ok in result.items():
            g.setdefault(key.split(".")[0], []).append(ok)
        g.setdefault("followed", []).append(all(result.values()))
        for k, o in enumerate(prompt.objects):
            by_group[s.groups[s.index(o.name)]].append(result["object" + (f".{k}" if len(prompt.objects) > 1 else "")])
    scores: dict = {name: {k: sum(v) / len(v) for k, v in g.items()} | {"prompts": len(g["followed"])} for name, g in groups.items()}
    scores["by_group"] = {name: {"object": sum(v) / len(v), "n": len(v)} for name, v in by_group.items() if v}
    return scores


def format_table(scores: dict) -> str:
    """Markdown: a row per prompt kind (attributes as columns), then a row per sprite group."""
    keys = KEYS
    lines = ["| prompts | n | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 2)]
    for name, s in sorted(scores.items()):
        if name == "by_group":
            continue
        cells = [f"{100 * s[k]:.1f}%" if k in s else "–" for k in keys]
        lines.append(f"| {name} | {int(s['prompts'])} | " + " | ".join(cells) + " |")
    if scores.get("by_group"):
        lines += ["", "| sprite group | objects | recognised |", "| --- | --- | --- |"]
        for name, g in sorted(scores["by_group"].items()):
            lines.append(f"| {name} | {g['n']} | {100 * g['object']:.1f}% |")
    return "\n".join(lines)


def grammar_words() -> list[str]:
    """Every word of the canonical emoji-scenes captions."""
    words = " ".join([*sprites().names, *SIZES, *BACKGROUNDS, *POSITION_PHRASES.values(), *RELATIONS, *STYLES, "a an on in background"])
    return sorted(set(words.split()))


def is_emoji_model(pipe) -> bool:
    """Whether the model's tokenizer knows every word of the emoji-scenes captions."""
    return not unknown_words(pipe, grammar_words())


def evaluate(pipe, n: int = 500, seed: int = 0, batch_size: int = 25, progress: bool = True, **generate_kwargs) -> dict:
    """Generate one image per evaluation prompt (image k seeded with seed + k) and score them.
    Refuses a model whose tokenizer does not know the emoji-scenes words."""
    check_world_model(pipe, grammar_words(), "emoji-scenes")
    load_classifier()  # fail before generating, if the classifier is missing
    prompts = eval_prompts(n, seed)
    texts = [caption(p) for p in prompts]
    images = generate(pipe, texts, seed, batch_size, progress, **generate_kwargs)
    return {"scores": score(images, prompts), "images": images, "prompts": texts}


def score_file(path: str | Path, seed: int) -> dict:
    """Score the images of an .npz written for evaluation (`images`: (N, 64, 64, 3) uint8,
    `prompts`: their captions, those of eval_prompts(N, seed) in order), as evaluate would:
    {"scores", "images" (PIL), "prompts"}."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            images, prompts = data["images"], data["prompts"]
    except (OSError, ValueError, KeyError) as e:
        raise UnfogError(f"cannot read evaluation images from {path} (an .npz with 'images' and 'prompts'): {e}") from None
    if prompts.ndim != 1:
        raise UnfogError(f"{path}: 'prompts' must be a list of captions, one per image; got an array of shape {prompts.shape}")
    texts = [str(t) for t in prompts]
    if images.ndim != 4 or min(images.shape[:3], default=0) < 1 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) != len(texts):
        raise UnfogError(f"{path}: 'images' must be (N, H, W, 3) uint8, N, H and W at least 1, with one caption per image in 'prompts'; got {images.shape} "
                         f"{images.dtype} and {len(texts)} captions")
    prompts = eval_prompts(len(texts), seed)
    for k, (p, t) in enumerate(zip(prompts, texts)):
        if caption(p) != t:
            raise UnfogError(f"{path}: caption {k} is {t!r}, but evaluation prompt {k} of seed {seed} is {caption(p)!r}; "
                             "pass the seed the images were generated for")
    pictures = [Image.fromarray(a) for a in images]
    return {"scores": score(pictures, prompts), "images": pictures, "prompts": texts}
