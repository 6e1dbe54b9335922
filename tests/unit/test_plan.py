"""The memory / FLOP planner (ditscale.plan): its estimates against memory measured on CPU, its properties,
the paper's known-good setting, the CLI.

How memory is measured on CPU: torch.profiler(profile_memory=True) reports every allocation and free of
PyTorch's CPU allocator with its address; replaying them in time order gives the bytes live at each moment
(bench/plan_vs_measured.py: `cpu_memory_trace`, `live_bytes`). That is the quantity
`torch.cuda.max_memory_allocated` tracks on a GPU, where the same autograd graph saves the same tensors
(q, k, v, output and log-sum-exp of SDPA's flash path on both), produces the same gradients and DeepSpeed
allocates the same buffers; kernel scratch (cuBLAS workspaces, flash-attention's accumulators) differs and
is within the tolerance. Tensors that exist before a measured window (parameters) are not in it: each test
says what it compares. The issue asks for 20 %; the estimates land within a few per cent.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditscale.diffusion import create_diffusion
from ditscale.models import build_dit
from ditscale.models.flops import dit_gflops, dit_params
from ditscale.plan import (
    CATEGORIES,
    PHASES,
    GiB,
    PlanInput,
    ZeroBuffers,
    activation_memory,
    from_ds_config,
    largest_micro_batch,
    main,
    model_shapes,
    peak_bytes,
    plan,
    sweep,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("plan_vs_measured", ROOT / "bench" / "plan_vs_measured.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TOLERANCE = 0.20
SMALL = {  # two presets shrunk by depth and width; (preset, overrides, resolution)
    "S/2": ("DiT-S/2", dict(depth=3, hidden_size=128, num_heads=2), 128),
    "B/4": ("DiT-B/4", dict(depth=2, hidden_size=192, num_heads=3), 256),
}


def small_input(name, **fields):
    preset, model, resolution = SMALL[name]
    return PlanInput(preset=preset, model=model, resolution=resolution, gpus=1, **fields)


#################################################################################
#                       Estimates against measured memory                        #
#################################################################################


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("micro_batch,every", [(6, 0), (6, 1), (2, 2)], ids=["mb6", "mb6-ckpt", "mb2-ckpt2"])
def test_activations_and_gradients_match_measured(name, dtype, micro_batch, every):
    """Forward + hybrid loss + backward of the model cast to `dtype`, with parameters and no gradients
    before: bytes alive after forward (the saved activations) against `Activations.saved`, and the peak of
    forward + backward (activations falling while gradients appear) against the planner's backward moments."""
    inp = small_input(name, micro_batch=micro_batch, checkpointing=every)
    cfg = inp.dit_kwargs()
    model = build_dit(inp.preset, **inp.model, input_size=cfg["input_size"], checkpoint_every=every).to(dtype)
    diffusion = create_diffusion()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(micro_batch, 4, cfg["input_size"], cfg["input_size"], generator=g)
    t, y = torch.randint(0, 1000, (micro_batch,), generator=g), torch.randint(0, 1000, (micro_batch,), generator=g)
    with bench.cpu_memory_trace() as trace:
        with torch.profiler.record_function("forward"):
            loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean()
        loss.backward()
    end = trace["ranges"]["forward"][1]
    *_, saved = bench.live_bytes([e for e in trace["events"] if e[0] <= end])
    peak, *_ = bench.live_bytes(trace["events"])

    a = activation_memory(cfg, micro_batch, dtype.itemsize, every)
    shapes = model_shapes(inp)
    rest = shapes.params - shapes.block_params - shapes.embed_params  # gradients done at the first block
    planned_peak = max(
        a.backward_start, a.at_first_block + dtype.itemsize * rest, a.embeddings + dtype.itemsize * shapes.params
    )
    assert shapes.params == sum(p.numel() for p in model.parameters())
    assert a.saved == pytest.approx(saved, rel=TOLERANCE), f"saved activations: planned {a.saved}, measured {saved}"
    assert planned_peak == pytest.approx(peak, rel=TOLERANCE), f"fwd+bwd peak: planned {planned_peak}, measured {peak}"


