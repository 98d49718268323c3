"""LoRA files in each format people share, on tiny SD 1.x and SDXL models: unfog's images equal
diffusers' `load_lora_weights` images; weights, two adapters, fuse/unfuse and unload behave as
diffusers' methods of the same names, and unload restores the network bit for bit."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from unfog import Pipeline  # noqa: E402
from unfog.errors import UnfogError  # noqa: E402

# (unfog module path, kohya name in diffusers' naming) for the tiny SD 1.x model of test_sd_parity
SD1_TARGETS = {
    "unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
             "down_blocks.0.attentions.0.proj_in", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v", "down_blocks.0.resnets.0.conv1",
             "mid_block.attentions.0.transformer_blocks.0.ff.net.2"],
    # (diffusers 0.42 with transformers 5 drops kohya LoRAs on the text encoder's attention
    # projections, "to_q_lora … UNEXPECTED"; the PEFT test below covers those.)
    "text_encoder": ["text_model.encoder.layers.0.mlp.fc2", "text_model.encoder.layers.1.mlp.fc1"],
}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from test_sd_parity import build_sd

    root = tmp_path_factory.mktemp("lora-sd1")
    ref = build_sd(root, v2=False, scheduler_cls="EulerDiscreteScheduler")
    return ref, root / "sd"


def diffusers_module(ref, comp, name):
    if comp == "unet":
        return ref.unet.get_submodule(name)
    te = ref.text_encoder
    return te.get_submodule(name if hasattr(te, "text_model") else name.removeprefix("text_model."))  # transformers 5 drops text_model


def kohya_file(ref, path, rank=2, seed=0, alpha=None, dtype=torch.float32):
    """A kohya-format LoRA for the targets, with shapes read from diffusers' modules."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for comp, names in SD1_TARGETS.items():
        for name in names:
            m = diffusers_module(ref, comp, name)
            w = m.weight
            prefix = ("lora_unet_" if comp == "unet" else "lora_te_") + name.replace(".", "_")
            if w.ndim == 4:
                down, up = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g), torch.randn(w.shape[0], rank, 1, 1, generator=g)
            else:
                down, up = torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g)
            state[f"{prefix}.lora_down.weight"] = (down * 0.3).to(dtype)
            state[f"{prefix}.lora_up.weight"] = (up * 0.3).to(dtype)
            state[f"{prefix}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank / 2))
    save_file(state, str(path))
    return path


def images(pipe_or_ref, ours: bool, **kw):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    args = dict(num_inference_steps=6, guidance_scale=5.0, negative_prompt="dog")
    if ours:
        im = pipe_or_ref("a photo of a cat", latents=latents, sampler="euler", sigma_schedule="leading", **args, **kw).images[0]
        return np.asarray(im, dtype=np.float32) / 255
    return pipe_or_ref("a photo of a cat", latents=latents.clone(), output_type="np", **args, **kw).images[0]


def assert_close(got, expected):
    assert np.abs(got - expected).max() <= 1e-3 + 0.5 / 255


def test_kohya_lora_matches_diffusers_at_weights_one_and_a_half(sd1, tmp_path):
    ref, folder = sd1
    path = kohya_file(ref, tmp_path / "style.safetensors", dtype=torch.float16)
    ours = Pipeline.from_pretrained(folder)
    base = images(ours, True)
    assert ours.load_lora_weights(path) == "style"
    ref.load_lora_weights(str(path), adapter_name="style")
    try:
        with_lora = images(ours, True)
        assert np.abs(with_lora - base).max() > 0.05  # the LoRA changes the picture
        assert_close(with_lora, images(ref, False))
        ours.set_adapters(["style"], [0.5])
        ref.set_adapters(["style"], [0.5])
        assert_close(images(ours, True), images(ref, False))
    finally:
        ref.unload_lora_weights()
    ours.unload_lora_weights()
    assert np.array_equal(images(ours, True), base)  # bit-identical to never having loaded


def test_two_adapters_at_once_and_peft_format_match_diffusers(sd1, tmp_path):
    ref, folder = sd1
    a = kohya_file(ref, tmp_path / "a.safetensors", seed=1)
    # the same kind of file in diffusers/PEFT layout, alpha in the header
    g = torch.Generator().manual_seed(2)
    peft = {}
    for name in SD1_TARGETS["unet"][:4]:
        w = diffusers_module(ref, "unet", name).weight
        peft[f"unet.{name}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.3
        peft[f"unet.{name}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.3
    for name in ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.out_proj"):
        w = diffusers_module(ref, "text_encoder", name).weight
        peft[f"text_encoder.{name}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.3
        peft[f"text_encoder.{name}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.3
    import json

    targets = {c: sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in peft if k.startswith(c + ".")}) for c in ("unet", "text_encoder")}
    header = {"unet.r": 4, "unet.lora_alpha": 2, "unet.target_modules": targets["unet"], "text_encoder.r": 4, "text_encoder.lora_alpha": 8,
              "text_encoder.target_modules": [t.removeprefix("text_model.") for t in targets["text_encoder"]]}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(header)}
    save_file(peft, str(tmp_path / "b.safetensors"), metadata=meta)
    ours = Pipeline.from_pretrained(folder)
    ours.load_lora_weights(a, "a")
    ours.load_lora_weights(tmp_path / "b.safetensors", "b")
    ours.set_adapters(["a", "b"], [0.7, 1.3])
    ref.load_lora_weights(str(a), adapter_name="a")
    ref.load_lora_weights(str(tmp_path / "b.safetensors"), adapter_name="b")
    try:
        ref.set_adapters(["a", "b"], [0.7, 1.3])
        assert_close(images(ours, True), images(ref, False))
    finally:
        ref.unload_lora_weights()
    assert ours.get_active_adapters() == ["a", "b"] and set(ours.get_list_adapters()["unet"]) == {"a", "b"}


def test_fuse_and_unfuse(sd1, tmp_path):
    ref, folder = sd1
    path = kohya_file(ref, tmp_path / "f.safetensors", seed=4)
    ours = Pipeline.from_pretrained(folder)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.load_lora_weights(path)
    live = images(ours, True)
    ours.fuse_lora()
    assert np.abs(images(ours, True) - live).max() <= 2 / 255  # the same update, folded into the weights
    with pytest.raises(UnfogError, match="unfuse_lora"):
        ours.set_adapters("f", 0.3)
    ours.unfuse_lora()
    assert_close(images(ours, True), live)
    ours.unload_lora_weights()
    assert all(torch.equal(before[k], v) for k, v in ours.unet.state_dict().items())


def test_saving_a_fused_lora_bakes_it_in(sd1, tmp_path):
    ref, folder = sd1
    ours = Pipeline.from_pretrained(folder)
    ours.load_lora_weights(kohya_file(ref, tmp_path / "s.safetensors", seed=5))
    with pytest.raises(UnfogError, match="not fused"):
        ours.save_pretrained(tmp_path / "out")
    ours.fuse_lora()
    ours.save_pretrained(tmp_path / "out")
    assert_close(images(Pipeline.from_pretrained(tmp_path / "out"), True), images(ours, True))


def test_lycoris_loha_and_lokr_are_their_formulas(sd1, tmp_path):
    """LoHa: (w1a·w1b) ⊙ (w2a·w2b)·α/r; LoKr: w1 ⊗ (w2a·w2b)·α/r; applied beside the layer, equal to
    that update added into the weight."""
    ref, folder = sd1
    ours = Pipeline.from_pretrained(folder)
    q = ours.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")  # Linear 32 → 32
    conv = ours.unet.get_submodule("down_blocks.0.resnets.0.conv1")  # Conv2d 32 → 32, 3×3
    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    a1, b1, a2, b2 = r(32, 2), r(2, 32), r(32, 2), r(2, 32)
    k1, k2a, k2b = r(4, 4), r(8, 2), r(2, 8 * 9)
    name_q, name_c = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{name_q}.hada_w1_a": a1, f"{name_q}.hada_w1_b": b1, f"{name_q}.hada_w2_a": a2, f"{name_q}.hada_w2_b": b2, f"{name_q}.alpha": torch.tensor(1.0),
               f"{name_c}.lokr_w1": k1, f"{name_c}.lokr_w2_a": k2a, f"{name_c}.lokr_w2_b": k2b, f"{name_c}.alpha": torch.tensor(4.0)},
              str(tmp_path / "ly.safetensors"))
    expected_q = q.weight + (a1 @ b1) * (a2 @ b2) * (1.0 / 2)
    expected_c = conv.weight + torch.kron(k1[:, :, None, None], (k2a @ k2b).reshape(8, 8, 3, 3)) * (4.0 / 2)
    x, xc = torch.randn(3, 32), torch.randn(1, 32, 6, 6)
    ours.load_lora_weights(tmp_path / "ly.safetensors")
    with torch.no_grad():
        q, conv = ours.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), ours.unet.get_submodule("down_blocks.0.resnets.0.conv1")
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, expected_q, q.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv(xc), torch.nn.functional.conv2d(xc, expected_c, conv.bias, padding=1), rtol=1e-4, atol=1e-4)


