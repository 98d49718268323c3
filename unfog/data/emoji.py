"""emoji-scenes: 1–3 Fluent Emoji sprites on a plain background, with English captions built from
their names (docs/specs/emoji-scenes.md).

The sprites are a vendored subset of Microsoft's Fluent Emoji (flat, MIT) in
unfog/assets/emoji-sprites/ (built by scripts/build_emoji_sprites.py). A `Scene` holds every
attribute of an image; a `Prompt` is a scene with some attributes left unstated (None), exactly
as in shapes-v1, whose placement rules this world shares.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UnfogError
from .shapes import MIRROR, POSITION_PHRASES, POSITIONS, RELATIONS, WorldStream, compose_caption, place

SIZE = 64
SPRITES_DIR = Path(__file__).resolve().parent.parent / "assets" / "emoji-sprites"
BACKGROUNDS = {
    "white": (255, 255, 255), "light blue": (170, 210, 255), "light green": (180, 235, 170),
    "light yellow": (255, 240, 160), "pink": (255, 190, 215),
}
SIZES = {"small": 18, "big": 28}  # the sprite's longer side, in pixels
SIZE_JITTER = 2
STYLES = ("grayscale", "sepia")
SEPIA = (1.0, 0.84, 0.62)  # the tint multiplied into the luminance
GROUPS = ("animals", "food", "objects", "plants", "travel")
# Paraphrases the training data may use (never in evaluation prompts).
PARAPHRASES = [("big ", "large "), ("left of", "to the left of"), ("right of", "to the right of"), ("in the center", "in the middle"),
               ("above", "over"), ("in grayscale", "in black and white")]
FETCH_HINT = ("the emoji sprites are part of unfog's repository (unfog/assets/emoji-sprites/); reinstall unfog from a full "
              "checkout, or rebuild them: npm pack @iconify-json/fluent-emoji-flat@1.2.6, then "
              "python scripts/build_emoji_sprites.py package/ (see docs/specs/emoji-scenes.md)")


@dataclass
class Sprites:
    names: list[str]  # "red apple"
    groups: list[str]
    images: list[Image.Image]  # RGBA, longer side 64

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise UnfogError(f"{name!r} is not an emoji-scenes object; known objects: {', '.join(sorted(self.names))}") from None

    def __post_init__(self):
        self._index = {n: k for k, n in enumerate(self.names)}


@lru_cache(maxsize=1)
def sprites(directory: str | None = None) -> Sprites:
    """The sprite set, read once from the vendored atlas."""
    d = Path(directory) if directory else SPRITES_DIR
    meta_path, atlas_path = d / "sprites.json", d / "sprites.png"
    if not (meta_path.is_file() and atlas_path.is_file()):
        raise UnfogError(f"emoji sprites not found in {d}: {FETCH_HINT}")
    meta = json.loads(meta_path.read_text())["sprites"]
    atlas = Image.open(atlas_path)
    atlas.load()
    images = [atlas.crop((x, y, x + w, y + h)) for x, y, w, h in (m["box"] for m in meta)]
    return Sprites([m["name"] for m in meta], [m["group"] for m in meta], images)


@dataclass
class Obj:
    name: str
    size: str | None = None  # "small" / "big"; None in a prompt = unstated
    side: float = 0.0  # the longer side of the sprite in pixels (scenes only)
    cx: float = 0.0
    cy: float = 0.0


@dataclass
class Scene:
    """A fully specified image, or (with None fields) a prompt."""

    objects: list[Obj]
    background: str | None = None
    position: str | None = None  # one-object images only
    relation: str | None = None  # two-object images only: objects[0] RELATION objects[1]
    style: str | None = None  # None (a prompt: unstated; a scene: the sprites' own colours), "grayscale", "sepia"
    paraphrase: bool = field(default=False, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("paraphrase")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        return cls(objects=[Obj(**o) for o in d["objects"]], background=d.get("background"), position=d.get("position"),
                   relation=d.get("relation"), style=d.get("style"))


Prompt = Scene


def random_prompt(rng: random.Random, objects: int | None = None, p_state: float = 0.5, p_style: float = 0.15) -> Prompt:
    """A prompt from the canonical grammar: each optional attribute stated with p_state, a style
    word with p_style; the objects are distinct."""
    n = objects or rng.choice((1, 2))
    names = rng.sample(sprites().names, n)
    objs = [Obj(name, rng.choice(list(SIZES)) if rng.random() < p_state else None) for name in names]
    bg = rng.choice(list(BACKGROUNDS)) if rng.random() < p_state else None
    style = rng.choice(STYLES) if rng.random() < p_style else None
    if n == 1:
        return Scene(objs, bg, position=rng.choice(list(POSITIONS)) if rng.random() < p_state else None, style=style)
    return Scene(objs, bg, relation=rng.choice(RELATIONS), style=style)


def sample_scene(rng: random.Random, prompt: Prompt | None = None) -> Scene:
    """A full scene, following `prompt` where it states something and random elsewhere. A scene
    without a style keeps the sprites' colours (a prompt without one may show either)."""
    if prompt is None:
        prompt = random_prompt(rng, p_state=1.0, p_style=0.2)
        if len(prompt.objects) == 1 and rng.random() < 0.25:
            prompt.position = None  # some single objects anywhere, for prompts without a position
    objs = [Obj(o.name, size := o.size or rng.choice(list(SIZES)), float(SIZES[size] + rng.randint(-SIZE_JITTER, SIZE_JITTER))) for o in prompt.objects]
    bg = prompt.background or rng.choice(list(BACKGROUNDS))
    if len(objs) == 1:
        place(objs, prompt.position, None, rng)
        return Scene(objs, bg, position=prompt.position, style=prompt.style)
    return Scene(objs, bg, relation=place(objs, None, prompt.relation, rng), style=prompt.style)


