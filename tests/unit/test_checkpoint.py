"""Checkpoint bookkeeping without DeepSpeed: completeness, the pointer, rotation, resume choice, RNG state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from ditscale.engine.checkpoint import (
    CheckpointError,
    _owner,
    abandon_newer,
    atomic_write,
    list_tags,
    needs_universal,
    newest_complete,
    read_meta,
    resolve_resume,
    rng_state,
    rotate,
    set_rng_state,
    stage_change_problem,
    tag_for,
)


def make_ckpt(root, step, complete=True, files=None):
    path = root / "ckpt" / tag_for(step)
    (path / "ema").mkdir(parents=True)
    files = files or {"mp_rank_00_model_states.pt": b"m" * 10, "ema/rank_00000.safetensors": b"e" * 4}
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    if complete:
        meta = {
            "step": step,
            "world_size": 1,
            "zero_stage": 2,
            "files": {rel: len(data) for rel, data in files.items()},
        }
        (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_tag_and_owner_of_files():
    assert tag_for(5000) == "step_00005000"
    assert [
        _owner(n)
        for n in (
            "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt",
            "zero_pp_rank_12_mp_rank_00_model_states.pt",
            "mp_rank_00_model_states.pt",
            "rank_00007.pt",
            "rank_00002.safetensors",
            "meta.json",
        )
    ] == [3, 12, 0, 7, 2, 0]


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
    make_ckpt(tmp_path, 30, complete=False)  # a save that was killed
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
    make_ckpt(tmp_path, 50, complete=False)  # newer than the newest complete: maybe in flight
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


#################################################################################
#                  Checksums, the verify command, write errors                  #
#################################################################################


def make_checked_ckpt(root, step, files=None):
    """A complete checkpoint whose meta.json records sizes and checksums, as save() writes it."""
    from ditscale.engine import integrity

    path = make_ckpt(root, step, complete=False, files=files)
    recorded = {str(f.relative_to(path)): integrity.file_record(f) for f in sorted(path.rglob("*")) if f.is_file()}
    (path / "meta.json").write_text(
        json.dumps({"step": step, "world_size": 1, "zero_stage": 2, "files": recorded, "checksum": integrity.CHECKSUM})
    )
    return path


def flip_byte(f, at=-3):
    data = bytearray(f.read_bytes())
    data[at] ^= 0x40
    f.write_bytes(bytes(data))


def test_a_flipped_byte_is_found_named_and_resume_falls_back(tmp_path):
    from ditscale.engine.checkpoint import verify_across_ranks

    for step in (10, 20):
        make_checked_ckpt(tmp_path, step)
    victim = tmp_path / "ckpt" / "step_00000020" / "mp_rank_00_model_states.pt"
    flip_byte(victim)
    assert read_meta(victim.parent)["step"] == 20  # the size is unchanged: complete as before
    lines = []
    verify = lambda p, m: verify_across_ranks(p, m, log=lines.append)  # noqa: E731 (one process: no group)
    assert resolve_resume(tmp_path, "auto", log=lines.append, verify=verify).name == "step_00000010"
    assert any(f"skipping checkpoint {victim.parent}: checkpoint file {victim} is corrupt" in x for x in lines)
    assert any("verified checkpoint" in x and "step_00000010" in x for x in lines)
    with pytest.raises(
        CheckpointError, match=rf"{victim} is corrupt: its xxh3_64 is [0-9a-f]+, [0-9a-f]+ was recorded"
    ):
        resolve_resume(tmp_path, str(victim.parent), verify=verify)


def test_verify_command_reports_each_checkpoint(tmp_path):
    from ditscale.engine.checkpoint import verify_run

    make_ckpt(tmp_path, 5)  # an older version's meta: sizes only
    make_checked_ckpt(tmp_path, 10)
    bad = make_checked_ckpt(tmp_path, 20)
    make_ckpt(tmp_path, 30, complete=False)
    out = []
    assert verify_run(tmp_path, out=out.append) == 0
    assert "resume auto would start from: " + str(tmp_path / "ckpt" / "step_00000020") in out[-1]
    flip_byte(bad / "ema" / "rank_00000.safetensors")
    out.clear()
    assert verify_run(tmp_path, out=out.append) == 1
    text = "\n".join(out)
    assert "step_00000005: ok: step 5, 2 files" in text and "no checksums recorded" in text
    assert "step_00000010: ok: step 10" in text and "checksums match" in text
    assert f"step_00000020: BAD: checkpoint file {bad / 'ema' / 'rank_00000.safetensors'} is corrupt" in text
    assert "step_00000030: incomplete" in text
    assert out[-1].endswith("step_00000010")
    assert verify_run(tmp_path / "ckpt" / "step_00000010", out=out.append) == 0
    assert verify_run(tmp_path / "nothing", out=out.append) == 2


def test_recording_engine_checksums_writes_and_keeps_the_first_error(tmp_path):
    import errno

    from ditscale.engine import integrity

    class Writer:
        def save(self, state, path):
            if "full" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            torch.save(state, path)

        def makedirs(self, path, exist_ok):
            return "inner"

    rec = integrity.RecordingCheckpointEngine(Writer())
    rec.save({"x": torch.ones(3)}, str(tmp_path / "a.pt"))
    rec.save({"x": torch.ones(3)}, str(tmp_path / "full.pt"))
    rec.save({"x": torch.ones(3)}, str(tmp_path / "b.pt"))  # after an error: not attempted
    assert list(rec.records) == [str((tmp_path / "a.pt").resolve())]
    assert rec.records[str((tmp_path / "a.pt").resolve())] == integrity.file_record(tmp_path / "a.pt")
    assert rec.error[0] == str(tmp_path / "full.pt") and not (tmp_path / "b.pt").exists()
    assert rec.makedirs("x", exist_ok=True) == "inner"
    message, no_space = integrity.describe_write_error(*rec.error)
    assert no_space and message.startswith(f"writing {tmp_path / 'full.pt'} failed: no space left on device")
    assert "errno ENOSPC" in message and "bytes free on its filesystem" in message
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error")
    message, no_space = integrity.describe_write_error(tmp_path / "c.pt", wrapped)
    assert not no_space and "input/output error" in message


def test_files_are_split_over_ranks_by_bytes():
    from ditscale.engine.integrity import assign, space_needed

    files = {"big": {"bytes": 100}, "a": 30, "b": 30, "c": 30, "d": 10}
    parts = assign(files, 2)
    assert sorted(sum(parts, [])) == sorted(files) and parts[0] == ["big"]
    assert assign(files, 1) == [["big", "a", "b", "c", "d"]]
    assert space_needed(0) == 0 and space_needed(100 << 20) == int(105 << 20) + (1 << 20)


def test_stage0_checkpoints_load_on_any_world_size_and_never_change_stage():
    """A stage-0 checkpoint holds the whole fp32 state: another world size loads it as is (no universal
    conversion, which needs ZeRO files); moving to or from a ZeRO stage is refused naming the key."""
    stage0 = {"world_size": 2, "zero_stage": 0}
    assert not needs_universal(stage0, 1, 0) and not needs_universal(stage0, 2, 0)
    assert needs_universal({"world_size": 2, "zero_stage": 2}, 1, 2)
    assert needs_universal({"world_size": 2, "zero_stage": 2}, 2, 1)
    assert stage_change_problem(stage0, 0) is None and stage_change_problem({"zero_stage": 1}, 2) is None
    for saved, now in ((0, 1), (2, 0), (0, 3)):
        assert "keep zero_optimization.stage" in stage_change_problem({"zero_stage": saved}, now)
    assert "between ZeRO-3 and ZeRO-1/2" in stage_change_problem({"zero_stage": 3}, 1)


def test_universal_conversion_of_a_stage0_checkpoint_is_refused(tmp_path):
    from ditscale.engine.checkpoint import make_universal

    path = make_ckpt(tmp_path, 5)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "zero_stage": 0}))
    with pytest.raises(CheckpointError, match="stage 0.*loads as it is on any world size"):
        make_universal(path, tmp_path)