def test_bad_lora_files_leave_the_pipeline_as_it_was(sd1, tmp_path):
    ref, folder = sd1
    ours = Pipeline.from_pretrained(folder)
    base = images(ours, True)
    good = kohya_file(ref, tmp_path / "good.safetensors", seed=7)
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(good))
    # rank mismatch between down and up
    bad = dict(state)
    key = next(k for k in bad if k.endswith("lora_up.weight") and bad[k].ndim == 2)
    bad[key] = torch.randn(bad[key].shape[0], 5)
    save_file(bad, str(tmp_path / "rank.safetensors"))
    with pytest.raises(UnfogError, match="rank.safetensors.*do not fit the layer"):
        ours.load_lora_weights(tmp_path / "rank.safetensors")
    # a module this model does not have (as an SDXL LoRA's names would be here)
    extra = dict(state)
    extra["lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.randn(2, 64)
    extra["lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_up.weight"] = torch.randn(64, 2)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UnfogError, match="match no layer of this model.*input_blocks_7.*another architecture.*strict=False"):
        ours.load_lora_weights(tmp_path / "extra.safetensors")
    save_file({"weird.weight": torch.zeros(2)}, str(tmp_path / "weird.safetensors"))
    with pytest.raises(UnfogError, match="not a LoRA file unfog knows"):
        ours.load_lora_weights(tmp_path / "weird.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"pickle")
    with pytest.raises(UnfogError, match="pickle"):
        ours.load_lora_weights(tmp_path / "x.ckpt")
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:-40])
    with pytest.raises(UnfogError, match="not a readable safetensors file|truncated"):
        ours.load_lora_weights(tmp_path / "trunc.safetensors")
    assert ours.get_list_adapters() == {}
    assert np.array_equal(images(ours, True), base)
    with pytest.warns(UserWarning, match="match no layer"):
        ours.load_lora_weights(tmp_path / "extra.safetensors", strict=False)
    with pytest.raises(UnfogError, match="already loaded"):
        ours.load_lora_weights(tmp_path / "extra.safetensors")
    with pytest.raises(UnfogError, match="no adapter named"):
        ours.set_adapters("nope")
    with pytest.raises(UnfogError, match="no adapter named"):  # had been accepted silently
        ours.delete_adapters(["extra", "nope"])
    assert "extra" in ours.get_list_adapters()["unet"]  # and nothing was deleted


