"""Guided DDPM / DDIM sampling: parity with the diffusion's own loops, the official CFG semantics,
per-sample seeds, decoding."""

import numpy as np
import pytest
import torch

from ditscale.diffusion import cfg_wrapper, prepare_cfg_inputs
from ditscale.models import build_dit
from ditscale.sampling import (
    GuidedSampler,
    SamplingInterrupted,
    decode,
    index_labels,
    index_seeds,
    sample_latents,
    sampling_diffusion,
    to_uint8,
)
from ditscale.sampling.core import respacing_for

from helpers import randomize

torch.set_num_threads(1)


def tiny(seed=0, **kw):
    """A DiT small enough for the CPU, with random (not zero-initialised) weights so outputs depend on x, t, y."""
    model = build_dit(
        "DiT-S/2", **{"depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 8, "num_classes": 10, **kw}
    ).eval()
    return randomize(model, seed)


@pytest.fixture(scope="module")
def model():
    return tiny()


Y = torch.tensor([1, 2, 3])


def test_unguided_ddpm_reproduces_the_diffusions_loop(model):
    d = sampling_diffusion("ddpm", 20)
    ours = sample_latents(model, d, Y, cfg_scale=1.0, generator=torch.Generator().manual_seed(5))
    ref = d.p_sample_loop(model, (3, 4, 8, 8), model_kwargs={"y": Y}, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_unguided_ddim_reproduces_the_diffusions_loop(model, eta):
    d = sampling_diffusion("ddim", 10)
    ours = sample_latents(
        model, d, Y, cfg_scale=1.0, sampler="ddim", eta=eta, generator=torch.Generator().manual_seed(5)
    )
    ref = d.ddim_sample_loop(
        model, (3, 4, 8, 8), model_kwargs={"y": Y}, eta=eta, generator=torch.Generator().manual_seed(5)
    )
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [3, 4])
def test_guidance_is_the_official_doubled_batch_loop(model, channels):
    """Official DiT: noise [z; z], labels [y; null], forward_with_cfg, keep the first half."""
    d = sampling_diffusion("ddim", 8)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    x2, y2 = prepare_cfg_inputs(z, Y, model.num_classes)
    ref = d.ddim_sample_loop(cfg_wrapper(model, 4.0, channels), x2.shape, noise=x2, model_kwargs={"y": y2})[:3]
    ours = sample_latents(
        model, d, Y, cfg_scale=4.0, guide_channels=channels, sampler="ddim", generator=torch.Generator().manual_seed(2)
    )
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    unguided = sample_latents(model, d, Y, cfg_scale=1.0, sampler="ddim", generator=torch.Generator().manual_seed(2))
    assert (ours - unguided).abs().max() > 1e-2


def test_seeds_make_each_sample_independent_of_its_batch(model):
    d = sampling_diffusion("ddpm", 10)
    seeds = index_seeds(7, range(4))
    labels = torch.tensor([1, 2, 3, 4])
    full = sample_latents(model, d, labels, seeds=seeds)
    part = sample_latents(model, d, labels[2:], seeds=seeds[2:])
    assert torch.allclose(full[2:], part, atol=1e-5, rtol=0)
    again = sample_latents(model, d, labels, seeds=seeds)
    assert torch.equal(full, again)
    other = sample_latents(model, d, labels, seeds=index_seeds(8, range(4)))
    assert (full - other).abs().min() > 0


@pytest.mark.parametrize("sampler", ["ddpm", "euler"])
def test_should_stop_is_asked_before_every_step_and_interrupts(model, sampler):
    """The trainer's sample grid passes its stop-signal check here: asked once per step, True stops before
    the step, the model is not called again."""
    steps, asked = 6, []
    objective = {"kind": "flow", "path": "linear", "prediction": "velocity"} if sampler == "euler" else None
    model_calls = []
    hook = model.register_forward_pre_hook(lambda *_: model_calls.append(1))
    try:
        kw = dict(sampler=sampler, steps=steps, objective=objective, cfg_scale=1.0, seeds=index_seeds(0, range(3)))
        done = sample_latents(model, None, Y, should_stop=lambda: asked.append(1) or False, **kw)
        assert len(asked) == steps and done.shape == (3, 4, 8, 8)
        asked.clear(), model_calls.clear()
        with pytest.raises(SamplingInterrupted, match=f"before step 4 of {steps}"):
            sample_latents(model, None, Y, should_stop=lambda: asked.append(1) or len(asked) > 3, **kw)
        assert len(asked) == 4 and len(model_calls) == 3
    finally:
        hook.remove()


def test_index_seeds_are_distinct_and_stable():
    a = index_seeds(0, range(1000))
    assert len(set(a)) == 1000 and a[10:20] == index_seeds(0, range(10, 20))
    assert not set(a) & set(index_seeds(1, range(1000)))
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        index_seeds(-1, [0])


def test_index_labels_balanced_and_random():
    balanced = index_labels(0, range(50), 10, "balanced")
    assert np.bincount(balanced).tolist() == [5] * 10
    random = index_labels(3, range(2000), 10, "random")
    assert random.min() == 0 and random.max() == 9 and 150 < np.bincount(random).min()
    assert index_labels(3, range(100, 120), 10, "random").tolist() == random[100:120].tolist()
    with pytest.raises(ValueError, match="balanced"):
        index_labels(0, [1], 10, "uniform")


def test_respacing_for():
    assert respacing_for("ddpm", 250) == "250"
    assert respacing_for("ddim", 50) == "ddim50"
    assert respacing_for("ddim", 300) == "300"  # no stride gives exactly 300 of 1000
    with pytest.raises(ValueError, match="unknown sampler 'plms'; choose one of ddpm, ddim, euler, heun"):
        respacing_for("plms", 10)
    with pytest.raises(ValueError, match="sampler 'euler' samples flow models.*choose one of ddpm, ddim"):
        respacing_for("euler", 10)
    with pytest.raises(ValueError, match="steps must be an int in 1..1000"):
        respacing_for("ddpm", 0)


def test_bf16_autocast_stays_close_to_fp32(model):
    d = sampling_diffusion("ddim", 5)
    seeds = index_seeds(0, range(2))
    fp32 = sample_latents(model, d, Y[:2], sampler="ddim", seeds=seeds)
    bf16 = sample_latents(model, d, Y[:2], sampler="ddim", seeds=seeds, autocast=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert 0 < (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_bad_requests_are_refused(model):
    d = sampling_diffusion("ddpm", 5)
    with pytest.raises(ValueError, match="steps=7 but the diffusion given has 5"):
        sample_latents(model, d, Y, steps=7)
    with pytest.raises(ValueError, match="not both"):
        sample_latents(model, d, Y, seeds=[1, 2, 3], generator=torch.Generator())
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        sample_latents(model, d, Y[:2], seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="eta must be in"):
        GuidedSampler(model, d, "ddpm", eta=0.5)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        GuidedSampler(model, d, cfg_scale=-1.0)
    with pytest.raises(ValueError, match="no null class"):
        GuidedSampler(tiny(class_dropout_prob=0.0), d, cfg_scale=4.0)
    GuidedSampler(tiny(class_dropout_prob=0.0), d, cfg_scale=1.0)  # fine without guidance


def test_steps_default_to_250_for_the_models_sigma():
    model = tiny(learn_sigma=False)
    sampler = GuidedSampler(model, sampling_diffusion("ddpm", 250, learn_sigma=False))
    assert sampler.num_draws == 250
    assert GuidedSampler(model, sampling_diffusion("ddim", 50, learn_sigma=False), "ddim").num_draws == 1
    out = sample_latents(model, None, [0], steps=3, seeds=[1])
    assert out.shape == (1, 4, 8, 8)


def test_decode_pixel_mode_and_uint8_rounding():
    grey = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    images = decode(grey * 2, None, 2.0)
    assert images.shape == (1, 3, 2, 2) and torch.equal(images[:, 0], images[:, 2])
    assert to_uint8(images)[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    per_channel = decode(torch.ones(1, 3, 1, 1), None, [1.0, 2.0, 4.0])
    assert per_channel.flatten().tolist() == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="1 or 3 channels"):
        decode(torch.zeros(1, 4, 2, 2), None, 1.0)
    with pytest.raises(ValueError, match="2 values for 3 latent channels"):
        decode(torch.zeros(1, 3, 2, 2), None, [1.0, 2.0])


def test_decode_with_a_vae_divides_by_the_scale_first():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z / 0.5).sample
    assert torch.allclose(decode(z, vae, 0.5, batch_size=2), ref, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "step"])
def test_compiled_sampling_matches_eager(mode):
    """Inductor (as users get it): regional or whole-step compilation changes nothing but rounding, and the
    diffusion's lazily filled tables do not force a recompile."""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, d = tiny(depth=3), sampling_diffusion("ddim", 4)
    eager = sample_latents(model, d, Y, sampler="ddim", eta=0.5, seeds=[4, 5, 6])
    compiled = sample_latents(copy.deepcopy(model), d, Y, sampler="ddim", eta=0.5, seeds=[4, 5, 6], compile=mode)
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1  # one block graph serves all
