"""REPA on 2 CPU ranks under ZeRO-2, with a tiny random ViT encoder from a local file and digits shards
that keep their images. Two launches: the first is killed (SIGKILL) at step 10, after its step-5
checkpoint; the second resumes in the same run_dir. The alignment term is logged beside the diffusion
parts, the resumed steps repeat the killed run's losses bit for bit (projector included in the
checkpoint), and both exports are a plain DiT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_resume import master_weights

from conftest import write_digits
from ds_launch import TOTAL, N, ckpt, reference_overrides, start_training, train

pytestmark = pytest.mark.distributed

KILL_AT = 10  # the ranks wait there (before step 10 is logged or saved) until the test kills them


@pytest.fixture(scope="module")
def repa_inputs(tmp_path_factory):
    from safetensors.torch import save_file

    from data_prep import make_dataset
    from ditscale.repa.encoder import build_vit

    base = tmp_path_factory.mktemp("repa")
    data = make_dataset(
        str(write_digits(base / "images", 64)),
        str(base / "mds"),
        resolution=8,
        vae="none",
        image_channels=1,
        decode_workers=0,
        keep_image="png",
    )
    torch.manual_seed(0)
    vit = build_vit("vit_tiny_test")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(base / "encoder.safetensors"))
    return data, base / "encoder.safetensors"


def step_records(run_dir) -> list[dict]:
    """Every per-step record of metrics.jsonl in order, repeats of a resumed run included."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [rec for rec in map(json.loads, lines) if "loss" in rec]


def test_repa_killed_run_resumes_exactly_and_exports_a_plain_dit(repa_inputs, tmp_path):
    from ditscale.engine.export import main as export
    from ditscale.models import DiT

    data, encoder = repa_inputs
    run = tmp_path / "run"
    overrides = reference_overrides(
        2,
        run,
        data,
        "repa.enabled=true",
        "repa.encoder=vit_tiny_test",
        f"repa.encoder_weights={encoder}",
        "repa.block=1",
        "repa.encoder_resolution=56",  # 4×4 patches: the DiT's 4×4 tokens
        "repa.projector_width=64",
    )
    first = start_training(2, overrides, tmp_path / "a.log", env={"DITSCALE_TEST_PAUSE": f"0:step:{KILL_AT}"})
    first.wait_for(lambda text: text.count(f"test pause at step:{KILL_AT}: waiting") == 2, "both ranks to pause")
    first.kill()
    first.wait()
    killed = step_records(run)
    assert [r["step"] for r in killed] == list(range(1, KILL_AT))

    second = train(2, overrides, tmp_path / "b.log")
    assert second.returncode == 0, second.output[-5000:]
    assert f"resumed from {ckpt(run, N)} at step {N}" in second.output
    resumed = step_records(run)[len(killed) :]
    assert [r["step"] for r in resumed] == list(range(N + 1, TOTAL + 1))
    for a, b in zip(killed[N:], resumed):
        for key in ("loss", "mse", "vb", "repa", "grad_norm", "index_sum"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    repa = [r["repa"] for r in killed + resumed]
    assert all(-0.5 <= r <= 0.5 for r in repa) and len(set(repa)) > 1  # λ · mean negative cosine
    assert all(abs(r["loss"] - (r["mse"] + r["vb"] + r["repa"])) < 1e-4 for r in killed)
    assert repa[-1] < repa[0], "the projector should learn to align"
    assert any(k.startswith("repa_projector.") for k in master_weights(ckpt(run, TOTAL)))

    for weights in ("ema", "raw"):
        out = tmp_path / f"{weights}.safetensors"
        assert export([str(run), "--weights", weights, "--out", str(out)]) == 0
        state = load_file(str(out))
        assert not any("repa" in k for k in state)
        DiT(**json.loads(out.with_suffix(".json").read_text())["model"]).load_state_dict(state, strict=True)