def test_malformed_lora_files_are_clear_errors_and_never_hang(sd1, tmp_path):
    """A crafted or damaged file: a missing LyCORIS factor, a 0-d LoRA weight, PEFT metadata of the
    wrong kind, and an alpha_pattern key built to backtrack forever (it had hung the load)."""
    import json
    import time

    ref, folder = sd1
    ours = Pipeline.from_pretrained(folder)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    w = diffusers_module(ref, "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight
    cases = {
        "loha": ({f"{name}.hada_w1_a": torch.ones(w.shape[0], 2), f"{name}.hada_w1_b": torch.ones(2, w.shape[1]),
                  f"{name}.hada_w2_a": torch.ones(w.shape[0], 2)}, None, "lacks hada_w2_b"),
        "lokr": ({f"{name}.lokr_w1_a": torch.ones(2, 1), f"{name}.lokr_w2": torch.ones(2, 2)}, None, "lacks lokr_w1_b"),
        "scalar": ({f"{name}.lora_down.weight": torch.tensor(1.0), f"{name}.lora_up.weight": torch.tensor(1.0)}, None, "must be matrices"),
        "meta": ({f"{name}.lora_down.weight": torch.ones(2, w.shape[1]), f"{name}.lora_up.weight": torch.ones(w.shape[0], 2)},
                 {"lora_adapter_metadata": "7"}, "not a JSON object"),
    }
    peft = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, w.shape[1]),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(w.shape[0], 2)}
    for tag, pattern, message in (("redos", {"([\\w.]|[\\w.])*X": 4}, "a repeated group"), ("stars", {".*" * 12 + "X": 4}, "more than 2 repetitions"),
                                  ("badre", {"(": 4}, "not a valid pattern"), ("notdict", "to_q", "not an object of module names")):
        cases[tag] = (peft, {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": pattern})}, message)
    for tag, (tensors, metadata, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{tag}.safetensors"), metadata=metadata)
        start = time.time()
        with pytest.raises(UnfogError, match=message):
            ours.load_lora_weights(tmp_path / f"{tag}.safetensors")
        assert time.time() - start < 5, tag
    # __metadata__ must be an object of strings (safetensors' own writer cannot write another, so by hand)
    header = json.dumps({"__metadata__": [1], "x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "listmeta.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(UnfogError, match="__metadata__ is not an object of strings"):
        ours.load_lora_weights(tmp_path / "listmeta.safetensors")
    assert ours.get_list_adapters() == {}
    # a plain module name in alpha_pattern still applies, as PEFT reads it
    save_file(peft, str(tmp_path / "named.safetensors"), metadata={"lora_adapter_metadata": json.dumps(
        {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 8}})})
    ours.load_lora_weights(tmp_path / "named.safetensors", "named")
    assert [a.scale for m in ours.unet.modules() for a in getattr(m, "adapters", {}).values()] == [4.0]
    # a small pattern runs, as PEFT's (.*\.)?(key)$, and the first key that matches wins
    for key, scale in (("(attn1|attn2)?\\.to_q", 3.0), ("attn1\\.to_q", 3.0), ("to_k", 1.0)):
        ours.unload_lora_weights()
        save_file(peft, str(tmp_path / "pattern.safetensors"), metadata={"lora_adapter_metadata": json.dumps(
            {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {key: 6, "to_q": 8}})})
        ours.load_lora_weights(tmp_path / "pattern.safetensors", "p")
        assert [a.scale for m in ours.unet.modules() for a in getattr(m, "adapters", {}).values()] == [scale if scale != 1.0 else 4.0], key


def test_sdxl_kohya_lora_with_original_layout_names_matches_diffusers(tmp_path_factory, tmp_path):
    """kohya's SDXL LoRAs name U-Net modules in the original layout (input_blocks_4_1_…) and the
    two text encoders lora_te1_ / lora_te2_."""
    from test_sdxl_parity import build_sdxl

    from unfog.formats.single_file import ldm_unet_key

    root = tmp_path_factory.mktemp("lora-sdxl")
    ref, _ = build_sdxl(root)
    ours = Pipeline.from_pretrained(root / "base")
    g = torch.Generator().manual_seed(8)
    state = {}
    for path in ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k",
                 "up_blocks.0.attentions.1.transformer_blocks.0.ff.proj", "mid_block.attentions.0.proj_in"]:
        w = ours.unet.get_submodule(path).weight
        name = "lora_unet_" + ldm_unet_key(path + ".weight", ours.unet.config).removesuffix(".weight").replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], 4, generator=g) * 0.3
        state[f"{name}.alpha"] = torch.tensor(2.0)
    for te, prefix, width in ((ours.text_encoder, "lora_te1_", 32), (ours.text_encoder_2, "lora_te2_", 48)):
        name = prefix + "text_model_encoder_layers_1_mlp_fc2"  # (not attention: see SD1_TARGETS)
        mlp = te.config.mlp_width
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = torch.randn(2, mlp, generator=g) * 0.5, torch.randn(width, 2, generator=g) * 0.5
    save_file(state, str(tmp_path / "xl.safetensors"))
    ours.load_lora_weights(tmp_path / "xl.safetensors", "xl")
    ref.load_lora_weights(str(tmp_path / "xl.safetensors"), adapter_name="xl")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=6, guidance_scale=5.0, negative_prompt="blurry", prompt_2="oil painting")
    expected = ref("a photo of a cat", latents=latents.clone(), output_type="np", **kw).images[0]
    got = np.asarray(ours("a photo of a cat", latents=latents, sampler="euler", **kw).images[0], dtype=np.float32) / 255
    assert_close(got, expected)


