import numpy as np
import pytest
import torch

from conftest import tiny_pipeline
from unfog import Pipeline
from unfog.diffusion import classifier_free_guidance, make_sigmas
from unfog.samplers import SAMPLERS


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_same_seed_gives_identical_pixels(tiny_pipe):
    a = tiny_pipe("a red circle", seed=5).images[0]
    b = tiny_pipe("a red circle", seed=5).images[0]
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))


def test_different_seeds_differ(tiny_pipe):
    a = tiny_pipe("a red circle", seed=1).images[0]
    b = tiny_pipe("a red circle", seed=2).images[0]
    assert np.abs(pixels(a) - pixels(b)).mean() > 1


def test_numpy_integers_are_taken_as_the_ints_they_are(tiny_pipe):
    """Values from numpy (a seed from np.random, a size from an array) were refused as "not an int"."""
    a = tiny_pipe("a red circle", seed=np.int64(5), num_inference_steps=np.int32(3), height=np.int64(32), width=np.uint16(32),
                  num_images_per_prompt=np.int8(2))
    b = tiny_pipe("a red circle", seed=[5, 6], num_inference_steps=3, num_images_per_prompt=2)
    assert a.seeds == [5, 6] and all(type(s) is int for s in a.seeds) and type(a.request.height) is int
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a.images, b.images))
    assert tiny_pipe.request("a", seed=[np.int64(1)]).seeds == [1]
    r = tiny_pipe.request("a", deep_cache=np.int64(2), cfg_truncation=np.float32(0.5), sampler="dpmpp_sde", sampler_options={"r": np.float64(0.5)})
    assert (r.deep_cache, r.cfg_truncation, r.sampler_options) == (2, 0.5, {"r": 0.5}) and type(r.deep_cache) is int
    from PIL import Image

    assert tiny_pipe.request("a", image=Image.new("RGB", (32, 32)), strength=np.float32(0.5)).strength == 0.5
    for bad in (np.float64(5.0), np.bool_(True), True, -1):
        with pytest.raises(ValueError, match="seed"):
            tiny_pipe.request("a", seed=bad)


def test_image_k_of_a_batch_equals_its_seed_alone(tiny_pipe):
    batch = tiny_pipe("a blue square", seed=10, num_images_per_prompt=3)
    assert batch.seeds == [10, 11, 12]
    alone = tiny_pipe("a blue square", seed=12)
    assert np.abs(pixels(batch.images[2]) - pixels(alone.images[0])).max() <= 1
    again = tiny_pipe("a blue square", seed=[10, 11, 12], num_images_per_prompt=3)
    for x, y in zip(batch.images, again.images):
        assert np.array_equal(pixels(x), pixels(y))


def test_list_of_prompts_and_reported_seeds_reproduce(tiny_pipe):
    out = tiny_pipe(["a red circle", "a green triangle"], num_images_per_prompt=2)
    assert len(out.images) == 4 and len(out.seeds) == 4
    again = tiny_pipe(["a red circle", "a green triangle"], num_images_per_prompt=2, seed=out.seeds)
    for x, y in zip(out.images, again.images):
        assert np.array_equal(pixels(x), pixels(y))


def test_save_load_round_trip_gives_identical_outputs(tiny_pipe, tiny_model_dir):
    loaded = Pipeline.from_pretrained(tiny_model_dir)
    for name in ("text_encoder", "unet", "vae"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = tiny_pipe("a small purple square", seed=3, guidance_scale=4.0).images[0]
    y = loaded("a small purple square", seed=3, guidance_scale=4.0).images[0]
    assert np.array_equal(pixels(x), pixels(y))


def test_guidance_scale_one_equals_conditional_only(tiny_pipe):
    calls = []
    hook = tiny_pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        out = tiny_pipe("a red circle", seed=4, guidance_scale=1.0, negative_prompt="blue", sampler="euler")
    finally:
        hook.remove()
    assert calls == [1] * 4  # no unconditional half
    ctx = tiny_pipe.encode_prompt(["a red circle"])
    sigmas = make_sigmas(tiny_pipe.scheduler.sigma_schedule, 4, tiny_pipe.denoiser.alphas_cumprod)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)) * (1 + sigmas[0] ** 2).sqrt()
    with torch.inference_mode():
        manual = SAMPLERS["euler"](lambda x, s: tiny_pipe.denoiser(x, s, context=ctx), x, sigmas)
    assert np.array_equal(pixels(out.images[0]), pixels(tiny_pipe.decode(manual)[0]))


def test_guidance_blends_two_halves_in_one_call():
    calls = []

    def den(x, sigma, context):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2)).view(-1, 1)

    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), 0.5)
    x, s = torch.ones(2, 5), torch.ones(2)
    out = classifier_free_guidance(den, cond, uncond, 3.0)(x, s)
    assert calls == [4]
    torch.testing.assert_close(out, torch.full((2, 5), 0.5 + 3.0 * (2.0 - 0.5)))


