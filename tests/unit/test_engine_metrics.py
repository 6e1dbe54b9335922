"""Training metrics (one process, no process group) and the in-training EMA sample grid."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ditscale.engine.metrics import Metrics, peak_tflops
from ditscale.engine.nonfinite import NonfiniteWatch


def log_cfg(**changes):
    base = dict(every=2, tensorboard=False, wandb=False, wandb_project="x", peak_tflops=100.0, progress="off")
    return SimpleNamespace(**{**base, **changes})


def losses(*values):
    v = torch.tensor(values, dtype=torch.float32)
    return {"loss": v, "mse": v / 2, "vb": v / 2}


def test_interval_means_mfu_and_fingerprint(tmp_path):
    m = Metrics(
        tmp_path,
        log_cfg(),
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        images_per_step=4,
        flops_per_image=1e12,
        start_step=0,
        max_steps=10,
    )
    m.add_losses(losses(1.0, 3.0))
    m.add_losses(losses(float("nan"), 5.0))  # a non-finite sample is left out of the means
    m.add_indices(torch.tensor([1, 2, 3, 4]))
    m.add_step(applied=True, grad_norm=torch.tensor(2.0), data_wait=0.0)
    m.add_step(applied=False, grad_norm=None, data_wait=0.0)
    assert m.due(2) and not m.due(3)
    rec = m.log(2, lr=1e-4, images_seen=8)
    assert rec["loss"] == pytest.approx(3.0) and rec["mse"] == pytest.approx(1.5)
    assert rec["grad_norm"] == pytest.approx(2.0) and rec["skipped_steps"] == 1
    assert (rec["index_sum"], rec["index_sqsum"]) == (10, 30)
    assert rec["mfu"] == pytest.approx(rec["images_per_s"] * 1e12 / 100e12)
    watch = NonfiniteWatch(m.nonfinite, world_size=1)
    assert watch.drain() == 1 and watch.drain() == 0
    m.write_event(event="done", step=2)
    m.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 2 and lines[1]["event"] == "done"


def test_only_the_losses_of_steps_deepspeed_applied_count_as_reaching_the_weights(tmp_path):
    m = Metrics(
        tmp_path,
        log_cfg(),
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        images_per_step=2,
        flops_per_image=1.0,
        start_step=0,
        max_steps=10,
    )
    watch = NonfiniteWatch(m.nonfinite, world_size=1)
    m.add_losses(losses(float("nan"), 1.0))
    m.add_step(applied=False, grad_norm=None, data_wait=0.0)  # skipped (fp32 or bf16 alike): not counted
    assert watch.drain() == 0
    m.add_losses(losses(float("inf"), float("nan")))
    m.add_step(applied=True, grad_norm=torch.tensor(1.0), data_wait=0.0)
    assert watch.drain() == 2
    m.close()


def test_an_interval_of_only_nonfinite_losses_logs_none(tmp_path, capsys):
    m = Metrics(
        tmp_path,
        log_cfg(peak_tflops=None),
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        images_per_step=2,
        flops_per_image=1.0,
        start_step=4,
        max_steps=10,
    )
    m.add_losses(losses(float("inf"), float("nan")))
    m.add_step(applied=False, grad_norm=None, data_wait=0.0)
    rec = m.log(5, lr=1e-4, images_seen=10)
    assert rec["loss"] is None and rec["grad_norm"] is None and "mfu" not in rec
    assert "loss non-finite" in capsys.readouterr().out
    m.close()


def test_peak_flops_defaults():
    assert peak_tflops(torch.device("cpu"), None) is None
    assert peak_tflops(torch.device("cpu"), 123.0) == 123.0


@pytest.mark.parametrize("objective", [[], ["objective.kind=flow", "model.learn_sigma=false"]], ids=["ddpm", "flow"])
def test_ema_feeds_the_sample_grid(tmp_path, objective, monkeypatch):
    """The in-training hook: EMA shards → a DiT with the official state dict → a PNG grid, drawn with the
    run's objective and its default grid sampler (ddim / heun)."""
    from ditscale.config import load_config, resolve_with_dataset
    from ditscale.engine.ema import ShardedEMA, module_shards
    from ditscale.models import DiT
    from ditscale.sampling import grid as grid_module
    from ditscale.train import sample_grid

    meta = {
        "format": "mds",
        "resolution": 8,
        "latent_channels": 1,
        "latent_size": 8,
        "scale_factor": 1.0,
        "vae": "none",
        "classes": [f"c{i}" for i in range(3)],
        "num_samples": 3,
        "slices": [],
    }
    cfg = load_config(
        None,
        [
            "data.root=x",
            f"run_dir={tmp_path}",
            "model.depth=1",
            "model.hidden_size=32",
            "model.num_heads=2",
            "sample.every=1",
            "sample.classes=[0,2]",
            "sample.num_per_class=1",
            "sample.steps=2",
            *objective,
        ],
    )
    cfg = resolve_with_dataset(cfg, meta)
    model = DiT(**cfg.model.dit_kwargs())
    drawn, real_ema_grid = [], grid_module.ema_grid

    def ema_grid(model, grid, *args, **kwargs):
        drawn.append(grid)
        return real_ema_grid(model, grid, *args, **kwargs)

    monkeypatch.setattr(grid_module, "ema_grid", ema_grid)
    sample_grid(cfg, meta, ShardedEMA(module_shards(model), 0.9), step=7, device=torch.device("cpu"), tb=None)
    assert (tmp_path / "samples" / "grid_00000007.png").is_file()
    (grid,) = drawn
    assert (grid.sampler, grid.objective["kind"]) == (("heun", "flow") if objective else ("ddim", "ddpm"))
