"""bench/sample_bench.py in its CPU smoke mode: the report it writes is complete and consistent."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sample_bench.py"


def test_smoke_report(tmp_path):
    spec = importlib.util.spec_from_file_location("sample_bench", BENCH)
    bench = sys.modules["sample_bench"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.set_num_threads(1)
    bench.main(["--smoke", "--variants", "eager-autocast,eager-bf16", "--timed-steps", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "sample_bench.json").read_text())
    base, bf16 = report["results"]
    assert [base["variant"], bf16["variant"]] == ["eager-autocast", "eager-bf16"]
    assert base["status"] == bf16["status"] == "ok" and base["ratio"] == 1.0 and base["max_rel_diff"] == 0.0
    assert 0 < bf16["max_rel_diff"] < 0.05 and bf16["finite"]  # bf16 weights: rounding only
    assert report["ours"]["variant"] == "eager-bf16"
    assert abs(bf16["images_per_s"] - report["batch"] / (bf16["step_s"] * 250)) < 1e-2 * bf16["images_per_s"]
    assert "**ours = eager-bf16" in (tmp_path / "sample_bench.md").read_text()
