"""Gaussian diffusion against closed forms: q(x_t | x₀), the posterior, learned Σ, and the hybrid loss."""

import math

import pytest
import torch

from ditscale.diffusion import GaussianDiffusion, create_diffusion
from ditscale.diffusion.losses import discretized_gaussian_log_likelihood

T = 1000
BETAS = [1e-4 + (2e-2 - 1e-4) * i / (T - 1) for i in range(T)]  # the paper's schedule, written out


def alpha_bar(t: int) -> float:
    return math.prod(1.0 - b for b in BETAS[: t + 1])


def posterior_by_product_of_gaussians(x0: float, xt: float, t: int) -> tuple[float, float]:
    """q(x_{t−1} | x_t, x₀) ∝ q(x_{t−1} | x₀) · q(x_t | x_{t−1}) (Bayes), both Gaussian in x_{t−1}."""
    prior_mean, prior_var = math.sqrt(alpha_bar(t - 1)) * x0, 1.0 - alpha_bar(t - 1)
    a, lik_var = math.sqrt(1.0 - BETAS[t]), BETAS[t]  # x_t = a·x_{t−1} + N(0, β_t)
    precision = 1.0 / prior_var + a * a / lik_var
    return (prior_mean / prior_var + a * xt / lik_var) / precision, 1.0 / precision


def oracle(diffusion, x0, log_var_frac=None):
    """A model that knows x₀: ε = (x_t − √ᾱ x₀) / √(1 − ᾱ), optional learned-Σ channels set to v."""
    ab = torch.cumprod(1 - torch.tensor(BETAS, dtype=torch.float64), 0)

    def model(x, t, **_):
        a = ab[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if log_var_frac is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, log_var_frac)], dim=1)

    return model


@pytest.fixture(scope="module")
def diffusion():
    return create_diffusion("")


