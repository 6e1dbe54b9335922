"""Noise schedules against their definitions (DDPM linear, Improved DDPM cosine)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditscale.diffusion.schedule import get_named_beta_schedule


def test_linear_1000_steps_is_the_ddpm_schedule():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(2e-2, rel=1e-12)
    steps = betas.diff()
    assert torch.allclose(steps, torch.full_like(steps, (2e-2 - 1e-4) / 999), rtol=1e-9, atol=0)


def test_linear_is_rescaled_for_other_step_counts():
    betas = get_named_beta_schedule("linear", 250)  # scale 1000 / 250 = 4
    assert betas[0].item() == pytest.approx(4e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(8e-2, rel=1e-12)


def test_cosine_alpha_bar_is_the_closed_form():
    T, s = 1000, 0.008

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = get_named_beta_schedule("cosine", T)
    alpha_bar = torch.cumprod(1 - betas, 0)
    capped = betas >= 0.999 - 1e-12
    assert capped.sum() == 1 and capped[-1]  # only the last step hits the 0.999 cap
    expected = torch.tensor([f((t + 1) / T) / f(0) for t in range(T - 1)], dtype=torch.float64)
    assert torch.allclose(alpha_bar[:-1], expected, rtol=1e-9, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["linear", "cosine"]), steps=st.integers(21, 3000))
def test_schedules_are_valid_and_alpha_bar_decreases(name, steps):
    betas = get_named_beta_schedule(name, steps)
    assert betas.shape == (steps,)
    assert bool((betas > 0).all()) and bool((betas < 1).all())
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert bool((alpha_bar.diff() < 0).all())
    assert 0 < alpha_bar[-1] < alpha_bar[0] < 1


@pytest.mark.parametrize(
    "name, steps, match",
    [("quadratic", 1000, "unknown noise_schedule"), ("linear", 0, "positive integer"), ("linear", 10, "use more")],
)
def test_bad_schedules_are_refused(name, steps, match):
    with pytest.raises(ValueError, match=match):
        get_named_beta_schedule(name, steps)
