"""The objective travels with the weights: exports record it, loaders and samplers refuse a mismatch
(exit 2 naming the objective), a resume with another objective is refused naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ditscale.config import config_diff, load_config, to_dict
from ditscale.interop import main as interop_main
from ditscale.models import DiT
from ditscale.objectives import DDPMObjective, FlowObjective, ObjectiveMismatch
from ditscale.sample import main as sample_main
from ditscale.weights import export_diffusers, load_objective, load_pipeline, read_objective

FLOW = FlowObjective(path="gvp", prediction="velocity").record()


def tiny_weights(path, record, learn_sigma=False, num_classes=3):
    """A tiny DiT's weights at `path` with `record` in the safetensors metadata, as the export writes it."""
    torch.manual_seed(0)
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
    )
    save_file(model.state_dict(), str(path), metadata={"objective": json.dumps(record)})
    return path


@pytest.fixture
def flow_weights(tmp_path):
    return tiny_weights(tmp_path / "ema.safetensors", FLOW)


def test_records_are_read_from_metadata_sidecar_or_absent(flow_weights, tmp_path):
    assert read_objective(flow_weights) == FLOW
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    assert read_objective(plain) is None
    (tmp_path / "plain.json").write_text(json.dumps({"objective": FLOW}))
    assert read_objective(plain) == FLOW
    assert load_objective(flow_weights) == FLOW
    with pytest.raises(ObjectiveMismatch, match="trained with objective 'flow'"):
        load_objective(flow_weights, expected="ddpm")


def grid_args(ckpt, tmp_path, *extra):
    return [
        "--ckpt",
        str(ckpt),
        "--vae",
        "none",
        "--num-heads",
        "2",
        "--classes",
        "0,2",
        "--num-per-class",
        "2",
        "--no-progress",
        "--guide-channels",
        "all",
        "--out",
        str(tmp_path / "grid.png"),
        *extra,
    ]


@pytest.mark.parametrize("sampler", ["euler", "heun", "dopri5", "euler_maruyama"])
def test_flow_checkpoints_sample_with_every_flow_sampler(flow_weights, tmp_path, sampler):
    extra = ["--steps", "3"] if sampler != "dopri5" else ["--rtol", "1e-2", "--atol", "1e-3"]
    assert (
        sample_main(grid_args(flow_weights, tmp_path, "--sampler", sampler, "--cfg-interval", "0.2,0.9", *extra)) == 0
    )
    assert (tmp_path / "grid.png").is_file()


def test_flow_checkpoint_refuses_ddpm_sampling(flow_weights, tmp_path, capsys):
    assert sample_main(grid_args(flow_weights, tmp_path, "--sampler", "ddpm", "--steps", "3")) == 2
    err = capsys.readouterr().err
    assert "sampler 'ddpm' samples ddpm models" in err and "'flow'" in err and "heun" in err
    assert sample_main(grid_args(flow_weights, tmp_path, "--objective", "ddpm")) == 2
    assert "trained with objective 'flow'" in capsys.readouterr().err
    assert sample_main(grid_args(flow_weights, tmp_path, "--sampler", "heun", "--last-step", "mean")) == 2
    assert "takes no option last_step" in capsys.readouterr().err
    assert sample_main(grid_args(flow_weights, tmp_path, "--respacing", "ddim10")) == 2
    assert "--respacing respaces a DDPM schedule; the heun sampler takes --steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        sample_main(grid_args(flow_weights, tmp_path, "--sampler", "plms"))
    assert bad.value.code == 2
    assert "invalid choice: 'plms'" in capsys.readouterr().err


def test_flow_checkpoint_writes_the_adm_npz_with_its_objective(flow_weights, tmp_path, capsys):
    out = tmp_path / "fid"
    run = ["--ckpt", str(flow_weights), "--vae", "none", "--num-heads", "2", "--no-progress", "--npz-out", str(out)]
    run += ["--num-samples", "5", "--batch-size", "4", "--steps", "2", "--cfg-scale", "1.5", "--cfg-interval", "0,0.8"]
    run += ["--guide-channels", "all"]
    assert sample_main(run) == 0
    (path,) = out.glob("samples_*.npz")
    with np.load(path) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert path.name == "samples_5x8x8x3.npz" and images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["objective"] == FLOW and (manifest["sampler"], manifest["steps"]) == ("heun", 2)  # the default
    assert manifest["cfg_interval"] == [0, 0.8]
    capsys.readouterr()
    assert sample_main([*run, "--sampler", "euler"]) == 2  # a resume with another sampler: refused
    assert "sampler: was 'heun', now 'euler'" in capsys.readouterr().err


