"""DDPM vs flow matching on the quickstart digits: steps to reach 90 % recognised samples.

    OMP_NUM_THREADS=1 python bench/objectives_digits.py --out bench_out/objectives --seeds 0,1,2 --max-steps 2000

Both objectives train the same model with the same trainer, data, optimizer and seeds (configs/quickstart.yaml
vs configs/quickstart_flow.yaml); one run per (objective, seed) keeps a checkpoint every --every steps, and
each checkpoint's EMA is exported and sampled as the quickstart does (10 classes × 20, guidance 3, ≈100 model
calls: 100 DDPM steps / 50 Heun steps), then scored by the quickstart's classifier. Runs alternate
objectives so a cut-short sweep stays balanced; a stopped run resumes from its last checkpoint when the
command is rerun, also with a larger --max-steps (the learning rate is constant). Results:
<out>/results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evaluate(run: Path, kind: str, classifier) -> list[dict]:
    """Quality of every checkpoint of a run: its EMA exported and sampled as the quickstart does."""
    from ditscale import quickstart_digits as qd
    from ditscale.engine.export import export

    rows = []
    for ckpt in sorted((run / "ckpt").glob("step_*")):
        out = run / "export" / f"{ckpt.name}.safetensors"
        if not out.exists():
            export(ckpt, out, log=lambda *_: None)
        samples, labels = qd.sample_digits(out, kind)
        rows.append({"step": int(ckpt.name.split("_")[1]), **qd.digits_quality(samples, labels, classifier)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/objectives")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250, help="checkpoint (and evaluation) interval")
    args = ap.parse_args(argv)
    from data_prep import make_dataset
    from ditscale import quickstart_digits as qd

    out = Path(args.out)
    data = out / "digits_mds"
    if not (data / "dataset.json").exists():
        make_dataset(
            str(qd.write_image_folder(out / "digits_images")),
            str(data),
            resolution=8,
            vae="none",
            format="mds",
            image_channels=1,
            progress=False,
        )
    classifier = qd.fit_classifier()
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for kind, (config, _, _) in qd.RECIPES.items():
            key = f"{kind}/seed{seed}"
            if key in results:
                continue
            run = out / key
            rc = subprocess.call(
                [
                    sys.executable,
                    "-m",
                    "ditscale.train",
                    "--config",
                    str(ROOT / "configs" / config),
                    f"data.root={data}",
                    f"run_dir={run}",
                    f"train.seed={seed}",
                    f"train.max_steps={args.max_steps}",
                    f"train.ckpt_every={args.every}",
                    "train.keep_last=1000",
                    "train.resume_ignore=[train.max_steps]",  # rerun with another --max-steps: runs go on
                    "log.every=250",
                ],
                env=env,
                cwd=ROOT,
            )
            if rc != 0:
                print(f"{key}: training failed ({rc})")
                return rc
            rows = evaluate(run, kind, classifier)
            first = next((r["step"] for r in rows if r["accuracy"] >= 0.9), None)
            results[key] = {"steps_to_90": first, "curve": rows}
            results_path.write_text(json.dumps(results, indent=1))
            print(
                f"{key}: steps to 90 % = {first}; " + ", ".join(f"{r['step']}: {r['accuracy']:.0%}" for r in rows),
                flush=True,
            )
    for kind in qd.RECIPES:
        firsts = [v["steps_to_90"] for k, v in results.items() if k.startswith(kind)]
        print(f"{kind}: steps to 90 % per seed {firsts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
