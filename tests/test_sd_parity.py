"""unfog computes what diffusers and transformers compute, on tiny random Stable Diffusion
1.x- and 2.x-style models saved in the diffusers folder layout."""

import json
import os

import numpy as np
import pytest
from clip_bytes import write_tiny_clip_vocab
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from unfog import Pipeline  # noqa: E402
from unfog.errors import UnfogError  # noqa: E402

def build_sd(root, *, v2: bool, scheduler_cls="DDIMScheduler"):
    """Build a tiny SD pipeline with diffusers/transformers and save it in diffusers' layout."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = write_tiny_clip_vocab(root / "_tok")
    tokenizer = CLIPTokenizer(str(root / "_tok" / "vocab.json"), str(root / "_tok" / "merges.txt"), pad_token="!" if v2 else "<|endoftext|>", model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="gelu" if v2 else "quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") if not v2 else ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if not v2 else ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if v2 else 2, use_linear_projection=v2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    # Random weights are tiny near init; spread them so every layer matters to the output.
    for m in (unet, vae, text_encoder):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    sched_cls = getattr(diffusers, scheduler_cls)
    scheduler = sched_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                          prediction_type="v_prediction" if v2 else "epsilon", **({"set_alpha_to_one": True, "clip_sample": False} if scheduler_cls == "DDIMScheduler" else {}))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd", safe_serialization=True)
    return pipe


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ref = build_sd(root, v2=request.param == "sd2")
    return ref, Pipeline.from_pretrained(root / "sd"), root / "sd"


PROMPTS = ["a photo of a cat", "An astronaut riding a horse on Mars!", "", "  red   circle\tblue square ", "dog " * 40, "café naïve 123"]


def test_tokenizer_matches_clip_tokenizer(sd):
    ref, ours, _ = sd
    expected = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenizer(PROMPTS), expected)


def test_tokenizer_from_vocab_and_merges_files(sd, tmp_path):
    """Older folders carry vocab.json + merges.txt instead of tokenizer.json."""
    from unfog.formats.diffusers_folder import clip_tokenizer

    ref, ours, path = sd
    old = tmp_path / "tok"
    old.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (old / name).write_bytes((path.parent / "_tok" / name).read_bytes())
    (old / "tokenizer_config.json").write_text((path / "tokenizer" / "tokenizer_config.json").read_text())
    assert torch.equal(clip_tokenizer(old)(PROMPTS), ours.tokenizer(PROMPTS))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_text_encoder_matches(sd):
    ref, ours, _ = sd
    ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref.text_encoder(ids)
        states, pooled = ours.text_encoder(ids)
    assert rel_err(states, out.last_hidden_state) < 1e-5
    assert rel_err(pooled, out.pooler_output) < 1e-5


def test_unet_matches(sd):
    ref, ours, _ = sd
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = ref.unet(x, t, encoder_hidden_states=ctx).sample
        got = ours.unet(x, t, ctx)
    assert rel_err(got, expected) < 1e-5


def test_vae_matches(sd):
    ref, ours, _ = sd
    g = torch.Generator().manual_seed(2)
    z, img = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        assert rel_err(ours.vae.decode(z), ref.vae.decode(z).sample) < 1e-5
        assert rel_err(ours.vae.encode(img)[0], ref.vae.encode(img).latent_dist.mean) < 1e-5


SAMPLERS = [("DDIMScheduler", "ddim"), ("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun"),
            ("DPMSolverMultistepScheduler", "dpmpp_2m"), ("EulerAncestralDiscreteScheduler", "euler_ancestral")]


@pytest.mark.parametrize("scheduler_cls, sampler", SAMPLERS)
def test_pipeline_images_match(sd, scheduler_cls, sampler):
    ref, ours, _ = sd
    # diffusers' DPM-Solver multistep reads "leading" as n+1 divisions, unlike DDIM and Euler;
    # its "trailing" is the common definition.
    spacing = "trailing" if sampler == "dpmpp_2m" else "leading"
    ref.scheduler = getattr(diffusers, scheduler_cls).from_config(ref.scheduler.config, timestep_spacing=spacing)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=8, guidance_scale=6.0)
    expected = ref("a photo of a cat", negative_prompt="dog", latents=latents.clone(), output_type="np",
                   generator=torch.Generator().manual_seed(11), **kwargs).images[0]
    got = ours("a photo of a cat", negative_prompt="dog", latents=latents, sampler=sampler, sigma_schedule=spacing,
               generator=torch.Generator().manual_seed(11), **kwargs).images[0]
    got = np.asarray(got, dtype=np.float32) / 255
    assert np.abs(got - expected).max() <= 1e-3 + 0.5 / 255  # ours is rounded to 8 bits


def test_sizes_are_multiples_of_the_autoencoders_factor_as_in_diffusers(sd, tmp_path):
    # Sizes had had to be multiples of the autoencoder's factor times the U-Net's (64 for SD),
    # so 600×400 was refused; diffusers takes multiples of 8, and the U-Net meets odd-sized skips.
    # SD's shape in small: an autoencoder of factor 8 and a U-Net of four levels (factor 8).
    _, _, folder = sd
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)  # (a fresh copy: other tests change the fixture's)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
        cross_attention_dim=ref.text_encoder.config.hidden_size,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, sample_size=64)
    deep = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=unet,
                                             scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    deep.set_progress_bar_config(disable=True)
    deep.save_pretrained(tmp_path / "deep", safe_serialization=True)
    ours = Pipeline.from_pretrained(tmp_path / "deep")
    assert ours.downsample_factor == 8 == deep.vae_scale_factor and ours.unet.config.downsample_factor == 8
    latents = torch.randn(1, 4, 9, 7, generator=torch.Generator().manual_seed(3))  # odd in both directions
    kwargs = dict(height=72, width=56, num_inference_steps=3, guidance_scale=6.0)
    expected = deep("a photo of a cat", latents=latents.clone(), output_type="np", **kwargs).images[0]
    got = ours("a photo of a cat", latents=latents, sampler="ddim", **kwargs).images[0]
    assert got.size == (56, 72)
    assert np.abs(np.asarray(got, dtype=np.float32) / 255 - expected).max() <= 1e-3 + 0.5 / 255


def test_dpmpp_2m_with_karras_sigmas_matches(sd):
    ref, ours, _ = sd
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config, use_karras_sigmas=True, timestep_spacing="trailing")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    kwargs = dict(num_inference_steps=8, guidance_scale=6.0)
    expected = ref("a photo of a cat", latents=latents.clone(), output_type="np", **kwargs).images[0]
    got = ours("a photo of a cat", latents=latents, sampler="dpmpp_2m", sigma_schedule="karras", round_timesteps=True, **kwargs).images[0]
    assert np.abs(np.asarray(got, dtype=np.float32) / 255 - expected).max() <= 1e-3 + 0.5 / 255


def test_nan_weights_are_refused(sd, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, path = sd
    bad = tmp_path / "nan"
    shutil.copytree(path, bad)
    f = bad / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    key = sorted(state)[0]
    state[key] = state[key].clone().fill_(float("nan"))
    save_file(state, str(f))
    with pytest.raises(UnfogError, match=f"{key}.*NaN"):
        Pipeline.from_pretrained(bad)
    f.write_bytes(f.read_bytes()[:-100])  # truncated: offsets run past the end
    with pytest.raises(UnfogError, match="not a readable safetensors file"):
        Pipeline.from_pretrained(bad)


def test_bad_diffusers_folders(sd, tmp_path):
    import shutil

    _, _, path = sd
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnfogError, match="pickled weights .* unfog convert --allow-pickle"):
        Pipeline.from_pretrained(bad)
    shutil.rmtree(bad)
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [32, 48]
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnfogError, match=r"weight '.*' has shape"):
        Pipeline.from_pretrained(bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(UnfogError, match="lacks the vae/"):
        Pipeline.from_pretrained(bad)


def test_malformed_diffusers_configs_are_errors_naming_the_file(sd, tmp_path):
    """A config of the wrong kind or missing a field had raised a raw AttributeError, KeyError or
    TypeError from inside the translation."""
    import shutil

    _, _, path = sd
    edits = [("unet/config.json", lambda c: [], "must hold a JSON object"),
             ("text_encoder/config.json", lambda c: {k: v for k, v in c.items() if k != "vocab_size"}, "a field is missing or of the wrong kind"),
             ("unet/config.json", lambda c: {k: v for k, v in c.items() if k != "block_out_channels"}, "a field is missing or of the wrong kind"),
             ("unet/config.json", lambda c: {**c, "block_out_channels": 5}, "a field is missing or of the wrong kind|block_out_channels"),
             ("vae/config.json", lambda c: {**c, "scaling_factor": "x"}, "scaling_factor|a field is missing or of the wrong kind"),
             ("scheduler/scheduler_config.json", lambda c: "ddim", "must hold a JSON object"),
             ("tokenizer/tokenizer_config.json", lambda c: {**c, "model_max_length": "abc"}, "model_max_length must be a positive number"),
             ("tokenizer/special_tokens_map.json", lambda c: {**c, "pad_token": 5}, "pad_token must be a string"),
             ("scheduler/scheduler_config.json", lambda c: {**c, "beta_start": "x"}, "beta_start must be"),  # named with its file
             ("model_index.json", lambda c: 5, "must hold a JSON object")]
    for name, edit, message in edits:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(path, bad)
        f = bad / name
        f.write_text(json.dumps(edit(json.loads(f.read_text()) if f.is_file() else {})))
        with pytest.raises(UnfogError, match=message) as e:
            Pipeline.from_pretrained(bad)
        assert name.split("/")[0] in str(e.value), (name, str(e.value))
    bad = tmp_path / "sharded"  # a shard index whose weight_map is not names of files in the folder
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(path, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").rename(bad / "unet" / "part.safetensors")
    for weight_map in (["part.safetensors"], {"x": 5}, {"x": "../vae/diffusion_pytorch_model.safetensors"}):
        (bad / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(UnfogError, match="weight_map must map tensor names to shard file names"):
            Pipeline.from_pretrained(bad)


def test_single_file_checkpoint_matches_diffusers_from_single_file(sd, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm_layout import write_ldm_checkpoint

    ref, ours, folder = sd
    ckpt = tmp_path / "model.safetensors"
    write_ldm_checkpoint(ours, ckpt, open_clip=ours.unet.config.linear_projection)
    theirs = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    mine = Pipeline.from_pretrained(ckpt, config=folder)
    g = torch.Generator().manual_seed(4)
    x, ctx, z = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ids = ours.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        assert rel_err(mine.unet(x, torch.tensor([500]), ctx), theirs.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample) < 1e-5
        assert rel_err(mine.vae.decode(z), theirs.vae.decode(z).sample) < 1e-5
        assert rel_err(mine.text_encoder(ids)[0], theirs.text_encoder(ids).last_hidden_state) < 1e-5
    theirs.scheduler = DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = theirs("a photo of a cat", latents=latents.clone(), num_inference_steps=6, guidance_scale=5.0, output_type="np").images[0]
    got = np.asarray(mine("a photo of a cat", latents=latents, num_inference_steps=6, guidance_scale=5.0, sampler="ddim", sigma_schedule="leading", height=16, width=16).images[0], dtype=np.float32) / 255
    assert np.abs(got - expected).max() <= 1e-3 + 0.5 / 255


def test_single_file_needs_a_tokenizer_and_refuses_pickles(sd, tmp_path):
    from ldm_layout import write_ldm_checkpoint

    _, ours, folder = sd
    ckpt = tmp_path / "model.safetensors"
    write_ldm_checkpoint(ours, ckpt, open_clip=ours.unet.config.linear_projection)
    with pytest.raises(UnfogError, match="carries no tokenizer"):
        Pipeline.from_pretrained(ckpt)
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(UnfogError, match="can run arbitrary code.*unfog convert --allow-pickle"):
        Pipeline.from_pretrained(tmp_path / "model.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(UnfogError, match="not a readable safetensors file"):
        Pipeline.from_pretrained(tmp_path / "bad.safetensors")


def test_convert_every_layout_to_an_unfog_folder(sd, tmp_path):
    from ldm_layout import write_ldm_checkpoint
    from unfog.cli import main

    ref, ours, folder = sd
    ckpt = tmp_path / "model.safetensors"
    write_ldm_checkpoint(ours, ckpt, open_clip=ours.unet.config.linear_projection)
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(ckpt))}, pickle)
    assert main(["convert", str(folder), str(tmp_path / "a")]) == 0
    assert main(["convert", str(ckpt), str(tmp_path / "b"), "--config", str(folder)]) == 0
    assert main(["convert", str(pickle), str(tmp_path / "c")]) == 2 and not (tmp_path / "c").exists()
    assert main(["convert", str(pickle), str(tmp_path / "c"), "--allow-pickle", "--config", str(folder)]) == 0
    kwargs = dict(seed=0, num_inference_steps=4, height=16, width=16, sampler="euler")
    images = [np.asarray(Pipeline.from_pretrained(tmp_path / d)("a red circle", **kwargs).images[0]) for d in "abc"]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    # a failed conversion leaves nothing behind
    assert main(["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "d")]) == 2 and not (tmp_path / "d").exists()


def test_generate_cli_with_diffusers_folder_and_single_file(sd, tmp_path):
    from ldm_layout import write_ldm_checkpoint
    from unfog.cli import main

    _, ours, folder = sd
    ckpt = tmp_path / "model.safetensors"
    write_ldm_checkpoint(ours, ckpt, open_clip=ours.unet.config.linear_projection)
    common = ["--steps", "3", "--height", "16", "--width", "16", "-q"]
    assert main(["generate", "a cat", "--model", str(folder), "-o", str(tmp_path / "x.png"), *common]) == 0
    assert main(["generate", "a cat", "--model", str(ckpt), "--config", str(folder), "-o", str(tmp_path / "y.png"), *common]) == 0


def test_architecture_is_inferred_from_a_single_file(sd, tmp_path):
    from ldm_layout import write_ldm_checkpoint
    from safetensors.torch import load_file

    from unfog.formats.single_file import detect, infer_unet_config, infer_vae_config

    _, ours, _ = sd
    ckpt = tmp_path / "model.safetensors"
    v2 = ours.unet.config.linear_projection
    write_ldm_checkpoint(ours, ckpt, open_clip=v2)
    state = load_file(str(ckpt))
    assert detect(state) == ("sd2" if v2 else "sd1")
    u, c = infer_unet_config(state, detect(state)), ours.unet.config
    assert (u.block_channels, u.layers_per_block, u.attention_levels, u.context_dim, u.linear_projection) == (c.block_channels, c.layers_per_block, c.attention_levels, c.context_dim, c.linear_projection)
    assert infer_vae_config(state).block_channels == ours.vae.config.block_channels


def _picture(seed, size=16):
    rng = np.random.default_rng(seed)
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _mask(size=16):
    from PIL import Image

    m = np.zeros((size, size), dtype=np.uint8)
    m[4:12, 2:10] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("scheduler_cls, sampler", [("DDIMScheduler", "ddim"), ("EulerAncestralDiscreteScheduler", "euler_ancestral")])
def test_img2img_matches_diffusers(sd, scheduler_cls, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref, ours, _ = sd
    pipe = StableDiffusionImg2ImgPipeline(**{k: getattr(ref, k) for k in ("vae", "text_encoder", "tokenizer", "unet")}, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False,
                                          scheduler=getattr(diffusers, scheduler_cls).from_config(ref.scheduler.config, timestep_spacing="leading"))
    init = _picture(0)
    kwargs = dict(num_inference_steps=10, guidance_scale=5.0, strength=0.6)
    expected = pipe("a red circle", image=init, generator=torch.Generator().manual_seed(7), output_type="np", **kwargs).images[0]
    got = ours("a red circle", image=init, sampler=sampler, sigma_schedule="leading", generator=torch.Generator().manual_seed(7), **kwargs).images[0]
    assert np.abs(np.asarray(got, dtype=np.float32) / 255 - expected).max() <= 1e-3 + 0.5 / 255


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_an_ordinary_model_matches_diffusers(sd, strength):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    ref, ours, _ = sd
    pipe = StableDiffusionInpaintPipeline(**{k: getattr(ref, k) for k in ("vae", "text_encoder", "tokenizer", "unet")}, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False, scheduler=DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=True))
    init, mask = _picture(1), _mask()
    kwargs = dict(num_inference_steps=8, guidance_scale=4.0, strength=strength, height=16, width=16)
    expected = pipe("a blue square", image=init, mask_image=mask, generator=torch.Generator().manual_seed(3), output_type="np", **kwargs).images[0]
    got = ours("a blue square", image=init, mask_image=mask, sampler="ddim", sigma_schedule="leading", generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    assert np.abs(np.asarray(got, dtype=np.float32) / 255 - expected).max() <= 1e-3 + 0.5 / 255


def test_nine_channel_inpainting_model_matches_diffusers(sd, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    _, _, folder = sd
    ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)  # fresh components, untouched by other tests
    torch.manual_seed(1)
    cfg = dict(ref.unet.config)
    cfg["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    pipe = StableDiffusionInpaintPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=unet, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False, scheduler=DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=True))
    pipe.save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    ours = Pipeline.from_pretrained(tmp_path / "inpaint")
    assert ours.is_inpainting_model
    with pytest.raises(UnfogError, match="inpainting model"):
        ours("a cat", height=16, width=16)
    init, mask = _picture(2), _mask()
    kwargs = dict(num_inference_steps=8, guidance_scale=4.0, height=16, width=16)
    expected = pipe("a cat", image=init, mask_image=mask, generator=torch.Generator().manual_seed(5), output_type="np", **kwargs).images[0]
    got = ours("a cat", image=init, mask_image=mask, sampler="ddim", sigma_schedule="leading", generator=torch.Generator().manual_seed(5), **kwargs).images[0]
    assert np.abs(np.asarray(got, dtype=np.float32) / 255 - expected).max() <= 1e-3 + 0.5 / 255


def test_the_same_weights_get_the_same_defaults_and_options_are_never_dropped(sd, tmp_path):
    from ldm_layout import write_ldm_checkpoint

    _, ours, folder = sd
    ckpt = tmp_path / "model.safetensors"
    write_ldm_checkpoint(ours, ckpt, open_clip=ours.unet.config.linear_projection)
    from_file = Pipeline.from_pretrained(ckpt, config=folder)
    assert from_file.defaults == ours.defaults
    assert ours.defaults.num_inference_steps == 50 and ours.defaults.sampler == "ddim"  # the folder's DDIMScheduler
    assert ours.defaults.height == 16  # the U-Net's sample_size × the autoencoder's factor
    # Options apply everywhere or are refused; nothing is silently dropped.
    assert Pipeline.from_pretrained(folder, prediction_type="sample").scheduler.prediction_type == "sample"
    assert Pipeline.from_pretrained(ckpt, config=folder, prediction_type="sample").scheduler.prediction_type == "sample"
    skipped = Pipeline.from_pretrained(folder, clip_skip=1).text_encoder.config.skip_last_layers
    assert skipped == ours.text_encoder.config.skip_last_layers + 1
    for bad in ({"config": folder}, {"tokenizer": folder / "tokenizer"}):
        with pytest.raises(UnfogError, match="apply to single-file checkpoints"):
            Pipeline.from_pretrained(folder, **bad)
    with pytest.raises(UnfogError, match="unknown prediction type"):
        Pipeline.from_pretrained(folder, prediction_type="velocity")
    with pytest.raises(TypeError):
        Pipeline.from_pretrained(folder, clip_skp=1)


# Stable Diffusion's scheduler configs as shipped (runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1, scheduler/scheduler_config.json).
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
DIFFUSERS_FOR = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
                 "heun": "HeunDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler", "lms": "LMSDiscreteScheduler", "uni_pc": "UniPCMultistepScheduler",
                 "lcm": "LCMScheduler"}


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def shipped(request, tmp_path_factory):
    """A tiny SD model saved by diffusers with the real SD 1.5 or 2.1 scheduler config."""
    root = tmp_path_factory.mktemp(request.param)
    ref = build_sd(root, v2=request.param == "sd21")
    config = SD15_SCHEDULER if request.param == "sd15" else SD21_SCHEDULER
    (root / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return ref, Pipeline.from_pretrained(root / "sd"), config


@pytest.mark.parametrize("sampler", sorted(DIFFUSERS_FOR))
def test_samplers_reproduce_diffusers_on_the_models_own_scheduler_config(shipped, sampler):
    ref, ours, config = shipped
    ref.scheduler = getattr(diffusers, DIFFUSERS_FOR[sampler]).from_config(config)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=8, guidance_scale=6.0, height=16, width=16)
    expected = ref("a photo of a cat", latents=latents.clone(), output_type="np", generator=torch.Generator().manual_seed(11), **kwargs).images[0]
    got = ours("a photo of a cat", latents=latents, sampler=sampler, generator=torch.Generator().manual_seed(11), **kwargs).images[0]
    assert np.abs(np.asarray(got, dtype=np.float32) / 255 - expected).max() <= 1.5 / 255  # within one level of 8 bits
    # Where diffusers' schedule differs from the common definition, the common one stays an explicit choice.
    finals = {}
    for match in (True, False):
        seen = []
        ours("a photo of a cat", latents=latents, sampler=sampler, match_diffusers=match, callback=lambda i, x, x0: seen.append(x), **kwargs)
        finals[match] = seen[-1]
    assert not torch.equal(finals[True], finals[False])  # both shipped configs leave the spacing or DDIM's end to diffusers


# bh1 is left out: diffusers' bh1 returns NaN on its last step to σ = 0, where B(h) = h is infinite
# (unfog's last step lands on the x_0 estimate); it is checked by convergence in test_samplers.py.
@pytest.mark.parametrize("order, variant", [(1, "bh2"), (3, "bh2")])
def test_uni_pc_orders_and_variants_match_diffusers(shipped, order, variant):
    ref, ours, config = shipped
    ref.scheduler = diffusers.UniPCMultistepScheduler.from_config(config, solver_order=order, solver_type=variant)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    kwargs = dict(num_inference_steps=7, guidance_scale=5.0, height=16, width=16)
    expected = ref("a photo of a cat", latents=latents.clone(), output_type="np", **kwargs).images[0]
    got = ours("a photo of a cat", latents=latents, sampler="uni_pc", sampler_options={"order": order, "variant": variant}, **kwargs).images[0]
    assert np.abs(np.asarray(got, dtype=np.float32) / 255 - expected).max() <= 1.5 / 255


def test_every_sampler_and_schedule_runs_on_a_stable_diffusion_folder(shipped):
    from unfog.diffusion import SIGMA_SCHEDULES
    from unfog.samplers import SAMPLERS

    _, ours, _ = shipped
    kwargs = dict(num_inference_steps=4, height=16, width=16, seed=1)
    # Each must run to the end (a NaN result is an error) and give the requested image.
    for sampler in SAMPLERS:
        assert ours("a cat", sampler=sampler, **kwargs).images[0].size == (16, 16)
    for schedule in SIGMA_SCHEDULES:
        assert ours("a cat", sampler="dpmpp_2m", sigma_schedule=schedule, **kwargs).images[0].size == (16, 16)


def test_inpainting_keeps_the_clean_image_after_the_last_step_on_the_shipped_configs(shipped):
    # With SD 1.5/2.1's DDIM config (set_alpha_to_one false) the last sigma is σ(0) = 0.029, not
    # 0: the known region had been re-noised to it, where diffusers puts the image back (7 levels).
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    ref, ours, config = shipped
    pipe = StableDiffusionInpaintPipeline(**{k: getattr(ref, k) for k in ("vae", "text_encoder", "tokenizer", "unet")}, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False, scheduler=DDIMScheduler.from_config(config))
    init, mask = _picture(1), _mask()
    kwargs = dict(num_inference_steps=8, guidance_scale=4.0, strength=0.6, height=16, width=16, output_type="latent")
    expected = pipe("a blue square", image=init, mask_image=mask, generator=torch.Generator().manual_seed(3), **kwargs).images
    got = ours("a blue square", image=init, mask_image=mask, sampler="ddim", generator=torch.Generator().manual_seed(3), **kwargs).latents
    known = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None], size=got.shape[-2:])[0, 0] < 0.5
    assert known.any() and (~known).any()
    torch.testing.assert_close(got[..., known], expected[..., known], rtol=0, atol=1e-5)
    assert (got - expected)[..., ~known].abs().max() < 0.01  # the repainted region as before
