"""A1111's prompt syntax: parsing (a table of A1111 prompts with the fragments and weights A1111
gives them), windows token by token, the emphasis rule on the text states, <lora:…> tags; and
textual-inversion embeddings against diffusers' load_textual_inversion."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from unfog.errors import UnfogError
from unfog.prompts import extract_loras, parse_attention

W = 1.1
TABLE = {  # the first six are the examples in A1111's own documentation of its parser
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
                                                              ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
    "((a)) [[b]]": [("a", W * W), (" ", 1.0), ("b", 1 / W / W)],
    "(a [b] c:2)": [("a ", 2.0), ("b", 2.0 / W), (" c", 2.0)],
    "a cat BREAK a dog": [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)],
    "x ) y ] z": [("x ) y ] z", 1.0)],  # closing with nothing open: text
    "[unclosed": [("unclosed", 1 / W)],
    "a \\\\ b": [("a \\ b", 1.0)],
    "time: 5pm": [("time: 5pm", 1.0)],
    "": [("", 1.0)],
}


@pytest.mark.parametrize("prompt", list(TABLE))
def test_parse_attention_table(prompt):
    got = parse_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in TABLE[prompt]]
    assert np.allclose([w for _, w in got], [w for _, w in TABLE[prompt]])


def test_lora_tags_are_taken_out():
    assert extract_loras("a cat <lora:style:0.8>, <lora:ink> night") == ("a cat ,  night", [("style", 0.8), ("ink", 1.0)])
    with pytest.raises(UnfogError, match="not a number"):
        extract_loras("<lora:x:abc>")


@pytest.mark.parametrize("prompt", ["(a:" + "9" * 400 + ")", "(" * 80 + "a", "(a:-5000)", "x (((b:900)))"])
def test_emphasis_beyond_the_bound_is_refused_naming_the_field(prompt):
    """1.1 to the power of 80 brackets, or a 400-digit weight, made the text states infinite and
    the job ended in NaN latents; now it is refused before anything runs."""
    with pytest.raises(UnfogError, match="emphasis weight") as e:
        parse_attention(prompt, "negative_prompt")
    assert e.value.field == "negative_prompt"
    assert parse_attention("(a:1000) ((b:-900))") == [("a", 1000.0), (" ", 1.0), ("b", -900 * 1.1)]


def test_request_checks_emphasis_and_lora_names_up_front(tiny_pipe, tmp_path):
    with pytest.raises(UnfogError, match="emphasis weight") as e:
        tiny_pipe.request("a", negative_prompt="(" * 80 + "b", prompt_syntax="a1111")
    assert e.value.field == "negative_prompt"
    with pytest.raises(UnfogError, match="not a number") as e:
        tiny_pipe.request("a", negative_prompt="<lora:x:abc>", prompt_syntax="a1111")
    assert e.value.field == "negative_prompt"
    # A name too long for the filesystem raised OSError (a 500 in the server) from the file check.
    with pytest.raises(UnfogError, match="….safetensors in") as e:
        tiny_pipe.request("a <lora:" + "n" * 300 + ":1>", prompt_syntax="a1111", lora_dir=str(tmp_path))
    assert e.value.field == "prompt" and len(str(e.value)) < 300
    with pytest.raises(UnfogError, match="safetensors in"):  # 70 characters, 280 bytes: past the filesystem's 255
        tiny_pipe.request("a <lora:" + "\U0001F600" * 70 + ":1>", prompt_syntax="a1111", lora_dir=str(tmp_path))
    assert tiny_pipe.request("(a:1.5) [b]", negative_prompt="((c))", prompt_syntax="a1111").prompts == ["(a:1.5) [b]"]
    with pytest.raises(UnfogError, match="lora_dir must be a folder path") as e:  # had been a raw TypeError
        tiny_pipe.request("a <lora:x:1>", prompt_syntax="a1111", lora_dir=5)
    assert e.value.field == "lora_dir"


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory):
    from clip_bytes import write_tiny_clip_vocab

    from unfog.formats.diffusers_folder import clip_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tiny_clip_vocab(d)
    return clip_tokenizer(d)


def test_weighted_windows_token_by_token(clip_tok):
    t = clip_tok
    ids, weights = t.weighted_windows(parse_attention("a (red:1.5) [circle]"))
    red, circle = t.encode(["red"])[0], t.encode(["circle"])[0]
    assert len(red) == 1 and len(circle) == 1
    assert ids[0][:5] == [t.bos_id, *t.encode(["a"])[0], red[0], circle[0], t.eos_id] and len(ids) == 1 and len(ids[0]) == 77
    assert np.allclose(weights[0][:5], [1, 1, 1.5, 1 / 1.1, 1]) and set(weights[0][5:]) == {1.0}
    ids, _ = t.weighted_windows(parse_attention("a cat BREAK a dog"))
    assert len(ids) == 2 and ids[1][1:3] == t.encode(["a dog"])[0]


def test_long_prompts_break_after_a_recent_comma(clip_tok):
    t = clip_tok
    words = "cat " * 70 + ", " + "dog " * 10  # the window fills 5 tokens after the comma
    ids, _ = t.weighted_windows(parse_attention(words))
    comma = t.backend.token_to_id(",</w>")
    assert len(ids) == 2
    first = ids[0][1 : ids[0].index(t.eos_id)]
    assert first[-1] == comma and len(first) == 71  # cut after the comma, the dogs moved on
    ids, _ = t.weighted_windows(parse_attention(words), comma_backtrack=0)
    assert len(ids[0][1 : ids[0].index(t.eos_id)]) == 75


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("diffusers")
    from test_sd_parity import build_sd

    from unfog import Pipeline

    root = tmp_path_factory.mktemp("prompts-sd")
    ref = build_sd(root, v2=False)
    return ref, Pipeline.from_pretrained(root / "sd"), root / "sd"


def test_emphasis_rule_on_the_states(sd):
    _, pipe, _ = sd
    plain, _ = pipe.encode_text(["a photo of a red cat"])
    same, _ = pipe.encode_text(["a photo of a red cat"], syntax="a1111")
    assert torch.equal(plain, same)  # no emphasis: the same tokens, the same states
    weighted, _ = pipe.encode_text(["a photo of a (red:1.5) [cat]"], syntax="a1111")
    ids, _ = pipe.tokenizer.weighted_windows(parse_attention("a photo of a (red:1.5) [cat]"))
    w = torch.ones(77)
    w[ids[0].index(pipe.tokenizer.encode(["red"])[0][0])] = 1.5
    w[ids[0].index(pipe.tokenizer.encode(["cat"])[0][0])] = 1 / 1.1
    z = plain[0] * w[:, None]
    expected = z * (plain[0].mean() / z.mean())
    torch.testing.assert_close(weighted[0], expected, rtol=1e-5, atol=1e-6)


def test_prompt_lora_tags_apply_for_the_call_only(sd, tmp_path):
    from test_lora import kohya_file

    ref, pipe, _ = sd
    kohya_file(ref, tmp_path / "style.safetensors", seed=3)
    kw = dict(seed=1, num_inference_steps=4, sampler="euler", prompt_syntax="a1111")
    base = np.asarray(pipe("a photo of a cat", **kw).images[0])
    tagged = np.asarray(pipe("a photo of a cat <lora:style:0.6>", lora_dir=tmp_path, **kw).images[0])
    assert pipe.get_list_adapters() == {}  # loaded for the call, gone after
    assert np.array_equal(np.asarray(pipe("a photo of a cat", **kw).images[0]), base)
    pipe.load_lora_weights(tmp_path / "style.safetensors")
    pipe.set_adapters("style", 0.6)
    try:
        assert np.array_equal(np.asarray(pipe("a photo of a cat", **kw).images[0]), tagged)
    finally:
        pipe.unload_lora_weights()
    with pytest.raises(UnfogError, match="no missing.safetensors"):
        pipe("a cat <lora:missing:1>", lora_dir=tmp_path, **kw)
    with pytest.raises(UnfogError, match="pass lora_dir"):
        pipe("a cat <lora:style:1>", **kw)
    with pytest.raises(UnfogError, match="no ...safetensors|no \\.\\./"):
        pipe("a cat <lora:../style:1>", lora_dir=tmp_path, **kw)


def test_hostile_prompts_parse_in_linear_time():
    """Thousands of open brackets made the parse quadratic (96 KB: 25 s), and a run of "<lora:"
    the tag search (60 KB: 24 s)."""
    import time

    start = time.time()
    with pytest.raises(UnfogError, match="more than 100 brackets open at once"):
        parse_attention("[a (b " * 16000)
    assert extract_loras("<lora:" * 10000) == ("<lora:" * 10000, [])
    assert parse_attention("(a) [b] " * 4000)[0] == ("a", W)
    assert time.time() - start < 2
    deep = "(" * 50 + "[" * 50 + "x" + "]" * 50 + ")" * 50
    assert parse_attention(deep) == [("x", pytest.approx(1.0))]  # 100 open at once is still allowed


def test_textual_inversion_matches_diffusers(sd, tmp_path):
    ref, pipe, folder = sd
    from unfog import Pipeline

    ours = Pipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, 32, generator=g)
    save_file({"emb_params": vectors}, str(tmp_path / "cattoy.safetensors"))
    assert ours.load_textual_inversion(tmp_path / "cattoy.safetensors", token="<cat-toy>") == "<cat-toy>"
    ref.load_textual_inversion(str(tmp_path / "cattoy.safetensors"), token="<cat-toy>")
    try:
        prompt = "a photo of <cat-toy> on a horse"
        expected = ref.encode_prompt(prompt, "cpu", 1, False)[0]
        got, _ = ours.encode_text([prompt], "truncate")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, ours.encode_text(["a photo of cat-toy on a horse"], "truncate")[0])
    finally:
        ref.unload_textual_inversion()
    with pytest.raises(UnfogError, match="already in the vocabulary"):
        ours.load_textual_inversion(tmp_path / "cattoy.safetensors", token="<cat-toy>")
    save_file({"emb_params": torch.randn(2, 48)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(UnfogError, match="48 wide but the text encoder's tokens are 32"):
        ours.load_textual_inversion(tmp_path / "wide.safetensors")
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(UnfogError, match="SDXL embedding"):
        ours.load_textual_inversion(tmp_path / "xl.safetensors")
    vocab = ours.tokenizer.vocab_size
    assert ours.text_encoder.token_embedding.num_embeddings == vocab  # the failed loads changed nothing


def test_an_embedding_token_matches_whole_words_only(sd, tmp_path):
    """A token inside a longer word is not the embedding (it had been: with the token "zq", the
    word "azqb" changed in every prompt), as the expansion of a multi-vector token already held;
    and a token is found whatever its case (it had to match the file name's case exactly)."""
    _, _, folder = sd
    from unfog import Pipeline

    ours = Pipeline.from_pretrained(folder)
    prompts = ["a azqb circle", "zqzq and zq_x", "a zq circle", "(zq), zq."]
    before = ours.encode_text(prompts, "truncate")[0]
    for n in (1, 2):
        save_file({"emb_params": torch.randn(n, 32, generator=torch.Generator().manual_seed(n))}, str(tmp_path / f"zq{n}.safetensors"))
        pipe = Pipeline.from_pretrained(folder)
        pipe.load_textual_inversion(tmp_path / f"zq{n}.safetensors", token="zq")
        after = pipe.encode_text(prompts, "truncate")[0]
        torch.testing.assert_close(after[:2], before[:2], rtol=0, atol=0)  # inside words: untouched
        assert not torch.equal(after[2], before[2]) and not torch.equal(after[3], before[3])  # whole words, punctuation around them too
        # in any case, as CLIP lower-cases the prompt (A1111 finds "EasyNegative" for easynegative.pt)
        torch.testing.assert_close(pipe.encode_text(["a ZQ circle"], "truncate")[0], after[2:3], rtol=0, atol=0)


def test_cli_and_server_read_a1111_prompts_with_lora_tags(sd, tmp_path):
    from PIL import Image
    from test_lora import kohya_file

    from unfog.cli import main

    ref, pipe, folder = sd
    kohya_file(ref, tmp_path / "style.safetensors", seed=3)
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))}, str(tmp_path / "toy.safetensors"))
    args = ["generate", "a (photo:1.3) of a toy cat <lora:style:0.6>", "--model", str(folder), "--steps", "3", "--seed", "2", "--sampler", "euler",
            "--height", "16", "--width", "16", "--lora-dir", str(tmp_path), "--embedding", str(tmp_path / "toy.safetensors"), "-q"]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    from unfog import Pipeline

    again = Pipeline.from_pretrained(folder)
    again.load_textual_inversion(tmp_path / "toy.safetensors")
    expected = again("a (photo:1.3) of a toy cat <lora:style:0.6>", num_inference_steps=3, seed=2, sampler="euler", height=16, width=16,
                     prompt_syntax="a1111", lora_dir=tmp_path).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), np.asarray(expected))
    assert main(["generate", "a cat <lora:style:1>", "--model", str(folder), "--steps", "2", "-q", "-o", str(tmp_path / "b.png")]) == 2  # no --lora-dir

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from unfog.server import ServerSettings, create_app

    with TestClient(create_app(pipe, ServerSettings(lora_dir=str(tmp_path)), model_name="sd"), base_url="http://127.0.0.1:7860") as api:
        r = api.post("/v1/images/generate", json={"prompt": "a ((cat)) <lora:style:0.5>", "steps": 2, "seed": 1, "width": 16, "height": 16})
        assert r.status_code == 200
        r = api.post("/v1/jobs", json={"prompt": "a cat <lora:nothing:1>", "steps": 2})
        assert r.status_code == 422 and r.json()["field"] == "prompt"
        assert api.post("/v1/jobs", json={"prompt": "a cat", "prompt_syntax": "fancy"}).json()["field"] == "prompt_syntax"
    assert pipe.get_list_adapters() == {}
