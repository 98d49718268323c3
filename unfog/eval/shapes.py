"""Prompt adherence on shapes-v1, by the exact rules of specs/shapes-v1.md."""

from __future__ import annotations

import random
from collections import deque

import numpy as np
from PIL import Image

from ..data.shapes import BACKGROUNDS, COLOURS, POSITION_PHRASES, RELATIONS, SHAPES, SIZES, Prompt, caption, random_prompt
from ..errors import UnfogError

COLOUR_DISTANCE = 60
MIN_PIXELS = 20
SMALL_BELOW = 19


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """(N, 2) array of (y, x) of the largest 4-connected component of a boolean mask."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        comp, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    return np.array(best) if best else None


def classify_shape(fill: float) -> str:
    return "square" if fill > 0.90 else "circle" if fill >= 0.65 else "triangle"


def find_object(pixels: np.ndarray, colour: str) -> dict | None:
    """The measured properties of the object of this colour, or None if it does not exist."""
    dist = np.sqrt(((pixels.astype(np.float32) - np.array(COLOURS[colour], np.float32)) ** 2).sum(-1))
    comp = largest_component(dist <= COLOUR_DISTANCE)
    if comp is None or len(comp) < MIN_PIXELS:
        return None
    ys, xs = comp[:, 0], comp[:, 1]
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    return {
        "shape": classify_shape(len(comp) / (w * h)),
        "size": "small" if max(w, h) < SMALL_BELOW else "big",
        "cx": xs.mean(),
        "cy": ys.mean(),
    }


def _position_holds(pos: str, cx: float, cy: float) -> bool:
    return {
        "left": cx < 26, "right": cx > 38, "top": cy < 26, "bottom": cy > 38,
        "center": 20 <= cx <= 44 and 20 <= cy <= 44,
    }[pos]


def _relation_holds(relation: str, a: dict, b: dict, gap: float = 6) -> bool:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    return {"left of": dx >= gap, "right of": -dx >= gap, "above": dy >= gap, "below": -dy >= gap}[relation]


def world_pixels(image, size: int = 64) -> np.ndarray:
    """uint8 (size, size, 3) pixels of a PIL image or an array, resized when it has another size
    (every world's checker measures in its own pixels)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BOX if image.width > size else Image.BICUBIC)
    return np.asarray(image)


def check(image: Image.Image, prompt: Prompt) -> dict[str, bool]:
    """Each attribute the prompt states → whether the image shows it. Keys: exists, shape,
    size, position, relation, background (per object, suffixed .0/.1 for two objects)."""
    pixels = world_pixels(image)  # the thresholds below are in the 64×64 world's pixels
    results: dict[str, bool] = {}
    found = []
    for k, o in enumerate(prompt.objects):
        sfx = f".{k}" if len(prompt.objects) > 1 else ""
        m = find_object(pixels, o.colour)
        found.append(m)
        results["exists" + sfx] = m is not None
        results["shape" + sfx] = m is not None and m["shape"] == o.shape
        if o.size:
            results["size" + sfx] = m is not None and m["size"] == o.size
    if prompt.position:
        m = found[0]
        results["position"] = m is not None and _position_holds(prompt.position, m["cx"], m["cy"])
    if prompt.relation:
        results["relation"] = all(found) and bool(_relation_holds(prompt.relation, found[0], found[1]))
    if prompt.background:
        border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]]).astype(np.float32)
        median = np.median(border, axis=0)
        results["background"] = float(np.sqrt(((median - np.array(BACKGROUNDS[prompt.background])) ** 2).sum())) <= COLOUR_DISTANCE
    return results


def eval_prompts(n: int, seed: int) -> list[Prompt]:
    """n prompts from the canonical grammar, half with one object and half with two."""
    rng = random.Random(f"eval/{seed}")
    return [random_prompt(rng, objects=1 if k < (n + 1) // 2 else 2) for k in range(n)]


def score(images: list[Image.Image], prompts: list[Prompt]) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy and the share of prompts fully followed, for one-object and
    two-object prompts separately."""
    groups: dict[str, dict[str, list[bool]]] = {}
    for image, prompt in zip(images, prompts):
        result = check(image, prompt)
        g = groups.setdefault("one-object" if len(prompt.objects) == 1 else "two-object", {})
        for key, ok in result.items():
            g.setdefault(key.split(".")[0], []).append(ok)
        g.setdefault("followed", []).append(all(result.values()))
    return {name: {k: sum(v) / len(v) for k, v in g.items()} | {"prompts": len(g["followed"])} for name, g in groups.items()}


def format_table(scores: dict[str, dict[str, float]]) -> str:
    keys = ["exists", "shape", "size", "position", "relation", "background", "followed"]
    lines = ["| prompts | n | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 2)]
    for name, s in sorted(scores.items()):
        cells = [f"{100 * s[k]:.1f}%" if k in s else "–" for k in keys]
        lines.append(f"| {name} | {int(s['prompts'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grammar_words() -> list[str]:
    """Every word of the canonical shapes-v1 captions."""
    words = " ".join([*COLOURS, *SHAPES, *SIZES, *BACKGROUNDS, *POSITION_PHRASES.values(), *RELATIONS, "a an on and background"])
    return sorted(set(words.split()))


def unknown_words(pipe, words: list[str]) -> list[str]:
    """The words that the model's tokenizer(s) map to the unknown token."""
    missing = set()
    for tok in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)):
        if tok is None:
            continue
        unk_token = getattr(tok.backend.model, "unk_token", None)
        unk = tok.backend.token_to_id(unk_token) if unk_token else None
        if unk is None:
            continue
        missing |= {w for w, ids in zip(words, tok.encode(words)) if not ids or unk in ids}
    return sorted(missing)


def check_world_model(pipe, words: list[str], world: str) -> None:
    """Refuse, before any generation, a model whose tokenizer does not know the world's words:
    it cannot read the evaluation prompts, so its scores would say nothing."""
    missing = unknown_words(pipe, words)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise UnfogError(f"this model is not {'an' if world[0] in 'aeiou' else 'a'} {world} model: its tokenizer does not know {len(missing)} of the words of the "
                         f"{world} captions ({shown}); evaluate a model trained on {world} (unfog train --data {world.split('-')[0]})")


def evaluate(pipe, n: int = 500, seed: int = 0, batch_size: int = 25, progress: bool = True, **generate_kwargs) -> dict:
    """Generate one image per evaluation prompt (image k seeded with seed + k) and score them.
    Refuses a model whose tokenizer does not know the shapes-v1 words."""
    check_world_model(pipe, grammar_words(), "shapes-v1")
    prompts = eval_prompts(n, seed)
    texts = [caption(p) for p in prompts]
    images = generate(pipe, texts, seed, batch_size, progress, **generate_kwargs)
    return {"scores": score(images, prompts), "images": images, "prompts": texts}


def generate(pipe, texts: list[str], seed: int, batch_size: int = 25, progress: bool = True, **generate_kwargs) -> list:
    """One image per evaluation caption, image k seeded with seed + k, in batches (every
    world's evaluation generates through here)."""
    from tqdm.auto import tqdm

    images = []
    for start in tqdm(range(0, len(texts), batch_size), desc="evaluating", disable=not progress):
        chunk = texts[start : start + batch_size]
        images += pipe(chunk, seed=[seed + start + k for k in range(len(chunk))], **generate_kwargs).images
    return images
