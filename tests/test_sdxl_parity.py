"""unfog computes what diffusers computes for Stable Diffusion XL, on tiny random SDXL base and
refiner models built by diffusers/transformers (both text encoders on the real CLIP vocabulary,
per-level transformer depths that differ, linear projections) and saved in diffusers' layout."""

import json
import os

import numpy as np
import pytest
import torch
from clip_bytes import WHEELS, write_real_clip_vocab

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from unfog import Pipeline  # noqa: E402
from unfog.errors import UnfogError  # noqa: E402

TIME_DIM, POOLED = 8, 40  # micro-conditioning sinusoids per number; bigG's projection width


def spread(*modules):
    """Random weights are tiny near init; spread them so every layer matters to the output."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)


def sdxl_unet(refiner: bool):
    from diffusers import UNet2DConditionModel

    down = ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D" if refiner else "CrossAttnDownBlock2D")
    up = ("UpBlock2D" if refiner else "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=down, up_block_types=up, transformer_layers_per_block=(1, 1, 2) if not refiner else 2,
        attention_head_dim=(2, 4, 4), cross_attention_dim=48 if refiner else 32 + 48, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + (5 if refiner else 6) * TIME_DIM)


def build_sdxl(root):
    """Tiny SDXL base and refiner saved by diffusers; returns (base, refiner) diffusers pipelines."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not write_real_clip_vocab(root / "_tok"):
        pytest.skip(f"no open-clip-torch wheel in {WHEELS}; run: pip download --no-deps open-clip-torch -d {WHEELS}")
    torch.manual_seed(0)
    files = (str(root / "_tok" / "vocab.json"), str(root / "_tok" / "merges.txt"))
    tok = CLIPTokenizer(*files, pad_token="<|endoftext|>", model_max_length=77)
    tok_2 = CLIPTokenizer(*files, pad_token="!", model_max_length=77)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=2, pad_token_id=1, num_hidden_layers=3)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act="quick_gelu", **common))
    te_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, hidden_act="gelu",
                                                      projection_dim=POOLED, **common))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.13025)
    unet, unet_r = sdxl_unet(False), sdxl_unet(True)
    spread(te, te_2, vae, unet, unet_r)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te_2, tokenizer=tok, tokenizer_2=tok_2, unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True)
    refiner = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=te_2, tokenizer=None, tokenizer_2=tok_2, unet=unet_r,
                                               scheduler=sched, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    base.save_pretrained(root / "base", safe_serialization=True)
    refiner.save_pretrained(root / "refiner", safe_serialization=True)
    for name in ("base", "refiner"):  # the keys SDXL's shipped scheduler config carries beyond Euler's own
        path = root / name / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True}))
    return base, refiner


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    base, refiner = build_sdxl(root)
    return base, refiner, Pipeline.from_pretrained(root / "base"), Pipeline.from_pretrained(root / "refiner"), root


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def close_images(got, expected):
    """Within one 8-bit level (ours is rounded to 8 bits, theirs is float)."""
    got = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in got])
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-3 + 0.5 / 255


def test_loaded_as_sdxl(xl):
    _, _, base, refiner, _ = xl
    assert (base.sdxl, refiner.sdxl) == ("base", "refiner")
    assert base.force_zeros_for_empty_prompt and not refiner.force_zeros_for_empty_prompt
    assert base.unet.config.transformer_depth == [1, 1, 2]
    assert (base.defaults.height, base.defaults.width) == (16, 16)  # sample_size × the autoencoder's factor


@pytest.mark.parametrize("negative", [None, "", "blurry photo"])
def test_text_conditioning_matches(xl, negative):
    ref, _, ours, _, _ = xl
    prompt, prompt_2 = "a photo of an astronaut riding a horse", "oil painting, highly detailed"
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = ref.encode_prompt(prompt, prompt_2=prompt_2, negative_prompt=negative, do_classifier_free_guidance=True)
    r = ours.request(prompt, prompt_2=prompt_2, negative_prompt=negative, guidance_scale=5.0, long_prompts="truncate")
    cond, uncond = ours._conditioning(r)
    assert rel_err(cond["context"], emb) < 1e-5 and rel_err(cond["pooled"], pooled) < 1e-5
    if negative is None:  # force_zeros_for_empty_prompt: zeros, not the encoded ""
        assert not uncond["context"].any() and not uncond["pooled"].any() and not neg.any()
    else:
        assert rel_err(uncond["context"], neg) < 1e-5 and rel_err(uncond["pooled"], neg_pooled) < 1e-5


