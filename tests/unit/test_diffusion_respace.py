"""Timestep respacing: which steps are kept, that ᾱ survives at them, and that the model sees them."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditscale.diffusion import GaussianDiffusion, SpacedDiffusion, create_diffusion, space_timesteps
from ditscale.diffusion.schedule import get_named_beta_schedule


def test_ddim_spacing_is_a_uniform_stride_from_zero():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))


def test_single_section_spreads_evenly_over_all_steps():
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    gaps = set(b - a for a, b in zip(kept, kept[1:]))
    assert gaps <= {4, 5}  # 999 / 249 ≈ 4.01
    assert space_timesteps(1000, "1000") == set(range(1000)) == space_timesteps(1000, 1000)


def test_sections_split_the_steps_first_ones_longer():
    kept = sorted(space_timesteps(301, "10,10,10"))  # sections [0, 101), [101, 201), [201, 301)
    assert len(kept) == 30
    assert kept[0] == 0 and kept[9] == 100 and kept[10] == 101 and kept[19] == 200 and kept[20] == 201
    assert kept[-1] == 300


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 1200), data=st.data())
def test_sections_keep_the_requested_number_of_steps(steps, data):
    n_sections = data.draw(st.integers(1, min(steps, 5)))
    size = steps // n_sections
    counts = data.draw(st.lists(st.integers(0, size), min_size=n_sections, max_size=n_sections))
    if sum(counts) == 0:
        counts[0] = 1
    kept = space_timesteps(steps, ",".join(map(str, counts)))
    assert len(kept) == sum(counts)
    assert kept <= set(range(steps))


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(2, 1200), data=st.data())
def test_respaced_alpha_bar_equals_original_at_kept_steps(steps, data):
    schedule = data.draw(st.sampled_from(["linear", "cosine"])) if steps > 20 else "cosine"
    betas = get_named_beta_schedule(schedule, steps)
    kept = sorted(data.draw(st.sets(st.integers(0, steps - 1), min_size=1, max_size=min(steps, 60))))
    spaced = SpacedDiffusion(kept, betas)
    original = torch.cumprod(1 - betas, 0)
    assert spaced.num_timesteps == len(kept)
    # exact up to float64 rounding of β' = 1 − ᾱ_s / ᾱ_prev (absolute, ~1e-16 per step)
    assert torch.allclose(spaced.alphas_cumprod, original[kept], rtol=1e-12, atol=1e-14)
    assert torch.equal(spaced.timestep_map, torch.tensor(kept))


def test_model_sees_original_timesteps():
    seen = []

    def model(x, t, **_):
        seen.append(t.clone())
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)

    d = create_diffusion("ddim50")
    d.training_losses(model, torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 49]))
    assert seen[-1].tolist() == [0, 20, 980] and seen[-1].dtype == torch.long
    seen.clear()
    d.ddim_sample_loop(model, (1, 1, 2, 2))
    assert [t.item() for t in seen] == list(range(980, -1, -20))


def test_create_diffusion_defaults_are_the_papers():
    d = create_diffusion("")
    assert type(d) is GaussianDiffusion and d.num_timesteps == 1000 and d.learn_sigma
    assert d.loss_type.value == "mse" and d.model_mean_type.value == "epsilon"
    full = create_diffusion("1000")  # respaced onto all steps: the same process
    assert isinstance(full, SpacedDiffusion)
    assert torch.allclose(full.betas, d.betas, rtol=1e-9, atol=0)
    assert create_diffusion("250").num_timesteps == 250


@pytest.mark.parametrize(
    "spec, match",
    [
        ("ddim999", "no integer stride"),
        ("ddimx", "ddimN"),
        ("ten", "comma-separated"),
        ("600,600", "cannot take 600"),
        ("0", "not all zero"),
        ("-3", "counts must be"),
    ],
)
def test_bad_respacing_is_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(1000, spec)


def test_bad_use_timesteps_are_refused():
    with pytest.raises(ValueError, match="subset of 0..9"):
        SpacedDiffusion([0, 10], torch.full((10,), 0.1))
