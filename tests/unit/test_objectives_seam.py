"""The objective seam: DDPM parity with the trainer's pre-seam step, registry, config keys, aux terms."""

from __future__ import annotations

import pytest
import torch

from ditscale.config import ConfigError, load_config
from ditscale.diffusion import create_diffusion
from ditscale.models import DiT
from ditscale.objectives import (
    DDPMObjective,
    FlowObjective,
    ObjectiveMismatch,
    build_objective,
    check_record,
    objective_from_record,
)


def tiny_dit(learn_sigma=True):
    torch.manual_seed(0)
    return DiT(
        input_size=4,
        patch_size=2,
        in_channels=2,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=3,
        learn_sigma=learn_sigma,
    )


def pre_seam_step(diffusion, model, x, y, g, drop_prob):
    """train.py's micro_step before the seam, written out: t, then ε, then the label dropout."""
    n = x.shape[0]
    t = torch.randint(0, diffusion.num_timesteps, (n,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    kwargs = {"y": y}
    if drop_prob > 0:
        kwargs["force_drop_ids"] = (torch.rand(n, generator=g) < drop_prob).long()
    return diffusion.training_losses(model, x, t, kwargs, noise=noise)


@pytest.mark.parametrize("drop_prob", [0.0, 0.3])
def test_ddpm_objective_is_the_pre_seam_step_bit_for_bit(drop_prob):
    model = tiny_dit()
    x, y = torch.randn(6, 2, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    want = pre_seam_step(create_diffusion(""), model, x, y, torch.Generator().manual_seed(5), drop_prob)
    g = torch.Generator().manual_seed(5)
    got = DDPMObjective().loss(model, x, y, g, drop_prob=drop_prob)
    assert list(got) == ["loss", "mse", "vb"]
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ref = torch.Generator().manual_seed(5)
    pre_seam_step(create_diffusion(""), model, x, y, ref, drop_prob)
    assert torch.equal(g.get_state(), ref.get_state())  # same draws, same count


def test_aux_terms_see_the_models_extras_and_add_to_the_loss():
    base = tiny_dit(learn_sigma=False)

    def model(x, t, **kw):
        return base(x, t, **kw), {"seen_t": t}

    class Aux:
        name = "aux"

        def __call__(self, extras, x0, labels):
            return extras["seen_t"].float() * 0 + 2.0

    x, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    for objective in (DDPMObjective(learn_sigma=False), FlowObjective()):
        plain = objective.loss(base, x, y, torch.Generator().manual_seed(1))
        out = objective.loss(model, x, y, torch.Generator().manual_seed(1), aux=[Aux()])
        assert torch.equal(out["aux"], torch.full((3,), 2.0))
        assert torch.allclose(out["loss"], plain["loss"] + 2.0)


def cfg(*overrides):
    return load_config(None, ["data.root=x", *overrides])


def test_config_picks_the_objective_and_refuses_the_other_kinds_keys():
    assert isinstance(build_objective(cfg()), DDPMObjective)
    flow = build_objective(cfg("objective.kind=flow", "objective.flow.path=gvp", "objective.flow.prediction=noise"))
    assert isinstance(flow, FlowObjective) and (flow.train_eps, flow.sample_eps) == (1e-3, 1e-3)
    with pytest.raises(ConfigError, match="objective.kind: 'sit' is not one of ddpm, flow"):
        cfg("objective.kind=sit")
    with pytest.raises(ConfigError, match="objective.flow.path: 'cosine' is not one of linear, gvp, vp"):
        cfg("objective.kind=flow", "objective.flow.path=cosine")
    with pytest.raises(ConfigError, match="objective.flow.prediction"):
        cfg("objective.kind=flow", "objective.flow.prediction=x0")
    with pytest.raises(ConfigError, match="diffusion.noise_schedule: applies to objective.kind=ddpm"):
        cfg("objective.kind=flow", "diffusion.noise_schedule=cosine")
    with pytest.raises(ConfigError, match="objective.flow.path: applies to objective.kind=flow"):
        cfg("objective.flow.path=vp")
    with pytest.raises(ConfigError, match="objective.timesteps.sampling"):
        cfg("objective.timesteps.sampling=beta")
    with pytest.raises(ConfigError, match="objective.timesteps.mean: applies to"):
        cfg("objective.timesteps.mean=0.5")
    with pytest.raises(ConfigError, match="unknown config key 'objective.flow.pth'; did you mean objective.flow.path"):
        cfg("objective.kind=flow", "objective.flow.pth=gvp")
    with pytest.raises(ConfigError, match="sample.sampler: sampler 'ddim' samples ddpm models"):
        cfg("objective.kind=flow", "sample.sampler=ddim")
    with pytest.raises(ConfigError, match="sample.sampler: sampler 'heun' samples flow models"):
        cfg("sample.sampler=heun")


def test_a_yaml_objective_section_with_a_bad_key_is_named(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data: {root: x}\nobjective:\n  kind: flow\n  flow: {path: linear, predicton: velocity}\n")
    with pytest.raises(ConfigError, match="unknown config key 'objective.flow.predicton'.*objective.flow.prediction"):
        load_config(str(path), [])
    path.write_text("data: {root: x}\nobjective: {kind: flow, timesteps: {sampling: logit_normal, std: 0}}\n")
    with pytest.raises(ConfigError, match="objective.timesteps.std: must be > 0"):
        load_config(str(path), [])


def test_flow_loss_draws_from_its_generator_only():
    """What exact resume needs of an objective (the trainer seeds one generator per micro-batch): the
    terms are a function of the generator's state, the global RNG is neither read nor advanced."""
    model = tiny_dit(learn_sigma=False)
    x, y = torch.randn(6, 2, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    flow = FlowObjective(path="gvp", prediction="noise", loss_weight="likelihood")
    torch.manual_seed(1)
    a = flow.loss(model, x, y, torch.Generator().manual_seed(5), drop_prob=0.3)
    after = torch.random.get_rng_state()
    torch.manual_seed(2)
    b = flow.loss(model, x, y, torch.Generator().manual_seed(5), drop_prob=0.3)
    c = flow.loss(model, x, y, torch.Generator().manual_seed(6), drop_prob=0.3)
    assert list(a) == ["loss", "mse"] and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["loss"], c["loss"])
    torch.manual_seed(1)
    assert torch.equal(torch.random.get_rng_state(), after)


def test_a_ddpm_record_samples_with_its_prediction_and_variance():
    from ditscale.diffusion.gaussian import ModelMeanType, ModelVarType
    from ditscale.sampling import sampling_process

    x0 = DDPMObjective(predict_xstart=True, learn_sigma=False, sigma_small=True).record()
    d = sampling_process(objective_from_record(x0).record(), "ddim", 10)
    assert (d.model_mean_type, d.model_var_type, d.num_timesteps) == (
        ModelMeanType.START_X,
        ModelVarType.FIXED_SMALL,
        10,
    )
    paper = sampling_process(None, "ddpm", 10)  # no record: ε, learned variance
    assert (paper.model_mean_type, paper.model_var_type) == (ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE)


def test_records_round_trip_and_mismatches_are_refused():
    flow = FlowObjective(path="vp", prediction="score", loss_weight="likelihood")
    back = objective_from_record(flow.record())
    assert back.record() == flow.record()
    assert objective_from_record(None).record()["kind"] == "ddpm"  # the paper's weights
    assert check_record(None, "ddpm", "x")["prediction"] == "epsilon"
    with pytest.raises(ObjectiveMismatch, match="trained with objective 'flow'.*not 'ddpm'.*euler"):
        check_record(flow.record(), "ddpm", "ckpt.safetensors")
