"""Cross-check against an independent implementation: diffusers' DDPM and DDIM schedulers."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ditscale.diffusion import create_diffusion, space_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")

BASE_ALPHA_BAR = torch.cumprod(1 - create_diffusion("").betas, 0)


def model(x, t, **_):
    """Exact ε for data N(0.3, 0.4²), plus a varying learned-Σ channel v = tanh(x)."""
    a = BASE_ALPHA_BAR[t].float().reshape(-1, 1, 1, 1)
    eps = (1 - a).sqrt() * (x - a.sqrt() * 0.3) / (a * 0.16 + 1 - a)
    return torch.cat([eps, torch.tanh(x)], 1)


@pytest.mark.parametrize("ours, theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedules_match(ours, theirs):
    d = create_diffusion("", noise_schedule=ours)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, beta_start=1e-4, beta_end=2e-2)
    assert torch.allclose(d.betas.float(), scheduler.betas, rtol=1e-5, atol=1e-8)
    assert torch.allclose(d.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-4, atol=1e-8)


def test_ddpm_learned_range_loop_matches_diffusers():
    """Same generator, same draws: diffusers takes the initial noise, then one draw per step with t > 0;
    ours draws at t = 0 too but scales it by 0, so the streams line up."""
    spec, shape = "50", (3, 2, 4, 4)
    ours = create_diffusion(spec).p_sample_loop(model, shape, generator=torch.Generator().manual_seed(0))

    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=2e-2,
        variance_type="learned_range",
        clip_sample=False,
    )
    scheduler.set_timesteps(timesteps=sorted(space_timesteps(1000, spec), reverse=True))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    for t in scheduler.timesteps:
        out = model(x, t.repeat(shape[0]))
        x = scheduler.step(out, t, x, generator=g).prev_sample
    assert torch.allclose(ours, x, atol=5e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_loop_matches_diffusers(eta):
    shape = (3, 2, 4, 4)
    ours = create_diffusion("ddim50").ddim_sample_loop(
        model, shape, eta=eta, generator=torch.Generator().manual_seed(1)
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=2e-2,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == sorted(space_timesteps(1000, "ddim50"), reverse=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    for t in scheduler.timesteps:
        eps = model(x, t.repeat(shape[0]))[:, :2]
        x = scheduler.step(eps, t, x, eta=eta, generator=g if eta > 0 else None).prev_sample
    assert torch.allclose(ours, x, atol=5e-5, rtol=0)


def test_q_sample_matches_add_noise():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2)
    x0, noise, t = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.tensor([0, 10, 500, 999])
    ours = create_diffusion("").q_sample(x0, t, noise=noise)
    assert torch.allclose(ours, scheduler.add_noise(x0, noise, t), atol=1e-5)