def test_lora_with_the_fast_path(sd1, tmp_path):
    """optimize()'s fused q/k/v and the cached denoiser graphs never run without the adapters."""
    ref, folder = sd1
    path = kohya_file(ref, tmp_path / "fast.safetensors", seed=9)
    plain = Pipeline.from_pretrained(folder)
    plain.load_lora_weights(path)
    expected = images(plain, True)
    fast = Pipeline.from_pretrained(folder).optimize(dtype=torch.float32, channels_last=False, cuda_graphs=True)
    images(fast, True)  # a graph (on a CPU: its static-buffer body) cached without the adapters
    assert fast.denoiser_graphs
    fast.load_lora_weights(path)
    assert not fast.denoiser_graphs
    assert_close(images(fast, True), expected)
    fast.fuse_lora()  # the fused q/k/v copy is rebuilt from the fused weights
    assert np.abs(images(fast, True) - expected).max() <= 2 / 255
    fast.unload_lora_weights()
    assert_close(images(fast, True), images(Pipeline.from_pretrained(folder), True))


def test_sd1_files_on_sdxl_are_refused(sd1, tmp_path_factory, tmp_path):
    from test_sdxl_parity import build_sdxl

    ref, _ = sd1
    root = tmp_path_factory.mktemp("lora-sdxl-bad")
    build_sdxl(root)
    xl = Pipeline.from_pretrained(root / "base")
    with pytest.raises(UnfogError, match="sd1.safetensors.*another architecture"):
        xl.load_lora_weights(kohya_file(ref, tmp_path / "sd1.safetensors"))
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "sd1-emb.safetensors"))
    with pytest.raises(UnfogError, match="needs an SDXL embedding"):
        xl.load_textual_inversion(tmp_path / "sd1-emb.safetensors")
    assert xl.get_list_adapters() == {} and not xl.embedding_tokens
    # an SDXL embedding loads into both encoders, as wide as each
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}, str(tmp_path / "xl-emb.safetensors"))
    assert xl.load_textual_inversion(tmp_path / "xl-emb.safetensors", token="<xl>") == "<xl>"
    states, _ = xl.encode_text(["a photo of <xl>"], "truncate")
    assert states.shape == (1, 77, 80)


