"""Classifier-free guidance around an unmodified model."""

import pytest
import torch

from ditscale.diffusion import cfg_wrapper, create_diffusion, prepare_cfg_inputs

NULL = 10


def toy_model(x, t, y):
    """A class-conditional 'model' with learned-Σ channels: out = f(x, t) + g(y) per channel."""
    c = x.shape[1]
    weights = torch.arange(1, 2 * c + 1, dtype=x.dtype).reshape(1, -1, 1, 1)
    base = torch.cat([x, x], 1) * weights * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000)
    label = torch.sin(y.to(x.dtype).reshape(-1, 1) + torch.arange(2 * c, dtype=x.dtype))[..., None, None]
    return base + label


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 2, 2, generator=g)
    y = torch.tensor([1, 5, 7])
    x2, y2 = prepare_cfg_inputs(z, y, NULL)
    return z, y, x2, y2, torch.tensor([250] * 6)


def test_prepare_cfg_inputs_doubles_noise_and_appends_null_labels(batch):
    z, y, x2, y2, _ = batch
    assert torch.equal(x2, torch.cat([z, z])) and y2.tolist() == [1, 5, 7, NULL, NULL, NULL]


def test_scale_one_is_the_conditional_model(batch):
    z, y, x2, y2, t = batch
    guided = cfg_wrapper(toy_model, 1.0, guide_channels="all")(x2, t, y=y2)
    cond = toy_model(z, t[:3], y)
    assert torch.allclose(guided[:3], cond, atol=1e-6)
    assert torch.allclose(guided[3:, :4], cond[:, :4], atol=1e-6)  # every guided channel, both halves


@pytest.mark.parametrize("channels", [3, 4, "all", 1])
def test_guidance_formula_on_the_guided_channels_only(batch, channels):
    z, y, x2, y2, t = batch
    scale, n = 4.0, 4 if channels == "all" else channels
    guided = cfg_wrapper(toy_model, scale, guide_channels=channels)(x2, t, y=y2)
    cond, uncond = toy_model(z, t[:3], y), toy_model(z, t[:3], torch.full_like(y, NULL))
    expected = uncond[:, :n] + scale * (cond[:, :n] - uncond[:, :n])
    assert torch.allclose(guided[:3, :n], expected, atol=1e-5)
    assert torch.allclose(guided[3:, :n], expected, atol=1e-5)
    # the rest — unguided latent channels and the learned-Σ channels — pass through from each half
    assert torch.equal(guided[:3, n:], cond[:, n:]) and torch.equal(guided[3:, n:], uncond[:, n:])


def test_only_the_first_half_of_the_input_is_used(batch):
    _, _, x2, y2, t = batch
    wrapper = cfg_wrapper(toy_model, 2.0)
    scrambled = torch.cat([x2[:3], torch.randn_like(x2[3:])])
    assert torch.equal(wrapper(x2, t, y=y2), wrapper(scrambled, t, y=y2))


def test_guided_ddim_at_scale_one_matches_conditional_sampling(batch):
    z, y, x2, y2, _ = batch
    d = create_diffusion("ddim10")
    guided = d.ddim_sample_loop(cfg_wrapper(toy_model, 1.0), x2.shape, noise=x2, model_kwargs={"y": y2})
    plain = d.ddim_sample_loop(toy_model, z.shape, noise=z, model_kwargs={"y": y})
    assert torch.allclose(guided.chunk(2)[0], plain, atol=1e-4, rtol=1e-5)


def test_bf16_model_output_is_guided_in_fp32(batch):
    _, _, x2, y2, t = batch
    out = cfg_wrapper(lambda x, t, y: toy_model(x, t, y).bfloat16(), 3.0)(x2, t, y=y2)
    assert out.dtype == torch.float32 and out.shape == (6, 8, 2, 2)


def test_bad_guidance_arguments_are_refused(batch):
    _, _, x2, y2, t = batch
    with pytest.raises(ValueError, match="doubled batch"):
        cfg_wrapper(toy_model, 2.0)(x2[:5], t[:5], y=y2[:5])
    with pytest.raises(ValueError, match="exceeds"):
        cfg_wrapper(toy_model, 2.0, guide_channels=5)(x2, t, y=y2)
    with pytest.raises(ValueError, match="positive integer or 'all'"):
        cfg_wrapper(toy_model, 2.0, guide_channels=0)
    with pytest.raises(ValueError, match="batch"):
        prepare_cfg_inputs(torch.zeros(2, 4, 2, 2), torch.zeros(3, dtype=torch.long), NULL)