@lru_cache(maxsize=8192)
def _sprite(name: str, side: int, style: str | None) -> Image.Image:
    s = sprites()
    im = s.images[s.index(name)]
    k = side / max(im.size)
    im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.LANCZOS)
    if style:
        alpha = im.getchannel("A")
        lum = np.asarray(im.convert("L"), np.float32)
        tint = SEPIA if style == "sepia" else (1.0, 1.0, 1.0)
        rgb = np.clip(np.stack([lum * t for t in tint], -1), 0, 255).astype(np.uint8)
        im = Image.fromarray(rgb, "RGB").convert("RGBA")
        im.putalpha(alpha)
    return im


def sprite_box(o: Obj) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) the sprite of `o` covers when rendered."""
    s = sprites()
    w, h = s.images[s.index(o.name)].size
    k = round(o.side) / max(w, h)
    w, h = max(1, round(w * k)), max(1, round(h * k))
    x0, y0 = round(o.cx - w / 2), round(o.cy - h / 2)
    return x0, y0, x0 + w, y0 + h


def render(scene: Scene, background: tuple[int, int, int] | None = None) -> Image.Image:
    """The scene at 64×64: each sprite scaled so its longer side is `side`, centred on (cx, cy)."""
    im = Image.new("RGBA", (SIZE, SIZE), (*(background or BACKGROUNDS[scene.background]), 255))
    for o in scene.objects:
        x0, y0, _, _ = sprite_box(o)
        im.alpha_composite(_sprite(o.name, round(o.side), scene.style), (x0, y0))
    return im.convert("RGB")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _object_phrase(o: Obj) -> str:
    words = f"{o.size + ' ' if o.size else ''}{o.name}"
    return f"{_article(words)} {words}"


def caption(prompt: Prompt) -> str:
    """The canonical caption of a prompt (docs/specs/emoji-scenes.md, Captions)."""
    tail = f" on {_article(prompt.background)} {prompt.background} background" if prompt.background else ""
    tail += f" in {prompt.style}" if prompt.style else ""
    return compose_caption(prompt, _object_phrase, tail, PARAPHRASES)


def training_prompt(scene: Scene, rng: random.Random, p_state: float = 0.6, p_paraphrase: float = 0.1) -> Prompt:
    """A prompt the scene follows, with each optional attribute kept with p_state (the style
    always, when the scene has one); two-object scenes are described from either side."""
    objs = [Obj(o.name, o.size if rng.random() < p_state else None) for o in scene.objects]
    bg = scene.background if rng.random() < p_state else None
    para = rng.random() < p_paraphrase
    if len(objs) == 1:
        pos = scene.position if scene.position and rng.random() < max(p_state, 0.75) else None
        return Scene(objs, bg, position=pos, style=scene.style, paraphrase=para)
    if rng.random() < 0.5:
        return Scene(objs[::-1], bg, relation=MIRROR[scene.relation], style=scene.style, paraphrase=para)
    return Scene(objs, bg, relation=scene.relation, style=scene.style, paraphrase=para)


def scene_for_index(seed: int, index: int) -> Scene:
    """Scene number `index` of the stream with this seed: the same on every run and process."""
    return sample_scene(random.Random(f"emoji-scenes/{seed}/{index}"))


def write_dataset(out_dir: str | Path, count: int, seed: int = 0, *, progress: bool = True) -> Path:
    """Write `count` PNGs plus metadata.jsonl ({file_name, text, scene} per line)."""
    import sys

    from .shapes import write_dataset as write

    return write(out_dir, count, seed, progress=progress, world=sys.modules[__name__])


def vocabulary_words() -> list[str]:
    return [*sprites().names, *SIZES, *BACKGROUNDS, *POSITION_PHRASES.values(), *RELATIONS, *STYLES, "a an on in background",
            *(b for _, b in PARAPHRASES)]


class EmojiStream(WorldStream):
    """The endless emoji-scenes stream (WorldStream: pool, prerender, captions, vocabulary)."""

    world = __name__

    def __init__(self, *args, **kwargs):
        sprites()  # fail now, with the fix, if the sprites are missing
        super().__init__(*args, **kwargs)