def test_peft_file_without_metadata_and_bfloat16(sd1, tmp_path):
    """No lora_adapter_metadata header: scale 1, as diffusers reads it; tensors stored in bfloat16."""
    ref, folder = sd1
    g = torch.Generator().manual_seed(12)
    state = {}
    for name in SD1_TARGETS["unet"][:3]:
        w = diffusers_module(ref, "unet", name).weight
        state[f"unet.{name}.lora_A.weight"] = (torch.randn(2, w.shape[1], generator=g) * 0.3).bfloat16()
        state[f"unet.{name}.lora_B.weight"] = (torch.randn(w.shape[0], 2, generator=g) * 0.3).bfloat16()
    save_file(state, str(tmp_path / "plain.safetensors"))
    ours = Pipeline.from_pretrained(folder)
    ours.load_lora_weights(tmp_path / "plain.safetensors")
    ref.load_lora_weights(str(tmp_path / "plain.safetensors"), adapter_name="plain")
    try:
        assert_close(images(ours, True), images(ref, False))
    finally:
        ref.unload_lora_weights()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_in_low_memory_mode(sd1, tmp_path, dtype):
    """With the text encoder resting on disk (enable_low_memory), loading, fusing, unfusing and
    unloading a LoRA that touches it give the images of a pipeline that keeps it resident; in
    bfloat16 too, where the adapters' float32 factors sit beside bfloat16 weights."""
    ref, folder = sd1
    path = kohya_file(ref, tmp_path / "style.safetensors")
    plain, low = Pipeline.from_pretrained(folder, dtype=dtype), Pipeline.from_pretrained(folder, dtype=dtype, low_memory=True)
    images(low, True)  # encoded once: the text encoder is on disk now
    steps = [lambda p: p.load_lora_weights(path), lambda p: p.fuse_lora(), lambda p: p.unfuse_lora(), lambda p: p.unload_lora_weights()]
    for step in steps:
        for pipe in (plain, low):
            step(pipe)
        assert np.array_equal(images(low, True), images(plain, True))
        assert all(t.is_meta for t in low.text_encoder.state_dict().values())