@pytest.mark.parametrize(
    "variant",
    [dict(block="adaln"), dict(block="in_context"), dict(block="cross_attention"), dict(qk_norm="layernorm")],
    ids=lambda v: "-".join(map(str, v.values())),
)
@pytest.mark.parametrize("every", [0, 1])
def test_saved_activations_of_other_blocks(variant, every):
    """The paper's other conditioning blocks and q/k LayerNorm (fp32, forward + loss only)."""
    inp = PlanInput(
        preset="DiT-S/2",
        model=dict(depth=2, hidden_size=128, num_heads=2, **variant),
        resolution=128,
        micro_batch=4,
        checkpointing=every,
    )
    cfg = inp.dit_kwargs()
    model = build_dit(inp.preset, **inp.model, input_size=cfg["input_size"], checkpoint_every=every)
    x, t, y = torch.randn(4, 4, 16, 16), torch.randint(0, 1000, (4,)), torch.randint(0, 1000, (4,))
    with bench.cpu_memory_trace() as trace:
        loss = create_diffusion().training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean()
    *_, saved = bench.live_bytes(trace["events"])
    assert activation_memory(cfg, 4, 4, every).saved == pytest.approx(saved, rel=TOLERANCE)
    del loss


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("micro_batch,every", [(2, 0), (12, 1)])
def test_fp32_training_step_peak_matches_plan(name, micro_batch, every):
    """A whole step (loss, backward, AdamW, fp32 EMA update) of the fp32 model in plain PyTorch, measured
    from before the model is built: the planner's ZeRO-0 fp32 peak on one GPU."""
    row = bench.run_case(
        small_input(name, micro_batch=micro_batch, checkpointing=every, zero=0, precision="fp32"), "cpu"
    )
    assert abs(row["error"]) < TOLERANCE, row


