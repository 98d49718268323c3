import math

import pytest
import torch

from unfog.diffusion import (
    SIGMA_SCHEDULES, DiscreteDenoiser, SchedulerConfig, karras_sigmas, loss_weight, make_betas, make_sigmas,
    q_sample, sigmas_from_alphas_cumprod, snr, spaced_timesteps, target, to_x0_and_eps,
)
from unfog.diffusion.schedules import alphas_cumprod_from_betas
from unfog.errors import UnfogError


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_schedules_are_valid(schedule):
    betas = make_betas(schedule, 1000, 0.0001, 0.02)
    ac = alphas_cumprod_from_betas(betas)
    assert betas.shape == (1000,) and (betas > 0).all() and (betas < 1).all()
    assert (ac[1:] < ac[:-1]).all()


def test_scaled_linear_is_stable_diffusions():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert alphas_cumprod_from_betas(betas)[-1].item() == pytest.approx(0.0047, abs=2e-4)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(schedule):
    plain = alphas_cumprod_from_betas(make_betas(schedule))
    ac = alphas_cumprod_from_betas(make_betas(schedule, zero_terminal_snr=True))
    assert ac[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert ac[0].item() == pytest.approx(plain[0].item(), rel=1e-9)
    assert math.isfinite(sigmas_from_alphas_cumprod(ac)[-1].item())


def test_forward_process_moments_match_closed_form():
    ac = alphas_cumprod_from_betas(make_betas("linear", 1000, 1e-4, 0.02)).float()
    x0 = torch.tensor([0.7, -0.3, 1.5])
    g = torch.Generator().manual_seed(0)
    for t in (0, 250, 999):
        n = 200_000
        xt = q_sample(x0.expand(n, 3), torch.full((n,), t), torch.randn(n, 3, generator=g), ac)
        torch.testing.assert_close(xt.mean(0), ac[t].sqrt() * x0, atol=0.01, rtol=0)
        torch.testing.assert_close(xt.var(0), (1 - ac[t]).expand(3), atol=0.01, rtol=0.02)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_targets_round_trip(pred):
    ac = alphas_cumprod_from_betas(make_betas("scaled_linear")).float()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 200, 500, 800, 998])
    xt = q_sample(x0, t, eps, ac)
    out = target(pred, x0, eps, t, ac)
    x0_hat, eps_hat = to_x0_and_eps(pred, out, xt, t, ac)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(eps_hat, eps, atol=2e-3, rtol=1e-3)


def test_stable_diffusion_timestep_spacings():
    assert spaced_timesteps(1000, 10, "leading", 1).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert spaced_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert spaced_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("schedule", SIGMA_SCHEDULES)
def test_sigma_schedules_decrease_to_zero(schedule):
    ac = SchedulerConfig().alphas_cumprod()
    s = make_sigmas(schedule, 12, ac)
    assert s.ndim == 1 and len(s) == 13 and s[-1] == 0
    assert (s[1:] < s[:-1]).all()


def test_karras_endpoints_and_density():
    s = karras_sigmas(10, 0.03, 14.6)
    assert s[0].item() == pytest.approx(14.6) and s[-1].item() == pytest.approx(0.03)
    # ρ = 7 spends more steps at low noise than a log-linear spacing would.
    assert (s < 1).sum() > 4


def test_bad_schedule_names_say_what_is_valid():
    with pytest.raises(UnfogError, match="cosine"):
        make_betas("quadratic")
    with pytest.raises(UnfogError, match="karras"):
        make_sigmas("nope", 10, SchedulerConfig().alphas_cumprod())
    with pytest.raises(UnfogError, match="positive integer"):
        make_sigmas("karras", 0, SchedulerConfig().alphas_cumprod())


