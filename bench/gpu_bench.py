"""DiT training throughput on one GPU: a plain-PyTorch baseline, compiled blocks, and the real trainer path.

One step = diffusion training loss (random t, the paper's hybrid loss) + backward + AdamW + EMA update.
Every run measures, in the same process and on the same card:
  - a bf16 matrix multiply (the peak that MFU is quoted against) and the SDPA backends at DiT's shapes;
  - `eager`: our model, plain PyTorch, eager, bf16 autocast, fp32 weights, torch AdamW, the official
    per-parameter EMA loop — the baseline every ratio is taken against (per resolution);
  - `compiled`: the same with every block torch.compile'd, fused AdamW and a foreach EMA;
  - `ds-zero2`, `ds-zero1`: the trainer's own path (ditscale.engine / ditscale.train: DeepSpeed bf16 engine,
    its optimizer, EMA every step, batches from MDS shards with posterior sampling on the device,
    logging on), with `engine.compile=blocks` set through the config (`--no-compile`: off), observed
    and ended through the trainer's hooks; `+ckpt` with activation checkpointing on every block;
    `ds-zero2-async` with `engine.nonfinite_check=async` (no host sync per step).
Timing: warm-up steps (compilation included) are excluded; a window of steps is timed between two CUDA
synchronisations. A wall-clock budget skips (and marks) what no longer fits, so the run ends in time; the
JSON and the markdown table are rewritten after every setting, so a killed run keeps what it measured.

    python bench/gpu_bench.py --out $OUT --budget 200             # on the GPU machine (bench/run_gpu.sh)
    python bench/gpu_bench.py --smoke --out /tmp/bench            # CPU plumbing check with a tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ditscale.diffusion import create_diffusion  # noqa: E402
from ditscale.models import build_dit  # noqa: E402
from ditscale.models.flops import train_flops_per_image  # noqa: E402
from ditscale.models.fused import compile_blocks  # noqa: E402

PRESET = "DiT-XL/2"
GOAL_IMAGES_PER_S = 650
SMOKE_MODEL = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2)  # CPU plumbing check only


#################################################################################
#                               Settings and results                            #
#################################################################################


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "eager" | "compiled" | "trainer"
    resolution: int
    batch: int
    zero: int = 0  # DeepSpeed ZeRO stage (trainer only)
    checkpoint_every: int = 0  # activation checkpointing (0 off, 1 every block)
    est_s: float = 30.0  # what it needs of the budget (build + compile + steps), to skip early
    note: str = ""
    overrides: tuple[str, ...] = ()  # trainer config overrides (trainer only)


# In priority order: what must be measured comes first, so a short budget still answers the question.
SETTINGS = [
    Setting("eager", "eager", 256, 128, est_s=20, note="baseline: plain PyTorch, eager, bf16 autocast"),
    Setting("ds-zero2", "trainer", 256, 128, zero=2, est_s=75, note="trainer path (the goal)"),
    Setting("ds-zero1", "trainer", 256, 128, zero=1, est_s=30),
    Setting(
        "ds-zero2+ckpt",
        "trainer",
        256,
        128,
        zero=2,
        checkpoint_every=1,
        est_s=35,
        note="activation checkpointing, same batch: its cost",
    ),
    Setting("compiled", "compiled", 256, 128, est_s=50, note="plain PyTorch, compiled blocks, fused AdamW"),
    Setting(
        "ds-zero2-async",
        "trainer",
        256,
        128,
        zero=2,
        est_s=25,
        overrides=("engine.nonfinite_check=async",),
        note="engine.nonfinite_check=async: DeepSpeed's per-step overflow syncs off, no host sync per step",
    ),
    Setting("eager", "eager", 512, 32, est_s=20, note="baseline at 512 (1,024 tokens)"),
    Setting("ds-zero2", "trainer", 512, 32, zero=2, est_s=60),
    Setting(
        "ds-zero2+ckpt",
        "trainer",
        256,
        256,
        zero=2,
        checkpoint_every=1,
        est_s=50,
        note="larger batch with checkpointing",
    ),
    Setting("ds-zero2", "trainer", 256, 256, zero=2, est_s=30, note="larger batch (may not fit)"),
]


@dataclass
class Result:
    setting: str
    resolution: int
    batch: int
    status: str = "ok"  # ok | skipped (budget) | oom | error: … | timed out
    images_per_s: float | None = None
    step_ms: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    ratio: float | None = None  # images/s over the eager baseline at the same resolution
    steps_timed: int = 0
    warmup_s: float | None = None  # build + compile + warm-up steps
    host_syncs_per_step: float | None = None
    sync_sites: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    note: str = ""


class TimeUp(Exception):
    """Raised by the per-setting alarm: the setting ran past its share of the budget."""


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupt the block (compilation included: it runs Python) after `seconds`."""
    if seconds <= 0:
        raise TimeUp()

    def _raise(signum, frame):
        raise TimeUp()

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