def test_schedule_is_the_papers(diffusion):
    assert diffusion.num_timesteps == T
    assert torch.allclose(diffusion.betas, torch.tensor(BETAS, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_q_mean_variance_is_closed_form(diffusion, t):
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    tt = torch.full((3,), t)
    mean, var, log_var = diffusion.q_mean_variance(x0, tt)
    assert torch.allclose(mean, math.sqrt(alpha_bar(t)) * x0, rtol=1e-10, atol=1e-12)
    assert torch.allclose(var, torch.full_like(var, 1 - alpha_bar(t)), rtol=1e-9)
    assert torch.allclose(log_var, torch.full_like(log_var, math.log(1 - alpha_bar(t))), rtol=1e-9)


def test_q_sample_has_the_marginal_moments(diffusion):
    t, x0 = 300, 0.7
    torch.manual_seed(0)
    xt = diffusion.q_sample(torch.full((200_000, 1), x0, dtype=torch.float64), torch.full((200_000,), t))
    assert xt.mean().item() == pytest.approx(math.sqrt(alpha_bar(t)) * x0, abs=1e-2)  # 5 standard errors
    assert xt.var().item() == pytest.approx(1 - alpha_bar(t), rel=1.5e-2)


@pytest.mark.parametrize("t", [1, 2, 40, 500, 999])
def test_posterior_matches_bayes_by_product_of_gaussians(diffusion, t):
    x0, xt = torch.tensor([[0.3], [-1.2]], dtype=torch.float64), torch.tensor([[0.9], [0.1]], dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, torch.full((2,), t))
    for i in range(2):
        m, v = posterior_by_product_of_gaussians(x0[i].item(), xt[i].item(), t)
        assert mean[i].item() == pytest.approx(m, rel=1e-9, abs=1e-12)
        assert var[i].item() == pytest.approx(v, rel=1e-9)
        assert log_var[i].item() == pytest.approx(math.log(v), rel=1e-9)


def test_posterior_matches_sampled_joint(diffusion):
    """Draw x_{t−1} ~ q(·|x₀), x_t ~ q(·|x_{t−1}); regress x_{t−1} on x_t: slope, intercept and residual
    variance are the posterior's mean coefficients and variance."""
    t, x0, n = 50, 0.8, 400_000
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(2, n, generator=g, dtype=torch.float64)
    prev = math.sqrt(alpha_bar(t - 1)) * x0 + math.sqrt(1 - alpha_bar(t - 1)) * e1
    xt = math.sqrt(1 - BETAS[t]) * prev + math.sqrt(BETAS[t]) * e2
    cov = torch.cov(torch.stack([xt, prev]))
    slope = (cov[0, 1] / cov[0, 0]).item()
    intercept = (prev.mean() - slope * xt.mean()).item()
    resid_var = (cov[1, 1] - cov[0, 1] ** 2 / cov[0, 0]).item()

    probe = torch.tensor([[0.0], [1.0]], dtype=torch.float64)  # posterior mean at x_t = 0 and 1
    mean, var, _ = diffusion.q_posterior_mean_variance(torch.full_like(probe, x0), probe, torch.full((2,), t))
    assert mean[1].item() - mean[0].item() == pytest.approx(slope, rel=1e-2)
    assert mean[0].item() == pytest.approx(intercept, abs=2e-3)
    assert var[0].item() == pytest.approx(resid_var, rel=2e-2)


def test_posterior_at_t0_is_x0_and_log_variance_is_clipped(diffusion):
    x0, xt = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(mean, x0, atol=1e-12) and torch.all(var == 0)
    beta_tilde_1 = BETAS[1] * (1 - alpha_bar(0)) / (1 - alpha_bar(1))
    assert torch.allclose(log_var, torch.full_like(log_var, math.log(beta_tilde_1)), rtol=1e-9)


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_learned_sigma_interpolates_beta_and_beta_tilde(diffusion, t):
    x0 = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    xt = diffusion.q_sample(x0, torch.full((2,), t))
    tt = torch.full((2,), t)
    beta_tilde = BETAS[max(t, 1)] * (1 - alpha_bar(max(t, 1) - 1)) / (1 - alpha_bar(max(t, 1)))
    for v, expected in [(1.0, BETAS[t]), (-1.0, beta_tilde), (0.0, math.sqrt(BETAS[t] * beta_tilde))]:
        out = diffusion.p_mean_variance(oracle(diffusion, x0, v), xt, tt)
        assert torch.allclose(out["variance"], torch.full_like(xt, expected), rtol=1e-9), v
        assert torch.allclose(out["log_variance"], torch.full_like(xt, math.log(expected)), rtol=1e-9)


@pytest.mark.parametrize("sigma_small", [True, False])
def test_fixed_variances(sigma_small):
    d = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    tt = torch.tensor([0, 1, 700])
    out = d.p_mean_variance(oracle(d, x0), d.q_sample(x0, tt), tt)
    tilde = [BETAS[t] * (1 - alpha_bar(t - 1)) / (1 - alpha_bar(t)) for t in (1, 700)]
    expected = [tilde[0], *tilde] if sigma_small else [tilde[0], BETAS[1], BETAS[700]]
    assert torch.allclose(out["variance"][:, 0, 0, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("predict_xstart", [False, True])
def test_exact_model_gives_x0_and_the_true_posterior_mean(predict_xstart):
    d = create_diffusion("", predict_xstart=predict_xstart, learn_sigma=False)
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    tt = torch.tensor([0, 5, 300, 999])
    xt = d.q_sample(x0, tt)
    model = (lambda x, t: x0) if predict_xstart else oracle(d, x0)
    out = d.p_mean_variance(model, xt, tt)
    assert torch.allclose(out["pred_xstart"], x0, atol=1e-9)
    true_mean, _, _ = d.q_posterior_mean_variance(x0, xt, tt)
    assert torch.allclose(out["mean"], true_mean, atol=1e-9)


def test_clip_and_denoised_fn_act_on_the_x0_estimate(diffusion):
    x0 = torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64)
    tt = torch.tensor([10])
    xt = diffusion.q_sample(x0, tt)
    clipped = diffusion.p_mean_variance(oracle(diffusion, x0, 0.0), xt, tt, clip_denoised=True)
    assert torch.allclose(clipped["pred_xstart"], torch.ones_like(x0))
    halved = diffusion.p_mean_variance(oracle(diffusion, x0, 0.0), xt, tt, denoised_fn=lambda x: x / 2)
    assert torch.allclose(halved["pred_xstart"], x0 / 2)


# ------------------------------------------------------------------------------------------------------
# Hybrid loss
# ------------------------------------------------------------------------------------------------------


def test_hybrid_loss_is_zero_for_the_true_eps_and_posterior_variance(diffusion):
    x0 = torch.rand(4, 3, 4, 4, dtype=torch.float64) * 2 - 1
    tt = torch.tensor([1, 17, 500, 999])
    terms = diffusion.training_losses(oracle(diffusion, x0, -1.0), x0, tt)
    assert set(terms) == {"loss", "mse", "vb"}
    for value in terms.values():
        assert value.shape == (4,) and value.dtype == torch.float64
        assert value.abs().max().item() < 1e-8


def test_vb_at_t0_is_the_decoder_nll_in_bits(diffusion):
    k = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    x0 = k.double() / 127.5 - 1.0  # 8-bit data
    tt = torch.zeros(2, dtype=torch.long)
    terms = diffusion.training_losses(oracle(diffusion, x0, 1.0), x0, tt)
    # the exact model's mean at t = 0 is x₀; its variance (v = 1) is β_0
    log_p = discretized_gaussian_log_likelihood(x0, x0, torch.full_like(x0, 0.5 * math.log(BETAS[0])))
    expected = -log_p.mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(terms["vb"], expected, rtol=1e-9)
    assert torch.all(terms["vb"] > 0) and torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_is_the_kl_between_gaussians_for_a_biased_eps(diffusion):
    """ε̂ = ε + δ shifts the mean by −coef1·√(1/ᾱ − 1)·δ, so KL = shift² / (2 β̃) nats, per dimension."""
    x0, t, delta = torch.randn(1, 2, 3, 3, dtype=torch.float64), 200, 0.1
    model_exact = oracle(diffusion, x0, -1.0)

    def biased(x, tt):
        out = model_exact(x, tt)
        return torch.cat([out[:, :2] + delta, out[:, 2:]], 1)

    terms = diffusion.training_losses(biased, x0, torch.tensor([t]))
    ab, ab_prev = alpha_bar(t), alpha_bar(t - 1)
    coef1 = BETAS[t] * math.sqrt(ab_prev) / (1 - ab)
    shift = coef1 * math.sqrt(1 / ab - 1) * delta
    beta_tilde = BETAS[t] * (1 - ab_prev) / (1 - ab)
    assert terms["vb"].item() == pytest.approx(shift**2 / (2 * beta_tilde) / math.log(2), rel=1e-8)
    assert terms["mse"].item() == pytest.approx(delta**2, rel=1e-9)


def test_vb_trains_only_the_variance_and_mse_only_the_mean(diffusion):
    x0, noise = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    tt = torch.tensor([0, 400])
    output = torch.randn(2, 4, 3, 3, requires_grad=True)
    terms = diffusion.training_losses(lambda x, t: output, x0, tt, noise=noise)
    terms["loss"].sum().backward()
    d = 2 * 3 * 3
    expected_mean_grad = 2 * (output[:, :2] - noise) / d  # from mse alone
    assert torch.allclose(output.grad[:, :2], expected_mean_grad.detach(), atol=1e-6)
    output.grad = None
    terms = diffusion.training_losses(lambda x, t: output, x0, tt, noise=noise)
    terms["mse"].sum().backward()
    assert torch.all(output.grad[:, 2:] == 0)


def test_bf16_model_output_gives_fp32_losses(diffusion):
    x0 = torch.randn(2, 2, 4, 4)
    terms = diffusion.training_losses(
        lambda x, t, y: torch.zeros(2, 4, 4, 4, dtype=torch.bfloat16),
        x0,
        torch.tensor([3, 900]),
        model_kwargs={"y": torch.tensor([0, 1])},
    )
    assert all(v.dtype == torch.float32 and v.shape == (2,) and torch.isfinite(v).all() for v in terms.values())


def test_kl_loss_is_the_rescaled_bound_and_fixed_sigma_has_no_vb():
    x0 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    tt, noise = torch.tensor([0, 300]), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    model = lambda x, t: 0.9 * x[:, :1].repeat(1, 2, 1, 1)  # noqa: E731
    hybrid = create_diffusion("").training_losses(model, x0, tt, noise=noise)
    kl = create_diffusion("", use_kl=True).training_losses(model, x0, tt, noise=noise)
    # unlike the hybrid, the KL loss also trains the mean, but the bound's value is the same
    assert torch.allclose(kl["loss"], hybrid["vb"] * T, rtol=1e-12)
    fixed = create_diffusion("", learn_sigma=False).training_losses(lambda x, t: 0.9 * x, x0, tt, noise=noise)
    assert torch.all(fixed["vb"] == 0) and torch.equal(fixed["loss"], fixed["mse"])


def test_rescaled_mse_scales_vb_by_steps_over_1000():
    x0, noise = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    tt = torch.tensor([0, 40])
    model = lambda x, t: torch.cat([0.5 * x, torch.zeros_like(x)], 1)  # noqa: E731
    plain = create_diffusion("", diffusion_steps=250).training_losses(model, x0, tt, noise=noise)
    rescaled = create_diffusion("", diffusion_steps=250, rescale_learned_sigmas=True).training_losses(
        model, x0, tt, noise=noise
    )
    assert torch.allclose(rescaled["vb"], plain["vb"] * 0.25, rtol=1e-12)


def test_wrong_model_channels_are_refused(diffusion):
    with pytest.raises(ValueError, match="learn_sigma=True"):
        diffusion.training_losses(lambda x, t: x, torch.randn(1, 3, 2, 2), torch.tensor([1]))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="model_var_type"):
        GaussianDiffusion([0.1, 0.2], model_var_type="huge")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        GaussianDiffusion([0.1, 1.0])


def test_training_loss_traces_without_graph_breaks(diffusion):
    torch._dynamo.reset()
    net = torch.nn.Conv2d(2, 4, 1)

    def model(x, t, y):
        return net(x) * (1 + t.float() / 1000).reshape(-1, 1, 1, 1) + y.float().reshape(-1, 1, 1, 1)

    def step(x0, t, y, noise):
        return diffusion.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()

    x0 = torch.randn(2, 2, 4, 4)
    explanation = torch._dynamo.explain(step)(x0, torch.tensor([0, 500]), torch.tensor([1, 2]), torch.randn_like(x0))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
