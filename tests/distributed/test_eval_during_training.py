"""FID during training on 2 CPU ranks: the EMA is sampled over both ranks every eval.every steps and at
the end, the metrics reach metrics.jsonl and TensorBoard, and an evaluation left unfinished (chunks
missing, no result) is completed by the resumed run without re-sampling the chunks that exist."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ds_launch import train

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    from ditscale.evaluate.digits import real_digit_images, save_digits_net, train_digits_net

    root = tmp_path_factory.mktemp("eval_files")
    np.savez(root / "ref.npz", arr_0=real_digit_images()[0])
    return save_digits_net(train_digits_net(steps=150)[0], root / "digits.safetensors"), root / "ref.npz"


def events(run_dir):
    return [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event": "eval"' in line
    ]


def test_fid_during_training_over_two_ranks_and_its_resume(digits64, eval_files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    weights, ref = eval_files
    run_dir = tmp_path / "run"
    overrides = [
        f"data.root={digits64}",
        f"run_dir={run_dir}",
        "train.max_steps=6",
        "train.ckpt_every=6",
        "log.tensorboard=true",
        "eval.every=4",
        "eval.num_samples=24",
        "eval.batch_size=4",
        "eval.steps=5",
        "eval.network=digits",
        f"eval.weights={weights}",
        f"eval.ref={ref}",
        "eval.metrics=fid,is",
    ]
    first = train(2, overrides, tmp_path / "a.log")
    assert first.returncode == 0, first.output[-5000:]
    found = events(run_dir)
    assert [e["step"] for e in found] == [4, 6] and all(e["fid"] > 0 and e["num_samples"] == 24 for e in found)
    assert "eval at step 4: fid" in first.output and "cost" in first.output
    tb = EventAccumulator(str(run_dir / "tb")).Reload()
    assert [s.step for s in tb.Scalars("eval/fid")] == [4, 6]

    # An evaluation preempted half-way: no result, chunks 0 (rank 0) and 3 (rank 1) missing.
    (step_dir,) = run_dir.glob("eval/step_00000006-*")
    (step_dir / "result.json").unlink()
    for j in (0, 3):
        (step_dir / "chunks" / f"{j:06d}.npz").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (step_dir / "chunks").glob("*.npz")}
    resumed = train(2, overrides, tmp_path / "b.log")
    assert resumed.returncode == 0, resumed.output[-5000:]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert len(list((step_dir / "chunks").glob("*.npz"))) == 6
    again = events(run_dir)[-1]
    assert again["step"] == 6 and again["fid"] == found[-1]["fid"]
    assert again["inception_score"] == found[-1]["inception_score"]