def test_unet_with_added_conditioning_matches(xl):
    ref, ref_r, ours, ours_r, _ = xl
    g = torch.Generator().manual_seed(1)
    for theirs, mine, ctx_dim, ids in ((ref.unet, ours.unet, 80, 6), (ref_r.unet, ours_r.unet, 48, 5)):
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, ctx_dim, generator=g)
        pooled, time_ids = torch.randn(2, POOLED, generator=g), torch.tensor([[16.0, 24, 0, 8, 16, 16], [1024, 1024, 0, 0, 1024, 1024]])[:, :ids]
        t = torch.tensor([10, 700])
        with torch.no_grad():
            expected = theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            got = mine(x, t, ctx, pooled=pooled, time_ids=time_ids)
        assert rel_err(got, expected) < 1e-5


def test_vae_matches(xl):
    ref, _, ours, _, _ = xl
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(ours.vae.decode(z), ref.vae.decode(z).sample) < 1e-5
    assert ours.vae.config.scaling_factor == 0.13025


SAMPLERS = [("EulerDiscreteScheduler", "euler", "leading"), ("EulerAncestralDiscreteScheduler", "euler_ancestral", "leading"),
            ("DDIMScheduler", "ddim", "leading"), ("DPMSolverMultistepScheduler", "dpmpp_2m", "trailing")]
MICRO = dict(prompt_2="oil painting of a dog", original_size=(24, 32), crops_coords_top_left=(4, 0), target_size=(16, 16))


@pytest.mark.parametrize("scheduler_cls, sampler, spacing", SAMPLERS)
def test_base_images_match(xl, scheduler_cls, sampler, spacing):
    ref, _, ours, _, _ = xl
    extra = {"clip_sample": False, "set_alpha_to_one": False} if scheduler_cls == "DDIMScheduler" else {}
    ref.scheduler = getattr(diffusers, scheduler_cls).from_config(ref.scheduler.config, timestep_spacing=spacing, **extra)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=8, guidance_scale=6.0, negative_prompt="blurry", **MICRO)
    expected = ref("a photo of a cat", latents=latents.clone(), output_type="np", generator=torch.Generator().manual_seed(11), **kwargs).images
    got = ours("a photo of a cat", latents=latents, sampler=sampler, sigma_schedule=spacing, generator=torch.Generator().manual_seed(11), **kwargs).images
    close_images(got, expected)


def test_zero_negative_and_turbo_style_settings_match(xl):
    """No negative prompt on a force-zeros model; then guidance 0 with trailing spacing in one
    step (SDXL-Turbo's documented settings), which runs only the conditional half."""
    ref, _, ours, _, _ = xl
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="leading")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = ref("a red circle", latents=latents.clone(), num_inference_steps=6, guidance_scale=5.0, output_type="np").images
    close_images(ours("a red circle", latents=latents, num_inference_steps=6, guidance_scale=5.0, sampler="euler").images, expected)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
    expected = ref("a red circle", latents=latents.clone(), num_inference_steps=1, guidance_scale=0.0, output_type="np",
                   generator=torch.Generator().manual_seed(1)).images
    calls = []
    hook = ours.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        got = ours("a red circle", latents=latents, num_inference_steps=1, guidance_scale=0.0, sampler="euler_ancestral", sigma_schedule="trailing",
                   generator=torch.Generator().manual_seed(1)).images
    finally:
        hook.remove()
    assert calls == [1]
    close_images(got, expected)


