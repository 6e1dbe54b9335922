"""DDPM and DDIM sampling with models whose answers are known in closed form."""

import pytest
import torch

from ditscale.diffusion import create_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")

BASE_ALPHA_BAR = torch.cumprod(1 - create_diffusion("").betas, 0)


def _alpha_bar(t, x):
    return BASE_ALPHA_BAR[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def oracle(x0, learn_sigma=True):
    """Knows x₀ (the model is called with the original 1000-step indices): ε = (x_t − √ᾱ x₀)/√(1 − ᾱ)."""

    def model(x, t, **_):
        a = _alpha_bar(t, x)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model


def gaussian_data_model(mu, s, learn_sigma=True):
    """The exact ε-predictor for data x₀ ~ N(mu, s²): E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ mu) / (ᾱ s² + 1 − ᾱ)."""

    def model(x, t, **_):
        a = _alpha_bar(t, x)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model


@pytest.mark.parametrize("spec", ["", "ddim50", "25", "10,10,10"])
def test_ddim_eta0_with_true_eps_recovers_x0(spec):
    d = create_diffusion(spec)
    x0 = torch.rand(3, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    sample = d.ddim_sample_loop(oracle(x0), x0.shape, generator=torch.Generator().manual_seed(2))
    assert sample.dtype == torch.float32
    assert (sample - x0).abs().max().item() < 1e-5


@pytest.mark.parametrize("spec", ["", "100"])
def test_ddpm_with_true_eps_ends_at_x0(spec):
    d = create_diffusion(spec)
    x0 = torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    sample = d.p_sample_loop(oracle(x0), x0.shape, generator=torch.Generator().manual_seed(4))
    assert (sample - x0).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "sampler, spec, kwargs",
    [
        ("ddpm", "", dict(learn_sigma=False)),
        ("ddpm", "", dict(learn_sigma=False, sigma_small=True)),
        ("ddpm", "", dict(learn_sigma=True)),
        ("ddim", "", dict(learn_sigma=True)),
        ("ddpm", "250", dict(learn_sigma=False)),
    ],
)
def test_samplers_reproduce_gaussian_data_with_the_exact_model(sampler, spec, kwargs):
    """x₀ ~ N(0.5, 0.2²): with the exact ε, either sampler over 1000 steps (and DDPM over 250 respaced
    steps, the model seeing the original indices) gives that distribution."""
    d = create_diffusion(spec, **kwargs)
    loop = d.p_sample_loop if sampler == "ddpm" else d.ddim_sample_loop
    model = gaussian_data_model(0.5, 0.2, kwargs["learn_sigma"])
    x = loop(model, (1000, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(0.5, abs=0.015)  # standard error 0.003
    assert x.std().item() == pytest.approx(0.2, abs=0.012)


def test_ddim_eta1_is_ancestral_sampling_with_posterior_variance():
    """σ_t(η=1)² = β̃_t and the DDIM mean is then the posterior mean: the same draws as DDPM with fixed
    small variances, noise for noise."""
    model = gaussian_data_model(0.3, 0.5, learn_sigma=False)
    d = create_diffusion("50", learn_sigma=False, sigma_small=True)
    ddpm = d.p_sample_loop(model, (4, 1, 3, 3), generator=torch.Generator().manual_seed(5))
    ddim = d.ddim_sample_loop(model, (4, 1, 3, 3), eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(ddpm, ddim, atol=1e-5)


def test_seeded_generator_reproduces_samples():
    d = create_diffusion("20")
    model = gaussian_data_model(0.0, 0.5)
    run = lambda seed, loop: loop(model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    for loop in (d.p_sample_loop, d.ddim_sample_loop):
        assert torch.equal(run(7, loop), run(7, loop))
        assert not torch.allclose(run(7, loop), run(8, loop))


def test_ddim_eta0_is_deterministic_given_the_noise():
    d = create_diffusion("ddim10")
    noise = torch.randn(2, 1, 3, 3)
    model = gaussian_data_model(0.0, 0.5)
    a = d.ddim_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(0))
    b = d.ddim_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_progressive_loops_yield_every_step():
    d = create_diffusion("12")
    model = gaussian_data_model(0.0, 0.5)
    noise = torch.randn(2, 1, 2, 2)
    steps = list(
        d.p_sample_loop_progressive(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(0))
    )
    assert len(steps) == 12 and set(steps[0]) == {"sample", "pred_xstart"}
    final = d.p_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(0))
    assert torch.equal(steps[-1]["sample"], final)
    assert len(list(d.ddim_sample_loop_progressive(model, noise.shape, noise=noise))) == 12


def test_progress_bar_counts_steps(capsys):
    d = create_diffusion("ddim25")
    d.ddim_sample_loop(gaussian_data_model(0.0, 0.5), (1, 1, 2, 2), progress=True)
    assert "25/25" in capsys.readouterr().err


def test_bf16_model_and_model_kwargs_reach_the_model():
    d = create_diffusion("5")
    seen = {}

    def model(x, t, y):
        seen["y"] = y
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=torch.bfloat16)

    y = torch.tensor([3, 4])
    out = d.p_sample_loop(model, (2, 1, 2, 2), model_kwargs={"y": y})
    assert out.dtype == torch.float32 and torch.equal(seen["y"], y)


def test_device_defaults_to_the_models_parameters():
    d = create_diffusion("3", learn_sigma=False)
    net = torch.nn.Conv2d(1, 1, 1)
    out = d.ddim_sample_loop(lambda x, t: net(x), (1, 1, 2, 2))
    assert out.device == next(net.parameters()).device


def test_noise_of_the_wrong_shape_is_refused():
    d = create_diffusion("3")
    with pytest.raises(ValueError, match="noise has shape"):
        d.p_sample_loop(gaussian_data_model(0, 1), (2, 1, 2, 2), noise=torch.randn(1, 1, 2, 2))