def test_prompt_lora_tags_in_low_memory_mode_do_not_rewrite_the_encoders(sd1, tmp_path, monkeypatch):
    """A <lora:name:w> tag for a loaded adapter changes only its weight: the text encoder's file on
    disk stays valid (no rewrite per request), and the images match a resident pipeline's."""
    import unfog.offload as offload

    ref, folder = sd1
    path = kohya_file(ref, tmp_path / "style.safetensors")
    plain, low = Pipeline.from_pretrained(folder), Pipeline.from_pretrained(folder, low_memory=True)
    for pipe in (plain, low):
        pipe.load_lora_weights(path, weight=0.0)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(latents=latents, num_inference_steps=4, guidance_scale=5.0, sampler="euler", prompt_syntax="a1111", lora_dir=tmp_path)
    low("a photo of a cat", **kw)  # writes the encoder with its adapters once
    writes = []
    real = offload._Copy
    monkeypatch.setattr(offload, "_Copy", lambda *a: writes.append(1) or real(*a))
    untagged = np.asarray(plain("a photo of a cat", **kw).images[0])
    for w in (0.5, 1.0):
        got = np.asarray(low(f"a photo of a cat <lora:style:{w}>", **kw).images[0])
        assert np.array_equal(got, np.asarray(plain(f"a photo of a cat <lora:style:{w}>", **kw).images[0]))
        assert not np.array_equal(got, untagged)  # the tag took effect
    assert writes == []