@pytest.mark.slow
def test_deepspeed_steps_match_plan():
    """ZeRO 0-3, offload, checkpointing, bf16 and fp32, through DeepSpeed on one CPU rank (a subprocess)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plan_vs_measured.py"), "--device", "cpu", "--suite", "cpu", "--json"],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(rows) == len(bench.SUITES["cpu"]), proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in rows:
        assert abs(row["error"]) < TOLERANCE, row


#################################################################################
#                                   Properties                                   #
#################################################################################


@st.composite
def inputs(draw, zero=None, offload=None):
    zero = draw(st.integers(0, 3)) if zero is None else zero
    offloads = {
        0: ["none"],
        1: ["none", "optimizer"],
        2: ["none", "optimizer"],
        3: ["none", "optimizer", "optimizer+params"],
    }
    return PlanInput(
        preset=draw(st.sampled_from(["DiT-S/2", "DiT-B/4", "DiT-XL/2", "DiT-1B/2", "DiT-7B/2"])),
        resolution=draw(st.sampled_from([256, 512])),
        micro_batch=draw(st.integers(1, 256)),
        gpus=draw(st.sampled_from([1, 2, 8, 64, 512])),
        zero=zero,
        offload=draw(st.sampled_from(offloads[zero])) if offload is None else offload,
        checkpointing=draw(st.sampled_from([0, 1, 2, 5])),
        precision=draw(st.sampled_from(["bf16", "fp32"])),
        ema=draw(st.sampled_from(["fp32", "bf16", "none"])),
        grad_accum=draw(st.sampled_from([1, 4])),
    )


def states(p):
    """Largest parameter + master + gradient + optimizer + EMA bytes on the GPU over the step."""
    return max(sum(p.phases[ph][c] for c in CATEGORIES[:5]) for ph in PHASES)


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(inputs(), st.integers(1, 64))
def test_memory_grows_with_micro_batch(inp, more):
    bigger = inp.replace(micro_batch=inp.micro_batch + more)
    assert peak_bytes(inp) <= peak_bytes(bigger)
    assert plan(inp).activations.saved < plan(bigger).activations.saved


@PROPERTY
@given(inputs(zero=0, offload="none"), st.sampled_from([2, 8, 64, 512]))
def test_each_zero_stage_lowers_state_memory(inp, gpus):
    per_stage = [states(plan(inp.replace(zero=z, gpus=gpus))) for z in range(4)]
    assert all(a > b for a, b in zip(per_stage, per_stage[1:])), per_stage


@PROPERTY
@given(inputs())
def test_checkpointing_lowers_activations(inp):
    off, every = plan(inp.replace(checkpointing=0)), plan(inp.replace(checkpointing=1))
    acts = lambda p: max(p.phases[ph]["activations"] for ph in PHASES)
    assert acts(every) < acts(off)
    assert every.peak_bytes <= off.peak_bytes
    assert every.hardware_flops_per_step > off.hardware_flops_per_step == every.model_flops_per_step


@PROPERTY
@given(inputs(zero=3, offload="none"), st.sampled_from([1, 2, 3]))
def test_offload_moves_optimizer_to_cpu(inp, zero):
    on_gpu = plan(inp.replace(zero=zero))
    off = plan(inp.replace(zero=zero, offload="optimizer"))
    for ph in PHASES:
        assert off.phases[ph]["master weights"] == off.phases[ph]["optimizer"] == 0
    moved = on_gpu.memory["master weights"] + on_gpu.memory["optimizer"]
    assert off.cpu["master weights"] + off.cpu["optimizer"] == moved > 0
    assert states(off) < states(on_gpu)
    if inp.gpus <= 8:  # on many GPUs the shard moved is smaller than the staging buffer added
        assert off.peak_bytes < on_gpu.peak_bytes
    if zero == 3:
        params_off = plan(inp.replace(zero=3, offload="optimizer+params"))
        assert params_off.memory["parameters"] < off.memory["parameters"]
        assert params_off.cpu["parameters"] > 0


@settings(max_examples=30, deadline=None)
@given(inputs())
def test_largest_micro_batch_is_the_fitting_boundary(inp):
    mb = largest_micro_batch(inp)
    if mb:
        assert peak_bytes(inp.replace(micro_batch=mb)) <= plan(inp).usable_bytes
    assert peak_bytes(inp.replace(micro_batch=mb + 1)) > plan(inp).usable_bytes


#################################################################################
#                             Known settings, FLOPs                              #
#################################################################################


@pytest.mark.parametrize("gpus", [8, 64])
def test_paper_xl2_fits_under_zero2(gpus):
    p = plan(PlanInput(preset="DiT-XL/2", resolution=256, micro_batch=32, gpus=gpus, gpu_mem=80, zero=2))
    assert p.fits and not p.suggestions
    assert 10 * GiB < p.peak_bytes < 30 * GiB  # ~11 GiB of activations + 1.3 GiB weights + EMA
    assert p.params == dit_params("DiT-XL/2")


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_7b_does_not_fit_one_gpu_without_zero3_offload(zero):
    """No micro-batch fits, even with checkpointing: 16 bytes of state per parameter is 102 GiB."""
    inp = PlanInput(preset="DiT-7B/2", micro_batch=1, gpus=1, gpu_mem=80, zero=zero, checkpointing=1)
    p = plan(inp)
    assert not p.fits and p.max_micro_batch == 0
    assert any("offload" in s for s in p.suggestions)
    assert plan(inp.replace(zero=3, offload="optimizer+params")).fits


def test_7b_on_8_gpus_needs_zero_and_is_limited_by_activations():
    inp = PlanInput(preset="DiT-7B/2", micro_batch=32, gpus=8, gpu_mem=80, zero=0)
    assert not plan(inp).fits
    mb = {z: largest_micro_batch(inp.replace(zero=z)) for z in (1, 2, 3)}
    assert 0 < mb[1] < 64 and mb[2] <= mb[1] < mb[3]  # ZeRO-2's overlap buckets vs ZeRO-1's grads
    assert largest_micro_batch(inp.replace(zero=2, checkpointing=1)) > 8 * mb[2]


def test_7b_on_one_gpu_fits_only_with_offload_and_needs_the_host_memory():
    inp = PlanInput(
        preset="DiT-7B/2", micro_batch=8, gpus=1, gpu_mem=80, zero=3, offload="optimizer+params", checkpointing=1
    )
    p = plan(inp)
    assert p.fits and p.cpu_bytes > 100 * GiB  # 18-20 bytes per parameter on the host
    assert not plan(inp.replace(offload="none")).fits
    assert not plan(inp.replace(cpu_mem=128)).fits  # the 128 GiB of a one-GPU machine are too few
    assert plan(inp.replace(preset="DiT-3B/2", cpu_mem=128)).fits


def test_flops_and_step_time():
    inp = PlanInput(preset="DiT-XL/2", micro_batch=32, gpus=8, grad_accum=2, mfu=0.5, peak_tflops=1000)
    p = plan(inp)
    assert p.global_batch == 512
    assert p.model_flops_per_step == pytest.approx(6e9 * dit_gflops("DiT-XL/2") * 512)
    assert p.hardware_flops_per_step == p.model_flops_per_step
    assert p.step_time_s == pytest.approx(p.model_flops_per_step / 8 / 0.5e15)
    assert p.images_per_s == pytest.approx(512 / p.step_time_s)
    ck = plan(inp.replace(checkpointing=1))  # recompute: ~4 forwards instead of 3
    assert 1.30 < ck.hardware_flops_per_step / ck.model_flops_per_step < 4 / 3
    half = plan(inp.replace(checkpointing=2))
    assert half.hardware_flops_per_step < ck.hardware_flops_per_step


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_ema_is_sharded_beside_the_master_weights(zero):
    """As ditscale.engine.ema keeps it: fp32, this rank's shard, on CPU when the optimizer is offloaded."""
    inp = PlanInput(preset="DiT-XL/2", gpus=8, zero=zero)
    shard = 4 * -(-dit_params("DiT-XL/2") // 8)
    assert plan(inp).memory["EMA"] == shard and "EMA" not in plan(inp).cpu
    off = plan(inp.replace(offload="optimizer"))
    assert off.memory["EMA"] == 0 and off.cpu["EMA"] == shard
    assert plan(inp.replace(offload="optimizer", ema_device="gpu")).memory["EMA"] == shard
    assert plan(inp.replace(ema="none")).memory["EMA"] == 0
    assert plan(inp.replace(zero=0)).memory["EMA"] == 8 * shard


def test_memory_split_adds_up():
    p = plan(PlanInput(preset="DiT-3B/2", micro_batch=16, gpus=8, zero=3, offload="optimizer", checkpointing=1))
    assert p.peak_bytes == sum(p.memory.values()) == max(sum(m.values()) for m in p.phases.values())
    assert p.memory["master weights"] == p.memory["optimizer"] == 0
    assert p.cpu_bytes == sum(p.cpu.values()) and p.cpu_bytes_per_node == 8 * p.cpu_bytes
    assert p.activations.checkpointed_blocks == 40


def test_sweep_lists_every_combination():
    rows = sweep(PlanInput(preset="DiT-XL/2", gpus=8))
    assert len(rows) == 24 and all(mb >= 1 for _, mb, _ in rows)
    for alt, mb, p in rows:
        assert p.fits and not plan(alt.replace(micro_batch=mb + 1)).fits
    best = {(a.zero, a.offload, a.checkpointing): mb for a, mb, _ in rows}
    assert best[(2, "none", 1)] > best[(2, "none", 0)]


#################################################################################
#                          Validation, DeepSpeed config, CLI                     #
#################################################################################


@pytest.mark.parametrize(
    "fields,word",
    [
        (dict(preset="DiT-XXL/2"), "preset"),
        (dict(micro_batch=0), "micro_batch"),
        (dict(gpus=1.5), "gpus"),
        (dict(zero=4), "zero"),
        (dict(zero=2, offload="optimizer+params"), "zero=3"),
        (dict(zero=0, offload="optimizer"), "ZeRO stage >= 1"),
        (dict(checkpointing=-1), "checkpointing"),
        (dict(mfu=1.5), "mfu"),
        (dict(precision="fp16"), "precision"),
        (dict(model={"depth": 0}), "depth"),
        (dict(model={"hidden_sizes": 8}), "hidden_sizes"),
        (dict(resolution=100), "vae_factor"),
        (dict(cpu_mem=0), "cpu_mem"),
    ],
)
def test_bad_input_names_the_field(fields, word):
    with pytest.raises(ValueError, match=word):
        PlanInput(**fields)


def test_ds_config(tmp_path):
    cfg = {
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": 5e7,
            "overlap_comm": True,
            "stage3_prefetch_bucket_size": 1e7,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu"},
        },
    }
    path = tmp_path / "zero3_offload.json"
    path.write_text(json.dumps(cfg))
    fields = from_ds_config(str(path))
    assert fields["zero"] == 3 and fields["offload"] == "optimizer+params" and fields["precision"] == "bf16"
    assert fields["buffers"] == ZeroBuffers(
        reduce_bucket_size=50_000_000, overlap_comm=True, prefetch_bucket_size=10_000_000
    )
    PlanInput(**fields)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ValueError, match=r"zero3_offload\.json.*reduce_bucket_size"):
        from_ds_config(str(path))
    with pytest.raises(ValueError, match="missing.json"):
        from_ds_config(str(tmp_path / "missing.json"))


