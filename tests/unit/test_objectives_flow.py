"""Flow matching against an independent formulation: Gaussian data N(μ, diag s²), where everything is
closed form. For x_t = α·x₁ + σ·ε with x₁ the data:
    V = α²s² + σ²,  E[x₁ | x] = μ + α s² (x − αμ) / V,  E[ε | x] = σ (x − αμ) / V,
    v*(x, t) = α'·E[x₁ | x] + σ'·E[ε | x],   ε* = E[ε | x],   s*(x, t) = −(x − αμ) / V,
and the least achievable velocity loss is Var(u | x) = α'²s² + σ'² − (α'αs² + σ'σ)² / V (per dim).
"""

from __future__ import annotations

import math

import pytest
import torch

from ditscale.objectives import FlowObjective, TimestepSampling, shift_noise_fraction
from ditscale.sampling.core import GuidedSampler
from ditscale.sampling.registry import euler_maruyama_step, heun_step, make_plan

MU = torch.tensor([1.5, -0.5]).reshape(1, 2, 1, 1)
S = torch.tensor([0.5, 2.0]).reshape(1, 2, 1, 1)


def coeffs(path, t):
    """(α, α', σ, σ') written out per path (SiT's definitions), t a float tensor."""
    if path == "linear":
        return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
    if path == "gvp":
        return (
            torch.sin(math.pi * t / 2),
            math.pi / 2 * torch.cos(math.pi * t / 2),
            torch.cos(math.pi * t / 2),
            -math.pi / 2 * torch.sin(math.pi * t / 2),
        )
    lmc = -0.25 * (1 - t) ** 2 * 19.9 - 0.5 * (1 - t) * 0.1
    alpha = torch.exp(lmc)
    d_alpha = alpha * (0.5 * (1 - t) * 19.9 + 0.05)
    sigma = torch.sqrt(1 - alpha**2)
    return alpha, d_alpha, sigma, -alpha * d_alpha / sigma


class Oracle(torch.nn.Module):
    """The exact prediction of the Gaussian data's flow, shaped like a DiT for the samplers."""

    in_channels, input_size, num_classes = 2, 2, 1

    def __init__(self, path, prediction, shift=0.0):
        super().__init__()
        self.path, self.prediction, self.shift = path, prediction, shift
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None, **_):
        a, da, s, ds = (c.reshape(-1, 1, 1, 1) for c in coeffs(self.path, t.double()))
        x = x.double()
        V = a**2 * S**2 + s**2
        ex1, eeps = MU + a * S**2 * (x - a * MU) / V, s * (x - a * MU) / V
        out = {"velocity": da * ex1 + ds * eeps, "noise": eeps, "score": -(x - a * MU) / V}[self.prediction]
        return (out + self.shift).float()


