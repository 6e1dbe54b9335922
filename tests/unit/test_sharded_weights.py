"""Sharded exports (`<name>.safetensors.index.json` + numbered shards + `<name>.json`) as the trainer's
export writes them (ditscale.weights' writer, without a checkpoint), read back as ditscale.sample and
ditscale.interop read them."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ditscale.interop import main as interop_main
from ditscale.models import build_dit
from ditscale.weights import load_model, read_state_dict, write_weights

from helpers import randomize

KWARGS = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1, num_classes=5)


def tiny_model(seed=0):
    return randomize(build_dit("DiT-S/2", **KWARGS), seed)


def write_export(out, model, max_shard_bytes):
    """What export() writes: the weights through write_weights, and the sidecar with the DiT kwargs
    (num_heads=2 matches no preset of width 32: loading must find the sidecar)."""
    sd = model.state_dict()
    asked = []

    def tensors(names):
        asked.append(names)
        return {n: sd[n] for n in names}

    files = write_weights(
        out,
        {k: tuple(v.shape) for k, v in sd.items()},
        tensors,
        max_shard_bytes,
        {"format": "pt", "weights": "ema"},
        log=lambda *_: None,
    )
    out.with_suffix(".json").write_text(json.dumps({"model": model.config, "weights": "ema"}))
    return files, asked


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_writer_asks_one_shard_at_a_time(tmp_path):
    model = tiny_model()
    limit = 20_000
    files, asked = write_export(tmp_path / "ema.safetensors", model, limit)
    index = json.loads(files[-1].read_text())
    assert files[-1].name == "ema.safetensors.index.json" and len(files) - 1 == len(asked) > 3
    assert [f.name for f in files[:2]] == [
        f"ema-00001-of-{len(asked):05d}.safetensors",
        f"ema-00002-of-{len(asked):05d}.safetensors",
    ]
    sd = model.state_dict()
    for names in asked:
        assert sum(4 * sd[n].numel() for n in names) <= limit or len(names) == 1
    assert index["metadata"]["total_size"] == sum(4 * math.prod(v.shape) for v in sd.values())
    assert sorted(index["weight_map"]) == sorted(sd)


@pytest.mark.parametrize("form", ["index", "out_path", "directory"])
def test_load_model_reads_a_sharded_export(tmp_path, form):
    model = tiny_model()
    out = tmp_path / "ema.safetensors"
    write_export(out, model, 20_000)
    given = {"index": tmp_path / "ema.safetensors.index.json", "out_path": out, "directory": tmp_path}[form]
    loaded = load_model(given)
    assert loaded.config == model.config
    assert_same(loaded, model)


def test_directory_with_raw_and_ema_exports_picks_by_name(tmp_path, capsys):
    ema, raw = tiny_model(0), tiny_model(1)
    write_export(tmp_path / "ema.safetensors", ema, 20_000)
    write_export(tmp_path / "raw.safetensors", raw, 10**9)  # one file
    assert_same(load_model(tmp_path, "ema"), ema)
    assert_same(load_model(tmp_path, "raw"), raw)
    assert interop_main(["inspect", "--ckpt", str(tmp_path / "ema.safetensors.index.json")]) == 0
    assert json.loads(capsys.readouterr().out)["num_heads"] == 2


def test_reexport_in_the_other_form_removes_the_stale_files(tmp_path):
    out = tmp_path / "ema.safetensors"
    first, second = tiny_model(0), tiny_model(1)
    write_export(out, first, 20_000)
    write_export(out, second, 10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.json", "ema.safetensors"]
    assert_same(load_model(out), second)
    write_export(out, first, 20_000)
    assert not out.exists()
    assert_same(load_model(out), first)


def test_broken_shard_sets_are_named(tmp_path):
    files, _ = write_export(tmp_path / "ema.safetensors", tiny_model(), 20_000)
    index = files[-1]
    weight_map = json.loads(index.read_text())["weight_map"]
    moved = next(iter(weight_map))
    weight_map[moved] = files[-2].name  # listed in the wrong shard
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"shard .* holds .*{re.escape(moved)}"):
        read_state_dict(index)
    files[1].unlink()
    index.write_text(json.dumps({"weight_map": json.loads(index.read_text())["weight_map"] | {moved: files[0].name}}))
    with pytest.raises(ValueError, match=f"{files[1].name}.*not a readable safetensors file"):
        read_state_dict(index)
    index.write_text("{}")
    with pytest.raises(ValueError, match="not a readable safetensors index"):
        read_state_dict(index)