def test_ds_config_buckets_change_the_plan():
    small, big = (
        PlanInput(preset="DiT-XL/2", zero=2, buffers=ZeroBuffers(reduce_bucket_size=b))
        for b in (50_000_000, 500_000_000)
    )
    diff = plan(big).memory["buffers"] - plan(small).memory["buffers"]
    assert diff == 2 * (5e8 - 5e7)  # one bf16 bucket (overlap_comm off under ZeRO-2)


def test_cli_table_json_and_sweep(capsys):
    assert (
        main(
            [
                "--preset",
                "DiT-XL/2",
                "--resolution",
                "256",
                "--micro-batch",
                "32",
                "--gpus",
                "64",
                "--gpu-mem",
                "80",
                "--zero",
                "2",
                "--checkpointing",
                "every",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "FITS" in out and "EMA (fp32)" in out and "activations" in out and "images/s" in out
    main(["--preset", "DiT-7B/2", "--zero", "2", "--gpus", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["suggestions"] and set(data["memory"]) == set(CATEGORIES)
    main(["--preset", "DiT-B/2", "--sweep", "--model-arg", "depth=4"])
    out = capsys.readouterr().out
    assert out.count("ZeRO-") == 24


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--checkpointing", "sometimes"], "--checkpointing"),
        (["--zero", "1", "--offload", "optimizer+params"], "zero=3"),
        (["--model-arg", "depth"], "--model-arg"),
        (["--ds-config", "/nonexistent/ds.json"], "ds.json"),
    ],
)
def test_cli_errors_name_the_flag(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and word in capsys.readouterr().err