def test_negative_prompt_changes_the_image(tiny_pipe):
    a = tiny_pipe("a red circle", seed=6, guidance_scale=5.0).images[0]
    b = tiny_pipe("a red circle", seed=6, guidance_scale=5.0, negative_prompt="a blue square").images[0]
    assert not np.array_equal(pixels(a), pixels(b))


def test_latents_argument_replaces_seeded_noise(tiny_pipe):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    a = tiny_pipe("a red circle", latents=noise, seed=0, sampler="euler").images[0]
    b = tiny_pipe("a red circle", seed=9, sampler="euler").images[0]
    assert np.array_equal(pixels(a), pixels(b))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_through_the_pipeline(tiny_pipe, sampler):
    steps = []
    out = tiny_pipe("a green triangle", seed=0, sampler=sampler, num_inference_steps=3, callback=lambda i, x, x0: steps.append(i))
    assert steps == [0, 1, 2] and out.images[0].size == (32, 32)


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_pixel_space_model_and_other_prediction_types(pred, tmp_path):
    pipe = tiny_pipeline(latent=False, prediction_type=pred)
    out = pipe("a red circle", seed=0, height=8, width=12)
    assert out.images[0].size == (12, 8)
    pipe.save_pretrained(tmp_path / "m")
    again = Pipeline.from_pretrained(tmp_path / "m")
    assert again.vae is None and again.scheduler.prediction_type == pred
    assert np.array_equal(pixels(out.images[0]), pixels(again("a red circle", seed=0, height=8, width=12).images[0]))


def test_to_dtype_keeps_schedule_precision(tmp_path, tiny_model_dir):
    pipe = Pipeline.from_pretrained(tiny_model_dir).to("cpu", torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.denoiser.alphas_cumprod.dtype == torch.float64
    ref = Pipeline.from_pretrained(tiny_model_dir)("a red circle", seed=1).images[0]
    low = pipe("a red circle", seed=1).images[0]
    assert np.abs(pixels(ref) - pixels(low)).mean() < 20


def test_long_prompts_are_chunked_not_truncated(tiny_pipe):
    n = tiny_pipe.tokenizer.config.context_length
    long = " ".join(["a red circle"] * n)  # 3n words: several windows
    states = tiny_pipe.encode_prompt([long, "a red circle"])
    windows = -(-3 * n // (n - 2))
    assert states.shape[:2] == (2, windows * n)
    first = tiny_pipe.encode_prompt([" ".join(long.split()[: n - 2])])
    torch.testing.assert_close(states[:1, :n], first[:, :n])
    # a change in the last window changes only that window (truncation would have lost it)
    words = long.split()
    words[-1] = "square"
    changed = tiny_pipe.encode_prompt([" ".join(words), "a red circle"])
    assert changed.shape == states.shape
    torch.testing.assert_close(changed[0, :n], states[0, :n])
    assert not torch.allclose(changed[0, -n:], states[0, -n:])
    out = tiny_pipe(long, seed=0, negative_prompt="blue")
    assert out.images[0].size == (32, 32)


def test_truncation_warns(tiny_pipe):
    long = " ".join(["a red circle"] * tiny_pipe.tokenizer.config.context_length)
    with pytest.warns(UserWarning, match="truncated"):
        tiny_pipe(long, seed=0, long_prompts="truncate")


def test_inpainting_keeps_the_known_latents(tiny_pipe):
    from PIL import Image

    from unfog.images import from_pil

    init = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    finals = []
    tiny_pipe("a blue square", image=init, mask_image=mask, seed=3, callback=lambda i, x, x0: finals.append(x.clone()))
    encoded = tiny_pipe.encode(from_pil(init), [torch.Generator().manual_seed(3)])
    # the right half of the final latents is the encoded picture (same posterior draw)
    torch.testing.assert_close(finals[-1][..., 8:], encoded[..., 8:])
    assert not torch.allclose(finals[-1][..., :8], encoded[..., :8])


def test_img2img_strength_controls_the_start(tiny_pipe):
    from PIL import Image

    init = Image.new("RGB", (32, 32), (40, 80, 230))
    steps = []
    tiny_pipe("a red circle", image=init, strength=0.5, num_inference_steps=10, seed=0, callback=lambda i, x, x0: steps.append(i))
    assert len(steps) == 5
    with pytest.raises(Exception, match="strength"):
        tiny_pipe("a red circle", image=init, strength=0.0)
    with pytest.raises(Exception, match="leaves no step"):
        tiny_pipe("a red circle", image=init, strength=0.05, num_inference_steps=10)


def test_optimize_keeps_images_close(tiny_model_dir):
    plain = Pipeline.from_pretrained(tiny_model_dir)
    fast = Pipeline.from_pretrained(tiny_model_dir).optimize(dtype=torch.bfloat16)
    assert fast.unet.conv_in.weight.dtype == torch.bfloat16 and fast.text_encoder.final_layer_norm.weight.dtype == torch.float32
    a = pixels(plain("a red circle", seed=2).images[0])
    b = pixels(fast("a red circle", seed=2).images[0])
    assert np.abs(a - b).mean() < 6  # bf16 rounding, not a different picture


def test_half_precision_decode_overflow_falls_back_to_float32(tiny_model_dir):
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    # Latents far outside float16's range (65504), as a diverged sample would give.
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 1e5 * pipe.vae.config.scaling_factor
    reference = pixels(pipe.decode(z)[0])
    pipe.vae.to(torch.float16)
    with pytest.warns(UserWarning, match="overflowed in float16"):
        image = pipe.decode(z)[0]
    assert np.abs(pixels(image) - reference).max() <= 1
    assert next(pipe.vae.parameters()).dtype == torch.float16  # the fast dtype is kept for next time


def test_a_batch_is_decoded_a_few_images_at_a_time(tiny_model_dir, monkeypatch):
    """Eight large images decoded as one batch held every image's full-size activations at once;
    the decode now takes at most DECODE_PIXELS output pixels per autoencoder call."""
    import unfog.pipeline as pipeline_module

    pipe = Pipeline.from_pretrained(tiny_model_dir)
    z = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    whole = [pixels(im) for im in pipe.decode(z)]
    batches = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    monkeypatch.setattr(pipeline_module, "DECODE_PIXELS", 2 * 32 * 32)  # two 32×32 images per call
    try:
        parts = [pixels(im) for im in pipe.decode(z)]
    finally:
        hook.remove()
    assert batches == [2, 2, 1]
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(whole, parts))


def test_tiled_decode_matches_whole_decode(tiny_model_dir):
    pipe = Pipeline.from_pretrained(tiny_model_dir)
    z = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(1))
    whole = pixels(pipe.decode(z)[0])
    other = pixels(pipe.decode(torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(2)))[0])
    pipe.decode_tile = 16
    tiled = pixels(pipe.decode(z)[0])
    assert tiled.shape == whole.shape == (80, 112, 3)
    # Tiles cannot see the whole picture (the mid-block attention is global), so they are an
    # approximation: close to the whole decode, far from the decode of other latents.
    assert np.abs(tiled - whole).mean() < 0.3 * np.abs(other - whole).mean()


