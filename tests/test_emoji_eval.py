"""The emoji-scenes evaluator: segmentation, the sprite classifier, the adherence checks, the
refusal of models that are not emoji-scenes models, and the evaluator's own validation."""

import json
import random

import numpy as np
import pytest
import torch

from unfog import Pipeline
from unfog.data.emoji import BACKGROUNDS, EmojiStream, Obj, Scene, caption, random_prompt, render, sample_scene, sprite_box, sprites
from unfog.diffusion import SchedulerConfig
from unfog.errors import UnfogError
from unfog.eval import emoji as E
from unfog.eval import emoji_validation as V
from unfog.nn import TextEncoder, TextEncoderConfig, Tokenizer, UNet, UNetConfig


def _close(a, b, tol=2):
    return max(abs(x - y) for x, y in zip(a, b)) <= tol


def test_segment_finds_each_sprite_at_its_box():
    fox, apple = Obj("fox", None, 28.0, 18.0, 30.0), Obj("red apple", None, 18.0, 48.0, 40.0)
    bg, found = E.segment(render(Scene([fox], "light blue")))
    assert np.allclose(bg, BACKGROUNDS["light blue"], atol=1) and len(found) == 1 and _close(found[0].box, sprite_box(fox), 1)
    assert found[0].side == max(found[0].box[2] - found[0].box[0], found[0].box[3] - found[0].box[1])
    _, found = E.segment(render(Scene([fox, apple], "white")))
    assert len(found) == 2
    assert _close(found[0].box, sprite_box(fox), 1) and _close(found[1].box, sprite_box(apple), 1)  # largest first
    assert E.segment(render(Scene([], "pink")))[1] == []
    for objects, share in ((1, 0.96), (2, 0.92)):  # two sprites closer than MERGE_GAP are one object to segment; check splits them
        hits = 0
        for k in range(100):
            rng = random.Random(f"segment-test/{objects}/{k}")
            scene = sample_scene(rng, random_prompt(rng, objects=objects))
            got = sorted(f.box for f in E.segment(render(scene))[1])
            want = sorted(sprite_box(o) for o in scene.objects)
            hits += len(got) == objects and all(_close(g, w) for g, w in zip(got, want))
        assert hits >= 100 * share, (objects, hits)


def test_segment_joins_the_parts_of_a_sprite_and_drops_specks():
    pixels = np.full((64, 64, 3), 255, np.uint8)
    pixels[10:20, 10:20] = (200, 0, 0)
    pixels[10:20, 22:30] = (200, 0, 0)  # 2 empty columns: one object of two parts
    pixels[40:43, 40:43] = (0, 0, 200)  # 9 pixels: a speck
    _, found = E.segment(pixels)
    assert len(found) == 1 and found[0].box == (10, 10, 30, 20) and len(found[0].parts) == 2 and found[0].pixels == 180


def test_segment_is_fast():
    import time

    images = [render(sample_scene(random.Random(k))) for k in range(50)]
    t = time.perf_counter()
    for im in images:
        E.segment(im)
    assert (time.perf_counter() - t) / 50 < 0.02  # about 2 ms here; generous for a loaded machine


def test_classifier_is_small_and_names_the_sprites():
    assert E.CLASSIFIER_PATH.stat().st_size <= 2 * 2**20
    net, names = E.load_classifier()
    assert names == sprites().names
    rng = random.Random(3)
    crops, labels = [], []
    for k in range(60):
        scene = sample_scene(random.Random(f"classifier-test/{k}"), random_prompt(rng, objects=1))
        pixels = np.asarray(render(scene))
        bg, found = E.segment(pixels)
        crops.append(E.crop(pixels, bg, found[0].box))
        labels.append(names.index(scene.objects[0].name))
    assert (E.classify(np.stack(crops)).argmax(-1) == np.array(labels)).mean() >= 0.97


def test_classifier_for_another_sprite_set_is_refused(tmp_path):
    names = list(sprites().names)
    names[0] = "unicorn"
    path = tmp_path / "classifier.safetensors"
    E.save_classifier(E.build_classifier((8, 8, 8, 8), len(names)), names, (8, 8, 8, 8), path)
    with pytest.raises(UnfogError, match="different sprite set"):
        E.load_classifier(str(path))
    with pytest.raises(UnfogError, match="train_emoji_classifier"):
        E.load_classifier(str(tmp_path / "missing.safetensors"))