#################################################################################
#                                   Timing                                      #
#################################################################################


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, *, warmup: int, window_s: float, min_steps: int, max_steps: int) -> dict:
    """Run `warmup` steps (compilation happens here), estimate a step's time from two synchronised steps,
    then time as many steps as fit `window_s` (within [min_steps, max_steps]) between two synchronisations."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    t1 = time.perf_counter()
    for _ in range(2):
        step()
    synchronize(device)
    probe = (time.perf_counter() - t1) / 2
    n = max(min_steps, min(max_steps, int(window_s / max(probe, 1e-6))))
    t2 = time.perf_counter()
    for _ in range(n):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - t2
    return {"warmup_s": t1 - t0, "probe_step_s": probe, "steps": n, "step_s": elapsed / n}


def count_host_syncs(step, device) -> tuple[int, list[str]]:
    """Host synchronisations in one step, as CUDA's sync debug mode reports them (with the Python line
    that caused each). CPU runs report (None, [])."""
    if device.type != "cuda":
        return None, []
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    return len(syncs), sites


#################################################################################
#                        Peaks: matrix multiply, attention                      #
#################################################################################


def matmul_tflops(device, n=8192, dtype=torch.bfloat16, reps=10) -> float:
    """bf16 n×n×n product on random data (zeros run faster than real data): median of `reps`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def sdpa_backends(device, shapes) -> dict:
    """Forward + backward time (ms) of each SDPA backend at DiT's attention shapes (N, heads, T, head_dim),
    and of the default choice, bf16. Attention is 4 % of XL/2's FLOPs at 256 and 14 % at 512."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for n, h, t, d in shapes:
        # q, k, v laid out as the model makes them: views of one (N, T, 3D) projection
        qkv = torch.randn(n, t, 3 * h * d, device=device, dtype=torch.bfloat16, requires_grad=True)
        q, k, v = (z.unflatten(-1, (h, d)).transpose(1, 2) for z in qkv.chunk(3, dim=-1))  # (N, h, T, d)
        grad = torch.randn(n, h, t, d, device=device, dtype=torch.bfloat16)
        row = {}
        for name, backend in [
            ("default", None),
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ]:
            ctx = contextlib.nullcontext() if backend is None else sdpa_kernel(backend)
            try:
                with ctx:

                    def run():
                        sdpa = torch.nn.functional.scaled_dot_product_attention
                        sdpa(q, k, v).backward(grad, retain_graph=True)  # noqa: B023 (called in this iteration)

                    for _ in range(3):
                        run()
                    synchronize(device)
                    t0 = time.perf_counter()
                    for _ in range(10):
                        run()
                    synchronize(device)
                row[name] = round((time.perf_counter() - t0) / 10 * 1e3, 3)
            except RuntimeError as e:  # backend unavailable for this shape / build
                row[name] = f"n/a ({str(e).splitlines()[0][:80]})"
        out[f"N={n} heads={h} T={t} d={d}"] = row
    return out


#################################################################################
#                          Plain PyTorch steps (a), (b)                         #
#################################################################################


def _model_kwargs(resolution, smoke):
    kwargs = dict(input_size=resolution // 8)
    return {**SMOKE_MODEL, **kwargs} if smoke else kwargs


def build_model(resolution, smoke, device, **overrides):
    with torch.device(device):  # initialise on the device: XL's 675M parameters init in ms there
        if smoke:
            from ditscale.models import DiT

            return DiT(**_model_kwargs(resolution, smoke), **overrides)
        return build_dit(PRESET, **_model_kwargs(resolution, smoke), **overrides)


def ema_loop(ema, model, decay=0.9999):
    """The official DiT code's EMA: one mul_/add_ pair per parameter."""
    with torch.no_grad():
        ema_params = dict(ema.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].mul_(decay).add_(p.data, alpha=1 - decay)


def ema_foreach(ema_params, params, decay=0.9999):
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - decay)