def gaussian_data(n, seed=0):
    return MU + S * torch.randn(n, 2, 2, 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_optimal_velocity_has_zero_excess_loss(path):
    objective = FlowObjective(path=path)
    x1, labels = gaussian_data(40_000), torch.zeros(40_000, dtype=torch.long)
    seen = {}

    def model(x, t, **kw):
        seen["t"] = t
        return Oracle(path, "velocity")(x, t)

    loss = objective.loss(model, x1, labels, torch.Generator().manual_seed(1))["loss"]
    a, da, s, ds = (c.reshape(-1, 1) for c in coeffs(path, seen["t"].double()))
    floor = (
        da**2 * S.reshape(1, 2) ** 2
        + ds**2
        - (da * a * S.reshape(1, 2) ** 2 + ds * s) ** 2 / (a**2 * S.reshape(1, 2) ** 2 + s**2)
    ).mean(1)  # (N,) Var(u | x), channel mean
    excess = (loss.double() - floor).mean()
    assert abs(excess) < 0.02 * floor.mean()
    shifted = objective.loss(
        lambda x, t, **kw: Oracle(path, "velocity", 0.3)(x, t), x1, labels, torch.Generator().manual_seed(1)
    )["loss"]
    assert (shifted - loss).mean() == pytest.approx(0.09, abs=0.01)  # a bias δ costs δ²


@pytest.mark.parametrize(
    "prediction,weight", [("velocity", "none"), ("noise", "none"), ("noise", "likelihood"), ("score", "velocity")]
)
@pytest.mark.parametrize("path", ["linear", "vp"])
def test_loss_is_the_written_out_formula(path, prediction, weight):
    objective = FlowObjective(path=path, prediction=prediction, loss_weight=weight)
    x1, labels = gaussian_data(8), torch.zeros(8, dtype=torch.long)
    out = torch.randn(8, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    got = objective.loss(lambda x, t, **kw: out, x1, labels, torch.Generator().manual_seed(2))

    g = torch.Generator().manual_seed(2)
    eps = objective.train_eps
    t0, t1 = (0.0, 1 - eps) if path == "vp" else (eps, 1 - eps) if prediction != "velocity" else (0.0, 1.0)
    t = t0 + (1 - torch.rand(8, generator=g)) * (t1 - t0)
    noise = torch.randn(8, 2, 2, 2, generator=g)
    a, da, s, ds = (c.reshape(-1, 1, 1, 1) for c in coeffs(path, t))
    if prediction == "velocity":
        want = ((out - (da * x1 + ds * noise)) ** 2).mean((1, 2, 3))
    else:
        if path == "vp":
            beta = 0.1 + (1 - t) * 19.9
            b = beta / 2
        else:
            b = (da / a).flatten() * s.flatten() ** 2 - s.flatten() * ds.flatten()
        sig = s.flatten()
        w = {"none": torch.ones(8), "velocity": (b / sig) ** 2, "likelihood": b / sig**2}[weight]
        err = out - noise if prediction == "noise" else out * s + noise
        want = w * (err**2).mean((1, 2, 3))
    assert torch.allclose(got["loss"], want, rtol=1e-5, atol=1e-6)


def standard_normal(n, seed=0):
    """N(0, I) draws standardised exactly (sample mean 0, variance 1 per dimension)."""
    z = torch.randn(n, 2, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((z - z.mean(0)) / z.std(0, unbiased=False)).float()


@pytest.mark.parametrize(
    "sampler,steps,path,prediction",
    [
        ("euler", 400, "linear", "velocity"),
        ("heun", 40, "linear", "velocity"),
        ("heun", 40, "gvp", "noise"),
        ("heun", 60, "vp", "score"),
        ("dopri5", None, "linear", "velocity"),
        ("dopri5", None, "vp", "velocity"),
    ],
)
def test_ode_carries_the_standard_normal_to_the_data(sampler, steps, path, prediction):
    z = standard_normal(4000)
    run = GuidedSampler(
        Oracle(path, prediction), FlowObjective(path=path, prediction=prediction), sampler, cfg_scale=1.0, steps=steps
    )
    x = run(lambda k: z, torch.zeros(4000, dtype=torch.long))
    assert torch.allclose(x.mean((0, 2, 3)), MU.flatten(), atol=1e-2)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), S.flatten(), atol=1e-2)


@pytest.mark.parametrize("form,last", [("sigma", "mean"), ("sbdm", "tweedie"), ("constant", "euler")])
def test_sde_reaches_the_data_moments(form, last):
    n = 20_000
    run = GuidedSampler(
        Oracle("linear", "velocity"),
        FlowObjective(),
        "euler_maruyama",
        cfg_scale=1.0,
        steps=200,
        options={"diffusion_form": form, "last_step": last},
    )
    g = torch.Generator().manual_seed(0)
    x = run(lambda k: torch.randn(n, 2, 2, 2, generator=g), torch.zeros(n, dtype=torch.long))
    assert torch.allclose(x.mean((0, 2, 3)), MU.flatten(), atol=0.05)
    assert torch.allclose(x.std((0, 2, 3)), S.flatten(), rtol=0.05)


def test_steps_are_the_written_out_formulas():
    v = lambda x, t: x * t.reshape(-1, 1) + 1.0  # noqa: E731
    x, t, tn = torch.tensor([[2.0]]), torch.tensor([0.2]), torch.tensor([0.5])
    k1 = 2.0 * 0.2 + 1
    k2 = (2.0 + 0.3 * k1) * 0.5 + 1
    assert heun_step(v, x, t, tn).item() == pytest.approx(2.0 + 0.15 * (k1 + k2))
    out = euler_maruyama_step(
        x, torch.tensor([[0.7]]), torch.tensor([[0.5]]), torch.tensor([[0.04]]), torch.tensor([[1.5]])
    )
    assert out.item() == pytest.approx(2.0 + 0.7 * 0.04 + math.sqrt(2 * 0.5) * math.sqrt(0.04) * 1.5)
    plan = make_plan("euler_maruyama", FlowObjective(), 5)
    assert plan.times[-2] == pytest.approx(0.96) and plan.times[-1] == 1.0 and plan.num_draws == 5
    assert make_plan("euler_maruyama", FlowObjective(), 5, options={"last_step": "none"}).times[-2] == 1.0
    assert make_plan("heun", FlowObjective(prediction="noise"), 4).times[0] == pytest.approx(1e-3)


def test_timestep_sampling_formulas():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_noise_fraction(u, 3.0), 3 * u / (1 + 2 * u))
    ln = TimestepSampling("logit_normal", mean=0.5, std=0.7)
    g = torch.Generator().manual_seed(0)
    want = torch.sigmoid(0.5 + 0.7 * torch.randn(5, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(ln.noise_fraction(5, g, "cpu"), want)
    flow = FlowObjective(timesteps=TimestepSampling(shift=3.0))
    t = flow.draw_times(20_000, torch.Generator().manual_seed(0), "cpu")
    assert 0 <= t.min() and t.max() <= 1 and t.mean() < 0.5 - 0.1  # shifted toward noise (t = 0)


def test_guidance_interval_guides_only_inside():
    calls = []

    class Model(Oracle):
        y_embedder = type("E", (), {"dropout_prob": 0.1})()

        def forward(self, x, t, y=None, **_):
            calls.append((float(t[0]), x.shape[0]))
            return super().forward(x, t)

    run = GuidedSampler(
        Model("linear", "velocity"),
        FlowObjective(),
        "euler",
        cfg_scale=2.0,
        guide_channels="all",
        steps=4,
        cfg_interval=(0.3, 0.8),
    )
    run(lambda k: torch.zeros(3, 2, 2, 2), torch.zeros(3, dtype=torch.long))
    # times 0, .25, .5, .75 → noise fractions 1, .75, .5, .25: guided (doubled batch) at .75 and .5 only
    assert calls == [(0.0, 3), (0.25, 6), (0.5, 6), (0.75, 3)]
