"""The memory planner (ditscale.plan) against the measured peak of real training steps.

Each case is a `PlanInput` run for real on one rank: the DiT (random weights) in bf16 or fp32 inside a
DeepSpeed engine with the case's ZeRO stage, offload and bucket sizes (plain PyTorch + AdamW for ZeRO-0 in
fp32, or when DeepSpeed is missing), an fp32 EMA updated after every step, the paper's hybrid diffusion
loss. One warm-up step, then the measured step, then timed steps. Printed last: a table of planned and
measured peak bytes per case, with the error, and the images/s and MFU the step reached.

- CUDA: `torch.cuda.max_memory_allocated` over the measured step, above what was allocated before the case
  (the planner's GPU peak; the caching allocator's reserve on top is what its --headroom stands for).
- CPU: torch.profiler's allocation events of PyTorch's CPU allocator, replayed by address, from before the
  model is built to the end of the measured step: every live byte, so the planner's figure to compare is its
  GPU peak plus its CPU (offload) bytes. tests/unit/test_plan.py runs `--device cpu --suite cpu`.
One process is one rank, so ZeRO shards over N = 1: this checks which buffers exist and how large they are;
the division by N is plain arithmetic in the planner.

    python bench/plan_vs_measured.py --out $OUT --budget 30            # GPU suite (bench/run_gpu.sh)
    python bench/plan_vs_measured.py --suite gpu-offload               # + CPU offload (cpu_adam JIT build)
    python bench/plan_vs_measured.py --case preset=DiT-3B/2,micro_batch=8,zero=3,checkpointing=1
    python bench/plan_vs_measured.py --device cpu --suite cpu --json   # small models on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ditscale.diffusion import create_diffusion  # noqa: E402
from ditscale.models import DiT  # noqa: E402
from ditscale.plan import GiB, PlanInput, ZeroBuffers, from_ds_config, plan  # noqa: E402

EMA_DECAY = 0.9999
CPU_MODEL = dict(depth=3, hidden_size=192, num_heads=3)  # DiT-S/2 shrunk, 128 px (16×16 latents)
CPU_BUFFERS = ZeroBuffers(reduce_bucket_size=200_000, prefetch_bucket_size=200_000)

SUITES = {
    # Fits the 30 s share bench/run_gpu.sh gives it on an H100, most telling first.
    "gpu": [
        dict(preset="DiT-XL/2", micro_batch=32, ds_config="ds_configs/zero2_bf16.json"),
        dict(preset="DiT-XL/2", micro_batch=32, ds_config="ds_configs/zero2_bf16.json", checkpointing=1),
        dict(preset="DiT-XL/2", micro_batch=64, ds_config="ds_configs/zero1_bf16.json"),
        dict(preset="DiT-1B/2", micro_batch=16, ds_config="ds_configs/zero3_bf16.json"),
        dict(preset="DiT-XL/2", resolution=512, micro_batch=8, ds_config="ds_configs/zero2_bf16.json", checkpointing=2),
        dict(preset="DiT-3B/2", micro_batch=16, ds_config="ds_configs/zero3_bf16.json", checkpointing=1),
    ],
    # CPU offload needs DeepSpeed's cpu_adam (a JIT build of a minute or more); the host needs the CPU bytes.
    "gpu-offload": [
        dict(preset="DiT-3B/2", micro_batch=32, ds_config="ds_configs/zero3_offload_bf16.json", checkpointing=1),
        dict(preset="DiT-1B/2", micro_batch=64, ds_config="ds_configs/zero3_offload_bf16.json", checkpointing=1),
    ],
    "cpu": [
        dict(micro_batch=16, zero=0, precision="fp32"),
        dict(micro_batch=16, zero=1),
        dict(micro_batch=16, zero=2, checkpointing=1),
        dict(micro_batch=16, zero=2, precision="fp32", checkpointing=2),
        dict(micro_batch=16, zero=3),
        dict(micro_batch=8, zero=3, checkpointing=1),
        dict(micro_batch=16, zero=2, offload="optimizer"),
        dict(micro_batch=16, zero=3, offload="optimizer+params"),
    ],
}


def case_input(spec, device):
    """(PlanInput, ds_configs path or None) of one case for one rank. A "ds_config" entry sets the ZeRO
    stage, offload, precision and buckets from that JSON; CPU cases default to the small model and buckets."""
    spec = dict(spec)
    path = spec.pop("ds_config", None)
    if path:
        spec = {**from_ds_config(str(ROOT / path)), **spec}
    if device == "cpu":
        spec = {"preset": "DiT-S/2", "model": CPU_MODEL, "resolution": 128, "buffers": CPU_BUFFERS, **spec}
    return PlanInput(**{"gpus": 1, "gpu_mem": 80.0, **spec}), path and str(ROOT / path)


def parse_case(text):
    """ "preset=DiT-XL/2,micro_batch=32,zero=2" → dict of PlanInput fields (numbers parsed)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--case: expected KEY=VALUE, got {item!r}")
        with contextlib.suppress(ValueError):
            val = json.loads(val)
        out[key.strip()] = val
    return out


