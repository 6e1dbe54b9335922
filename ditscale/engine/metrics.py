"""Training metrics: accumulated on the device every step, reduced and written only every `log.every` steps.

Rank 0 writes RUN_DIR/metrics.jsonl (one JSON object per interval), TensorBoard events in RUN_DIR/tb,
wandb when asked, and a progress bar when stderr is a terminal. Per interval: loss and whatever named
parts the objective returns with it (DDPM: mse, vb; flow: mse; auxiliary terms), gradient norm, learning rate, images/s, MFU (model FLOPs per image / peak), peak memory, the
share of wall time spent waiting for data, skipped (non-finite) steps.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

# bf16 dense tensor-core peak (TFLOP/s) by device name; first match wins. log.peak_tflops overrides.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB → GiB


class Metrics:
    """Sums of the step's losses live on the device; `log` reduces them over ranks (one
    all-reduce, one host sync) only when the interval is due."""

    def __init__(
        self,
        run_dir: str | Path,
        log_cfg,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        images_per_step: int,
        flops_per_image: float,
        start_step: int,
        max_steps: int,
    ):
        self.cfg, self.rank, self.world, self.device = log_cfg, rank, world_size, device
        self.images_per_step, self.flops_per_image = images_per_step, flops_per_image
        self.peak = peak_tflops(device, log_cfg.peak_tflops)
        self.parts: list[str] | None = None  # "loss" first, then the objective's parts
        self.part_sums: torch.Tensor | None = None  # (P,) on the device
        self.sums = torch.zeros(2, dtype=torch.float32, device=device)  # finite samples, grad norm
        self.index_sums = [0, 0]  # Σ index, Σ index² of the samples seen: a fingerprint of the data order
        # Non-finite values of the step in progress, and of the steps DeepSpeed applied (read by
        # engine.nonfinite.NonfiniteWatch): a skipped step's losses never reached the weights.
        self.step_nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = self.applied = 0
        self.skipped_total = 0
        self.data_wait = 0.0
        self.t0 = time.perf_counter()
        self.tb = self.wandb = self.bar = self.jsonl = None
        if rank == 0:
            run_dir = Path(run_dir)
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            if log_cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)
            if log_cfg.wandb:
                import wandb

                self.wandb = wandb.init(
                    project=log_cfg.wandb_project,
                    dir=str(run_dir),
                    name=run_dir.name,
                    id=run_dir.name.replace("/", "_"),
                    resume="allow",
                )
            if log_cfg.progress == "on" or (log_cfg.progress == "auto" and sys.stderr.isatty()):
                from tqdm import tqdm

                self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def add_losses(self, losses: dict[str, torch.Tensor]) -> None:
        """One micro-batch's per-sample terms {"loss": (N,), **parts}; non-finite samples are left out of the
        means. The names are fixed by the first call (every rank's objective returns the same ones)."""
        if self.parts is None:
            self.parts = ["loss", *(k for k in losses if k != "loss")]
            self.part_sums = torch.zeros(len(self.parts), dtype=torch.float32, device=self.device)
        elif sorted(losses) != sorted(self.parts):
            raise ValueError(f"loss terms changed from {self.parts} to {list(losses)}")
        parts = torch.stack([losses[k].detach().float() for k in self.parts])  # (P, N)
        finite = torch.isfinite(parts).all(0)  # (N,)
        self.part_sums += torch.where(finite, parts, 0.0).sum(1)
        self.sums[0] += finite.sum()
        self.step_nonfinite += (~finite).sum()

    def add_indices(self, index: torch.Tensor) -> None:
        """The dataset indices of one micro-batch (a CPU tensor from the loader: no device sync)."""
        index = index.to(torch.int64)
        self.index_sums[0] += int(index.sum())
        self.index_sums[1] += int((index * index).sum())

    def add_step(self, applied: bool, grad_norm, data_wait: float) -> None:
        """`applied`: engine.was_step_applied() (False: DeepSpeed skipped the step, gradients not finite)."""
        self.steps += 1
        self.data_wait += data_wait
        if applied:
            self.nonfinite += self.step_nonfinite
            self.applied += 1
            if grad_norm is not None:
                self.sums[1] += grad_norm
                if isinstance(grad_norm, torch.Tensor):  # finite losses, overflowing gradients
                    self.nonfinite += (~torch.isfinite(grad_norm)).sum()
        else:
            self.skipped_total += 1
        self.step_nonfinite.zero_()
        if self.bar is not None:
            self.bar.update(1)

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0

    def log(self, step: int, lr: float, images_seen: int) -> dict | None:
        """Reduce and write the interval ending at `step` (call on every rank); returns the record on rank 0."""
        import torch.distributed as dist

        names = self.parts or ["loss"]
        part_sums = self.part_sums if self.part_sums is not None else torch.zeros(1, device=self.device)
        sums = torch.cat([part_sums, self.sums])
        index_sums = torch.tensor(self.index_sums, dtype=torch.int64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(index_sums)
        *totals, n, gnorm = sums.tolist()  # the interval's one host sync
        dt = time.perf_counter() - self.t0
        images_per_s = self.steps * self.images_per_step / dt if dt > 0 else 0.0
        mean = (lambda v: v / n) if n else (lambda v: None)  # None: no finite sample in the interval
        rec = {
            "step": step,
            **{k: mean(v) for k, v in zip(names, totals)},
            "grad_norm": gnorm / self.world / self.applied if self.applied else None,
            "lr": lr,
            "images_per_s": images_per_s,
            "images_seen": images_seen,
            "step_time_s": dt / max(self.steps, 1),
            "data_wait_frac": self.data_wait / dt if dt > 0 else 0.0,
            "skipped_steps": self.skipped_total,
            "mem_gib": _memory_gib(self.device),
            "index_sum": int(index_sums[0]),
            "index_sqsum": int(index_sums[1]),
            "time": time.time(),
        }
        if self.peak:
            rec["mfu"] = images_per_s / self.world * self.flops_per_image / (self.peak * 1e12)
        self.sums.zero_()
        if self.part_sums is not None:
            self.part_sums.zero_()
        self.index_sums = [0, 0]
        self.steps = self.applied = 0
        self.data_wait = 0.0
        self.t0 = time.perf_counter()
        if self.rank != 0:
            return None
        self.jsonl.write(json.dumps(rec) + "\n")
        scalars = {
            k: v for k, v in rec.items() if k not in ("step", "time", "index_sum", "index_sqsum") and v is not None
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        detail = ", ".join(f"{k} {rec[k]:.4f}" for k in names[1:]) if n else ""
        losses = f"loss {rec['loss']:.4f}" + (f" ({detail})" if detail else "") if n else "loss non-finite"
        text = (
            f"step {step} | {losses} | skipped {self.skipped_total} | "
            f"{images_per_s:.1f} img/s"
            + (f" | mfu {rec['mfu']:.1%}" if "mfu" in rec else "")
            + f" | data wait {rec['data_wait_frac']:.1%} | {rec['mem_gib']:.2f} GiB"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(f"{losses}, {images_per_s:.0f} img/s")
        else:
            print(text, flush=True)
        return rec

    def write_event(self, **fields) -> None:
        """A non-periodic record (start, resume, checkpoint, stop) in metrics.jsonl on rank 0."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({**fields, "time": time.time()}) + "\n")

    def close(self) -> None:
        for h in (self.bar, self.tb, self.jsonl):
            if h is not None:
                h.close()
        if self.wandb is not None:
            self.wandb.finish()
