"""The sharded fp32 EMA: its update, its files, and re-cutting them for any other shard layout.

Layouts are built the way DeepSpeed cuts the fp32 master weights: ZeRO-3 splits every parameter into
`world` equal padded pieces; ZeRO-1/2 concatenate all parameters into one flat buffer and give each
rank a contiguous slice (a rank's slice may start and end inside parameters).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditscale.engine.ema import (
    Shard,
    ShardedEMA,
    ShardIndex,
    assemble,
    gather_full,
    module_shards,
    replica_shards,
)


def zero3_layout(params: dict[str, torch.Tensor], world: int) -> list[list[Shard]]:
    ranks = [[] for _ in range(world)]
    for name, p in params.items():
        part = math.ceil(p.numel() / world)
        for r in range(world):
            start, end = r * part, min((r + 1) * part, p.numel())
            if end > start:
                ranks[r].append(Shard(name, start, tuple(p.shape), p.reshape(-1)[start:end]))
    return ranks


def flat_layout(params: dict[str, torch.Tensor], world: int) -> list[list[Shard]]:
    total = sum(p.numel() for p in params.values())
    part = math.ceil(total / world)
    ranks = [[] for _ in range(world)]
    offset = 0
    for name, p in params.items():
        for r in range(world):
            lo, hi = max(offset, r * part), min(offset + p.numel(), (r + 1) * part)
            if hi > lo:
                ranks[r].append(Shard(name, lo - offset, tuple(p.shape), p.reshape(-1)[lo - offset : hi - offset]))
        offset += p.numel()
    return ranks


LAYOUTS = {"zero3": zero3_layout, "flat": flat_layout}


def save_layout(params, layout, world, tmp_path, tag) -> list:
    files = []
    for r, shards in enumerate(LAYOUTS[layout](params, world)):
        f = tmp_path / f"{tag}_rank_{r:05d}.safetensors"
        ShardedEMA(shards, 0.9).save(f)
        files.append(f)
    return files


def test_update_is_the_ema_of_the_master_weights():
    master = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    shards = zero3_layout(master, 2)[0] + zero3_layout(master, 2)[1]
    ema = ShardedEMA(shards, decay=0.75)
    expected = {k: v.clone() for k, v in master.items()}
    for _ in range(3):
        for v in master.values():
            v.add_(torch.randn_like(v))  # the optimizer moves the master in place
        ema.update()
        expected = {k: 0.75 * expected[k] + 0.25 * master[k] for k in master}
    for s, e in zip(ema.shards, ema.ema):
        torch.testing.assert_close(e, expected[s.name].reshape(-1)[s.start : s.start + s.numel], rtol=1e-6, atol=1e-6)
    assert all(e.dtype == torch.float32 for e in ema.ema)


def test_ema_of_a_bf16_module_is_fp32():
    module = torch.nn.Linear(4, 3).to(torch.bfloat16)
    ema = ShardedEMA(module_shards(module), 0.9)
    assert all(e.dtype == torch.float32 for e in ema.ema) and len(ema.ema) == 2


def test_stage0_ranks_follow_contiguous_views_of_the_modules_own_parameters():
    """Stage 0: the module's fp32 parameters are the master weights, whole on every rank; each rank's EMA
    follows one contiguous 1/world of them (the flat layout, so its files re-cut like ZeRO-1/2's)."""
    module = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    params = list(module.named_parameters())
    for world in (1, 2, 3):
        ranks = [replica_shards(params, r, world) for r in range(world)]
        expected = flat_layout(dict(params), world)
        assert [[(s.name, s.start, s.numel) for s in r] for r in ranks] == [
            [(s.name, s.start, s.numel) for s in r] for r in expected
        ]
    shards = replica_shards(params, 1, 2)
    ema = ShardedEMA(shards, decay=0.5)
    before = [e.clone() for e in ema.ema]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)  # the optimizer steps the parameters in place: the views follow
    ema.update()
    for b, e in zip(before, ema.ema):
        torch.testing.assert_close(e, b + 0.5)
    with pytest.raises(RuntimeError, match="fp32 parameters.*bf16.enabled false"):
        replica_shards(list(module.to(torch.bfloat16).named_parameters()), 0, 1)


def test_save_load_roundtrip_and_layout_mismatch(tmp_path):
    params = {"a": torch.randn(5, 3), "b": torch.randn(7)}
    shards = flat_layout(params, 3)[1]
    ema = ShardedEMA(shards, 0.5)
    ema.ema[0].add_(1.0)
    ema.save(tmp_path / "r1.safetensors")
    other = ShardedEMA(flat_layout(params, 3)[1], 0.5)
    other.load(tmp_path / "r1.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(ema.ema, other.ema))
    wrong = ShardedEMA(flat_layout(params, 2)[1], 0.5)
    with pytest.raises(RuntimeError, match=r"r1.safetensors has another shard layout"):
        wrong.load(tmp_path / "r1.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(RuntimeError, match="cannot read EMA file .*junk.safetensors"):
        other.load(tmp_path / "junk.safetensors")


shapes = st.lists(st.lists(st.integers(1, 7), min_size=1, max_size=3), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(
    shapes=shapes,
    src=st.sampled_from(sorted(LAYOUTS)),
    dst=st.sampled_from(sorted(LAYOUTS)),
    w_src=st.integers(1, 5),
    w_dst=st.integers(1, 5),
)
def test_reshard_to_any_layout_and_assemble(shapes, src, dst, w_src, w_dst):
    params = {f"p{i}": torch.randn(*s) for i, s in enumerate(shapes)}
    with tempfile.TemporaryDirectory() as tmp:
        files = save_layout(params, src, w_src, Path(tmp), "old")
        full = assemble(files)
        assert full.keys() == params.keys() and all(torch.equal(full[k], params[k]) for k in params)
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        for shards in LAYOUTS[dst](zeros, w_dst):
            ema = ShardedEMA(shards, 0.9)
            ema.load_resharded(files)
            for s, e in zip(ema.shards, ema.ema):
                assert torch.equal(e, params[s.name].reshape(-1)[s.start : s.start + s.numel])


def test_missing_rank_file_is_reported(tmp_path):
    params = {"w": torch.randn(10)}
    files = save_layout(params, "zero3", 2, tmp_path, "x")
    with pytest.raises(RuntimeError, match=r"EMA files cover 5 of elements \[0, 10\) of w"):
        ShardIndex(files[:1]).full("w")


def test_gather_full_without_a_process_group():
    params = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    shards = flat_layout(params, 1)[0]
    full = gather_full(ShardedEMA(shards, 0.9))
    assert all(torch.equal(full[k], params[k]) for k in params)