def test_damaged_adapter_numbers_are_refused_and_nothing_damaged_is_saved(sd1, tmp_path):
    """A non-finite alpha (or weight, or scale) loaded, fused and saved cleanly, and the saved
    model then would not load, having replaced the good one; alphas of two values and rank-0
    LoRAs raised raw errors; fuse_lora("st_v2") also fused "st"."""
    from safetensors.torch import load_file

    ref, folder = sd1
    ours = Pipeline.from_pretrained(folder)
    state = load_file(str(kohya_file(ref, tmp_path / "good.safetensors", seed=7)))
    alpha_key = next(k for k in state if k.endswith(".alpha"))
    for bad_alpha, match in ((torch.tensor(float("inf")), "alpha must be one finite number"), (torch.tensor(float("nan")), "alpha must be one finite"),
                             (torch.tensor([1.0, 2.0]), "alpha must be one finite number, got 2")):
        save_file({**state, alpha_key: bad_alpha}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(UnfogError, match=match):
            ours.load_lora_weights(tmp_path / "bad.safetensors")
    down_key = next(k for k in state if k.endswith("lora_down.weight") and state[k].ndim == 2)
    up_key = down_key.replace("lora_down", "lora_up")
    save_file({**state, down_key: torch.zeros(0, state[down_key].shape[1]), up_key: torch.zeros(state[up_key].shape[0], 0)}, str(tmp_path / "r0.safetensors"))
    with pytest.raises(UnfogError, match="rank 0"):
        ours.load_lora_weights(tmp_path / "r0.safetensors")
    for kw in ({"weight": float("nan")}, {"weight": "1"}):
        with pytest.raises(UnfogError, match="weight must be a finite number"):
            ours.load_lora_weights(tmp_path / "good.safetensors", **kw)
    assert ours.get_list_adapters() == {}
    ours.load_lora_weights(tmp_path / "good.safetensors", adapter_name="st", weight=np.float32(0.5))  # any real number type
    ours.load_lora_weights(tmp_path / "good.safetensors", adapter_name="st_v2")
    with pytest.raises(UnfogError, match="adapter_weights must be one finite number"):
        ours.set_adapters(["st"], [float("inf")])
    for scale in (float("nan"), "x"):
        with pytest.raises(UnfogError, match="lora_scale must be a finite number"):
            ours.fuse_lora(lora_scale=scale)
    with pytest.raises(UnfogError, match="no adapter named"):
        ours.fuse_lora(adapter_names=["missing"])
    ours.fuse_lora(adapter_names="st_v2")
    fused = {n for _, _, layer in ours._adapted_layers() for n in layer.fused}
    assert fused == {"st_v2"}  # the name, not every adapter whose name is a substring of it
    ours.unfuse_lora()
    ours.set_adapters("st", np.float32(0.5))  # one numpy number for the one name (it had been taken for a list)
    assert ours.get_active_adapters() == ["st"]
    ours.unload_lora_weights()
    # A model folder is never replaced by weights the loader would refuse.
    ours.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "NOTES.md").write_text("mine")
    with torch.no_grad():
        ours.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UnfogError, match="conv_in.weight.*NaN or infinite.*nothing was saved"):
        ours.save_pretrained(tmp_path / "model")
    assert Pipeline.from_pretrained(tmp_path / "model")  # the good one is still there
    assert (tmp_path / "model" / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


def test_saving_over_a_model_folder_keeps_the_users_other_files(sd1, tmp_path):
    _, folder = sd1
    ours = Pipeline.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "NOTES.md").write_text("notes")
    (tmp_path / "m" / "loras").mkdir()
    (tmp_path / "m" / "loras" / "ink.safetensors").write_bytes(b"x")
    ours.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "NOTES.md").read_text() == "notes" and (tmp_path / "m" / "loras" / "ink.safetensors").read_bytes() == b"x"
    assert Pipeline.from_pretrained(tmp_path / "m")


