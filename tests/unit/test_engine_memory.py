"""The per-rank memory report's pieces that need no DeepSpeed engine (rank_state itself runs in every
distributed trainer test; tests/distributed/test_zero3_large.py checks its numbers)."""

from __future__ import annotations

import mmap

import torch

from ditscale.engine.memory import _held, describe, process_memory


def test_storages_count_once_and_released_tensors_not_at_all():
    flat = torch.zeros(1000, dtype=torch.bfloat16)
    views = [flat[:300], flat[300:], flat.view(10, 100)]
    other = torch.zeros(10)
    assert _held(views + [other, None, torch.empty(0)]) == {"numel": 1010, "bytes": 2000 + 40}


def test_process_memory_grows_with_a_touched_allocation():
    # A fresh anonymous mapping: torch's allocator could reuse pages this long test process already has.
    before = process_memory()
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))  # 64 MiB, every page written
    after = process_memory()
    assert 0 < before["rss_gib"] <= before["peak_rss_gib"]
    assert after["rss_gib"] - before["rss_gib"] > 0.05 and after["peak_rss_gib"] >= after["rss_gib"]
    block.close()


def test_describe_gives_shares_of_the_full_model():
    gib = 2**30
    rec = {
        "rank": 1,
        "model_numel": gib // 4,
        "params": {"numel": gib // 8, "bytes": gib // 4},
        "grads": {"numel": 0, "bytes": 0},
        "optimizer": {"numel": 3 * gib // 8, "bytes": 3 * gib // 2},
        "ema": {"numel": gib // 8, "bytes": gib // 2},
        "rss_gib": 3.5,
        "peak_rss_gib": 4.25,
        "rss_before_model_gib": 0.5,
    }
    assert describe(rec) == (
        "rank 1: params 256.00 MiB (50%), grads freed after the step, optimizer 1.50 GiB "
        "(150%), ema 512.00 MiB (50%); RSS 3.50 GiB (peak 4.25, 0.50 before the model)"
    )
