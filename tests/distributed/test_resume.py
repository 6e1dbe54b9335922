"""Resume on 2 CPU ranks: exact for stage 0 (fp32, plain data parallel) and ZeRO-1, 2 and 3; on another world
size (2 → 1 → 2 through the universal form; stage 0: 2 → 1, loaded as is).

Exact: the reference run trains TOTAL steps and saves at N; a second run resumes from that checkpoint
in another run_dir. Per-step losses (all-rank means as logged), gradient norms, the data order
fingerprint, and at the end the fp32 master weights, every optimizer tensor and the EMA must be equal
bit for bit. The "stop, then resume" path through a signal is in test_faults.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds_launch import TOTAL, N, ckpt, metrics, reference_overrides, tensor_leaves, train


def stage0_states(path: Path) -> dict:
    """A stage-0 checkpoint's one DeepSpeed file: the fp32 module and the whole optimizer state."""
    return torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)


def master_weights(path: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not list(path.glob("*optim_states.pt")):
        return stage0_states(path)["module"]
    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every rank's optimizer state file (fp32 partitions, Adam moments, step counts)."""
    out = {}
    for f in sorted(path.glob("*optim_states.pt")):
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        out.update({f"{f.name}{k}": v for k, v in tensor_leaves(sd)})
    return out or dict(tensor_leaves(stage0_states(path)["optimizer"]))


def ema_shards(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(str(f)) for f in sorted((path / "ema").glob("*.safetensors"))}


def full_ema(path: Path) -> dict[str, torch.Tensor]:
    from ditscale.engine.ema import assemble

    return assemble(sorted((path / "ema").glob("*.safetensors")))


def assert_same_state(a: Path, b: Path) -> None:
    wa, wb = master_weights(a), master_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"master weight {k} differs"
    oa, ob = optimizer_tensors(a), optimizer_tensors(b)
    assert oa.keys() == ob.keys() and any("exp_avg_sq" in k for k in oa)
    for k in oa:
        assert torch.equal(oa[k], ob[k]), f"optimizer state {k} differs"
    ea, eb = ema_shards(a), ema_shards(b)
    assert ea.keys() == eb.keys() and len(ea) == 2
    for f in ea:
        assert ea[f].keys() == eb[f].keys()
        for k in ea[f]:
            assert torch.equal(ea[f][k], eb[f][k]), f"EMA {f}:{k} differs"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_exact_resume(stage, reference_run, digits64, tmp_path):
    ref = reference_run(stage)
    run = tmp_path / "resumed"
    resumed = train(2, reference_overrides(stage, run, digits64, f"train.resume={ckpt(ref, N)}"), tmp_path / "b.log")
    assert resumed.returncode == 0, resumed.output[-5000:]
    assert f"resumed from {ckpt(ref, N)} at step {N}" in resumed.output

    ma, mb = metrics(ref), metrics(run)
    assert sorted(ma) == list(range(1, TOTAL + 1)) and sorted(mb) == list(range(N + 1, TOTAL + 1))
    for step in range(N + 1, TOTAL + 1):
        for key in ("loss", "mse", "vb", "grad_norm", "index_sum", "index_sqsum"):
            assert ma[step][key] == mb[step][key], (step, key, ma[step][key], mb[step][key])
    assert all(ma[s]["skipped_steps"] == 0 for s in ma)
    assert all(ma[s]["grad_norm"] > 0 for s in ma)  # stage 0: computed by build.StepGradNorm
    assert len({ma[s]["index_sum"] for s in ma}) > 1 and ma[1]["loss"] > 0
    assert_same_state(ckpt(ref, TOTAL), ckpt(run, TOTAL))
    ema, raw = full_ema(ckpt(run, TOTAL)), master_weights(ckpt(run, TOTAL))
    if stage == 3:  # decay 0 (ds_launch.STAGE_EXTRA): the EMA is the master copy
        assert all(torch.equal(ema[k], raw[k]) for k in ema)
    else:
        assert any(not torch.equal(ema[k], raw[k]) for k in ema), "the EMA should lag the weights"


def test_zero_stages_agree(reference_run):
    """ZeRO-1, 2 and 3 train the same model on the same data and noise: their losses agree to rounding
    (the reduction order of bf16 gradients differs, so not bit for bit)."""
    runs = [metrics(reference_run(stage)) for stage in (1, 2, 3)]
    for step in range(1, TOTAL + 1):
        losses = [m[step]["loss"] for m in runs]
        assert max(losses) - min(losses) <= 1e-3 * losses[0], (step, losses)
        assert len({m[step]["index_sum"] for m in runs}) == 1
    assert runs[0][1]["loss"] == runs[1][1]["loss"] == runs[2][1]["loss"]  # before any update


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_world_size(stage, reference_run, digits64, tmp_path):
    """A checkpoint of 2 ranks → 1 rank → 2 ranks, through DeepSpeed's universal checkpoint (ZeRO-2 stands
    for ZeRO-1 too: both keep the flat fp32 partitions that the conversion re-cuts).

    The data position is exact: every step after a resume sees the same global set of samples as the
    reference (fingerprint: sum and sum of squares of the sample indices per step), also across the
    epoch boundary. The per-sample noise differs (it is drawn per rank), so losses differ. The EMA is
    re-cut from the old shard layout: with a decay of 1 - 1e-9 it stays the loaded EMA, which must
    equal the reference's assembled EMA at the resume step.
    """
    ref = reference_run(stage)
    slow_ema = ["train.ema_decay=0.999999999", "train.resume_ignore=[train.ema_decay]"]
    one, two = tmp_path / "one_rank", tmp_path / "two_ranks"
    r1 = train(
        1,
        reference_overrides(
            stage, one, digits64, f"train.resume={ckpt(ref, N)}", f"train.max_steps={2 * N}", *slow_ema
        ),
        tmp_path / "one.log",
    )
    assert r1.returncode == 0, r1.output[-5000:]
    assert "universal" in r1.output and f"at step {N}" in r1.output
    r2 = train(
        2,
        reference_overrides(stage, two, digits64, f"train.resume={ckpt(one, 2 * N)}", *slow_ema),
        tmp_path / "two.log",
    )
    assert r2.returncode == 0, r2.output[-5000:]

    mref, m1, m2 = metrics(ref), metrics(one), metrics(two)
    assert sorted(m1) == list(range(N + 1, 2 * N + 1)) and sorted(m2) == list(range(2 * N + 1, TOTAL + 1))
    for step, rec in {**m1, **m2}.items():
        assert (rec["index_sum"], rec["index_sqsum"]) == (mref[step]["index_sum"], mref[step]["index_sqsum"]), step
        assert 0 < rec["loss"] < 2 * mref[step]["loss"], step
    expected = full_ema(ckpt(ref, N))
    for path in (ckpt(one, 2 * N), ckpt(two, TOTAL)):
        got = full_ema(path)
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=f"{path}: EMA {k}")


