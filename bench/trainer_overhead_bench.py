"""What the full trainer costs per step over a bare PyTorch loop, on CPU.

    python bench/trainer_overhead_bench.py [--steps 200] [--rounds 3] [--batch 16] [--models tiny small]

Both sides train the same DiT with the same diffusion loss on the same batch size, one process,
one thread, in the same run (the ratios are what to compare across machines):
- bare: the official DiT loop without data loading: torch AdamW (foreach), an fp32 EMA of every
  parameter, a fixed batch in memory; with the weights cast to bf16 as DeepSpeed does, and in fp32;
- trainer: `python -m ditscale.train` on one rank: DeepSpeed, data from MDS shards through the streaming
  loader, posterior sampling, sharded EMA, metrics accumulated on the device, stop-signal check every
  step; ZeRO-2 bf16 (the GPU configs) against the bf16 loop, and against the fp32 loop both ZeRO-1 fp32
  (ds_configs/zero1_fp32_cpu.json) and stage 0 fp32 (ds_configs/zero0_fp32_cpu.json, plain data
  parallel: what CPU demos such as the quickstart use). Timed from its
  hooks (ditscale.train.Hooks, in this process) over the second half of the run, so start-up and
  checkpoints are not counted.
The loops run in rounds (bare, then each trainer config), so drifts in the machine's speed fall on both sides
of a round alike. The data set holds --samples images (1,024: epochs of 64 steps at batch 16, so streaming's
epoch start, ~5 ms, weighs on the step about as little as in a real run's epochs).
Prints one row per loop and round (CPU and wall ms/step, images/s, the CPU-time ratio to the same round's
bare loop of the same precision), then the median ratio of each trainer config over the rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ("d2 w32", dict(depth=2, hidden_size=32, num_heads=2)),
    "small": ("d4 w128", dict(depth=4, hidden_size=128, num_heads=4)),
}
TRAINERS = {
    "bf16": [("ZeRO-2 bf16", "ds_configs/zero2_bf16.json")],
    "fp32": [("ZeRO-1 fp32", "ds_configs/zero1_fp32_cpu.json"), ("stage 0 fp32", "ds_configs/zero0_fp32_cpu.json")],
}


def make_dataset(root: Path, resolution: int, samples: int = 1024) -> str:
    from data_prep import make_dataset as encode
    from data_prep.testing import write_image_folder

    images = write_image_folder(
        str(root / "images"), classes=4, per_class=samples // 4, min_side=resolution, max_side=2 * resolution
    )
    return encode(images, str(root / "mds"), resolution=resolution, vae="none", decode_workers=0)


class Clock:
    """Wall and CPU time (this process: the trainer's loader runs in it too, num_workers=0) over a window of
    steps. On a shared machine CPU time is the figure to compare: other processes stretch wall time, while
    a one-thread process's CPU time per step barely moves."""

    def __init__(self):
        self.wall = self.cpu = None

    def start(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self, steps: int) -> dict:
        return {"wall": (time.perf_counter() - self.wall) / steps, "cpu": (time.process_time() - self.cpu) / steps}


def bare_loop(shape: dict, resolution: int, batch: int, steps: int, bf16_weights: bool) -> dict:
    """Seconds per step of the bare loop over the second half of its steps (bf16 or fp32 weights)."""
    from ditscale.diffusion import create_diffusion
    from ditscale.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=resolution, patch_size=2, in_channels=3, num_classes=4, **shape)
    if bf16_weights:
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, foreach=True)
    ema = [p.detach().float() for p in model.parameters()]
    diffusion = create_diffusion("")
    x = torch.randn(batch, 3, resolution, resolution)
    y = torch.randint(0, 4, (batch,))
    warm, clock = steps // 2, Clock()
    for i in range(steps):
        if i == warm:
            clock.start()
        t = torch.randint(0, diffusion.num_timesteps, (batch,))
        loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in model.parameters()], 1e-4)
        loss.item()  # the official loop logs the loss every step
    return clock.stop(steps - warm)


