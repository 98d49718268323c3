"""The emoji-scenes world (docs/specs/emoji-scenes.md): sprites, scenes, captions, stream, CLI."""

import json
import random
import re

import numpy as np
import pytest

from unfog.cli import main
from unfog.data import emoji
from unfog.data.emoji import (
    BACKGROUNDS, SIZES, EmojiStream, Obj, Scene, caption, random_prompt, render, sample_scene, scene_for_index, sprite_box, sprites,
    training_prompt,
)
from unfog.errors import UnfogError

NAMES = "|".join(sorted((re.escape(n) for n in sprites().names), key=len, reverse=True))
OBJ = rf"an? (?:(?:small|big) )?(?:{NAMES})"
TAIL = r"(?: on an? (?:white|light blue|light green|light yellow|pink) background)?(?: in (?:grayscale|sepia))?$"
ONE = re.compile(rf"^{OBJ}(?: (?:on the left|on the right|at the top|at the bottom|in the center))?{TAIL}")
TWO = re.compile(rf"^{OBJ} (?:left of|right of|above|below) {OBJ}{TAIL}")


def test_sprite_set_is_the_vendored_one():
    s = sprites()
    assert len(s.names) == 175 and len(set(s.names)) == 175
    assert {"fox", "red apple", "cat", "hot beverage"} <= set(s.names)
    assert set(s.groups) == {"animals", "food", "objects", "plants", "travel"}
    assert all(im.mode == "RGBA" and max(im.size) == 64 for im in s.images)
    meta = json.loads((emoji.SPRITES_DIR / "sprites.json").read_text())
    assert meta["source"]["licence"] == "MIT" and (emoji.SPRITES_DIR / "LICENSE").read_text().count("Microsoft") >= 2


def test_render_is_64px_rgb_deterministic_and_draws_the_sprite_where_it_says():
    a, b = render(scene_for_index(3, 17)), render(scene_for_index(3, 17))
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(render(scene_for_index(3, 18))))
    scene = Scene([Obj("fox", "big", 28, 20, 40)], "light blue")
    pixels = np.asarray(render(scene)).astype(int)
    fg = np.abs(pixels - BACKGROUNDS["light blue"]).sum(-1) > 30
    ys, xs = np.nonzero(fg)
    x0, y0, x1, y1 = sprite_box(scene.objects[0])
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    assert max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 >= 26  # the sprite fills its box's longer side
    assert abs(xs.mean() - 20) < 4 and abs(ys.mean() - 40) < 4


def test_styles_change_only_the_sprite_colours():
    base = Scene([Obj("red apple", "big", 28, 32, 32)], "pink")
    plain, gray, sepia = (np.asarray(render(Scene(base.objects, "pink", style=s))).astype(int) for s in (None, "grayscale", "sepia"))
    bg = (plain == BACKGROUNDS["pink"]).all(-1)  # pixels no sprite touches
    assert bg.sum() > 2000 and (gray[bg] == plain[bg]).all() and (sepia[bg] == plain[bg]).all()
    fg = np.abs(plain - BACKGROUNDS["pink"]).sum(-1) > 30
    x0, y0, x1, y1 = sprite_box(base.objects[0])
    core = np.zeros((64, 64), bool)  # the sprite's opaque pixels (its edges blend with the background)
    core[y0:y1, x0:x1] = np.asarray(emoji._sprite("red apple", 28, None).getchannel("A")) == 255
    assert np.abs(gray[core] - gray[core].mean(-1, keepdims=True)).max() <= 1
    r, g, bl = sepia[core].T
    assert (r >= g).all() and (g >= bl).all()
    assert np.abs(plain[fg] - gray[fg]).sum() > 0


def test_scenes_follow_the_spec():
    rng = random.Random(0)
    for _ in range(300):
        s = sample_scene(rng)
        names = [o.name for o in s.objects]
        assert len(set(names)) == len(names) and s.background in BACKGROUNDS
        for o in s.objects:
            assert abs(o.side - SIZES[o.size]) <= 2
            assert o.side / 2 <= o.cx <= 64 - o.side / 2 and o.side / 2 <= o.cy <= 64 - o.side / 2
        if len(s.objects) == 2:
            a, b = s.objects
            dx, dy = b.cx - a.cx, b.cy - a.cy
            assert {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[s.relation] >= 12
            assert abs(dx) >= (a.side + b.side) / 2 + 1 or abs(dy) >= (a.side + b.side) / 2 + 1  # boxes apart


def test_canonical_captions_match_the_grammar():
    rng = random.Random(1)
    for _ in range(500):
        p = random_prompt(rng)
        text = caption(p)
        assert (ONE if len(p.objects) == 1 else TWO).match(text), text
    assert caption(Scene([Obj("fox")], "light blue")) == "a fox on a light blue background"
    assert caption(Scene([Obj("owl", "small")], position="center", style="sepia")) == "a small owl in the center in sepia"
    assert caption(Scene([Obj("fox"), Obj("red apple")], "light blue", relation="left of")) == "a fox left of a red apple on a light blue background"
    assert caption(Scene([Obj("elephant")])) == "an elephant"


def test_training_prompts_describe_their_scene():
    rng = random.Random(2)
    for _ in range(300):
        scene = sample_scene(rng)
        p = training_prompt(scene, rng, p_paraphrase=0.0)
        assert p.style == scene.style and p.background in (None, scene.background)
        if len(scene.objects) == 2:
            same = [o.name for o in p.objects] == [o.name for o in scene.objects]
            assert p.relation == (scene.relation if same else emoji.MIRROR[scene.relation])


def test_prompted_scenes_follow_the_prompt():
    rng = random.Random(3)
    for _ in range(200):
        p = random_prompt(rng)
        s = sample_scene(rng, p)
        assert [o.name for o in s.objects] == [o.name for o in p.objects]
        assert all(po.size in (None, so.size) for po, so in zip(p.objects, s.objects))
        assert p.background in (None, s.background) and s.style == p.style and s.relation == p.relation


def test_stream_is_deterministic_pool_wraps_and_prerender_matches():
    s = EmojiStream(seed=4, pool=10)
    a, b = s.images([3, 13]), EmojiStream(seed=4, pool=10).images([3, 3])
    assert a.shape == (2, 3, 64, 64) and (a == b).all()
    assert s.captions([3], epoch_seed=0) == EmojiStream(seed=4, pool=10).captions([3], epoch_seed=0)
    pre = EmojiStream(seed=4, pool=10)
    pre.prerender(workers=2, chunk=4)
    assert (pre.images(list(range(10))) == s.images(list(range(10)))).all()
    assert EmojiStream(seed=4, resolution=32).images([0]).shape == (1, 3, 32, 32)
    vocab = " ".join(s.vocabulary_captions(50))
    assert all(n in vocab for n in sprites().names)


def test_unknown_object_and_missing_sprites_are_clear_errors(tmp_path):
    with pytest.raises(UnfogError, match="not an emoji-scenes object"):
        render(Scene([Obj("unicorn", "big", 28, 32, 32)], "white"))
    with pytest.raises(UnfogError, match="npm pack @iconify-json/fluent-emoji-flat"):
        sprites(str(tmp_path))


def test_data_emoji_cli_writes_a_dataset(tmp_path):
    for d in ("a", "b"):
        assert main(["data", "emoji", str(tmp_path / d), "--count", "5", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all({"file_name", "text", "scene"} <= r.keys() for r in rows)
    for r in rows:
        assert (tmp_path / "a" / r["file_name"]).read_bytes() == (tmp_path / "b" / r["file_name"]).read_bytes()
        assert Scene.from_json(r["scene"]).objects[0].name in sprites().names