def build_plain_step(s: Setting, device, smoke):
    """(a) eager: autocast bf16, fp32 weights, torch AdamW (its default foreach), official EMA loop.
    (b) compiled: every block compiled, fused AdamW, foreach EMA."""
    compiled = s.kind == "compiled"
    model = build_model(s.resolution, smoke, device, checkpoint_every=s.checkpoint_every).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    if compiled:
        compile_blocks(model)
    opt_kwargs = dict(fused=True) if compiled and device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, **opt_kwargs)
    diffusion = create_diffusion()
    channels, size = model.in_channels, model.input_size
    x = torch.randn(s.batch, channels, size, size, device=device)
    y = torch.randint(0, model.num_classes, (s.batch,), device=device)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (s.batch,), device=device)
        with amp:
            loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if compiled:
            ema_foreach(ema_params, params)
        else:
            ema_loop(ema, model)

    return step, {
        "optimizer": "torch AdamW " + ("fused" if opt_kwargs else "foreach (default)"),
        "ema": "foreach lerp" if compiled else "per-parameter loop (official)",
    }


#################################################################################
#                           The trainer's path (c), (d)                         #
#################################################################################


class BenchDone(Exception):
    """Raised from the metrics hook when enough logged intervals were timed: ends ditscale.train's loop."""


_DIST_READY = False


def _init_dist_once(device):
    """One single-rank process group for the whole bench (nccl on a GPU, gloo on CPU), as train.main does."""
    global _DIST_READY
    if not _DIST_READY:
        from ditscale.engine import launch

        launch.init_distributed(launch.detect(), device)
        _DIST_READY = True


def describe_optimizer(engine) -> str:
    inner = getattr(engine.optimizer, "optimizer", None)
    return f"{type(engine.optimizer).__name__} over {type(inner).__name__ if inner else '?'}" + (
        f" (fused={inner.defaults.get('fused')}, foreach={inner.defaults.get('foreach')})"
        if isinstance(inner, torch.optim.Optimizer)
        else ""
    )


def _interval_clock(device, every, warmup, window_s, min_intervals, max_intervals):
    """The trainer's hooks (ditscale.train.Hooks) that time it: every logged interval ends with the metrics'
    own host sync, so the wall time between two logged steps is an exact measure of their steps. The first
    `warmup` intervals (compilation) are dropped (the first log only starts the clock); after `window_s` of
    timed intervals the next steps before a log (every - 1 of them) run under CUDA's sync debug mode to
    count host synchronisations per step; then BenchDone ends the run."""
    from ditscale.train import Hooks

    class IntervalClock(Hooks):
        def __init__(self):
            self.records, self.timed = [], []
            self.optimizer = None
            self.sync_phase = None  # warnings.catch_warnings while counting
            self.caught, self.syncs, self.sync_steps = None, None, max(1, every - 1)
            self.counted = 0
            self.mem = 0.0
            self.last = None  # time of the previous log (the first log only starts the clock)

        def engine_built(self, engine):
            self.optimizer = describe_optimizer(engine)

        def step_end(self, step, record):
            if self.sync_phase is not None:
                self.counted += 1
                if self.counted == self.sync_steps:
                    torch.cuda.set_sync_debug_mode("default")
                    self.sync_phase.__exit__(None, None, None)
                    self.syncs = self.caught
                    raise BenchDone()
                return
            if record is None:
                return
            if device.type == "cuda":
                self.mem = max(self.mem, torch.cuda.max_memory_allocated(device) / 2**30)
            now = time.perf_counter()
            if self.last is not None:  # the whole interval: its steps and the logging itself
                self.records.append({**record, "interval_s": now - self.last})
                if len(self.records) > warmup:
                    self.timed.append(self.records[-1])
            self.last = now
            spent = sum(r["interval_s"] for r in self.timed)
            if len(self.timed) >= max_intervals or (len(self.timed) >= min_intervals and spent >= window_s):
                if device.type != "cuda":
                    raise BenchDone()
                self.sync_phase = warnings.catch_warnings(record=True)
                self.caught = self.sync_phase.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

    return IntervalClock()


