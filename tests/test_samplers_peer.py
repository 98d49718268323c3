"""Each sampler against k-diffusion's function of the same name (an independent implementation),
on an analytic Gaussian-mixture denoiser, from the same start and, for the stochastic ones,
with the same noise passed in."""

import hashlib

import pytest
import torch
from kdiffusion_ref import load_sampling

from unfog.diffusion import karras_sigmas
from unfog.samplers import SAMPLERS, BrownianNoise

# Data: every dimension drawn from this mixture of 1-D Gaussians (weight, mean, std).
MIXTURE = [(0.3, -1.2, 0.25), (0.5, 0.4, 0.4), (0.2, 1.5, 0.15)]


def mixture_denoiser(x, sigma):
    """E[x_0 | x_0 + σ·n = x] for the mixture, exactly."""
    s2 = sigma.double().view(-1, *([1] * (x.ndim - 1))) ** 2
    xd = x.double()
    logs, means = [], []
    for w, mu, sd in MIXTURE:
        var = sd**2 + s2
        logs.append(torch.log(torch.tensor(w, dtype=torch.float64)) - 0.5 * torch.log(var) - (xd - mu) ** 2 / (2 * var))
        means.append(mu + sd**2 / var * (xd - mu))
    resp = torch.softmax(torch.stack(logs), dim=0)
    return (resp * torch.stack(means)).sum(0).to(x.dtype)


def fixed_noise(shape):
    """A noise sampler that is a fixed function of the step's two sigmas, so that two samplers
    given it draw the same noise whatever their order of draws."""
    def sample(sigma, sigma_next):
        key = f"{float(sigma):.6g}:{float(sigma_next):.6g}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:6], "little")
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sample


def schedule(n):
    return torch.cat([karras_sigmas(n, 0.03, 14.6), torch.zeros(1)]).double()


def start(n=256):
    return torch.randn(4, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


DETERMINISTIC = {"euler": {}, "heun": {}, "dpm_2": {}, "lms": {}, "dpmpp_2m": {}}
STOCHASTIC = {
    "euler_ancestral": [{}, {"eta": 0.5, "s_noise": 0.8}],
    "dpm_2_ancestral": [{}, {"eta": 0.7}],
    "dpmpp_2s_ancestral": [{}, {"eta": 0.5}],
    "dpmpp_sde": [{}, {"eta": 0.6, "s_noise": 0.9}, {"r": 0.4}],
    "dpmpp_2m_sde": [{}, {"solver_type": "heun"}, {"eta": 0.4, "s_noise": 0.7}],
    "dpmpp_3m_sde": [{}, {"eta": 0.3}],
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
@pytest.mark.parametrize("steps", [3, 12])
def test_deterministic_samplers_equal_k_diffusion(name, steps):
    K = load_sampling()
    s, x = schedule(steps), start()
    ours = SAMPLERS[name](mixture_denoiser, x.clone(), s)
    theirs = getattr(K, f"sample_{name}")(mixture_denoiser, x.clone(), s, disable=True)
    assert rel(ours, theirs) < 1e-5


@pytest.mark.parametrize("name, options", [(n, o) for n, opts in STOCHASTIC.items() for o in opts])
def test_stochastic_samplers_equal_k_diffusion_with_the_same_noise(name, options):
    K = load_sampling()
    s, x = schedule(10), start()
    ours = SAMPLERS[name](mixture_denoiser, x.clone(), s, noise_sampler=fixed_noise(x.shape), **options)
    theirs = getattr(K, f"sample_{name}")(mixture_denoiser, x.clone(), s, disable=True, noise_sampler=fixed_noise(x.shape), **options)
    assert rel(ours, theirs) < 1e-5


def test_churn_matches_karras_algorithm_2_in_distribution():
    """With churn the noise comes from our generator and k-diffusion's global RNG, so the two
    agree in distribution: 20,000 samples each, compared by the two-sample Kolmogorov–Smirnov
    distance (its 0.1 % critical value at these sizes is 0.0195)."""
    K = load_sampling()
    s = schedule(12)
    x = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 14.6
    options = {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 10.0, "s_noise": 1.003}
    for name in ("euler", "heun", "dpm_2"):
        ours = SAMPLERS[name](mixture_denoiser, x.clone(), s, generator=torch.Generator().manual_seed(2), **options).flatten()
        torch.manual_seed(3)
        theirs = getattr(K, f"sample_{name}")(mixture_denoiser, x.clone(), s, disable=True, **options).flatten()
        grid = torch.linspace(-2.5, 2.5, 501, dtype=torch.float64)
        cdf = lambda v: (v[None, :] <= grid[:, None]).double().mean(1)  # noqa: E731
        assert (cdf(ours) - cdf(theirs)).abs().max() < 0.0195, name
        plain = SAMPLERS[name](mixture_denoiser, x[:256].clone(), s)
        assert not torch.allclose(ours[:256].view(-1, 1), plain)  # churn changed the path


def test_brownian_noise_is_k_diffusions_brownian_tree():
    """noise="brownian" draws what k-diffusion's BrownianTreeNoiseSampler draws for the same
    seeds, so an SDE sampler reproduces a k-diffusion-based tool's image from the same start."""
    K = load_sampling()
    s, x = schedule(8).float(), start(64).float()
    seeds = [11, 12, 13, 14]
    theirs_noise = K.BrownianTreeNoiseSampler(x, s[s > 0].min(), s.max(), seed=seeds)
    ours_noise = BrownianNoise(x, s, seeds)
    for a, b in zip(s.tolist(), s.tolist()[1:-1]):
        torch.testing.assert_close(ours_noise(a, b), theirs_noise(torch.tensor(a), torch.tensor(b)), rtol=1e-4, atol=1e-5)
    gens = [torch.Generator().manual_seed(k) for k in seeds]
    ours = SAMPLERS["dpmpp_sde"](mixture_denoiser, x.clone(), s, generator=gens, noise="brownian")
    theirs = K.sample_dpmpp_sde(mixture_denoiser, x.clone(), s, disable=True, noise_sampler=K.BrownianTreeNoiseSampler(x, s[s > 0].min(), s.max(), seed=seeds))
    assert rel(ours, theirs) < 1e-3  # float32 states, the same noise to 1e-5
    # Image k's noise comes from its own seed only.
    alone = SAMPLERS["dpmpp_sde"](mixture_denoiser, x[2:3].clone(), s, generator=[torch.Generator().manual_seed(13)], noise="brownian")
    torch.testing.assert_close(alone, ours[2:3], rtol=1e-5, atol=1e-5)