@pytest.mark.parametrize("scheduler_cls, sampler", [("EulerDiscreteScheduler", "euler"), ("DDIMScheduler", "ddim")])
def test_base_to_refiner_hand_off_matches(xl, scheduler_cls, sampler):
    ref, ref_r, ours, ours_r, _ = xl
    extra = {"clip_sample": False, "set_alpha_to_one": False} if scheduler_cls == "DDIMScheduler" else {}
    ref.scheduler = ref_r.scheduler = getattr(diffusers, scheduler_cls).from_config(ref.scheduler.config, timestep_spacing="leading", **extra)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    common = dict(num_inference_steps=10, guidance_scale=5.0, negative_prompt="ugly")
    handed = ref("a photo of a dog", latents=latents.clone(), denoising_end=0.699, output_type="latent", **common).images
    expected = ref_r("a photo of a dog", image=handed, denoising_start=0.699, output_type="np", aesthetic_score=7.0,
                     negative_crops_coords_top_left=(0, 0), **common).images
    base_out = ours("a photo of a dog", latents=latents, denoising_end=0.699, output_type="latent", sampler=sampler, sigma_schedule="leading", **common)
    assert base_out.images == [] and base_out.latents.shape == (1, 4, 8, 8)
    got = ours_r("a photo of a dog", image=base_out.latents, denoising_start=0.699, aesthetic_score=7.0, sampler=sampler, sigma_schedule="leading", **common)
    close_images(got.images, expected)
    # the two halves together run the whole schedule once
    assert len(base_out.request.seeds) == 1


def test_refiner_img2img_matches(xl):
    from PIL import Image

    _, ref_r, _, ours_r, _ = xl
    ref_r.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref_r.scheduler.config, timestep_spacing="leading")
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    kwargs = dict(num_inference_steps=10, strength=0.4, guidance_scale=4.0, negative_aesthetic_score=2.0, negative_original_size=(16, 16),
                  negative_crops_coords_top_left=(0, 0))
    expected = ref_r("a cat", image=init, generator=torch.Generator().manual_seed(9), output_type="np", crops_coords_top_left=(2, 2), **kwargs).images
    got = ours_r("a cat", image=init, sampler="euler_ancestral", sigma_schedule="leading", generator=torch.Generator().manual_seed(9),
                 crops_coords_top_left=(2, 2), **kwargs).images
    close_images(got, expected)


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_single_file_matches_diffusers_from_single_file(xl, tmp_path, which):
    from ldm_layout import write_ldm_checkpoint

    ref, ref_r, ours, ours_r, root = xl
    mine, theirs_cls = (ours, diffusers.StableDiffusionXLPipeline) if which == "base" else (ours_r, diffusers.StableDiffusionXLImg2ImgPipeline)
    ckpt = tmp_path / f"{which}.safetensors"
    write_ldm_checkpoint(mine, ckpt)
    theirs = theirs_cls.from_single_file(str(ckpt), config=str(root / which), local_files_only=True)
    loaded = Pipeline.from_pretrained(ckpt, config=root / which)
    assert loaded.sdxl == which
    g = torch.Generator().manual_seed(4)
    ctx_dim = loaded.unet.config.context_dim
    x, ctx, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, ctx_dim, generator=g), torch.randn(1, POOLED, generator=g)
    ids = torch.tensor([[16.0, 16, 0, 0, 16, 16][: 6 if which == "base" else 5]])
    with torch.no_grad():
        expected = theirs.unet(x, torch.tensor([500]), encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        assert rel_err(loaded.unet(x, torch.tensor([500]), ctx, pooled=pooled, time_ids=ids), expected) < 1e-5
        prompt_embeds = theirs.encode_prompt("a photo of a cat", do_classifier_free_guidance=False)
    states, pooled_ours = loaded.encode_text(["a photo of a cat"], "truncate")
    assert rel_err(states, prompt_embeds[0]) < 1e-5 and rel_err(pooled_ours, prompt_embeds[2]) < 1e-5
    # the same model read from the file and from the folder gives the same picture
    kwargs = dict(seed=3, num_inference_steps=4, sampler="euler")
    if which == "refiner":
        kwargs["image"] = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(loaded("a cat", **kwargs).images[0]), np.asarray(mine("a cat", **kwargs).images[0]))


def test_single_file_without_config_is_recognised(xl, tmp_path):
    """Without a config folder the architecture comes from the keys and shapes; the tiny model's
    heads are not SDXL's 64 channels each, so here only the layout and the families are checked."""
    from safetensors.torch import load_file

    from ldm_layout import write_ldm_checkpoint
    from unfog.formats.single_file import detect, infer_text_config, infer_unet_config

    _, _, ours, ours_r, _ = xl
    for pipe, family in ((ours, "sdxl"), (ours_r, "sdxl_refiner")):
        write_ldm_checkpoint(pipe, tmp_path / "m.safetensors")
        state = load_file(str(tmp_path / "m.safetensors"))
        assert detect(state) == family
        u, c = infer_unet_config(state, family), pipe.unet.config
        assert (u.block_channels, u.attention_levels, u.context_dim, u.projection_class_embeddings_input_dim) == (
            c.block_channels, c.attention_levels, c.context_dim, c.projection_class_embeddings_input_dim)
        assert [u.depth_at(level) for level in range(3) if c.attention_levels[level]] == [c.depth_at(level) for level in range(3) if c.attention_levels[level]]
        assert u.depth_at(2) == c.depth_at(2)  # the middle block's depth
        prefix = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
        assert infer_text_config(state, prefix).projection_dim == POOLED