@pytest.mark.slow
def test_optimize_with_compile_matches_eager(tiny_model_dir):
    eager = Pipeline.from_pretrained(tiny_model_dir)
    compiled = Pipeline.from_pretrained(tiny_model_dir).optimize(dtype=torch.float32, channels_last=False, compile=True)
    a = pixels(eager("a red circle", seed=4, num_inference_steps=2).images[0])
    b = pixels(compiled("a red circle", seed=4, num_inference_steps=2).images[0])
    assert np.abs(a - b).max() <= 2
    assert "_orig_mod" not in "".join(compiled.unet.state_dict())


def test_should_stop_interrupts_within_one_unet_call(tiny_pipe):
    from unfog.pipeline import Interrupted

    from unfog.nn.layers import ResBlock, TransformerBlock

    asked, checked = [], []

    def should_stop():
        asked.append(1)
        if len(asked) == 1:
            checked.extend(bool(m._forward_pre_hooks) for m in tiny_pipe.unet.modules() if isinstance(m, (ResBlock, TransformerBlock)))
        return len(asked) > 2  # a stop request arrives during the first U-Net call

    blocks = []
    hook = tiny_pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *a: blocks.append("mid"))
    request = tiny_pipe.request("a red circle", num_inference_steps=4, seed=0)
    state = tiny_pipe.initial_state(request)
    try:
        with pytest.raises(Interrupted):
            for _ in tiny_pipe.denoise(request, state, should_stop):
                pass
    finally:
        hook.remove()
    assert blocks == []  # stopped before the first call reached the middle block
    # Asked before every transformer block too, not only the residual ones (one attention layer
    # at 1024² can take seconds on a CPU).
    assert checked and all(checked)
    assert not tiny_pipe.unet.down_blocks[0].resnets[0]._forward_pre_hooks  # the checks are removed afterwards
    assert tiny_pipe("a red circle", seed=0).images  # and the pipeline still works


