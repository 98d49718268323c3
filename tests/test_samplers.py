"""Samplers on Gaussian data, where the exact denoiser and the exact ODE solution are known."""

import math

import pytest
import torch

from unfog.diffusion import karras_sigmas
from unfog.errors import UnfogError
from unfog.samplers import SAMPLERS, get_sampler, iterate, randn_like, sample_ddim, sample_ddpm, sample_euler_ancestral

MU, S = 0.5, 0.8  # data: x_0 ~ N(MU, S²) in every dimension
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
REQUIRED = ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lms", "dpm_2", "dpm_2_ancestral",
            "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_3m_sde", "uni_pc", "lcm"]
DETERMINISTIC = ["ddim", "euler", "heun", "dpmpp_2m", "dpm_2", "lms", "uni_pc"]


def gaussian_denoiser(x, sigma):
    """E[x_0 | x_0 + σ·n = x] for Gaussian data."""
    s2 = sigma.view(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def sigmas(n):
    return torch.cat([karras_sigmas(n, SIGMA_MIN, SIGMA_MAX), torch.zeros(1)]).float()


def test_registry_has_required_samplers():
    assert set(REQUIRED) <= set(SAMPLERS)


def test_unknown_sampler_lists_valid_ones():
    with pytest.raises(UnfogError) as e:
        get_sampler("plms2")
    for name in REQUIRED:
        assert name in str(e.value)


# First-order samplers converge slowly in the step count; the second-order ones need few steps.
STEPS = {"ddpm": 1000, "ddim": 1000, "euler": 1000, "euler_ancestral": 1000, "heun": 50, "dpmpp_2m": 50, "dpmpp_2m_sde": 100, "lms": 50,
         "dpm_2": 50, "dpm_2_ancestral": 200, "dpmpp_2s_ancestral": 100, "dpmpp_sde": 100, "dpmpp_3m_sde": 100, "uni_pc": 50, "lcm": 1000}


@pytest.mark.parametrize("name", [n for n in REQUIRED if n != "lcm"])  # LCM samples only consistency models exactly
def test_output_distribution_matches_data(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 8, generator=g) * SIGMA_MAX
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas(STEPS[name]), generator=g)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.03)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_error_falls_as_steps_rise(name):
    x_T = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * SIGMA_MAX
    # The probability-flow ODE for Gaussian data scales x - MU by sqrt(S² + σ²).
    exact = MU + (x_T - MU) * S / math.sqrt(S**2 + SIGMA_MAX**2)
    errors = [(SAMPLERS[name](gaussian_denoiser, x_T.clone(), sigmas(n)) - exact).abs().max().item() for n in (10, 20, 40, 80)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.15 * errors[0]


def test_ddpm_equals_ddim_with_eta_one():
    s = sigmas(20)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(3)) * SIGMA_MAX
    a = sample_ddpm(gaussian_denoiser, x.clone(), s, generator=torch.Generator().manual_seed(7))
    b = sample_ddim(gaussian_denoiser, x.clone(), s, generator=torch.Generator().manual_seed(7), eta=1.0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_callback_sees_every_step():
    seen = []
    SAMPLERS["heun"](gaussian_denoiser, torch.randn(4, 2) * SIGMA_MAX, sigmas(6), callback=lambda i, x, x0: seen.append((i, x.shape, x0.shape)))
    assert [i for i, _, _ in seen] == list(range(6))


def test_per_item_generators_make_noise_independent_of_batch():
    x = torch.randn(3, 5)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    batch = randn_like(x, gens)
    alone = randn_like(x[1:2], [torch.Generator().manual_seed(11)])
    torch.testing.assert_close(batch[1:2], alone)
    s = sigmas(8)
    start = torch.randn(3, 5) * SIGMA_MAX
    full = sample_euler_ancestral(gaussian_denoiser, start.clone(), s, generator=[torch.Generator().manual_seed(k) for k in (1, 2, 3)])
    one = sample_euler_ancestral(gaussian_denoiser, start[2:].clone(), s, generator=[torch.Generator().manual_seed(3)])
    torch.testing.assert_close(full[2:], one)


def test_wrong_number_of_generators_is_an_error():
    with pytest.raises(UnfogError, match="one per image"):
        randn_like(torch.zeros(3, 2), [torch.Generator()])


# ---- each sampler against the same algorithm written out step by step ---------------------
# References in float64, op by op, from each algorithm's paper form; DDPM from its posterior.

def _ref_ancestral(s, s1, eta):
    if s1 == 0:
        return 0.0, 0.0
    up = min(s1, eta * (s1**2 * (s**2 - s1**2) / s**2) ** 0.5)
    return (s1**2 - up**2) ** 0.5, up


def reference_step(name, x, x0, x0_prev, h_prev, s, s1, noise, eta):
    """One step of `name` written out directly; returns (x_next, h) with h for the multistep ones."""
    if name == "euler":
        return x + (x - x0) / s * (s1 - s), None
    if name == "euler_ancestral":
        down, up = _ref_ancestral(s, s1, eta)
        return x + (x - x0) / s * (down - s) + noise * up, None
    if name == "ddim":
        a, a1 = 1 / (1 + s**2), 1 / (1 + s1**2)
        std = eta * ((1 - a1) / (1 - a) * (1 - a / a1)) ** 0.5
        out = a1**0.5 * x0 + max(1 - a1 - std**2, 0.0) ** 0.5 * (x - x0) / s + std * noise
        return out / a1**0.5, None
    if name == "ddpm":
        a, a1 = 1 / (1 + s**2), 1 / (1 + s1**2)
        beta = 1 - a / a1
        mean = (a1**0.5 * beta / (1 - a)) * x0 + ((a / a1) ** 0.5 * (1 - a1) / (1 - a)) * x * a**0.5
        return (mean + (beta * (1 - a1) / (1 - a)) ** 0.5 * noise) / a1**0.5, None
    if s1 == 0:
        return x0, None
    h = math.log(s) - math.log(s1)
    if name == "dpmpp_2m":
        d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
        return (s1 / s) * x - math.expm1(-h) * d, h
    eh = eta * h  # dpmpp_2m_sde
    out = (s1 / s) * math.exp(-eh) * x - math.expm1(-h - eh) * x0
    if x0_prev is not None:
        out = out - 0.5 * math.expm1(-h - eh) * (h / h_prev) * (x0 - x0_prev)
    return out + noise * s1 * (-math.expm1(-2 * eh)) ** 0.5, h


def draws_noise(name, s1, eta):
    """Whether a step to s1 injects fresh noise (and so takes a draw from the generator)."""
    return s1 != 0 and (name == "ddpm" or (name in ("euler_ancestral", "ddim", "dpmpp_2m_sde") and eta > 0))


@pytest.mark.parametrize("name, eta", [(n, None) for n in ("euler", "euler_ancestral", "ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde")]
                         + [(n, e) for n in ("euler_ancestral", "ddim", "dpmpp_2m_sde") for e in (0.0, 0.5)])
def test_samplers_equal_the_algorithms_written_out(name, eta):
    options = {} if eta is None else {"eta": eta}
    eta_value = eta if eta is not None else (0.0 if name == "ddim" else 1.0)
    s = sigmas(12).double()
    x_start = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    seen = []
    SAMPLERS[name](lambda x, sig: gaussian_denoiser(x, sig), x_start.clone(), s, generator=torch.Generator().manual_seed(1),
                   callback=lambda i, x, x0: seen.append(x.clone()), **options)
    g = torch.Generator().manual_seed(1)
    ref, prev, h_prev = x_start, None, None
    for i in range(12):
        s0, s1 = s[i].item(), s[i + 1].item()
        noise = torch.randn(64, generator=g, dtype=torch.float32).double() if draws_noise(name, s1, eta_value) else torch.zeros(64, dtype=torch.float64)
        r0 = gaussian_denoiser(ref, s[i].float().expand(1))  # samplers hand the denoiser float32 sigmas
        ref, h_prev = reference_step(name, ref, r0, prev, h_prev, s0, s1, noise, eta_value)
        prev = r0
        torch.testing.assert_close(seen[i], ref, rtol=1e-10, atol=1e-10)


# ---- a sampler as a generator of steps --------------------------------------------------------

def test_iterate_yields_every_step_and_returns_the_samplers_result():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)) * SIGMA_MAX
    s = sigmas(7)
    expected = sample_euler_ancestral(gaussian_denoiser, x.clone(), s, generator=torch.Generator().manual_seed(4))
    gen = iterate(sample_euler_ancestral, gaussian_denoiser, x.clone(), s, generator=torch.Generator().manual_seed(4))
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as done:
            final = done.value
            break
    assert [st.index for st in steps] == list(range(7))
    torch.testing.assert_close(final, expected, rtol=0, atol=0)
    torch.testing.assert_close(steps[-1].x, expected, rtol=0, atol=0)