def test_crop_is_square_padded_with_the_background_and_hides_other_objects():
    pixels = np.full((64, 64, 3), 255, np.uint8)
    pixels[0:10, 0:20] = (0, 0, 0)  # a 20×10 box in the corner
    pixels[30:40, 30:40] = (0, 200, 0)
    hide = np.zeros((64, 64), bool)
    hide[30:40, 30:40] = True
    out = E.crop(pixels, (255, 255, 255), (0, 0, 20, 10), hide, size=24)  # 24 = the padded square's side: no resampling
    assert out.shape == (24, 24, 3)
    assert (out[:7] == 255).all() and (out[7:17, 2:22] == 0).all() and (out[7:17, :2] == 255).all() and (out[17:] == 255).all()
    out = E.crop(pixels, (255, 255, 255), (25, 25, 45, 45), hide)
    assert (out == 255).all()


def _render(prompt, seed=0):
    return render(sample_scene(random.Random(seed), prompt))


def test_check_passes_a_render_of_the_prompt_and_flags_each_wrong_attribute():
    p = Scene([Obj("fox", "big")], "light green", position="left", style="sepia")
    image = _render(p)
    assert E.check(image, p) == dict.fromkeys(["exists", "object", "size", "position", "background", "style"], True)
    wrong = {
        "object": Scene([Obj("cat", "big")], "light green", position="left", style="sepia"),
        "size": Scene([Obj("fox", "small")], "light green", position="left", style="sepia"),
        "position": Scene([Obj("fox", "big")], "light green", position="right", style="sepia"),
        "background": Scene([Obj("fox", "big")], "pink", position="left", style="sepia"),
        "style": Scene([Obj("fox", "big")], "light green", position="left", style="grayscale"),
    }
    for attribute, q in wrong.items():
        result = E.check(image, q)
        assert [k for k, ok in result.items() if not ok] == [attribute], (attribute, result)
    natural = _render(Scene([Obj("fox", "big")], "light green", position="left"))
    assert not E.check(natural, p)["style"]
    assert "style" not in E.check(natural, Scene([Obj("fox")]))  # an unstated style is not checked
    blank = render(Scene([], "white"))
    assert E.check(blank, Scene([Obj("fox")], "white")) == {"exists": False, "object": False, "background": True}


def test_check_two_objects_relation_and_identity():
    p = Scene([Obj("red apple", "small"), Obj("bicycle", "big")], "white", relation="left of")
    for seed in range(5):
        image = _render(p, seed)
        assert all(E.check(image, p).values()), seed
        mirrored = E.check(image, Scene(p.objects, "white", relation="right of"))
        assert [k for k, ok in mirrored.items() if not ok] == ["relation"]
        swapped = E.check(image, Scene([Obj("bicycle"), Obj("red apple")], "white", relation="right of"))
        assert all(swapped.values())  # the same picture described from the other side
        other = E.check(image, Scene([Obj("red apple", "small"), Obj("dolphin", "big")], "white", relation="left of"))
        assert not other["object.1"] and other["object.0"]


def test_check_splits_two_sprites_the_segmentation_joined():
    a, b = Obj("bus", None, 17.0, 52.5, 28.5), Obj("fish", None, 16.0, 34.0, 32.0)  # one empty pixel column apart
    image = render(Scene([a, b], "pink"))
    assert len(E.segment(image)[1]) == 1
    result = E.check(image, Scene([Obj("bus", "small"), Obj("fish", "small")], "pink", relation="right of"))
    assert all(result.values()), result


def test_validate_accepts_ground_truth_and_rejects_wrong_renders():
    v = V.validate(200, seed=11)
    assert v["ground_truth"]["n"] == 200 and v["wrong"]["n"] == 200
    assert v["ground_truth"]["followed"] >= 0.98, v["failures"]
    assert v["wrong"]["rejected"] >= 0.95, v["accepted_wrong"]
    assert set(v["wrong"]["by_kind"]) == set(V.MUTATIONS)


def test_mutate_changes_exactly_one_stated_attribute():
    rng = random.Random(4)
    for _ in range(200):
        p = random_prompt(rng)
        kind, q = V.mutate(p, rng)
        diffs = [o.name != r.name or o.size != r.size for o, r in zip(p.objects, q.objects)]
        diffs += [p.position != q.position, p.relation != q.relation, p.background != q.background, p.style != q.style]
        assert sum(diffs) == 1 and caption(p) != caption(q)


