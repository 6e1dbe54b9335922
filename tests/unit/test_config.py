"""The experiment config (YAML + typed dotted overrides), the DeepSpeed JSON completion, the launch
environment, and the trainer's command line up to the point where it would start working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ditscale.config import (
    ConfigError,
    ExperimentConfig,
    config_diff,
    config_hash,
    identity,
    load_config,
    resolve_with_dataset,
    save_config,
    to_dict,
)
from ditscale.engine.build import complete_ds_config, read_ds_config, skips_nonfinite_steps
from ditscale.engine.launch import detect

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_test.yaml"
XL = REPO / "configs" / "dit_xl_2_256.yaml"


def tiny(*overrides: str) -> ExperimentConfig:
    return load_config(TINY, ["data.root=/data/x", *overrides])


def meta(**changes) -> dict:
    base = {
        "format": "mds",
        "resolution": 8,
        "latent_channels": 1,
        "latent_size": 8,
        "scale_factor": 1.0,
        "vae": "none",
        "classes": [f"digit_{i}" for i in range(10)],
        "num_samples": 64,
        "slices": [],
    }
    return {**base, **changes}


# --------------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------------


def test_the_xl_config_is_the_papers_recipe():
    cfg = load_config(XL, ["data.root=/data/in1k"])
    assert cfg.model.preset == "DiT-XL/2" and cfg.model.class_dropout_prob == 0.1 and cfg.model.learn_sigma
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps, cfg.optim.betas) == (
        1e-4,
        0.0,
        0,
        [0.9, 0.999],
    )
    assert cfg.train.global_batch == 256 and cfg.train.ema_decay == 0.9999 and cfg.train.max_steps >= 400_000
    assert cfg.diffusion.noise_schedule == "linear" and cfg.diffusion.diffusion_steps == 1000
    ds = complete_ds_config(read_ds_config(REPO / cfg.engine.ds_config), cfg, world_size=8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        256,
        32,
        1,
    )
    assert "scheduler" not in ds  # constant learning rate


def test_overrides_are_typed_by_the_field():
    cfg = tiny(
        "train.max_steps=1_000",
        "optim.lr=1e-4",
        "optim.betas=[0.9, 0.95]",
        "train.micro_batch=null",
        "sample.classes=1,2,3",
        "log.tensorboard=false",
        "data.root=0123",
        "model.qk_norm=rmsnorm",
    )
    assert cfg.train.max_steps == 1000 and cfg.optim.lr == 1e-4 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.train.micro_batch is None and cfg.sample.classes == [1, 2, 3] and cfg.log.tensorboard is False
    assert cfg.data.root == "0123" and cfg.model.qk_norm == "rmsnorm"
    assert tiny("optim.warmup_steps=10").optim.warmup_steps == 10


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=3", "unknown config key 'train.max_step'; did you mean train.max_steps"),
        ("train.lr=1", "unknown config key 'train.lr'; did you mean optim.lr"),
        ("modle.depth=2", "unknown config key 'modle.depth'; did you mean model.depth"),
        ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer"),
        ("log.every=true", "log.every: expected an integer, got True"),
        ("log.tensorboard=yes please", "log.tensorboard: expected true or false"),
        ("optim.lr=-1", "optim.lr: must be > 0"),
        ("optim.betas=[0.9]", "optim.betas: must be two values"),
        ("train.ema_decay=1.0", "train.ema_decay: must be in [0, 1)"),
        ("train.micro_batch=3", "train.micro_batch: 3 does not divide train.global_batch=8"),
        ("model.preset=DiT-XXL/2", "model.preset: unknown preset 'DiT-XXL/2'"),
        ("model.block=adaln-zero", "model.block: 'adaln-zero' is not one of"),
        ("engine.device=tpu", "engine.device: 'tpu' is not one of auto, cuda, cpu"),
        ("train.resume_ignore=[optim.lrr]", "train.resume_ignore: unknown key(s) ['optim.lrr']"),
        ("train=3", "'train' is a section"),
        ("train.max_steps", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        tiny(override)
    assert message in str(e.value)


def test_yaml_errors_name_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  global_batch: 256\n  ema: 0.999\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.ema'"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match=f"config file {bad}: expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="data.root: is required"):
        load_config(TINY)


def test_saved_config_loads_back_equal(tmp_path):
    cfg = tiny("optim.lr=3e-4", "sample.classes=[4]")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 3e-4


def test_batch_split():
    assert tiny().train.batch_split(2) == (4, 1)
    assert tiny("train.micro_batch=2").train.batch_split(2) == (2, 2)
    assert tiny("train.global_batch=256", "train.micro_batch=16").train.batch_split(8) == (16, 2)
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        tiny().train.batch_split(3)
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch × ranks = 4 × 4"):
        tiny("train.micro_batch=4").train.batch_split(4)


# --------------------------------------------------------------------------------------------------
# Dataset resolution and resume identity
# --------------------------------------------------------------------------------------------------


def test_model_shape_comes_from_the_dataset():
    cfg = resolve_with_dataset(tiny(), meta())
    kwargs = cfg.model.dit_kwargs()
    assert (kwargs["input_size"], kwargs["in_channels"], kwargs["num_classes"]) == (8, 1, 10)
    assert (kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"], kwargs["patch_size"]) == (2, 32, 2, 2)
    with pytest.raises(ConfigError, match=r"model.in_channels=4 but the dataset at /data/x has 1"):
        resolve_with_dataset(tiny("model.in_channels=4"), meta())
    with pytest.raises(ConfigError, match="model.num_classes=5 but the dataset at /data/x has 10 classes"):
        resolve_with_dataset(tiny("model.num_classes=5"), meta())
    with pytest.raises(ConfigError, match="model.input_size is not resolved"):
        tiny().model.dit_kwargs()
    with pytest.raises(ConfigError, match="hidden_size=30 is not divisible by num_heads=4"):
        resolve_with_dataset(tiny("model.hidden_size=30", "model.num_heads=4"), meta())


def test_resume_identity_ignores_what_may_change():
    base = tiny()
    moved = tiny(
        "run_dir=/elsewhere",
        "train.max_steps=99",
        "data.num_workers=7",
        "engine.ds_config=x.json",
        "log.every=5",
        "sample.every=100",
        "train.micro_batch=2",
        "data.root=/moved",
    )
    assert identity(base) == identity(moved) and config_hash(base) == config_hash(moved)
    changed = tiny("optim.lr=5e-4", "train.seed=1")
    assert config_hash(changed) != config_hash(base)
    diff = config_diff(to_dict(base), changed)
    assert diff == ["optim.lr: checkpoint 0.001, now 0.0005", "train.seed: checkpoint 0, now 1"]
    assert config_diff(to_dict(base), changed, ignore=["optim.lr", "train.seed"]) == []


# --------------------------------------------------------------------------------------------------
# DeepSpeed JSON
# --------------------------------------------------------------------------------------------------


def test_the_ds_configs():
    names = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))
    assert names == [
        "zero0_fp32_cpu",
        "zero1_bf16",
        "zero1_fp32_cpu",
        "zero2_bf16",
        "zero3_bf16",
        "zero3_offload_bf16",
    ]
    stages = {n: read_ds_config(REPO / "ds_configs" / f"{n}.json")["zero_optimization"]["stage"] for n in names}
    assert stages == {n: int(n[4]) for n in names}


@pytest.mark.parametrize(
    "name", ["zero0_fp32_cpu", "zero1_bf16", "zero1_fp32_cpu", "zero2_bf16", "zero3_bf16", "zero3_offload_bf16"]
)
def test_every_ds_config_completes(name):
    cfg = tiny("optim.grad_clip=1.0", "optim.warmup_steps=100", f"engine.ds_config=ds_configs/{name}.json")
    ds = complete_ds_config(read_ds_config(REPO / "ds_configs" / f"{name}.json"), cfg, world_size=2, universal=True)
    # stage 0: ditscale.engine.build.StepGradNorm clips, DeepSpeed does not
    assert ds["bf16"]["enabled"] == ("bf16" in name) and ds["gradient_clipping"] == (0.0 if "zero0" in name else 1.0)
    assert ds["checkpoint"]["load_universal"]
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 100 and ds["scheduler"]["params"]["warmup_max_lr"] == 1e-3
    assert "auto" not in json.dumps(ds)
    assert skips_nonfinite_steps(ds) == ("bf16" in name)
    if "optimizer" in ds:
        assert ds["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}


def test_ds_config_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 16, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"'train_batch_size' is 16 but the experiment config gives 8"):
        complete_ds_config(read_ds_config(f), tiny(f"engine.ds_config={f}"), 2)
    f.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match=f"{f}: zero_optimization.stage must be 0, 1, 2 or 3, got 4"):
        read_ds_config(f)
    f.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    with pytest.raises(ConfigError, match=f"{f}: zero_optimization.stage 0 is supported with fp32 only"):
        read_ds_config(f)
    f.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        read_ds_config(f)
    f.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="fp32 .* ZeRO-1/2 only"):
        read_ds_config(f)
    f.write_text("{not json")
    with pytest.raises(ConfigError, match=f"cannot read {f}"):
        read_ds_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        read_ds_config(tmp_path / "none.json")


# --------------------------------------------------------------------------------------------------
# Launch environment
# --------------------------------------------------------------------------------------------------


def test_rank_layout_from_each_launcher():
    ds = detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_SIZE": "2",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "1234",
            "CROSS_RANK": "1",
        }
    )
    assert (ds.rank, ds.world_size, ds.local_rank, ds.local_world_size, ds.launcher) == (3, 8, 1, 2, "deepspeed")
    tr = detect(
        {
            "RANK": "0",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "29500",
        }
    )
    assert (tr.launcher, tr.local_world_size, tr.master_addr) == ("torchrun", 4, "h")
    sl = detect(
        {
            "SLURM_PROCID": "9",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "16",
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
            "MASTER_ADDR": "node1",
            "MASTER_PORT": "15042",
        }
    )
    assert (sl.rank, sl.local_rank, sl.world_size, sl.local_world_size, sl.master_port, sl.launcher) == (
        9,
        1,
        16,
        8,
        15042,
        "slurm",
    )
    batch_shell = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "5"})
    assert batch_shell.launcher == "single" and batch_shell.world_size == 1
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})


# --------------------------------------------------------------------------------------------------
# Command line, before any work: exit 2 naming the key, or --check
# --------------------------------------------------------------------------------------------------


def run_main(*args: str) -> int:
    from ditscale.engine.signals import release_stop_signals
    from ditscale.train import main

    try:
        return main(["--config", str(TINY), *args])
    finally:
        release_stop_signals()  # main() keeps its stop handlers to the process's exit


def test_bad_config_is_exit_2_naming_the_key(capsys, tmp_path):
    assert run_main(f"run_dir={tmp_path}", "data.root=/x", "train.max_step=10") == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.max_step'" in err and "train.max_steps" in err
    assert run_main(f"run_dir={tmp_path}", "data.root=/x", "objective.kind=flow", "objective.flow.path=cosine") == 2
    assert "objective.flow.path: 'cosine' is not one of linear, gvp, vp" in capsys.readouterr().err
    assert run_main(f"run_dir={tmp_path}", f"data.root={tmp_path / 'nowhere'}") == 2
    err = capsys.readouterr().err
    assert "data.root:" in err and "dataset.json not found" in err


def test_check_validates_data_run_dir_and_ds_config(capsys, tmp_path):
    from data_prep.testing import write_synthetic_latents

    data = write_synthetic_latents(str(tmp_path / "data"), 16, latent_channels=1, latent_size=8, num_classes=10)
    ok = [f"data.root={data}", f"run_dir={tmp_path / 'run'}"]
    assert run_main(*ok, "--check") == 0
    assert "config ok" in capsys.readouterr().out and (tmp_path / "run").is_dir()
    assert run_main(*ok, "engine.ds_config=ds_configs/zero9.json", "--check") == 2
    assert "engine.ds_config: ds_configs/zero9.json does not exist" in capsys.readouterr().err
    assert run_main(*ok, "model.in_channels=3", "--check") == 2
    assert "model.in_channels=3 but the dataset" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert run_main(f"data.root={data}", f"run_dir={blocked / 'run'}", "--check") == 2
    assert "run_dir:" in capsys.readouterr().err
