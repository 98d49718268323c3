"""The graph-captured guided denoiser gives every sampler what the eager denoiser gives it.

On a CPU the denoiser runs from the same static buffers without capture, which checks the
buffer logic (x, σ, conditioning, scale, cache); on CUDA the captured graph's replay is compared
with the eager path."""

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image

from unfog import Pipeline
from unfog.nn import Autoencoder, UNet, UNetConfig
from unfog.samplers import CALLS_PER_STEP, SAMPLERS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pixels(out):
    return np.stack([np.asarray(im, dtype=np.int16) for im in out.images])


def latents_of(pipe, **kw):
    """The state after the last step (the final latents), read through a callback."""
    seen = []
    pipe(callback=lambda i, x, x0: seen.append(x.clone()), **kw)
    return seen[-1]


@pytest.fixture(scope="module")
def pair():
    return tiny_pipeline(), tiny_pipeline()


def replays(pipe) -> int:
    return sum(g.calls for g in pipe.denoiser_graphs.values())


def assert_graph_ran(pipe, before: int, calls: int) -> None:
    assert replays(pipe) == before + calls, "the static denoiser was not used for every network call"


def network_calls(sampler: str, steps: int) -> int:
    """Two-evaluation samplers (Heun, DPM-2, …) take one call on the last step to σ = 0."""
    return 2 * steps - 1 if CALLS_PER_STEP[sampler] == 2 else steps


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_static_denoiser_equals_eager_for_every_sampler(pair, sampler, guidance):
    eager, graphed = pair
    graphed.cuda_graphs = True
    kw = dict(prompt=["a red circle", "a blue square"], negative_prompt="a green triangle", sampler=sampler,
              guidance_scale=guidance, num_inference_steps=6, seed=3)
    before = replays(graphed)
    a, b = latents_of(eager, **kw), latents_of(graphed, **kw)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert_graph_ran(graphed, before, network_calls(sampler, 6))


def test_sampler_options_reach_the_sampler(pair):
    eager, graphed = pair
    graphed.cuda_graphs = True
    kw = dict(prompt="a red circle", sampler="ddim", num_inference_steps=5, seed=1, sampler_options={"eta": 0.7})
    before = replays(graphed)
    torch.testing.assert_close(latents_of(graphed, **kw), latents_of(eager, **kw), atol=1e-5, rtol=1e-5)
    assert_graph_ran(graphed, before, 5)
    plain = latents_of(eager, **{**kw, "sampler_options": {}})
    assert not torch.allclose(plain, latents_of(eager, **kw))


def test_graphs_are_cached_per_shape_and_bounded(pair, monkeypatch):
    _, pipe = pair
    pipe.cuda_graphs = True
    monkeypatch.setattr(pipe, "max_denoiser_graphs", 2)
    pipe.denoiser_graphs.clear()
    pipe("a red circle", num_inference_steps=3, seed=0)
    first = next(iter(pipe.denoiser_graphs.values()))
    pipe("a blue square", num_inference_steps=5, seed=1, sampler="euler")  # same shapes: reused
    assert len(pipe.denoiser_graphs) == 1 and first.calls == 8
    pipe("a red circle", num_inference_steps=3, seed=0, height=64, width=64)
    pipe("a red circle", num_inference_steps=2, seed=0)  # the first again: now most recently used
    pipe("a red circle", num_inference_steps=3, seed=0, guidance_scale=1.0)  # unguided: a third shape
    assert len(pipe.denoiser_graphs) == 2 and first in pipe.denoiser_graphs.values()  # the 64×64 one went
    assert first.calls == 10
    pipe.to("cpu")
    assert not pipe.denoiser_graphs  # moved weights invalidate captured graphs


def test_cache_key_holds_what_the_graph_reads_besides_buffers(pair):
    _, pipe = pair
    pipe.cuda_graphs = True
    pipe.denoiser_graphs.clear()
    pipe("a red circle", num_inference_steps=2, seed=0)
    pipe("a red circle", num_inference_steps=2, seed=0, round_timesteps=True)
    assert len(pipe.denoiser_graphs) == 2


def test_round_timesteps_reaches_the_graphed_denoiser(pair):
    eager, graphed = pair
    graphed.cuda_graphs = True
    kw = dict(prompt="a red circle", num_inference_steps=4, seed=0, sigma_schedule="karras", round_timesteps=True)
    rounded = latents_of(eager, **kw)
    torch.testing.assert_close(latents_of(graphed, **kw), rounded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rounded, latents_of(eager, **{**kw, "round_timesteps": False}))