def test_ddpm_schedule_flags_only_complete_what_the_weights_do_not_record(flow_weights, tmp_path, capsys):
    ddpm = tiny_weights(tmp_path / "ddpm.safetensors", DDPMObjective(learn_sigma=False).record())
    common = ["--steps", "2", "--sampler", "ddim", "--noise-schedule", "cosine"]
    assert sample_main(grid_args(ddpm, tmp_path, *common)) == 2
    err = capsys.readouterr().err
    assert "--noise-schedule cosine contradicts" in err and "(noise_schedule=linear)" in err
    assert sample_main(grid_args(flow_weights, tmp_path, "--diffusion-steps", "500")) == 2
    assert "--diffusion-steps is for DDPM weights" in capsys.readouterr().err
    legacy = tmp_path / "legacy.safetensors"
    save_file(load_file(str(ddpm)), str(legacy))  # no record: the paper's weights
    assert sample_main(grid_args(legacy, tmp_path, *common)) == 0


def test_interop_cli_shows_the_objective_and_will_not_export_a_flow_model(flow_weights, tmp_path, capsys):
    assert interop_main(["inspect", "--ckpt", str(flow_weights), "--num-heads", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["objective"] == FLOW
    argv = ["export", "--ckpt", str(flow_weights), "--num-heads", "2", "--vae", str(tmp_path / "vae")]
    assert interop_main([*argv, "--out", str(tmp_path / "pipe")]) == 2
    err = capsys.readouterr().err
    assert "trained with objective 'flow'" in err and "cannot be sampled as a ddpm model" in err
    assert not (tmp_path / "pipe").exists()


def test_diffusers_export_records_ddpm_and_refuses_flow(tmp_path):
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ObjectiveMismatch, match="trained with objective 'flow'"):
        export_diffusers(model, tmp_path / "p", vae=None, objective=FLOW)
    with pytest.raises(ValueError, match="predicts 'x0'.*'epsilon' prediction only"):
        export_diffusers(model, tmp_path / "p", vae=None, objective=DDPMObjective(predict_xstart=True).record())
    fake = tmp_path / "flow_pipe"
    fake.mkdir()
    (fake / "ditscale_objective.json").write_text(json.dumps(FLOW))
    with pytest.raises(ObjectiveMismatch, match="cannot be sampled as a ddpm model"):
        load_pipeline(fake)


def test_quickstart_samples_with_the_recipe_of_the_recorded_objective(tmp_path):
    from ditscale.quickstart_digits import sample_digits

    weights = tiny_weights(tmp_path / "digits.safetensors", FLOW, num_classes=10)
    (tmp_path / "digits.json").write_text(json.dumps({"model": {"num_heads": 2}}))  # the export's sidecar
    samples, labels = sample_digits(weights, "flow", per_class=2)
    assert samples.shape == (20, 1, 8, 8) and np.abs(samples).max() <= 1 and labels.tolist() == sorted(labels)
    with pytest.raises(ObjectiveMismatch, match="trained with objective 'flow'"):
        sample_digits(weights, "ddpm", per_class=2)


def test_resume_with_another_objective_names_the_key():
    ddpm = load_config(None, ["data.root=x"])
    flow = load_config(None, ["data.root=x", "objective.kind=flow"])
    assert "objective.kind: checkpoint 'ddpm', now 'flow'" in config_diff(to_dict(ddpm), flow)
    pre_seam = {k: v for k, v in to_dict(ddpm).items() if k != "objective"}  # a checkpoint from before the seam
    assert config_diff(pre_seam, ddpm) == []
    assert any(line.startswith("objective.kind") for line in config_diff(pre_seam, flow))