def run_trainer(
    s: Setting,
    device,
    data_root,
    workdir: Path,
    args,
    *,
    model: dict | None = None,
    compiled=True,
    num_workers: int | None = None,
) -> dict:
    """ditscale.train.train on the synthetic MDS dataset: its engine (ditscale.engine.build, with
    engine.compile=blocks unless --no-compile), its EMA (every step), its loader, metrics (every `every`
    steps: jsonl + TensorBoard), stop checks; no checkpoint is due before the bench ends the run from the
    trainer's hooks. model: overrides of the preset's shape (tiny models for CPU checks); num_workers:
    loader processes (default: the trainer's)."""
    from ditscale import train as T
    from ditscale.engine import launch

    _init_dist_once(device)
    every = args.log_every
    overrides = [
        f"data.root={data_root}",
        f"run_dir={workdir / 'run'}",
        f"data.cache={workdir / 'cache'}",
        f"engine.ds_config=ds_configs/zero{s.zero}_bf16.json",
        f"train.global_batch={s.batch}",
        "train.max_steps=1000000",
        "train.ckpt_every=1000000",
        f"log.every={every}",
        "log.progress=off",
        "sample.every=0",
        f"model.checkpoint_every={s.checkpoint_every}",
        f"model.preset={PRESET}",
        f"engine.compile={'blocks' if compiled else 'off'}",
        *s.overrides,
    ]
    overrides += [f"model.{k}={v}" for k, v in (model or {}).items()]
    if num_workers is not None:
        overrides.append(f"data.num_workers={num_workers}")
    cfg, meta, ds = T.prepare(T.parse_args(overrides), 1)
    clock = _interval_clock(
        device, every, warmup=1, window_s=args.window_s, min_intervals=2, max_intervals=args.max_steps // every + 1
    )
    t0 = time.perf_counter()
    try:
        T.train(cfg, meta, ds, launch.detect(), device, hooks=clock)
        raise RuntimeError("ditscale.train returned before the bench had its intervals")
    except BenchDone:
        pass
    if len(clock.timed) < 1:
        raise RuntimeError(f"no timed interval: {len(clock.records)} logged")
    steps = len(clock.timed) * every
    step_s = sum(r["interval_s"] for r in clock.timed) / steps
    syncs, sites = None, []
    if clock.syncs is not None:
        found = [w for w in clock.syncs if "synchroniz" in str(w.message).lower()]
        syncs = len(found) / clock.sync_steps
        counts = {}
        for w in found:
            key = f"{Path(w.filename).name}:{w.lineno}"
            counts[key] = counts.get(key, 0) + 1
        sites = [f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    return {
        "steps": steps,
        "step_s": step_s,
        "mem_gib": clock.mem,
        "syncs_per_step": syncs,
        "sync_sites": sites,
        "total_s": time.perf_counter() - t0,
        "interval_ms_per_step": [round(r["interval_s"] / every * 1e3, 1) for r in clock.records],
        "data_wait_frac": [round(r.get("data_wait_frac", 0), 3) for r in clock.timed],
        "log_every": every,
        "optimizer": clock.optimizer,
        "compile": cfg.engine.compile,
        "overrides": list(s.overrides),
        "ema": "ditscale.engine.ema.ShardedEMA (foreach lerp on fp32 master shards)",
    }


#################################################################################
#                                    Driver                                     #
#################################################################################


def run_setting(s: Setting, device, smoke, budget: Budget, args, data) -> Result:
    res = Result(s.name, s.resolution, s.batch, note=s.note)
    if budget.left() < s.est_s:
        res.status = f"skipped (budget: {budget.left():.0f} s left, needs ~{s.est_s:.0f} s)"
        return res
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        res.details["allocated_at_start_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    start = time.perf_counter()
    step = None
    try:
        with deadline(min(budget.left() - args.reserve_s, args.setting_cap_s)):
            if s.kind == "trainer":
                root = data.root(s.resolution)
                with tempfile.TemporaryDirectory(prefix="ditscale-bench-run-", dir=data.dir) as workdir:
                    t = run_trainer(
                        s,
                        device,
                        root,
                        Path(workdir),
                        args,
                        compiled=not args.no_compile,
                        model=SMOKE_MODEL if smoke else None,
                        num_workers=1 if smoke else None,
                    )
                timing = {"steps": t["steps"], "step_s": t["step_s"]}
                res.host_syncs_per_step, res.sync_sites = t["syncs_per_step"], t["sync_sites"]
                res.peak_mem_gib = t["mem_gib"] if device.type == "cuda" else None
                res.details.update(
                    {
                        k: v
                        for k, v in t.items()
                        if k not in ("steps", "step_s", "mem_gib", "syncs_per_step", "sync_sites")
                    }
                )
            else:
                step, details = build_plain_step(s, device, smoke)
                res.details.update(details)
                timing = time_steps(
                    step,
                    device,
                    warmup=args.warmup,
                    window_s=args.window_s,
                    min_steps=args.min_steps,
                    max_steps=args.max_steps,
                )
                res.host_syncs_per_step, res.sync_sites = count_host_syncs(step, device)
                if device.type == "cuda":
                    res.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
        res.steps_timed = timing["steps"]
        res.step_ms = timing["step_s"] * 1e3
        res.images_per_s = s.batch / timing["step_s"]
        res.warmup_s = round(time.perf_counter() - start - timing["steps"] * timing["step_s"], 1)
    except TimeUp:
        res.status = f"timed out after {time.perf_counter() - start:.0f} s"
        traceback.print_exc(limit=-6)
    except torch.OutOfMemoryError:
        res.status = "oom"
    except Exception as e:  # one setting's failure must not lose the others' numbers
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        res.status = f"error: {type(e).__name__}: {first}"
        traceback.print_exc()
    finally:
        step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def finish(results: list[Result], peak_tflops: float | None, smoke: bool):
    """Fill TFLOP/s, MFU and the ratio to the eager baseline at the same resolution."""
    base = {r.resolution: r.images_per_s for r in results if r.setting == "eager" and r.status == "ok"}
    for r in results:
        if r.status != "ok":
            continue
        flops = train_flops_per_image(_model_kwargs(r.resolution, smoke) if smoke else PRESET, r.resolution)
        r.tflops = r.images_per_s * flops / 1e12
        if peak_tflops:
            r.mfu = r.tflops / peak_tflops
        if base.get(r.resolution):
            r.ratio = r.images_per_s / base[r.resolution]


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    lines = [
        f"### DiT training throughput — {report['device']} ({report['model']})",
        "",
        f"bf16 matmul peak (measured): {fmt(report['matmul_tflops'], '.0f')} TFLOP/s · torch "
        f"{report['torch']} · deepspeed {report.get('deepspeed', '—')} · commit {report['commit']} · "
        f"{report['date']}",
        "",
        "| setting | res | batch | images/s | TFLOP/s | MFU | peak mem GiB | vs eager | syncs/step | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['setting']} | {r['resolution']} | {r['batch']} | {fmt(r['images_per_s'], '.1f')} | "
            f"{fmt(r['tflops'], '.0f')} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
            f"{fmt(r['peak_mem_gib'], '.1f')} | {fmt(r['ratio'], '.2f')}{'×' if r['ratio'] else ''} | "
            f"{fmt(r['host_syncs_per_step'], 'g')} | {r['status']} |"
        )
    goal = next(
        (
            r
            for r in report["results"]
            if r["setting"] == "ds-zero2" and r["resolution"] == 256 and r["batch"] == 128 and r["images_per_s"]
        ),
        None,
    )
    lines += [
        "",
        f"Goal (issue 7): trainer path (ds-zero2) at 256 ≥ {GOAL_IMAGES_PER_S} images/s per H100: "
        + (
            f"{goal['images_per_s']:.0f} images/s — {'met' if goal['images_per_s'] >= GOAL_IMAGES_PER_S else 'not met'}"
            if goal
            else "not measured"
        ),
    ]
    if report.get("sdpa_ms"):
        lines += [
            "",
            "SDPA forward + backward, ms (bf16): "
            + "; ".join(
                f"{shape}: " + ", ".join(f"{k} {v}" for k, v in row.items()) for shape, row in report["sdpa_ms"].items()
            ),
        ]
    notes = [
        f"- {r['setting']} @ {r['resolution']} × {r['batch']}: {r['note']}"
        + (f" (optimizer: {r['details']['optimizer']})" if r["details"].get("optimizer") else "")
        for r in report["results"]
        if r["note"] or r["details"].get("optimizer")
    ]
    return "\n".join(lines + ([""] + notes if notes else []))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="directory for JSON + markdown")
    ap.add_argument("--budget", type=float, default=200.0, help="wall-clock seconds for the whole bench")
    ap.add_argument("--only", nargs="*", default=None, help="run only these setting names")
    ap.add_argument("--resolutions", type=int, nargs="*", default=None, help="only these resolutions")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per setting (compile happens here)")
    ap.add_argument("--window-s", type=float, default=5.0, help="seconds of timed steps per setting")
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10, help="the trainer's log.every: its timing interval")
    ap.add_argument("--reserve-s", type=float, default=5.0, help="kept back at the end for the report")
    ap.add_argument("--setting-cap-s", type=float, default=120.0, help="most seconds any one setting may take")
    ap.add_argument("--data-dir", default=None, help="where the synthetic MDS datasets go (default: a temp dir)")
    ap.add_argument("--no-compile", action="store_true", help="trainer settings without compiled blocks")
    ap.add_argument("--smoke", action="store_true", help="tiny model, batch 4, CPU allowed: checks the plumbing")
    return ap.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--make-data"]:
        return make_data(argv[1], argv[2:])
    args = parse_args(argv)
    budget = Budget(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("gpu_bench: no CUDA device; use --smoke for the CPU plumbing check")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # Every setting adds compiled variants of DiTBlock.forward (dtype, batch, resolution): dynamo's default
    # of 8 per code object would silently send later settings back to eager.
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512

    settings = SETTINGS
    if args.only:
        settings = [s for s in settings if s.name in args.only]
    if args.resolutions:
        settings = [s for s in settings if s.resolution in args.resolutions]
    if args.smoke:
        args.window_s, args.log_every = min(args.window_s, 0.5), 2
        settings = [
            replace(s, batch=4, resolution=32 if s.resolution == 256 else 64, est_s=0)
            for s in settings
            if s.batch == 128 or s.resolution == 512
        ]

    data = SyntheticData(
        args.data_dir, smoke=args.smoke, resolutions=sorted({s.resolution for s in settings if s.kind == "trainer"})
    )
    data.start()  # written by a CPU process while the GPU measures the baseline

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model": PRESET if not args.smoke else f"tiny DiT {SMOKE_MODEL}",
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "budget_s": args.budget,
        "matmul_tflops": None,
        "sdpa_ms": None,
        "results": [],
    }
    with contextlib.suppress(ImportError):
        import deepspeed

        report["deepspeed"] = deepspeed.__version__

    def save():
        (out / "gpu_bench.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_bench.md").write_text(markdown(report) + "\n")

    if device.type == "cuda":
        report["matmul_tflops"] = matmul_tflops(device)
        print(f"bf16 matmul: {report['matmul_tflops']:.0f} TFLOP/s", flush=True)
        heads, d = 16, 1152 // 16
        report["sdpa_ms"] = sdpa_backends(device, [(128, heads, 256, d), (32, heads, 1024, d)])
        print("SDPA fwd+bwd ms:", json.dumps(report["sdpa_ms"]), flush=True)
    save()

    results: list[Result] = []
    for s in settings:
        print(f"--- {s.name} @ {s.resolution} batch {s.batch} ({budget.left():.0f} s left)", flush=True)
        r = run_setting(s, device, args.smoke, budget, args, data)
        results.append(r)
        finish(results, report["matmul_tflops"], args.smoke)
        report["results"] = [asdict(x) for x in results]
        save()
        print(
            f"    {r.status}: {fmt(r.images_per_s, '.1f')} images/s, {fmt(r.step_ms, '.1f')} ms/step, "
            f"peak {fmt(r.peak_mem_gib, '.1f')} GiB, syncs/step {r.host_syncs_per_step} {r.sync_sites[:4]}",
            flush=True,
        )
    data.close()
    print()
    print(markdown(report), flush=True)
    return report


