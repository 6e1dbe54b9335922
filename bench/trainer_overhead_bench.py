"""What the full trainer costs per step over a bare PyTorch loop, on CPU.

    python bench/trainer_overhead_bench.py [--steps 60] [--batch 16]

Both sides train the same DiT with the same diffusion loss on the same batch size, one process,
one thread:
- bare: the official DiT loop without data loading: torch AdamW (foreach), an fp32 EMA of every
  parameter, a fixed batch in memory; with fp32 weights under bf16 autocast (the usual recipe), and with
  the weights cast to bf16 as DeepSpeed does (the same kernels as the trainer);
- trainer: `python -m ditscale.train` on one rank: DeepSpeed ZeRO-2 bf16, data from MDS shards through
  the streaming loader, posterior sampling, sharded EMA, metrics accumulated on the device, stop-signal
  check every step. Timed from its own metrics over the second half of the run (after warm-up), so
  start-up, checkpoints and process launch are not counted.
Prints one table: ms/step, steps/s, images/s and the ratio to the bf16 bare loop for each model size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny (d2 w32)": dict(depth=2, hidden_size=32, num_heads=2), "small (d4 w128)": dict(depth=4, hidden_size=128, num_heads=4)}


def make_dataset(root: Path, resolution: int) -> str:
    from data_prep import make_dataset as encode
    from data_prep.testing import write_image_folder

    images = write_image_folder(str(root / "images"), classes=4, per_class=64, min_side=resolution,
                                max_side=2 * resolution)
    return encode(images, str(root / "mds"), resolution=resolution, vae="none", decode_workers=0)


def bare_loop(shape: dict, resolution: int, batch: int, steps: int, bf16_weights: bool) -> float:
    """Seconds per step of the bare loop over the second half of its steps."""
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
    warm = steps // 2
    for i in range(steps):
        if i == warm:
            t0 = time.perf_counter()
        t = torch.randint(0, diffusion.num_timesteps, (batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not bf16_weights):
            loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in model.parameters()], 1e-4)
        loss.item()                                   # the official loop logs the loss every step
    return (time.perf_counter() - t0) / (steps - warm)


def trainer(shape: dict, data: str, run_dir: Path, batch: int, steps: int) -> float:
    """Seconds per step of the full trainer, from its metrics over the second half of the run."""
    overrides = [f"data.root={data}", f"run_dir={run_dir}", f"train.global_batch={batch}", f"train.max_steps={steps}",
                 f"train.ckpt_every={10 * steps}", f"log.every={steps // 2}", "train.ema_decay=0.9999",
                 "engine.ds_config=ds_configs/zero2_bf16.json", "engine.device=cpu", "data.num_workers=0",
                 *[f"model.{k}={v}" for k, v in shape.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DITSCALE_DATA_CACHE": str(run_dir / "cache")}
    out = subprocess.run([sys.executable, "-m", "ditscale.train", "--config", str(REPO / "configs/tiny_test.yaml"),
                          *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"trainer failed ({out.returncode}):\n{out.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "step_time_s" in r][-1]["step_time_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=16, help="pixel-mode image side (latent side)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", args.resolution)
        for name, shape in MODELS.items():
            times = {"bare, fp32 weights + bf16 autocast": bare_loop(shape, args.resolution, args.batch, args.steps, False),
                     "bare, bf16 weights": bare_loop(shape, args.resolution, args.batch, args.steps, True),
                     "ditscale.train (ZeRO-2 bf16)": trainer(shape, data, Path(tmp) / name.split()[0], args.batch,
                                                             args.steps)}
            rows.append((name, times))
    print(f"\ntrainer overhead on CPU ({torch.get_num_threads()} thread, batch {args.batch}, "
          f"{args.resolution}x{args.resolution}x3, {args.steps} steps, second half timed)")
    print("| model | loop | ms/step | steps/s | images/s | time / bare bf16 |")
    print("|---|---|---|---|---|---|")
    for name, times in rows:
        ref = times["bare, bf16 weights"]
        for label, sec in times.items():
            print(f"| {name} | {label} | {sec * 1e3:.1f} | {1 / sec:.1f} | {args.batch / sec:.0f} | {sec / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