def test_lycoris_factors_are_checked_before_they_are_multiplied_out(sd1, tmp_path):
    """96 KB of LoHa factors of 6000 × 1 made a 6000 × 6000 matrix (a 40000-wide file, 1.6e9 values: 6.4 GB)
    before the shape check refused it."""
    import resource

    _, folder = sd1
    ours = Pipeline.from_pretrained(folder)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    n = 40000
    save_file({f"{name}.hada_w1_a": torch.ones(n, 1), f"{name}.hada_w1_b": torch.ones(1, n), f"{name}.hada_w2_a": torch.ones(n, 1),
               f"{name}.hada_w2_b": torch.ones(1, n)}, str(tmp_path / "huge.safetensors"))
    save_file({f"{name}.lokr_w1_a": torch.ones(n, 1), f"{name}.lokr_w1_b": torch.ones(1, n), f"{name}.lokr_w2": torch.ones(2, 2)},
              str(tmp_path / "kron.safetensors"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for f in ("huge", "kron"):
        with pytest.raises(UnfogError, match=r"factors make a \((40000, 40000|80000, 80000)\) update"):
            ours.load_lora_weights(tmp_path / f"{f}.safetensors")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KB: nothing near 6.4 GB (float32 of 1.6e9 values) was built
    save_file({f"{name}.hada_w1_a": torch.ones(32, 2), f"{name}.hada_w1_b": torch.ones(3, 32), f"{name}.hada_w2_a": torch.ones(32, 2),
               f"{name}.hada_w2_b": torch.ones(2, 32)}, str(tmp_path / "mismatch.safetensors"))
    with pytest.raises(UnfogError, match="do not combine"):
        ours.load_lora_weights(tmp_path / "mismatch.safetensors")
    # Factors whose product has the layer's size but not its shape (transposed) had been laid out as nonsense.
    ref, _ = sd1
    cross = name.replace("attn1_to_q", "ff_net_2")
    out, inp = ref.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2].weight.shape
    assert out != inp
    save_file({f"{cross}.hada_w1_a": torch.ones(inp, 2), f"{cross}.hada_w1_b": torch.ones(2, out), f"{cross}.hada_w2_a": torch.ones(inp, 2),
               f"{cross}.hada_w2_b": torch.ones(2, out)}, str(tmp_path / "transposed.safetensors"))
    save_file({f"{cross}.lokr_w1": torch.ones(1, out), f"{cross}.lokr_w2": torch.ones(inp, 1)}, str(tmp_path / "transposed-kron.safetensors"))
    for f in ("transposed", "transposed-kron"):
        with pytest.raises(UnfogError, match=rf"factors make a \({inp}, {out}\) update but the layer's weight is \({out}, {inp}\)"):
            ours.load_lora_weights(tmp_path / f"{f}.safetensors")
    assert ours.get_list_adapters() == {}


def test_a_save_that_fails_mid_swap_loses_neither_the_model_nor_the_users_files(sd1, tmp_path, monkeypatch):
    import os

    import unfog.formats.folder as folder_module

    _, folder = sd1
    ours = Pipeline.from_pretrained(folder)
    target = tmp_path / "m"
    ours.save_pretrained(target)
    (target / "NOTES.md").write_text("notes")
    real = os.replace
    fail = {"tmp": True, "old": False}

    def flaky(src, dst):
        if Path(dst) == target and (fail["old"] if Path(src).name.startswith(".m.old.") else fail["tmp"]):
            raise OSError("the disk went away")
        return real(src, dst)

    monkeypatch.setattr(folder_module.os, "replace", flaky)
    with pytest.raises(OSError, match="went away"):  # the new folder cannot take the old one's place: all put back
        ours.save_pretrained(target)
    assert (target / "NOTES.md").read_text() == "notes" and Pipeline.from_pretrained(target)
    fail["old"] = True  # and the old one cannot be put back either: nothing is deleted, and the warning says where it is
    with pytest.warns(UserWarning, match="your other files from it are in"), pytest.raises(OSError, match="went away"):
        ours.save_pretrained(target)
    monkeypatch.setattr(folder_module.os, "replace", real)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]
    assert any((p / "NOTES.md").exists() for p in leftovers) and any((p / "model_index.json").exists() for p in leftovers if p.name.startswith(".m.old."))