def test_callbacks_and_img2img_and_inpainting(pair):
    eager, graphed = pair
    graphed.cuda_graphs = True
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(np.arange(32)[None, :] < 16, 255, 0).repeat(32, 0).astype(np.uint8))
    for extra in ({"image": image, "strength": 0.6}, {"image": image, "mask_image": mask}):
        kw = dict(prompt="a red circle", num_inference_steps=5, seed=2, sampler="dpmpp_2m_sde", **extra)
        steps_e, steps_g = [], []
        eager(callback=lambda i, x, x0: steps_e.append((i, x0.clone())), **kw)
        before = replays(graphed)
        graphed(callback=lambda i, x, x0: steps_g.append((i, x0.clone())), **kw)
        assert_graph_ran(graphed, before, len(steps_e))  # dpmpp_2m_sde: one network call per step
        assert [i for i, _ in steps_g] == [i for i, _ in steps_e]
        for (_, a), (_, b) in zip(steps_e, steps_g):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_nine_channel_inpainting_model():
    base = tiny_pipeline()
    torch.manual_seed(1)
    unet = UNet(UNetConfig(in_channels=9, out_channels=4, block_channels=[32, 64], layers_per_block=1, attention_levels=[False, True],
                           num_heads=2, context_dim=32, norm_groups=8))
    make = lambda: Pipeline(base.tokenizer, base.text_encoder, unet, Autoencoder(base.vae.config), base.scheduler, base.defaults)  # noqa: E731
    eager, graphed = make(), make()
    graphed.vae.load_state_dict(eager.vae.state_dict())
    graphed.cuda_graphs = True
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    kw = dict(prompt="a red circle", image=image, mask_image=mask, num_inference_steps=4, seed=0)
    torch.testing.assert_close(latents_of(graphed, **kw), latents_of(eager, **kw), atol=1e-5, rtol=1e-5)
    assert next(iter(graphed.denoiser_graphs.values())).concat.shape == (1, 5, 16, 16)  # mask + masked-image latents, a static input


@cuda
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "heun", "dpm_2", "dpmpp_sde"])
def test_cuda_graph_replay_equals_eager(tiny_model_dir, sampler):
    """The captured step on the GPU gives the image the eager GPU path gives for the seed."""
    eager = Pipeline.from_pretrained(tiny_model_dir).to("cuda").optimize(cuda_graphs=False)
    graphed = Pipeline.from_pretrained(tiny_model_dir).to("cuda").optimize()
    assert graphed.cuda_graphs
    kw = dict(prompt=["a red circle", "a blue square"], negative_prompt="a green triangle", sampler=sampler, num_inference_steps=10, seed=5)
    a = latents_of(eager, **kw)
    b = latents_of(graphed, **kw)
    c = latents_of(graphed, **kw)  # replayed from the cache
    assert next(iter(graphed.denoiser_graphs.values())).graph is not None
    # Same kernels and the same fp32 update arithmetic, so at most rare bf16 rounding flips.
    assert ((b - a).norm() / a.norm()).item() < 5e-3
    assert torch.equal(b, c)
    assert np.abs(pixels(graphed(**kw)) - pixels(eager(**kw))).max() <= 2
    # The same captured graph with other values in its buffers: scale, sampler, steps, strength.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for other in ({"guidance_scale": 3.0}, {"sampler": "ddim", "sampler_options": {"eta": 0.5}}, {"sampler": "dpmpp_2m_sde", "num_inference_steps": 7},
                  {"image": image, "strength": 0.5}):
        kw2 = {**kw, **other}
        a, b = latents_of(eager, **kw2), latents_of(graphed, **kw2)
        assert ((b - a).norm() / a.norm()).item() < 5e-3, other
    assert len(graphed.denoiser_graphs) == 1


@cuda
def test_cuda_fast_path_close_to_float32(tiny_model_dir):
    exact = Pipeline.from_pretrained(tiny_model_dir).to("cuda")
    fast = Pipeline.from_pretrained(tiny_model_dir).to("cuda").optimize()
    kw = dict(prompt="a red circle", num_inference_steps=10, seed=0)
    a, b = latents_of(exact, **kw), latents_of(fast, **kw)
    assert ((b - a).norm() / a.norm()).item() < 5e-2  # bfloat16 keeps 8 bits of mantissa


def test_interleaved_generations_of_one_shape_keep_their_own_conditioning(pair):
    eager, graphed = pair
    graphed.cuda_graphs = True
    graphed.denoiser_graphs.clear()
    requests = [graphed.request(p, num_inference_steps=4, seed=k, guidance_scale=g) for k, (p, g) in enumerate((("a red circle", 3.0), ("a blue square", 6.0)))]
    states = [graphed.initial_state(r) for r in requests]
    gens = [graphed.denoise(r, s) for r, s in zip(requests, states)]
    done = [False, False]
    while not all(done):  # one step of each in turn, on one cached graph
        for k, gen in enumerate(gens):
            done[k] = done[k] or next(gen, None) is None
    assert len(graphed.denoiser_graphs) == 1
    for r, s in zip(requests, states):
        alone = eager.initial_state(r)
        for _ in eager.denoise(r, alone):
            pass
        torch.testing.assert_close(s.x, alone.x, atol=1e-5, rtol=1e-5)