def test_closing_the_generator_stops_the_sampler():
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    gen = iterate(SAMPLERS["heun"], counting, torch.randn(2, 2) * SIGMA_MAX, sigmas(20))
    for step in gen:
        if step.index == 2:
            break
    gen.close()
    assert len(calls) == 2 * 3  # Heun: two calls for each of steps 0, 1 and 2, none after


def test_iterate_passes_errors_and_state_replacements_through():
    def broken(x, sigma):
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        list(iterate(SAMPLERS["euler"], broken, torch.zeros(1, 2), sigmas(3)))
    zeros = lambda i, x, x0: torch.zeros_like(x)  # noqa: E731
    steps = list(iterate(SAMPLERS["dpmpp_2m"], gaussian_denoiser, torch.randn(1, 2) * SIGMA_MAX, sigmas(3), callback=zeros))
    assert all(torch.equal(st.x, torch.zeros(1, 2)) for st in steps)


def test_iterate_keeps_each_sides_grad_mode_and_the_callers_context():
    import contextvars

    var = contextvars.ContextVar("probe", default="unset")
    var.set("caller")
    seen = []

    def denoiser(x, sigma):
        seen.append((var.get(), torch.is_grad_enabled()))
        return gaussian_denoiser(x, sigma)

    torch.set_grad_enabled(True)
    for _ in iterate(SAMPLERS["euler"], denoiser, torch.randn(1, 2), sigmas(3)):
        assert torch.is_grad_enabled()  # the sampler's no_grad stays on its side
    assert torch.is_grad_enabled()
    assert seen == [("caller", False)] * 3


