"""Export from a 2-rank ZeRO-3 checkpoint: official-layout weights that a DiT loads with strict=True."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from ditscale.engine.checkpoint import read_meta
from ditscale.engine.export import export, main
from ditscale.models import DiT
from ditscale.weights import read_objective

from ds_launch import TOTAL, N, ckpt


def load_exported(weights_file):
    kwargs = json.loads(weights_file.with_suffix(".json").read_text())["model"]
    model = DiT(**kwargs)
    model.load_state_dict(load_file(str(weights_file)), strict=True)
    return model, kwargs


def test_exported_ema_equals_deepspeeds_consolidated_weights(reference_run, tmp_path):
    """The ZeRO-3 reference trains with EMA decay 0, so its EMA is the fp32 master copy: the EMA we
    assemble from our per-rank shard files must equal, bit for bit, the raw weights that DeepSpeed's
    zero_to_fp32 consolidates from its optimizer partitions."""
    run = reference_run(3)
    assert main([str(run), "--out", str(tmp_path / "ema.safetensors")]) == 0
    assert main([str(run / "ckpt"), "--weights", "raw", "--out", str(tmp_path / "raw.safetensors")]) == 0
    ema, kwargs = load_exported(tmp_path / "ema.safetensors")
    raw, _ = load_exported(tmp_path / "raw.safetensors")
    assert json.loads((tmp_path / "ema.json").read_text())["step"] == TOTAL
    for (name, a), (_, b) in zip(ema.state_dict().items(), raw.state_dict().items()):
        assert torch.equal(a, b), name
    assert (kwargs["depth"], kwargs["hidden_size"], kwargs["in_channels"], kwargs["input_size"]) == (2, 32, 1, 8)
    trained = raw.state_dict()["final_layer.linear.weight"]
    assert trained.abs().sum() > 0  # zero-initialised, so nonzero means trained
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 7, 9])
    assert torch.isfinite(ema.eval()(x, t, y)).all()


def test_sharded_export_matches_the_single_file(reference_run, tmp_path):
    run = reference_run(3)
    one = export(ckpt(run, N), tmp_path / "one" / "ema.safetensors")
    many = export(ckpt(run, N), tmp_path / "many" / "ema.safetensors", max_shard_bytes=40_000)
    assert len(one) == 1 and len(many) > 2 and many[-1].name == "ema.safetensors.index.json"
    index = json.loads(many[-1].read_text())
    merged = {}
    for shard in many[:-1]:
        merged.update(load_file(str(shard)))
    single = load_file(str(one[0]))
    assert merged.keys() == single.keys() == set(index["weight_map"])
    assert all(torch.equal(merged[k], single[k]) for k in single)
    load_exported(one[0])
    recorded = read_meta(ckpt(run, N))["objective"]  # the trainer's record, carried by every form of export
    assert recorded["kind"] == "ddpm" and recorded["prediction"] == "epsilon"
    assert read_objective(one[0]) == read_objective(many[-1]) == recorded
    assert json.loads((tmp_path / "one" / "ema.json").read_text())["objective"] == recorded


def test_export_names_a_missing_checkpoint(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert f"checkpoint {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