class Oracle(torch.nn.Module):
    """A network that returns the exact target for known x0 and ε."""

    def __init__(self, x0, eps, pred, ac):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.x0, self.eps, self.pred, self.ac = x0, eps, pred, ac

    def forward(self, x_t, t, **cond):
        return target(self.pred, self.x0, self.eps, t.round().long(), self.ac.float())


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_denoiser_recovers_x0_in_sigma_space(pred):
    ac = SchedulerConfig().alphas_cumprod()
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([5, 400, 990])
    sigma = sigmas_from_alphas_cumprod(ac)[t].float()
    den = DiscreteDenoiser(Oracle(x0, eps, pred, ac), ac, pred)
    torch.testing.assert_close(den.sigma_to_t(sigma), t.float(), atol=1e-3, rtol=0)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(den(x, sigma), x0, atol=1e-4, rtol=1e-4)
    assert den.loss(x0, t=t, noise=eps).item() < 1e-10


def test_min_snr_weights():
    s = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(loss_weight("min_snr", "epsilon", s, 5.0), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(loss_weight("min_snr", "sample", s, 5.0), torch.tensor([0.5, 5.0, 5.0]))
    torch.testing.assert_close(loss_weight("min_snr", "v_prediction", s, 5.0), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    torch.testing.assert_close(loss_weight("uniform", "epsilon", s), torch.ones(3))
    ac = SchedulerConfig().alphas_cumprod()
    assert snr(ac, torch.tensor([0])).item() > snr(ac, torch.tensor([999])).item()


def test_trailing_spacing_has_exactly_the_requested_steps():
    for n in (1, 7, 30, 61, 103, 121, 122, 1000):
        t = spaced_timesteps(1000, n, "trailing")
        assert len(t) == n and t[0] == 999 and (t[1:] < t[:-1]).all()


def test_min_snr_epsilon_weight_is_finite_at_zero_snr():
    w = loss_weight("min_snr", "epsilon", torch.tensor([0.0, 1.0, 100.0]))
    assert torch.isfinite(w).all() and w[0] == 1


# ---- ComfyUI's schedules, written out here from their definitions ------------------------------

def comfy_reference(schedule, steps, ac):
    """ComfyUI's schedulers over a discrete model's sigmas, as its samplers.py defines them."""
    import numpy as np
    from scipy import stats

    sig = ((1 - ac) / ac).sqrt()
    log_sig = sig.log()

    def sigma_at(t):  # ComfyUI's ModelSamplingDiscrete.sigma: log-linear between integer timesteps
        lo, hi = int(np.floor(t)), int(np.ceil(t))
        w = t - lo
        return float(((1 - w) * log_sig[lo] + w * log_sig[hi]).exp())

    if schedule == "simple":
        ss = len(sig) / steps
        out = [float(sig[-(1 + int(x * ss))]) for x in range(steps)]
    elif schedule in ("normal", "sgm_uniform"):
        ts = np.linspace(len(sig) - 1, 0, steps + 1)[:-1] if schedule == "sgm_uniform" else np.linspace(len(sig) - 1, 0, steps)
        out = [sigma_at(t) for t in ts]
    else:
        ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (len(sig) - 1))
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(float(sig[int(t)]))
            last = t
    return torch.tensor(out + [0.0])


@pytest.mark.parametrize("schedule", ["simple", "normal", "sgm_uniform", "beta"])
@pytest.mark.parametrize("steps", [1, 4, 13, 30])
def test_comfyui_schedules_match_their_definitions(schedule, steps):
    pytest.importorskip("scipy")
    ac = SchedulerConfig().alphas_cumprod()
    got = make_sigmas(schedule, steps, ac)
    torch.testing.assert_close(got, comfy_reference(schedule, steps, ac).float(), rtol=1e-5, atol=1e-6)
    assert got[0] == pytest.approx(((1 - ac[-1]) / ac[-1]).sqrt().item(), rel=1e-6)  # all start at σ_max


def test_beta_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    from unfog.diffusion.schedules import beta_ppf

    for a, b in ((0.6, 0.6), (2.0, 5.0), (0.5, 3.0)):
        for q in (1e-4, 0.1, 0.37, 0.5, 0.9, 0.9999):
            assert beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), abs=1e-12)


def test_polyexponential_with_rho_one_is_exponential():
    ac = SchedulerConfig().alphas_cumprod()
    torch.testing.assert_close(make_sigmas("polyexponential", 9, ac), make_sigmas("exponential", 9, ac))
