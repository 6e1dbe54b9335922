"""FID during training, in one process: the evaluator samples the EMA chunk by chunk, stops between
rounds when asked, finishes only the missing chunks on the next call, and logs what it found and cost."""

import json
import os

import numpy as np
import pytest
import torch

from ditscale.config import ConfigError, config_from_dict
from ditscale.engine.ema import ShardedEMA, module_shards
from ditscale.engine.evaluation import TrainingEval, check_inputs, ema_model
from ditscale.evaluate.digits import real_digit_images, save_digits_net, train_digits_net
from ditscale.models import DiT

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_inputs")
    net, accuracy = train_digits_net(steps=150)
    assert accuracy > 0.9
    np.savez(root / "ref.npz", arr_0=real_digit_images()[0])
    return save_digits_net(net, root / "digits.safetensors"), root / "ref.npz"


class Events:
    """The Metrics object's surface the evaluator uses."""

    def __init__(self):
        self.events, self.tb = [], None

    def write_event(self, **fields):
        self.events.append(fields)


def setup(tmp_path, files, sections=None, **eval_overrides):
    weights, ref = files
    cfg = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"root": "unused"},
            "model": {
                "preset": "DiT-S/2",
                "depth": 1,
                "hidden_size": 32,
                "num_heads": 2,
                "input_size": 8,
                "in_channels": 1,
                "num_classes": 10,
            },
            "train": {"max_steps": 30},
            "eval": {
                "every": 10,
                "num_samples": 40,
                "batch_size": 8,
                "steps": 5,
                "network": "digits",
                "weights": str(weights),
                "ref": str(ref),
                "metrics": ["fid", "is", "pr"],
                **eval_overrides,
            },
            **(sections or {}),
        }
    )
    torch.manual_seed(0)
    ema = ShardedEMA(module_shards(DiT(**cfg.model.dit_kwargs())), 0.9)
    events, lines = Events(), []
    meta = {"vae": "none", "scale_factor": 1.0, "resolution": 8}
    return TrainingEval(cfg, meta, 0, 1, torch.device("cpu"), events, log=lines.append), ema, events, lines


def test_due_at_every_and_the_last_step(tmp_path, files):
    ev, *_ = setup(tmp_path, files)
    assert [s for s in range(0, 31) if ev.due(s)] == [10, 20, 30]
    ev.cfg.train.max_steps = 25
    assert [s for s in range(0, 26) if ev.due(s)] == [10, 20, 25]


def test_stop_between_rounds_then_finish_only_the_missing_chunks(tmp_path, files):
    ev, ema, events, lines = setup(tmp_path, files)
    calls = []
    assert ev.run(10, ema, lambda: calls.append(1) or len(calls) >= 2) is None  # stopped after 2 chunks
    chunks = sorted((ev.step_dir(10) / "chunks").glob("*.npz"))
    assert len(chunks) == 2 and ev.pending(10) and not events.events
    before = {c: c.stat().st_mtime_ns for c in chunks}

    result = ev.run(10, ema, lambda: False)
    assert all(c.stat().st_mtime_ns == t for c, t in before.items())  # not sampled again
    assert len(list((ev.step_dir(10) / "chunks").glob("*.npz"))) == 5 and not ev.pending(10)

    fresh, fresh_ema, *_ = setup(tmp_path / "fresh", files)
    uninterrupted = fresh.run(10, fresh_ema, lambda: False)
    for key in ("fid", "inception_score", "precision", "recall"):
        assert result[key] == uninterrupted[key], key
    assert result["num_samples"] == 40 and result["fid"] > 0
    (event,) = events.events
    assert event["event"] == "eval" and event["step"] == 10 and event["fid"] == result["fid"]
    assert event["settings"]["labels"] == "balanced" and event["settings"]["is_chunk_size"] == 5000
    assert json.loads((ev.step_dir(10) / "result.json").read_text())["fid"] == result["fid"]
    assert "eval at step 10: fid" in lines[-1] and "cost" in lines[-1]
    assert "2 of 5 chunks were kept from an interrupted evaluation" in lines[-1], lines[-1]
    assert ev.run(20, ema, lambda: False)["num_samples"] == 40  # the second of this process: a share of training
    assert "% of the" in lines[-1] and "trained since the last one" in lines[-1], lines[-1]


def test_each_objective_is_evaluated_with_its_own_sampler(tmp_path, files):
    ddpm, *_ = setup(tmp_path / "ddpm", files)
    assert ddpm.sampler == ddpm.settings["sampler"] == "ddpm"  # the paper's; the tag of earlier runs
    ev, ema, *_ = setup(tmp_path / "flow", files, {"objective": {"kind": "flow"}})
    run = ev._sampler(ema)
    assert (ev.sampler, run.sampler, run.process.record()["kind"], run.plan.num_steps) == ("heun", "heun", "flow", 5)
    assert ev.run(10, ema, lambda: False)["num_samples"] == 40
    with pytest.raises(ConfigError, match="eval.sampler: sampler 'ddpm' samples ddpm models"):
        setup(tmp_path / "bad", files, {"objective": {"kind": "flow"}}, sampler="ddpm")


def test_ema_model_is_the_ema(tmp_path, files):
    ev, ema, *_ = setup(tmp_path, files)
    with torch.no_grad():
        for e in ema.ema:
            e.add_(1.0)
    model = ema_model(ev.cfg, ema)
    names = [s.name for s in ema.shards]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n].reshape(-1), e) for n, e in zip(names, ema.ema))


def test_missing_inputs_are_config_errors(tmp_path, files):
    ev, *_ = setup(tmp_path, files)
    with pytest.raises(ConfigError, match="eval.ref: .*nope.npz does not exist"):
        check_inputs(ev.cfg.eval.__class__(every=5, ref=str(tmp_path / "nope.npz"), weights=str(files[0])))
    with pytest.raises(ConfigError, match="eval.ref: is required"):
        config_from_dict({"data": {"root": "x"}, "eval": {"every": 5, "weights": "w"}})
    with pytest.raises(ConfigError, match="eval.metrics"):
        config_from_dict({"data": {"root": "x"}, "eval": {"metrics": ["kid"]}})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(64))
    with pytest.raises(ConfigError, match="eval.weights"):
        setup(tmp_path, (bad, files[1]))