def test_convert_to_unfog_folder_and_back(xl, tmp_path):
    from unfog.cli import main

    _, _, ours, ours_r, root = xl
    assert main(["convert", str(root / "base"), str(tmp_path / "base")]) == 0
    again = Pipeline.from_pretrained(tmp_path / "base")
    assert again.sdxl == "base" and again.force_zeros_for_empty_prompt
    kwargs = dict(seed=1, num_inference_steps=4, sampler="euler", prompt_2="a dog", original_size=(32, 32))
    assert np.array_equal(np.asarray(again("a cat", **kwargs).images[0]), np.asarray(ours("a cat", **kwargs).images[0]))
    ours_r.save_pretrained(tmp_path / "refiner")
    assert Pipeline.from_pretrained(tmp_path / "refiner").sdxl == "refiner"


def test_bad_sdxl_input(xl, tiny_pipe, tmp_path):
    import shutil

    _, _, ours, ours_r, root = xl
    with pytest.raises(UnfogError, match="SDXL refiner.*does not draw from pure noise"):
        ours_r("a cat")
    with pytest.raises(UnfogError, match="prompt_2 applies to SDXL models"):
        tiny_pipe("a cat", prompt_2="a dog")
    with pytest.raises(UnfogError, match="aesthetic_score applies to the SDXL refiner"):
        ours("a cat", aesthetic_score=6.0)
    with pytest.raises(UnfogError, match=f"height must be a positive multiple of {ours.downsample_factor}"):
        ours("a cat", height=2 * ours.downsample_factor + 1)
    with pytest.raises(UnfogError, match="original_size must be a pair"):
        ours("a cat", original_size=(1024,))
    with pytest.raises(UnfogError, match="denoising_end must be a fraction"):
        ours("a cat", denoising_end=1.5)
    with pytest.raises(UnfogError, match="denoising_start needs image"):
        ours("a cat", denoising_start=0.5)
    with pytest.raises(UnfogError, match=r"latents of shape \(B, 4, h, w\)"):
        ours_r("a cat", image=torch.zeros(1, 3, 8, 8))
    # a refiner's config folder with a base's model index: a mix, refused by name
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "refiner", mixed)
    index = json.loads((mixed / "model_index.json").read_text())
    index["requires_aesthetics_score"] = False
    (mixed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnfogError, match="requires_aesthetics_score=False .* SDXL refiner"):
        Pipeline.from_pretrained(mixed)
    # a refiner file with the base's config folder
    from ldm_layout import write_ldm_checkpoint

    write_ldm_checkpoint(ours_r, tmp_path / "r.safetensors")
    with pytest.raises(UnfogError, match="is an SDXL refiner checkpoint but the config folder .* describes an SDXL base"):
        Pipeline.from_pretrained(tmp_path / "r.safetensors", config=root / "base")


def test_server_takes_sdxl_prompts(xl, tiny_pipe):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from unfog.server import ServerSettings, create_app

    _, _, ours, _, _ = xl
    with TestClient(create_app(ours, ServerSettings(), model_name="xl"), base_url="http://127.0.0.1:7860") as api:
        r = api.post("/v1/images/generate", json={"prompt": "a cat", "prompt_2": "oil painting", "negative_prompt_2": "blurry", "steps": 3, "seed": 2})
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert api.post("/v1/jobs", json={"prompt": "a cat", "width": 21}).json()["field"] == "width"  # not a multiple of the factor
        assert api.post("/v1/jobs", json={"prompt": "a cat", "prompt_2": 5}).json()["field"] == "prompt_2"
    with TestClient(create_app(tiny_pipe, ServerSettings(), model_name="tiny"), base_url="http://127.0.0.1:7860") as api:
        r = api.post("/v1/jobs", json={"prompt": "a cat", "prompt_2": "a dog"})
        assert r.status_code == 422 and r.json()["field"] == "prompt_2" and "SDXL" in r.json()["error"]