def _images(prompts, seed=0):
    return np.stack([np.asarray(_render(p, seed + k)) for k, p in enumerate(prompts)])


def test_score_and_table():
    prompts = E.eval_prompts(12, seed=2)
    s = E.score(list(_images(prompts)), prompts)
    assert s["one-object"]["prompts"] == 6 and s["two-object"]["prompts"] == 6
    assert s["one-object"]["followed"] == 1 and s["two-object"]["followed"] == 1
    assert sum(g["n"] for g in s["by_group"].values()) == 18 and all(g["object"] == 1 for g in s["by_group"].values())
    table = E.format_table(s)
    assert "| one-object | 6 |" in table and "| sprite group |" in table


def test_score_file_checks_the_captions_against_the_seed(tmp_path):
    prompts = E.eval_prompts(6, seed=3)
    path = tmp_path / "eval-seed3.npz"
    np.savez_compressed(path, images=_images(prompts), prompts=np.array([caption(p) for p in prompts]))
    result = E.score_file(path, seed=3)
    s = result["scores"]
    assert s["one-object"]["followed"] == 1 and s["two-object"]["followed"] == 1
    assert result["prompts"] == [caption(p) for p in prompts] and result["images"][0].size == (64, 64)
    with pytest.raises(UnfogError, match="seed 4"):
        E.score_file(path, seed=4)
    np.savez_compressed(path, images=_images(prompts)[:5], prompts=np.array([caption(p) for p in prompts]))
    with pytest.raises(UnfogError, match="one caption per image"):
        E.score_file(path, seed=3)
    # empty or degenerate files had scored nothing, or crashed later in the table or grid
    first = caption(prompts[0])
    for images, texts, match in ((np.zeros((0, 64, 64, 3), np.uint8), np.array([], dtype=str), "at least 1"),
                                 (np.zeros((1, 0, 64, 3), np.uint8), np.array([first]), "at least 1"),
                                 (np.zeros((1, 64, 64, 3), np.uint8), np.array(first), "must be a list of captions")):
        np.savez_compressed(path, images=images, prompts=texts)
        with pytest.raises(UnfogError, match=match):
            E.score_file(path, seed=3)


def test_evaluate_refuses_the_bundled_shapes_model():
    pipe = Pipeline.from_pretrained()
    assert not E.is_emoji_model(pipe)
    with pytest.raises(UnfogError, match="not an emoji-scenes model"):
        E.evaluate(pipe, n=2, progress=False)


def test_evaluate_runs_an_emoji_model():
    torch.manual_seed(0)
    tok = Tokenizer.train_word_level(EmojiStream().vocabulary_captions(200))
    te = TextEncoder(TextEncoderConfig(vocab_size=tok.vocab_size, context_length=tok.config.context_length, width=32, layers=1, heads=2,
                                       mlp_width=64, activation="gelu", eos_token_id=tok.eos_id))
    unet = UNet(UNetConfig(in_channels=3, out_channels=3, block_channels=[16, 32], layers_per_block=1, attention_levels=[False, True],
                           num_heads=2, context_dim=32, norm_groups=8))
    pipe = Pipeline(tok, te, unet, None, SchedulerConfig(), {"height": 64, "width": 64, "num_inference_steps": 2})
    assert E.is_emoji_model(pipe)
    result = E.evaluate(pipe, n=4, seed=5, batch_size=2, progress=False)
    assert result["prompts"] == [caption(p) for p in E.eval_prompts(4, 5)] and len(result["images"]) == 4
    assert {"one-object", "two-object", "by_group"} <= set(result["scores"])
    json.dumps(result["scores"])  # plain numbers, for reports


def test_a_low_confidence_first_choice_is_not_recognised(monkeypatch):
    """A blob the classifier calls "most like a fox" at 7 % is not a fox to a person."""
    image = render(Scene([Obj("fox", "big", 28, 32, 32)], "white"))
    prompt = Scene([Obj("fox")])
    assert E.check(image, prompt)["object"]
    fox = sprites().index("fox")

    def unsure(crops, path=None):
        p = np.full((len(crops), len(sprites().names)), (1 - 0.07) / (len(sprites().names) - 1))
        p[:, fox] = 0.07  # still the first choice
        return np.log(p)

    monkeypatch.setattr(E, "classify", unsure)
    assert not E.check(image, prompt)["object"]