def test_iterate_must_be_resumed_on_its_own_thread():
    import threading

    gen = iterate(SAMPLERS["euler"], gaussian_denoiser, torch.randn(1, 2), sigmas(3))
    next(gen)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(UnfogError, next, gen)))
    t.start()
    t.join()
    assert "thread that started it" in str(errors[0].value)
    gen.close()


def test_lcm_jumps_to_the_estimate_and_renoises_to_the_next_sigma():
    s = sigmas(4)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * SIGMA_MAX
    seen = []
    SAMPLERS["lcm"](gaussian_denoiser, x, s, generator=torch.Generator().manual_seed(1), callback=lambda i, x_i, x0: seen.append((x_i, x0)))
    g = torch.Generator().manual_seed(1)
    for i, (x_i, x0) in enumerate(seen[:-1]):
        torch.testing.assert_close(x_i, x0 + torch.randn(3, 5, generator=g) * s[i + 1])
    torch.testing.assert_close(seen[-1][0], seen[-1][1])


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_uni_pc_error_falls_with_steps_in_every_order_and_variant(order, variant):
    x_T = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * SIGMA_MAX
    exact = MU + (x_T - MU) * S / math.sqrt(S**2 + SIGMA_MAX**2)
    errors = [(SAMPLERS["uni_pc"](gaussian_denoiser, x_T.clone(), sigmas(n), order=order, variant=variant) - exact).abs().max().item() for n in (8, 16, 32)]
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.3 * errors[0]


def test_dpmpp_sde_at_its_largest_r_stays_real(tiny_pipe):
    """At r = 1 (the documented bound) the midpoint sigma rounds a hair below the next one, and a
    negative square root had made the latents complex."""
    out = tiny_pipe("a red circle", sampler="dpmpp_sde", sampler_options={"r": 1}, num_inference_steps=3, seed=0)
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
