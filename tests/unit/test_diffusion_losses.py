"""The bound's terms against direct computations: Gaussian KL and the discretised Gaussian likelihood."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from ditscale.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

finite = st.floats(-5, 5, allow_nan=False)
logvars = st.floats(-6, 3, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(mean=finite, logvar=logvars)
def test_kl_of_equal_gaussians_is_zero(mean, logvar):
    m, lv = torch.tensor(mean, dtype=torch.float64), torch.tensor(logvar, dtype=torch.float64)
    assert abs(normal_kl(m, lv, m, lv).item()) < 1e-12


@settings(max_examples=40, deadline=None)
@given(m1=finite, lv1=logvars, m2=finite, lv2=logvars)
def test_kl_matches_the_textbook_formula(m1, lv1, m2, lv2):
    s1, s2 = math.exp(lv1 / 2), math.exp(lv2 / 2)
    expected = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert normal_kl(t(m1), t(lv1), t(m2), t(lv2)).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.5, 2.0), (1.0, 0.3, -1.0, 0.7), (0.2, 1.5, 0.2, 0.5)])
def test_kl_matches_numerical_integration(m1, s1, m2, s2):
    def logpdf(x, m, s):
        return -0.5 * math.log(2 * math.pi * s * s) - (x - m) ** 2 / (2 * s * s)

    value, _ = integrate.quad(
        lambda x: math.exp(logpdf(x, m1, s1)) * (logpdf(x, m1, s1) - logpdf(x, m2, s2)), m1 - 12 * s1, m1 + 12 * s1
    )
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    kl = normal_kl(t(m1), t(2 * math.log(s1)), t(m2), t(2 * math.log(s2))).item()
    assert kl == pytest.approx(value, rel=1e-7)


def _levels():
    return -1.0 + 2.0 * torch.arange(256, dtype=torch.float64) / 255.0


@settings(max_examples=25, deadline=None)
@given(mean=st.floats(-1.2, 1.2), log_scale=st.floats(-5, 1))
def test_discretised_likelihood_sums_to_one_over_the_256_bins(mean, log_scale):
    x = _levels()
    log_p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)  # up to the 1e-12 floor on 256 bins


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.37, -4.5), (-0.8, 0.0), (0.99, -2.0)])
def test_discretised_likelihood_matches_direct_cdf(mean, log_scale):
    sigma = math.exp(log_scale)

    def cdf(v):
        return 0.5 * (1.0 + math.erf((v - mean) / (sigma * math.sqrt(2.0))))

    x = _levels()
    log_p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    for k in [0, 1, 17, 128, 200, 254, 255]:
        lo = -math.inf if k == 0 else x[k].item() - 1 / 255
        hi = math.inf if k == 255 else x[k].item() + 1 / 255
        p = (1.0 if hi == math.inf else cdf(hi)) - (0.0 if lo == -math.inf else cdf(lo))
        expected = math.log(max(p, 1e-12))
        assert log_p[k].item() == pytest.approx(expected, rel=1e-6, abs=1e-9), k


def test_discretised_likelihood_is_floored_and_accurate_in_the_tails():
    x = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    # a confident, very wrong prediction: every bin's probability is far below 1e-12
    far = discretized_gaussian_log_likelihood(x, -x + 0.5, torch.full_like(x, -6.0))
    assert torch.equal(far, torch.full_like(far, math.log(1e-12)))
    # edge bins whose complement is tiny: log p = log1p(−Q) with Q the normal tail beyond the bin edge
    sigma = math.exp(-4.0)
    z = (-1.0 + 1.0 / 255.0 + 1.1) / sigma
    near = discretized_gaussian_log_likelihood(
        x[:1], torch.tensor([-1.1], dtype=torch.float64), torch.tensor([-4.0], dtype=torch.float64)
    )
    assert near.item() == pytest.approx(math.log1p(-0.5 * math.erfc(z / math.sqrt(2))), rel=1e-9)


def test_discretised_likelihood_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(torch.zeros(3), torch.zeros(3), torch.zeros(1))


def test_mean_flat_averages_all_but_the_batch_dimension():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(mean_flat(x), torch.tensor([5.5, 17.5]))