#################################################################################
#                                  Measurement                                   #
#################################################################################


def live_bytes(events, windows=()):
    """Replay allocation events [(time_ns, ptr, signed bytes)]: (peak live bytes, [peak in each (start, end)
    window], live bytes at the end). Frees of blocks allocated before the first event are ignored."""
    live, cur, peak = {}, 0, 0
    peaks = [0] * len(windows)
    for t, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            cur += size
        elif ptr in live:
            cur -= live.pop(ptr)
        peak = max(peak, cur)
        for i, (a, b) in enumerate(windows):
            if a <= t <= b:
                peaks[i] = max(peaks[i], cur)
    return peak, peaks, cur


def profiler_allocations(prof):
    """[(time_ns, ptr, signed bytes)] of every CPU allocation in a torch.profiler run, and {name: (start,
    end)} of its record_function ranges."""
    from torch._C._profiler import _EventType

    events, ranges, stack = [], {}, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.ptr, f.alloc_size))
        elif node.tag == _EventType.TorchOp:
            ranges.setdefault(node.name, (node.start_time_ns, node.end_time_ns))
    return events, ranges


@contextlib.contextmanager
def cpu_memory_trace():
    """Profile CPU allocations; yields a dict filled on exit with "events" and "ranges"."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield out
    out["events"], out["ranges"] = profiler_allocations(prof)


#################################################################################
#                                    One case                                    #
#################################################################################

AUTO = {
    "train_batch_size": None,
    "train_micro_batch_size_per_gpu": None,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "lr": 1e-4,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.0,
}


def _fill_auto(node, micro_batch):
    """The "auto" values of a ds_configs JSON, as the trainer completes them for one rank."""
    if isinstance(node, dict):
        return {
            k: (micro_batch if AUTO.get(k, 0) is None else AUTO[k]) if v == "auto" else _fill_auto(v, micro_batch)
            for k, v in node.items()
        }
    return node


def ds_config(inp: PlanInput, path=None):
    """The DeepSpeed config of a case: a ds_configs JSON completed, or one written from the PlanInput."""
    if path:
        return _fill_auto(json.loads(Path(path).read_text()), inp.micro_batch)
    b = inp.buffers
    zero = {
        "stage": inp.zero,
        "reduce_bucket_size": b.reduce_bucket_size,
        "allgather_bucket_size": b.reduce_bucket_size,
        "contiguous_gradients": b.contiguous_gradients,
        "stage3_prefetch_bucket_size": b.prefetch_bucket_size,
        "stage3_max_live_parameters": b.max_live_parameters,
        "sub_group_size": b.sub_group_size,
        "stage3_param_persistence_threshold": b.param_persistence_threshold,
    }
    if b.overlap_comm is not None:
        zero["overlap_comm"] = b.overlap_comm
    cfg = {
        "train_batch_size": inp.micro_batch,
        "train_micro_batch_size_per_gpu": inp.micro_batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": inp.precision == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if inp.offload != "none":  # as ds_configs/zero3_offload_bf16.json: DeepSpeed's CPU Adam
        zero["offload_optimizer"] = {"device": "cpu"}
        cfg["optimizer"] = {"type": "AdamW", "params": {k: AUTO[k] for k in ("lr", "betas", "eps", "weight_decay")}}
    if inp.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu"}
    if inp.grad_dtype:
        cfg["data_types"] = {"grad_accum_dtype": inp.grad_dtype}
    return cfg


def _deepspeed():
    try:
        import deepspeed
    except ImportError:
        return None
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(k, v)
    return deepspeed


class Trainer:
    """One rank's training step as ditscale.engine builds it: the DiT in bf16 (under zero.Init for ZeRO-3), a
    DeepSpeed engine with torch's fused AdamW (DeepSpeed's CPU Adam when offloading), the trainer's sharded
    fp32 EMA; the diffusion loss. ZeRO-0 fp32 is plain PyTorch (DDP-like), which the trainer does not run."""

    def __init__(self, inp: PlanInput, device, ds_path=None):
        from ditscale.engine.ema import ShardedEMA, master_shards, module_shards

        kwargs = inp.dit_kwargs()
        dtype = torch.bfloat16 if inp.precision == "bf16" else torch.float32
        plain = inp.zero == 0 and inp.precision == "fp32" and not ds_path
        ds = None if plain else _deepspeed()
        if not plain and ds is None:
            raise RuntimeError("deepspeed is not importable: only ZeRO-0 fp32 cases can run")
        if plain:
            with torch.device(device):
                model = DiT(**{**kwargs, "checkpoint_every": inp.checkpointing})
            self.model = model.train()
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
            self.ema = ShardedEMA(module_shards(model), EMA_DECAY)
        else:
            config = ds_config(inp, ds_path)
            with torch.device(device), ds.zero.Init(config_dict_or_path=config, enabled=inp.zero == 3, dtype=dtype):
                model = DiT(**{**kwargs, "checkpoint_every": inp.checkpointing})
            model = model.to(dtype) if inp.zero != 3 else model
            for buf in model.buffers():  # DeepSpeed casts parameters only; the trainer casts pos_embed
                buf.data = buf.data.to(dtype)
            optimizer = (
                None
                if "optimizer" in config
                else torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
            )
            engine, *_ = ds.initialize(
                model=model.train(),
                optimizer=optimizer,
                config=config,
                model_parameters=None if optimizer else model.parameters(),
            )
            self.model, self.optimizer = engine, None
            self.ema = None if inp.ema == "none" else ShardedEMA(master_shards(engine), EMA_DECAY)
        del model
        if inp.ema == "none":
            self.ema = None
        self.diffusion = create_diffusion()
        n, c, s = inp.micro_batch, kwargs["in_channels"], kwargs["input_size"]
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(n, c, s, s, generator=g).to(device)
        self.t = torch.randint(0, 1000, (n,), generator=g).to(device)
        self.y = torch.randint(0, kwargs["num_classes"], (n,), generator=g).to(device)

    def step(self):
        loss = self.diffusion.training_losses(self.model, self.x, self.t, model_kwargs={"y": self.y})["loss"].mean()
        if self.optimizer is None:
            self.model.backward(loss)
            self.model.step()
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()

    def close(self):
        if self.optimizer is None and hasattr(self.model, "destroy"):
            self.model.destroy()
        self.model = self.optimizer = self.ema = None


def run_case(inp: PlanInput, device, timed_steps=2, ds_path=None):
    """Measured peak bytes of one step, its time, and the plan. On CPU the peak counts every byte the case
    allocated; on CUDA every byte above what was allocated before it."""
    p = plan(inp)
    row = {
        "case": describe(inp) + (f" [{Path(ds_path).name}]" if ds_path else ""),
        "input": {k: v for k, v in vars(inp).items() if k != "buffers"},
        "planned_gpu_bytes": p.peak_bytes,
        "planned_cpu_bytes": p.cpu_bytes,
        "planned_phase": p.peak_phase,
    }
    gc.collect()
    if device == "cpu":
        with cpu_memory_trace() as trace:
            trainer = Trainer(inp, device, ds_path)
            trainer.step()
            with torch.profiler.record_function("measured_step"):
                trainer.step()
        _, (peak,), _ = live_bytes(trace["events"], [trace["ranges"]["measured_step"]])
        row.update(measured_bytes=peak, planned_bytes=p.peak_bytes + p.cpu_bytes)
    else:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        trainer = Trainer(inp, device, ds_path)
        trainer.step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.step()
        torch.cuda.synchronize()
        row.update(
            measured_bytes=torch.cuda.max_memory_allocated() - base,
            planned_bytes=p.peak_bytes,
            reserved_bytes=torch.cuda.max_memory_reserved(),
        )
        t0 = time.perf_counter()
        for _ in range(timed_steps):
            trainer.step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / timed_steps
        row.update(
            step_s=dt,
            images_per_s=inp.micro_batch / dt,
            mfu=p.hardware_flops_per_step / dt / (inp.peak_tflops * 1e12),
            planned_step_s=p.step_time_s,
        )
    trainer.close()
    del trainer
    gc.collect()
    row["error"] = row["planned_bytes"] / row["measured_bytes"] - 1
    return row


def describe(inp: PlanInput):
    ck = {0: "", 1: " ckpt"}.get(inp.checkpointing, f" ckpt/{inp.checkpointing}")
    off = "" if inp.offload == "none" else f" off:{inp.offload}"
    model = "".join(f" {k}={v}" for k, v in inp.model.items())
    return f"{inp.preset}{model} {inp.resolution}px mb{inp.micro_batch} ZeRO-{inp.zero}{off}{ck} {inp.precision}"


#################################################################################
#                                     Report                                     #
#################################################################################


def table(rows, device):
    head = ["case", "planned GiB", "measured GiB", "error"]
    if device != "cpu":
        head += ["reserved GiB", "images/s", "MFU", "planned step ms", "step ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error_message" in r:
            lines.append(f"| {r['case']} | failed: {r['error_message']} |")
            continue
        cells = [r["case"], f"{r['planned_bytes'] / GiB:.3f}", f"{r['measured_bytes'] / GiB:.3f}", f"{r['error']:+.1%}"]
        if device != "cpu":
            cells += [
                f"{r['reserved_bytes'] / GiB:.2f}",
                f"{r['images_per_s']:.1f}",
                f"{r['mfu']:.1%}",
                f"{r['planned_step_s'] * 1e3:.1f}",
                f"{r['step_s'] * 1e3:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument(
        "--suite",
        choices=tuple(SUITES),
        action="append",
        help="cases to run (repeatable; default gpu on cuda, cpu on cpu)",
    )
    ap.add_argument(
        "--case",
        type=parse_case,
        action="append",
        default=[],
        help="extra case as PlanInput fields: preset=DiT-XL/2,micro_batch=32,zero=2,...",
    )
    ap.add_argument("--budget", type=float, default=None, help="seconds; no case starts after this")
    ap.add_argument("--out", type=Path, help="directory for plan_vs_measured.json / .md (rewritten per case)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    start = time.perf_counter()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(min(4, torch.get_num_threads()))
    suites = args.suite or ([] if args.case else ["cpu" if args.device == "cpu" else "gpu"])
    specs = [s for name in suites for s in SUITES[name]] + args.case
    rows = []
    for spec in specs:
        if args.budget is not None and time.perf_counter() - start > args.budget:
            print(f"budget of {args.budget:g} s spent: skipped {spec}", flush=True)
            continue
        try:
            inp, path = case_input(spec, args.device)
            row = run_case(inp, args.device, ds_path=path)
        except Exception as e:  # a failed case is reported, the rest go on
            traceback.print_exc()
            row = {"case": str(spec), "error_message": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(
            json.dumps(row, default=str)
            if args.json
            else f"{row['case']}: "
            + (
                f"planned {row['planned_bytes'] / GiB:.3f} GiB, measured {row['measured_bytes'] / GiB:.3f} GiB "
                f"({row['error']:+.1%})"
                if "error" in row
                else row["error_message"]
            ),
            flush=True,
        )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "plan_vs_measured.json").write_text(json.dumps(rows, indent=1, default=str))
            (args.out / "plan_vs_measured.md").write_text(table(rows, args.device) + "\n")
    if not args.json:
        name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
        print(f"\nplan vs measured peak memory of one training step ({name}, torch {torch.__version__})")
        print(table(rows, args.device))
    return 0 if rows and all("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
