"""shapes-v1: the procedural world of flat shapes with English captions (specs/shapes-v1.md).

A `Scene` holds every attribute of an image; a `Prompt` is a scene with some attributes left
unstated (None). Training captions are drawn from a scene by leaving attributes out at
random, which is valid because an attribute a caption leaves out is drawn at random in the
image. The evaluator draws prompts, and the ground-truth test renders scenes that follow them.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UnfogError

SIZE = 64
SUPERSAMPLE = 4
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLOURS = {
    "red": (220, 30, 30), "green": (40, 170, 50), "blue": (40, 80, 230),
    "yellow": (240, 220, 30), "purple": (150, 50, 200), "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 14, "big": 24}
SIZE_JITTER = 2
POSITIONS = {"left": (16, None), "right": (48, None), "top": (None, 16), "bottom": (None, 48), "center": (32, 32)}
POSITION_JITTER = 3
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "center": "in the center"}
RELATIONS = ("left of", "right of", "above", "below")
MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MIN_SEPARATION = 12
# Paraphrases the training data may use (never in evaluation prompts).
PARAPHRASES = [("big ", "large "), ("left of", "to the left of"), ("right of", "to the right of"), ("in the center", "in the middle"), ("above", "over")]


@dataclass
class Obj:
    shape: str
    colour: str
    size: str | None = None  # "small" / "big"; None in a prompt = unstated
    side: float = 0.0  # bounding-box side in pixels (scenes only)
    cx: float = 0.0
    cy: float = 0.0


@dataclass
class Scene:
    """A fully specified image, or (with None fields) a prompt."""

    objects: list[Obj]
    background: str | None = None
    position: str | None = None  # one-object images only
    relation: str | None = None  # two-object images only: objects[0] RELATION objects[1]
    paraphrase: bool = field(default=False, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("paraphrase")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        return cls(objects=[Obj(**o) for o in d["objects"]], background=d.get("background"), position=d.get("position"), relation=d.get("relation"))


Prompt = Scene


def _bbox(o: Obj) -> tuple[float, float, float, float]:
    h = o.side / 2
    return o.cx - h, o.cy - h, o.cx + h, o.cy + h


def _overlap(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = _bbox(a)
    bx0, by0, bx1, by1 = _bbox(b)
    return ax0 < bx1 + 1 and bx0 < ax1 + 1 and ay0 < by1 + 1 and by0 < ay1 + 1


def _relation_holds(a: Obj, b: Obj, relation: str, gap: float) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    return {"left of": dx >= gap, "right of": -dx >= gap, "above": dy >= gap, "below": -dy >= gap}[relation]


def random_prompt(rng: random.Random, objects: int | None = None, p_state: float = 0.5) -> Prompt:
    """A prompt from the canonical grammar: each optional attribute stated with p_state."""
    n = objects or rng.choice((1, 2))
    colours = rng.sample(list(COLOURS), n)
    objs = [Obj(rng.choice(SHAPES), c, rng.choice(list(SIZES)) if rng.random() < p_state else None) for c in colours]
    bg = rng.choice(list(BACKGROUNDS)) if rng.random() < p_state else None
    if n == 1:
        return Scene(objs, bg, position=rng.choice(list(POSITIONS)) if rng.random() < p_state else None)
    return Scene(objs, bg, relation=rng.choice(RELATIONS))


def sample_scene(rng: random.Random, prompt: Prompt | None = None) -> Scene:
    """A full scene, following `prompt` where it states something and random elsewhere."""
    if prompt is None:
        prompt = random_prompt(rng, p_state=1.0)
        if len(prompt.objects) == 1 and rng.random() < 0.25:
            prompt.position = None  # some single objects anywhere, for prompts without a position
    objs = []
    for o in prompt.objects:
        size = o.size or rng.choice(list(SIZES))
        side = SIZES[size] + rng.randint(-SIZE_JITTER, SIZE_JITTER)
        objs.append(Obj(o.shape, o.colour, size, float(side)))
    bg = prompt.background or rng.choice([b for b in BACKGROUNDS])
    if len(objs) == 1:
        place(objs, prompt.position, None, rng)
        return Scene(objs, bg, position=prompt.position)
    return Scene(objs, bg, relation=place(objs, None, prompt.relation, rng))


def place(objs: list, position: str | None, relation: str | None, rng: random.Random) -> str | None:
    """Set the centres (cx, cy) of one or two objects whose `side` is set: one at `position`
    (jittered, kept inside the canvas) or anywhere; two so that `relation` (drawn if None)
    holds by MIN_SEPARATION and their boxes stay apart. Returns the relation (two objects).
    Shared by every procedural world (shapes-v1, emoji-scenes)."""
    if len(objs) == 1:
        o = objs[0]
        lo, hi = o.side / 2, SIZE - o.side / 2
        fx, fy = POSITIONS[position] if position else (None, None)
        o.cx = min(max(fx + rng.uniform(-POSITION_JITTER, POSITION_JITTER), lo), hi) if fx is not None else rng.uniform(lo, hi)
        o.cy = min(max(fy + rng.uniform(-POSITION_JITTER, POSITION_JITTER), lo), hi) if fy is not None else rng.uniform(lo, hi)
        return None
    a, b = objs
    relation = relation or rng.choice(RELATIONS)
    for _ in range(10_000):
        for o in (a, b):
            o.cx, o.cy = rng.uniform(o.side / 2, SIZE - o.side / 2), rng.uniform(o.side / 2, SIZE - o.side / 2)
        if _relation_holds(a, b, relation, MIN_SEPARATION) and not _overlap(a, b):
            return relation
    raise RuntimeError("could not place two objects; this is a bug in the scene sampler")


def render(scene: Scene, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw at 4× and box-downsample to 64×64, so edges are anti-aliased. `background` (RGB)
    overrides the scene's, for worlds beyond shapes-v1 (the LoRA demo's coloured backgrounds)."""
    k = SUPERSAMPLE
    im = Image.new("RGB", (SIZE * k, SIZE * k), background or BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        x0, y0, x1, y1 = (v * k for v in _bbox(o))
        fill = COLOURS[o.colour]
        # PIL's boxes include their last pixel, so the far edge is one pixel in.
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return im.reduce(k)


def _object_phrase(o: Obj) -> str:
    return f"a {o.size + ' ' if o.size else ''}{o.colour} {o.shape}"


def caption(prompt: Prompt) -> str:
    """The canonical caption of a prompt (specs/shapes-v1.md, Captions)."""
    return compose_caption(prompt, _object_phrase, f" on a {prompt.background} background" if prompt.background else "", PARAPHRASES)


def compose_caption(prompt, object_phrase, tail: str, paraphrases) -> str:
    """One object with its position phrase, or two with their relation, then `tail`
    (background, style), paraphrased if the prompt says so: the grammar every procedural
    world shares, with the world's own object phrase."""
    if len(prompt.objects) == 1:
        text = object_phrase(prompt.objects[0])
        if prompt.position:
            text += " " + POSITION_PHRASES[prompt.position]
    else:
        text = f"{object_phrase(prompt.objects[0])} {prompt.relation} {object_phrase(prompt.objects[1])}"
    text += tail
    if prompt.paraphrase:
        for a, b in paraphrases:
            text = text.replace(a, b)
    return text


def training_prompt(scene: Scene, rng: random.Random, p_state: float = 0.6, p_paraphrase: float = 0.1) -> Prompt:
    """A prompt the scene follows, with each optional attribute kept with p_state; two-object
    scenes are described from either side ("A left of B" or "B right of A")."""
    objs = [Obj(o.shape, o.colour, o.size if rng.random() < p_state else None) for o in scene.objects]
    bg = scene.background if rng.random() < p_state else None
    para = rng.random() < p_paraphrase
    if len(objs) == 1:
        pos = scene.position if scene.position and rng.random() < max(p_state, 0.75) else None
        return Scene(objs, bg, position=pos, paraphrase=para)
    if rng.random() < 0.5:
        return Scene(objs[::-1], bg, relation=MIRROR[scene.relation], paraphrase=para)
    return Scene(objs, bg, relation=scene.relation, paraphrase=para)


def scene_for_index(seed: int, index: int) -> Scene:
    """Scene number `index` of the stream with this seed: the same on every run and process."""
    return sample_scene(random.Random(f"shapes-v1/{seed}/{index}"))


_DATASET_ENTRY = re.compile(r"\d{7}\.png|metadata\.jsonl(\.tmp)?")


def _is_world_dataset(folder: Path) -> bool:
    """Whether a folder holds what `write_dataset` writes, finished or interrupted: numbered PNGs
    and its metadata (metadata.jsonl.tmp while unfinished), whose first line names image 0 and
    carries a scene (a user's own metadata.jsonl with a "scene" key is not enough), and nothing else."""
    if not all(_DATASET_ENTRY.fullmatch(p.name) for p in folder.iterdir()):
        return False
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        meta = folder / "metadata.jsonl.tmp"
    try:
        with open(meta, encoding="utf-8") as f:
            line = f.readline()
        if not line and meta.name.endswith(".tmp"):
            return True  # interrupted before its first caption
        first = json.loads(line)
        return isinstance(first, dict) and first.get("file_name") == "0000000.png" and isinstance(first.get("scene"), dict)
    except (OSError, ValueError, TypeError):
        return False


def write_dataset(out_dir: str | Path, count: int, seed: int = 0, *, progress: bool = True, world=None) -> Path:
    """Write `count` PNGs plus metadata.jsonl ({file_name, text, scene} per line). `world` is
    the module of another procedural world with the same functions (unfog.data.emoji)."""
    from tqdm.auto import tqdm

    w = world or __import__(__name__, fromlist=["render"])
    scene_for_index, render, caption, training_prompt = w.scene_for_index, w.render, w.caption, w.training_prompt

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_world_dataset(out))):  # the user's files would be overwritten
        raise UnfogError(f"{out} exists and is not a dataset written by unfog data; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    # The previous dataset's captions go first, so that no moment leaves its captions beside new
    # images; the new ones appear only once every image is written, and images past `count` go.
    (out / "metadata.jsonl").unlink(missing_ok=True)
    tmp = out / "metadata.jsonl.tmp"  # if interrupted, it keeps the captions so far and marks the folder as unfog's
    with tmp.open("w", encoding="utf-8") as f:
        for i in tqdm(range(count), desc="rendering", disable=not progress):
            scene = scene_for_index(seed, i)
            name = f"{i:07d}.png"
            render(scene).save(out / name)
            text = caption(training_prompt(scene, random.Random(f"caption/{seed}/{i}"), p_paraphrase=0.0))
            f.write(json.dumps({"file_name": name, "text": text, "scene": scene.to_json()}) + "\n")
    for p in out.glob("*.png"):
        if _DATASET_ENTRY.fullmatch(p.name) and int(p.stem) >= count:
            p.unlink()
    tmp.replace(out / "metadata.jsonl")
    return out


__all__ = [
    "Obj", "Scene", "Prompt", "COLOURS", "SHAPES", "SIZES", "BACKGROUNDS", "POSITIONS", "RELATIONS",
    "random_prompt", "sample_scene", "render", "caption", "training_prompt", "scene_for_index", "write_dataset", "ShapesStream",
]


def _render_range(args: tuple[str, int, int, int]) -> np.ndarray:
    """Images lo..hi of a world's stream (a worker process of WorldStream.prerender)."""
    import importlib

    world, seed, lo, hi = args
    w = importlib.import_module(world)
    return np.stack([np.asarray(w.render(w.scene_for_index(seed, i)), np.uint8) for i in range(lo, hi)])


class WorldStream:
    """The endless in-memory stream of a procedural world (the module `world`, which has
    scene_for_index, render, caption, training_prompt and vocabulary_words): sample i is
    rendered from (seed, i) on demand. With `pool`, index i wraps to i % pool (so latents of a
    finite pool can be cached), and each visit draws a fresh caption for the same image;
    `prerender(workers)` renders the whole pool up front in parallel processes."""

    world = __name__

    def __init__(self, seed: int = 0, pool: int | None = None, p_paraphrase: float = 0.1, resolution: int = SIZE):
        import importlib

        self.w = importlib.import_module(self.world)
        self.seed, self.pool, self.p_paraphrase, self.resolution = seed, pool, p_paraphrase, resolution
        self.endless = not pool  # every index a new scene: nothing worth caching
        self._scenes: dict[int, Scene] = {}
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.pool or 2**62

    def _scene(self, i: int):
        if not self.pool:
            return self.w.scene_for_index(self.seed, i)
        j = i % self.pool
        if j not in self._scenes:
            self._scenes[j] = self.w.scene_for_index(self.seed, j)
        return self._scenes[j]

    def prerender(self, workers: int = 8, chunk: int = 2000) -> None:
        from concurrent.futures import ProcessPoolExecutor

        from ..errors import UnfogError

        if not self.pool:
            raise UnfogError("prerender needs a finite pool (pool=N)")
        ranges = [(self.world, self.seed, lo, min(lo + chunk, self.pool)) for lo in range(0, self.pool, chunk)]
        with ProcessPoolExecutor(workers) as ex:
            self._pixels = np.concatenate(list(ex.map(_render_range, ranges)))

    def images(self, indices: list[int]) -> "torch.Tensor":
        """uint8 images (B, 3, H, W)."""
        import torch

        if self._pixels is not None:
            out = self._pixels[[i % self.pool for i in indices]]
        else:
            out = np.stack([np.asarray(self.w.render(self._scene(i)), np.uint8) for i in indices])
        if self.resolution != SIZE:
            out = np.stack([np.asarray(Image.fromarray(a).resize((self.resolution, self.resolution), Image.BOX)) for a in out])
        return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()

    def captions(self, indices: list[int], epoch_seed: int = 0) -> list[str]:
        """A caption per image; pooled images get a fresh one for each `epoch_seed`."""
        w = self.w
        return [
            w.caption(w.training_prompt(self._scene(i), random.Random(f"caption/{self.seed}/{i}/{epoch_seed}"), p_paraphrase=self.p_paraphrase))
            for i in indices
        ]

    def vocabulary_captions(self, n: int = 3000) -> list[str]:
        """Captions covering every word the grammar and its paraphrases use (for the tokenizer)."""
        w = self.w
        rng = random.Random(f"vocab/{self.seed}")
        texts = [w.caption(w.training_prompt(w.sample_scene(rng), rng, p_paraphrase=0.5)) for _ in range(n)]
        return texts + [" ".join(w.vocabulary_words())]


def vocabulary_words() -> list[str]:
    return [*COLOURS, *SHAPES, *SIZES, *BACKGROUNDS, *POSITION_PHRASES.values(), *RELATIONS, "a on background", *(b for _, b in PARAPHRASES)]


class ShapesStream(WorldStream):
    """The endless shapes-v1 stream (WorldStream)."""

    world = __name__