def test_cli_base_then_refiner(xl, tmp_path):
    from PIL import Image

    from unfog.cli import main

    ref, ref_r, ours, ours_r, root = xl
    out = tmp_path / "x.png"
    args = ["generate", "a photo of a cat", "--model", str(root / "base"), "--refiner", str(root / "refiner"), "--refiner-start", "0.7",
            "--prompt-2", "oil painting", "--steps", "10", "--seed", "4", "--sampler", "euler", "-q", "-o", str(out)]
    assert main(args) == 0
    # the same as the two Python calls
    common = dict(num_inference_steps=10, seed=4, sampler="euler")
    latents = ours("a photo of a cat", prompt_2="oil painting", denoising_end=0.7, output_type="latent", **common).latents
    expected = ours_r("a photo of a cat", image=latents, denoising_start=0.7, **common).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    assert main(["generate", "a cat", "--model", str(root / "refiner"), "--refiner", str(root / "base"), "-q", "-o", str(tmp_path / "y.png")]) == 2


def test_a1111_prompts_reach_both_encoders_and_the_refiner_as_parsed(xl, tmp_path):
    """The CLI's refiner step had read an A1111 prompt as plain text, and a <lora:> tag's text
    reached SDXL's second encoder (prompt_2 defaulted to the prompt as given)."""
    from PIL import Image

    from unfog.cli import main

    _, _, ours, ours_r, root = xl
    (tmp_path / "ink.safetensors").write_bytes(b"")  # the request only checks that the file is there
    r = ours.request("a cat <lora:ink:0.6>", negative_prompt="ugly <lora:ink:0.5>", prompt_2=["oil <lora:ink:0.6>"], prompt_syntax="a1111",
                     lora_dir=tmp_path)
    assert r.prompts == ["a cat "] and r.prompts_2 == ["oil "] and r.negative_prompts_2 == ["ugly "]
    r = ours.request("a cat <lora:ink:0.6>", prompt_syntax="a1111", lora_dir=tmp_path)
    assert r.prompts_2 == ["a cat "]
    out = tmp_path / "x.png"
    prompt = "a (photo:1.4) of a [cat]"
    assert main(["generate", prompt, "--model", str(root / "base"), "--refiner", str(root / "refiner"), "--refiner-start", "0.7",
                 "--steps", "10", "--seed", "4", "--sampler", "euler", "-q", "-o", str(out)]) == 0
    common = dict(num_inference_steps=10, seed=4, sampler="euler", prompt_syntax="a1111")
    latents = ours(prompt, denoising_end=0.7, output_type="latent", **common).latents
    expected = ours_r(prompt, image=latents, denoising_start=0.7, **common).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))


def test_each_sdxl_encoder_reads_its_own_prompts_emphasis(xl):
    """Token weights had come from the first prompt alone and been applied to both encoders:
    prompt_2's emphasis was ignored, and the prompt's was put on prompt_2's tokens."""
    _, _, ours, _, _ = xl
    width = ours.text_encoder.config.width

    def second(prompt, prompt_2):  # the second encoder's states
        return ours.encode_text([prompt], "truncate", prompts_2=[prompt_2], syntax="a1111")[0][..., width:]

    assert not torch.equal(second("a cat", "(oil painting:1.5)"), second("a cat", "oil painting"))
    torch.testing.assert_close(second("(a cat:1.5)", "oil painting"), second("a cat", "oil painting"), rtol=0, atol=0)


def test_refiner_numbers_are_checked_in_the_request(xl):
    """A huge aesthetic score had run every step, then ended in NaN latents; a denoising_end before
    denoising_start had failed only in the sampler set-up with advice that could not help."""
    from unfog import UnfogError

    _, _, ours, ours_r, _ = xl
    side = 16 // ours.vae_factor  # the tiny models' 16² images
    latents = torch.zeros(1, 4, side, side)
    with pytest.raises(UnfogError, match="aesthetic_score must be from 0 to 100"):
        ours_r.request("a cat", image=latents, denoising_start=0.5, aesthetic_score=1e300)
    with pytest.raises(UnfogError, match=r"denoising_end \(0.3\) must come after denoising_start \(0.7\)"):
        ours.request("a cat", image=latents, denoising_start=0.7, denoising_end=0.3)