def test_flow_matching_resumes_exactly(digits64, tmp_path):
    """Issue 13: flow matching (SiT's GVP path, velocity prediction) with SD3's logit-normal times and a
    resolution shift, through the same objective seam: ZeRO-2 on 2 ranks resumed from step N equals the
    uninterrupted run bit for bit (every logged part, weights, optimizer, EMA), as the DDPM runs above."""
    flow = (
        "objective.kind=flow",
        "objective.flow.path=gvp",
        "objective.timesteps.sampling=logit_normal",
        "objective.timesteps.shift=2.0",
        "model.learn_sigma=false",
    )
    ref, run = tmp_path / "reference", tmp_path / "resumed"
    first = train(2, reference_overrides(2, ref, digits64, *flow), tmp_path / "a.log")
    assert first.returncode == 0, first.output[-5000:]
    resumed = train(2, reference_overrides(2, run, digits64, *flow, f"train.resume={ckpt(ref, N)}"), tmp_path / "b.log")
    assert resumed.returncode == 0, resumed.output[-5000:]

    ma, mb = metrics(ref), metrics(run)
    assert sorted(mb) == list(range(N + 1, TOTAL + 1))
    assert "vb" not in ma[1] and ma[1]["loss"] > 0
    timing = {"time", "images_per_s", "step_time_s", "data_wait_frac", "mem_gib"}
    for step in range(N + 1, TOTAL + 1):
        assert ma[step].keys() == mb[step].keys()
        for key in ma[step].keys() - timing:
            assert ma[step][key] == mb[step][key], (step, key, ma[step][key], mb[step][key])
    assert_same_state(ckpt(ref, TOTAL), ckpt(run, TOTAL))


def test_stage0_resumes_on_another_world_size_as_is(reference_run, digits64, tmp_path):
    """A stage-0 checkpoint of 2 ranks resumed on 1: no universal conversion (the one DeepSpeed file holds
    the whole fp32 state); the data position is exact and the EMA is re-cut from the 2-rank layout (decay
    1 - 1e-9: it stays the loaded EMA, equal to the reference's at the resume step)."""
    ref = reference_run(0)
    one = tmp_path / "one_rank"
    slow_ema = ["train.ema_decay=0.999999999", "train.resume_ignore=[train.ema_decay]"]
    r1 = train(1, reference_overrides(0, one, digits64, f"train.resume={ckpt(ref, N)}", *slow_ema), tmp_path / "1.log")
    assert r1.returncode == 0, r1.output[-5000:]
    assert f"at step {N} (stage 0, loaded as is: 2 -> 1 ranks" in r1.output
    assert not (one / "ckpt" / "universal").exists()
    mref, m1 = metrics(ref), metrics(one)
    assert sorted(m1) == list(range(N + 1, TOTAL + 1))
    for step, rec in m1.items():
        assert (rec["index_sum"], rec["index_sqsum"]) == (mref[step]["index_sum"], mref[step]["index_sqsum"]), step
        assert 0 < rec["loss"] < 2 * mref[step]["loss"] and rec["grad_norm"] > 0, step
    expected, got = full_ema(ckpt(ref, N)), full_ema(ckpt(one, TOTAL))
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=f"EMA {k}")

    from ditscale.engine.export import export

    (raw_file,) = export(ckpt(one, TOTAL), tmp_path / "raw.safetensors", weights="raw", log=lambda *_: None)
    raw, module = load_file(str(raw_file)), master_weights(ckpt(one, TOTAL))
    assert raw.keys() == module.keys()  # the DiT's parameters and its fixed pos_embed
    assert all(torch.equal(raw[k], module[k]) for k in raw if k != "pos_embed")