#################################################################################
#                         Synthetic MDS dataset (background)                    #
#################################################################################


class SyntheticData:
    """Synthetic posterior latents written as data_prep's MDS dataset, in a background process so the CPU
    work overlaps the GPU's baseline; `root(resolution)` waits for it."""

    SAMPLES = {256: 8192, 512: 2048}  # ~256 MiB each: epochs repeat, which the loader handles

    def __init__(self, directory, smoke, resolutions):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="ditscale-bench-data-"))
        self.smoke, self.resolutions = smoke, resolutions
        self.proc = None

    def _samples(self, resolution):
        return 64 if self.smoke else self.SAMPLES.get(resolution, 2048)

    def start(self):
        if not self.resolutions:
            return
        specs = [f"{r}:{self._samples(r)}" for r in self.resolutions]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--make-data", str(self.dir), *specs]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)

    def root(self, resolution) -> str:
        if self.proc is not None:
            if self.proc.wait() != 0:
                raise RuntimeError(f"synthetic MDS dataset: writer exited with {self.proc.returncode}")
        return str(self.dir / f"res{resolution}")

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def make_data(directory, specs):
    """Write `res{R}` datasets of N samples for each "R:N" spec (data_prep's synthetic-latent writer)."""
    from data_prep.testing import write_synthetic_latents

    for spec in specs:
        resolution, n = (int(v) for v in spec.split(":"))
        t = time.perf_counter()
        root = write_synthetic_latents(str(Path(directory) / f"res{resolution}"), n, latent_size=resolution // 8)
        print(f"synthetic MDS dataset {root}: {n} samples in {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