def trainer(shape: dict, data: str, run_dir: Path, batch: int, steps: int, ds_config: str, workers: int) -> dict:
    """Seconds per step of ditscale.train.train (in this process, one rank on gloo) over the second half of
    the run, timed from its hooks: start-up and the final checkpoint are not counted."""
    from ditscale import train as T
    from ditscale.engine import launch

    overrides = [
        f"data.root={data}",
        f"run_dir={run_dir}",
        f"data.cache={run_dir / 'cache'}",
        f"train.global_batch={batch}",
        f"train.max_steps={steps}",
        f"train.ckpt_every={10 * steps}",
        f"log.every={steps // 2}",
        "train.ema_decay=0.9999",
        f"engine.ds_config={REPO / ds_config}",
        "engine.device=cpu",
        f"data.num_workers={workers}",
        *[f"model.{k}={v}" for k, v in shape.items()],
    ]
    cfg, meta, ds = T.prepare(T.parse_args(["--config", str(REPO / "configs/tiny_test.yaml"), *overrides]), 1)
    warm, clock, timed = steps // 2, Clock(), {}

    class Hooks(T.Hooks):
        def step_end(self, step, record):
            if step == warm:
                clock.start()
            elif step == steps - 1:  # the last step saves a checkpoint: not counted
                timed.update(clock.stop(steps - 1 - warm))

    if T.train(cfg, meta, ds, launch.detect(), torch.device("cpu"), hooks=Hooks()) != 0:
        raise RuntimeError(f"the trainer failed; see {run_dir}")
    return timed


def main(argv=None) -> int:
    import statistics

    from ditscale.engine import launch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="bare loop + trainers, this many times in turn")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=1024, help="images in the data set")
    ap.add_argument("--resolution", type=int, default=16, help="pixel-mode image side (latent side)")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--precisions", nargs="+", choices=list(TRAINERS), default=list(TRAINERS))
    ap.add_argument(
        "--num-workers", type=int, default=0, help="the trainer's loader processes (their CPU time is not counted)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ["DITSCALE_DS_LOG_LEVEL"] = "ERROR"
    launch.init_distributed(launch.detect(), torch.device("cpu"))
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", args.resolution, args.samples)
        for name in args.models:
            label, shape = MODELS[name]
            for precision in args.precisions:
                for r in range(args.rounds):
                    bare = bare_loop(shape, args.resolution, args.batch, args.steps, precision == "bf16")
                    rows.append((f"{name} ({label})", precision, r + 1, "bare", bare, bare))
                    for i, (zero, ds_config) in enumerate(TRAINERS[precision]):
                        run_dir = Path(tmp) / f"{name}-{precision}-{i}-{r}"
                        t = trainer(shape, data, run_dir, args.batch, args.steps, ds_config, args.num_workers)
                        rows.append((f"{name} ({label})", precision, r + 1, f"ditscale.train ({zero})", t, bare))
                        ratios.setdefault((f"{name} ({label})", precision, zero), []).append(t["cpu"] / bare["cpu"])
    launch.shutdown()
    print(
        f"\ntrainer overhead on CPU ({torch.get_num_threads()} thread, batch {args.batch}, "
        f"{args.resolution}x{args.resolution}x3, {args.samples} images, {args.steps} steps, second half timed, "
        f"loader workers {args.num_workers}; CPU time is the figure to compare on a shared machine)"
    )
    print("| model | weights | round | loop | CPU ms/step | wall ms/step | images/s (CPU) | CPU time / bare |")
    print("|---|---|---|---|---|---|---|---|")
    for name, precision, r, loop, t, bare in rows:
        print(
            f"| {name} | {precision} | {r} | {loop} | {t['cpu'] * 1e3:.1f} | {t['wall'] * 1e3:.1f} | "
            f"{args.batch / t['cpu']:.0f} | {t['cpu'] / bare['cpu']:.2f} |"
        )
    print("\n| model | weights | trainer | CPU time / bare, median of the rounds | lowest | highest |")
    print("|---|---|---|---|---|---|")
    for (name, precision, zero), rs in ratios.items():
        print(f"| {name} | {precision} | {zero} | {statistics.median(rs):.2f} | {min(rs):.2f} | {max(rs):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
