"""`make quickstart`: the whole pipeline on a CPU, on real data that ships inside scikit-learn.

digits → image folder → data_prep (pixel mode) → MDS shards → ditscale.train (DeepSpeed, configs/quickstart.yaml)
→ EMA export → guided samples (one row per class) → PNG grid + loss curve → quality figures.
`--flow` trains the same model with flow matching (configs/quickstart_flow.yaml) and samples it with Heun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

OUT = Path(os.environ.get("DITSCALE_QUICKSTART_OUT", "quickstart_out"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def loss_curve(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    plt.figure(figsize=(6, 4))
    plt.plot(*zip(*pts))
    plt.xlabel("step"), plt.ylabel("training loss"), plt.yscale("log"), plt.title("quickstart training loss")
    plt.tight_layout(), plt.savefig(png, dpi=100), plt.close()


def main(argv=None) -> int:
    """argv: [--flow] then extra trainer overrides, e.g. train.max_steps=200 for a smoke run."""
    from data_prep import make_dataset
    from ditscale import quickstart_digits as qd
    from ditscale.sampling import save_grid

    argv = list(argv if argv is not None else sys.argv[1:])
    kind = "flow" if "--flow" in argv else "ddpm"
    argv = [a for a in argv if a != "--flow"]
    config, sampler, steps = qd.RECIPES[kind]
    tag = "" if kind == "ddpm" else "_flow"  # output names: run{tag}/, samples{tag}.png, …
    OUT.mkdir(parents=True, exist_ok=True)
    images, data, run = OUT / "digits_images", OUT / "digits_mds", OUT / f"run{tag}"
    print("[1/5] scikit-learn digits → image folder", images)
    if not images.exists():
        qd.write_image_folder(images)
    print("[2/5] data_prep, pixel mode → MDS shards", data)
    if not (data / "dataset.json").exists():
        make_dataset(str(images), str(data), resolution=8, vae="none", format="mds", image_channels=1, progress=True)
    print("[3/5] training through ditscale.train (DeepSpeed on CPU)")
    rc = subprocess.call(
        [
            sys.executable,
            "-m",
            "ditscale.train",
            "--config",
            str(CONFIGS / config),
            f"data.root={data}",
            f"run_dir={run}",
            *argv,
        ]
    )
    if rc != 0:
        print(f"training failed with exit code {rc}; see {run}")
        return rc
    print(f"[4/5] export EMA and sample 10 classes × 20 with guidance 3 ({steps} {sampler} steps)")
    export = run / "export" / "ema.safetensors"
    subprocess.check_call([sys.executable, "-m", "ditscale.engine.export", str(run), "--out", str(export)])
    samples, labels = qd.sample_digits(export, kind, progress=True)
    shown = labels % 20 < 10
    grid = save_grid(
        torch.from_numpy(samples[shown]).repeat(1, 3, 1, 1),
        labels[shown],
        OUT / f"samples{tag}.png",
        class_names=[str(i) for i in range(10)],
    )
    del grid
    loss_curve(run / "metrics.jsonl", OUT / f"loss{tag}.png")
    q = qd.digits_quality(samples, labels)
    print(
        "[5/5] quality: classifier accuracy {accuracy:.1%} (goal ≥ 90 %), diversity {diversity_mean:.2f} "
        "mean / {diversity_min:.2f} min (goals ≥ 0.6 / ≥ 0.4)".format(**q)
    )
    (OUT / f"quality{tag}.json").write_text(json.dumps(q, indent=2))
    print(
        f"\nOutputs: {OUT / f'samples{tag}.png'}, {OUT / f'loss{tag}.png'}, {OUT / f'quality{tag}.json'}, run dir {run}"
    )
    print("Next: encode ImageNet with a local VAE (slurm/prep_latents.sh), then sbatch slurm/train_xl.sh (README).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
