"""The emoji-scenes evaluator's own validation (docs/specs/emoji-scenes.md, Evaluation): does it
score renders that follow a prompt as followed, and reject renders with one attribute wrong?"""

from __future__ import annotations

import io
import random
from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

from ..data.emoji import BACKGROUNDS, STYLES, Prompt, Scene, caption, random_prompt, render, sample_scene, sprites
from ..data.shapes import MIRROR
from .emoji import check_many

# ---- validating the evaluator ----------------------------------------------------------------


def degrade(image: Image.Image, rng: random.Random, blur: float = 0.6, noise: float = 4.0, jitter: float = 0.0, jpeg: float = 0.0) -> Image.Image:
    """A rendered image made a little like a generated one: gaussian blur of radius up to `blur`,
    gaussian noise of σ up to `noise`; with probability `jitter` a slight colour shift, with
    probability `jpeg` a JPEG round trip (quality 50–95)."""
    r = rng.uniform(0, blur)
    if r > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(r))
    a = np.asarray(image, np.float32)
    if rng.random() < jitter:
        a = a * np.array([rng.uniform(0.94, 1.06) for _ in range(3)], np.float32) + np.array([rng.uniform(-8, 8) for _ in range(3)], np.float32)
    sigma = rng.uniform(0, noise)
    if sigma > 0:
        a = a + np.random.default_rng(rng.getrandbits(64)).normal(0, sigma, a.shape).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if rng.random() < jpeg:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=rng.randint(50, 95))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image


MUTATIONS = ("object", "size", "position", "relation", "background", "style")
_CONTRARY = {"left": ("right", "center"), "right": ("left", "center"), "top": ("bottom", "center"), "bottom": ("top", "center"),
             "center": ("left", "right", "top", "bottom")}


def mutate(prompt: Prompt, rng: random.Random) -> tuple[str, Prompt]:
    """The prompt with exactly one stated attribute changed so that it contradicts the original:
    an object's name, a stated size, the position (to one that excludes it), the relation
    (mirrored), the background, or a stated style (to the other style or none)."""
    p = Scene([replace(o) for o in prompt.objects], prompt.background, prompt.position, prompt.relation, prompt.style)
    kinds = ["object"] + ["size"] * any(o.size for o in p.objects) + ["position"] * bool(p.position) + ["relation"] * bool(p.relation) \
        + ["background"] * bool(p.background) + ["style"] * bool(p.style)
    kind = rng.choice(kinds)
    if kind == "object":
        o = rng.choice(p.objects)
        o.name = rng.choice([n for n in sprites().names if n not in {q.name for q in p.objects}])
    elif kind == "size":
        o = rng.choice([o for o in p.objects if o.size])
        o.size = "small" if o.size == "big" else "big"
    elif kind == "position":
        p.position = rng.choice(_CONTRARY[p.position])
    elif kind == "relation":
        p.relation = MIRROR[p.relation]
    elif kind == "background":
        p.background = rng.choice([b for b in BACKGROUNDS if b != p.background])
    else:
        p.style = rng.choice([s for s in (*STYLES, None) if s != p.style])
    return kind, p


def validate(n: int = 1000, seed: int = 0) -> dict:
    """The evaluator measured on renders (mildly degraded: blur radius ≤ 0.6, noise σ ≤ 4):
    ground truth (a scene following each prompt: the share followed should be ≥ 98 %) and wrong
    renders (a scene following the prompt with one stated attribute changed: the share rejected
    should be ≥ 95 %), per kind of change. Prompts are drawn like eval_prompts', from their own
    seed namespace."""
    rng = random.Random(f"emoji-validate/{seed}")
    prompts = [random_prompt(rng, objects=1 if k < (n + 1) // 2 else 2) for k in range(n)]
    truths, wrongs, kinds = [], [], []
    for k, p in enumerate(prompts):
        r = random.Random(f"emoji-validate/{seed}/{k}")
        truths.append(degrade(render(sample_scene(r, p)), r))
        kind, wrong = mutate(p, r)
        kinds.append((kind, wrong))
        wrongs.append(degrade(render(sample_scene(r, wrong)), r))
    followed: dict[str, list[bool]] = {"one-object": [], "two-object": []}
    rejected: dict[str, list[bool]] = {k: [] for k in MUTATIONS}
    failures, accepted = [], []
    for p, result in zip(prompts, check_many(truths, prompts)):
        followed["one-object" if len(p.objects) == 1 else "two-object"].append(all(result.values()))
        if not all(result.values()):
            failures.append({"prompt": caption(p), "failed": sorted(key for key, ok in result.items() if not ok)})
    for p, (kind, wrong), result in zip(prompts, kinds, check_many(wrongs, prompts)):
        rejected[kind].append(not all(result.values()))
        if all(result.values()):
            accepted.append({"prompt": caption(p), "rendered": caption(wrong)})
    everything = [x for v in followed.values() for x in v]
    wrongs = [x for v in rejected.values() for x in v]  # (the images are no longer needed)
    return {
        "seed": seed,
        "ground_truth": {"followed": sum(everything) / len(everything), "n": len(everything)}
        | {g: sum(v) / len(v) for g, v in followed.items() if v},
        "wrong": {"rejected": sum(wrongs) / len(wrongs), "n": len(wrongs),
                  "by_kind": {kind: {"rejected": sum(v) / len(v), "n": len(v)} for kind, v in rejected.items() if v}},
        "failures": failures,
        "accepted_wrong": accepted,
    }