def test_cfg_truncation_skips_the_unconditional_half_late_in_the_schedule(tiny_pipe):
    calls = []
    hook = tiny_pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    kw = dict(seed=3, num_inference_steps=8, sampler="euler", guidance_scale=4.0)
    try:
        full = tiny_pipe("a red circle", **kw).latents
        calls.clear()
        cut = tiny_pipe("a red circle", cfg_truncation=0.75, **kw).latents
        assert calls == [2] * 6 + [1] * 2  # the last quarter of the steps without the unconditional half
        calls.clear()
        same = tiny_pipe("a red circle", cfg_truncation=1.0, **kw).latents
        assert calls == [2] * 8
    finally:
        hook.remove()
    assert torch.equal(same, full) and not torch.equal(cut, full)
    with pytest.raises(__import__("unfog.errors", fromlist=["UnfogError"]).UnfogError, match="cfg_truncation"):
        tiny_pipe("a red circle", cfg_truncation=1.5)


def test_deep_cache_runs_the_deep_blocks_every_k_calls(tiny_pipe):
    deep, calls = [], []
    hooks = [tiny_pipe.unet.mid_block.resnets[0].register_forward_hook(lambda m, a, o: deep.append(1)),
             tiny_pipe.unet.register_forward_hook(lambda m, a, o: calls.append(1))]
    kw = dict(seed=5, num_inference_steps=6, sampler="euler", guidance_scale=3.0)
    try:
        full = tiny_pipe("a red circle", **kw).latents
        same = tiny_pipe("a red circle", deep_cache=1, **kw).latents
        deep.clear(), calls.clear()
        cached = tiny_pipe("a red circle", deep_cache=3, **kw).latents
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(same, full)  # every call whole: exactly the plain computation
    assert len(calls) == 6 and len(deep) == 2  # calls 0 and 3 whole, the others shallow
    assert not torch.equal(cached, full) and torch.isfinite(cached).all()
    with pytest.raises(__import__("unfog.errors", fromlist=["UnfogError"]).UnfogError, match="deep_cache"):
        tiny_pipe("a red circle", deep_cache=0)


def test_generations_sharing_a_pipeline_keep_their_own_deep_cache(tiny_pipe):
    # The cache had been an attribute of the shared U-Net: a generation interleaved with one
    # using deep_cache (two threads, or two of denoise's generators) took the other's features.
    kw = dict(num_inference_steps=6, sampler="euler", guidance_scale=3.0)
    alone = [tiny_pipe(p, seed=s, deep_cache=d, **kw).latents for p, s, d in (("a red circle", 1, 3), ("a blue square", 7, None))]
    requests = [tiny_pipe.request("a red circle", seed=1, deep_cache=3, **kw), tiny_pipe.request("a blue square", seed=7, **kw)]
    states = [tiny_pipe.initial_state(r) for r in requests]
    for _ in __import__("itertools").zip_longest(*(tiny_pipe.denoise(r, st) for r, st in zip(requests, states))):
        pass  # (to the end of both: a generation's latents are set when its sampler returns)
    for st, lone in zip(states, alone):
        torch.testing.assert_close(st.x, lone, rtol=0, atol=0)


def test_warm_up_runs_the_unet_at_each_size(tiny_model_dir):
    """warm_up builds what a first call of a shape builds (a compiled U-Net, CUDA graphs): one
    short guided generation per size, the model's default size when none is given."""
    from unfog import Pipeline

    pipe = Pipeline.from_pretrained(tiny_model_dir)
    shapes = []
    pipe.unet.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    assert len(pipe.warm_up([(32, 48), (16, 16)])) == 2
    f, c = pipe.vae_factor, pipe.latent_channels
    assert set(shapes) == {(2, c, 32 // f, 48 // f), (2, c, 16 // f, 16 // f)}  # the CFG batch of 2, at each size's latents
    shapes.clear()
    pipe.warm_up()
    default = pipe.defaults
    assert set(shapes) == {(2, c, default.height // f, default.width // f)}


def test_encode_prompt_takes_one_string_as_one_prompt(tiny_pipe):
    """A string had been taken as a list of one-character prompts, silently (diffusers takes a string)."""
    import pytest as _pytest

    assert torch.equal(tiny_pipe.encode_prompt("a red circle"), tiny_pipe.encode_prompt(["a red circle"]))
    for bad in ([], [None], 5):
        with _pytest.raises(ValueError, match="prompts must be a string or a non-empty list of strings"):
            tiny_pipe.encode_prompt(bad)


def test_warm_up_takes_a_list_of_sizes(tiny_pipe):
    """One (height, width) pair given bare, or a string, had been a raw TypeError or ValueError."""
    import pytest as _pytest

    assert len(tiny_pipe.warm_up([(32, 32)])) == 1
    for bad in ((32, 32), "32x32", [(32,)]):
        with _pytest.raises(ValueError, match=r"sizes must be a list of \(height, width\) pairs"):
            tiny_pipe.warm_up(bad)
