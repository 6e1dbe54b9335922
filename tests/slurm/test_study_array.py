"""Issue 18: slurm/study.sh as a real SLURM array on the local cluster: each array task trains one
configuration of a sweep through train_xl.sh with FID during training, and `ditscale.study plot` draws the
figures from what the tasks wrote. The digits stand in for ImageNet and a digits classifier for the
Inception, as in tests/slow/test_scaling_study.py (which runs the same sweep without SLURM)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slurm
def test_study_array_trains_each_configuration_and_the_plot_reads_them(slurm_cluster, tmp_path):
    from ditscale import study
    from ditscale.study_digits import prepare

    sweep_path = prepare(tmp_path, max_steps=30, net_steps=50)
    sweep = yaml.safe_load(sweep_path.read_text())
    sweep["models"] = sweep["models"][:1]  # one width × patch sizes 4 and 2: two array tasks
    sweep["overrides"].append("eval.steps=5")
    sweep_path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    count = subprocess.run(
        [sys.executable, "-m", "ditscale.study", "list", str(sweep_path), "--count"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert count.stdout.strip() == "2"

    job = slurm_cluster.sbatch(
        f"--partition={slurm_cluster.partition}",
        "--gres=none",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--time=30",
        "--array=0-1",
        f"--output={tmp_path}/study-%A_%a.out",
        "slurm/study.sh",
        env={"SWEEP": str(sweep_path), "GPUS_PER_NODE": "0", "OMP_NUM_THREADS": "1"},
    )
    configs = study.Sweep.load(sweep_path).configurations()
    for i, config in enumerate(configs):
        done = slurm_cluster.wait(f"{job}_{i}", timeout=600)
        out = tmp_path / f"study-{job}_{i}.out"
        log = out.read_text() if out.exists() else f"(no {out})"
        assert (done.state, done.exit_code) == ("COMPLETED", 0), log[-4000:]
        assert f"array task {i} of {sweep_path}: {config.run_dir}" in log
        assert [step for step, _ in study.eval_points(config.run_dir)] == [10, 20, 30], log[-4000:]

    figures = tmp_path / "figures"
    assert study.main(["plot", str(sweep_path), "--out", str(figures)]) == 0
    summary = json.loads((figures / "summary.json").read_text())
    assert [r["name"] for r in summary["configurations"]] == [c.name for c in configs]
    for row in summary["configurations"]:
        assert [p["step"] for p in row["points"]] == [10, 20, 30] and all(p["fid"] > 0 for p in row["points"])
    for name in ("fid_vs_steps.png", "fid_vs_compute.png", "fid_vs_gflops.png"):
        assert (figures / name).stat().st_size > 0
