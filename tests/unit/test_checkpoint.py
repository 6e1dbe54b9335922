"""Checkpoint bookkeeping without DeepSpeed: completeness, the pointer, rotation, resume choice, RNG state."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from ditscale.engine.checkpoint import (CheckpointError, _owner, abandon_newer, atomic_write, list_tags,
                                        newest_complete,
                                        read_meta, resolve_resume, rng_state, rotate, set_rng_state, tag_for)


def make_ckpt(root, step, complete=True, files=None):
    path = root / "ckpt" / tag_for(step)
    (path / "ema").mkdir(parents=True)
    files = files or {"mp_rank_00_model_states.pt": b"m" * 10, "ema/rank_00000.safetensors": b"e" * 4}
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    if complete:
        meta = {"step": step, "world_size": 1, "zero_stage": 2,
                "files": {rel: len(data) for rel, data in files.items()}}
        (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_tag_and_owner_of_files():
    assert tag_for(5000) == "step_00005000"
    assert [_owner(n) for n in ("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt", "zero_pp_rank_12_mp_rank_00_model_states.pt",
                                "mp_rank_00_model_states.pt", "rank_00007.pt", "rank_00002.safetensors", "meta.json")] \
        == [3, 12, 0, 7, 2, 0]


def test_atomic_write_replaces_without_leftovers(tmp_path):
    atomic_write(tmp_path / "latest", b"step_00000001")
    atomic_write(tmp_path / "latest", b"step_00000002")
    assert (tmp_path / "latest").read_text() == "step_00000002"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_read_meta_names_what_is_wrong(tmp_path):
    path = make_ckpt(tmp_path, 10)
    assert read_meta(path)["step"] == 10
    (path / "ema" / "rank_00000.safetensors").write_bytes(b"e")
    with pytest.raises(CheckpointError, match=r"rank_00000.safetensors has 1 bytes, 4 were written"):
        read_meta(path)
    (path / "ema" / "rank_00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint file .*ema/rank_00000.safetensors is missing"):
        read_meta(path)
    (path / "meta.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match=r"cannot read .*meta.json"):
        read_meta(path)
    incomplete = make_ckpt(tmp_path, 20, complete=False)
    with pytest.raises(CheckpointError, match=r"step_00000020 is incomplete: .*meta.json is missing"):
        read_meta(incomplete)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_meta(tmp_path / "nope")


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    for step in (10, 20):
        make_ckpt(tmp_path, step)
    make_ckpt(tmp_path, 30, complete=False)                  # a save that was killed
    skipped = []
    assert resolve_resume(tmp_path, "auto", log=skipped.append).name == "step_00000020"
    assert "step_00000030" in skipped[0]
    assert resolve_resume(tmp_path, "none") is None
    assert resolve_resume(tmp_path / "elsewhere", "auto") is None
    assert resolve_resume(tmp_path, str(tmp_path / "ckpt" / "step_00000010")).name == "step_00000010"
    (tmp_path / "ckpt" / "latest").write_text("step_00000010")
    assert resolve_resume(tmp_path, str(tmp_path / "ckpt")).name == "step_00000010"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(tmp_path, str(tmp_path / "ckpt" / "step_00000030"))


def test_rotation_keeps_the_last_k_and_drops_crashed_saves(tmp_path):
    for step in (10, 20, 30, 40):
        make_ckpt(tmp_path, step)
    make_ckpt(tmp_path, 25, complete=False)
    make_ckpt(tmp_path, 50, complete=False)                  # newer than the newest complete: maybe in flight
    (tmp_path / "ckpt" / "universal" / "step_00000010").mkdir(parents=True)
    rotate(tmp_path / "ckpt", keep_last=2, log=lambda *_: None)
    assert [s for s, _ in list_tags(tmp_path / "ckpt")] == [30, 40, 50]
    assert not (tmp_path / "ckpt" / "universal" / "step_00000010").exists()
    assert newest_complete(tmp_path / "ckpt", log=lambda *_: None).name == "step_00000040"


def test_rng_state_roundtrip_through_a_safe_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    for step in (10, 20, 30):
        make_ckpt(tmp_path, step)
    make_ckpt(tmp_path, 40, complete=False)
    (tmp_path / "ckpt" / "latest").write_text("step_00000030")
    abandon_newer(tmp_path / "ckpt", 10, log=lambda *_: None)
    assert [s for s, _ in list_tags(tmp_path / "ckpt")] == [10, 40]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000010"
    aside = [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_00000020", "step_00000030"]
    assert resolve_resume(tmp_path, "auto").name == "step_00000010"
