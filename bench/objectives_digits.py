"""DDPM vs flow matching on the quickstart digits: steps to reach 90 % recognised samples.

    python bench/objectives_digits.py --out bench_out/objectives --seeds 0,1,2 --max-steps 3000 --jobs 2

Both objectives train the same model with the same trainer, data, optimizer and seeds (configs/quickstart.yaml
vs configs/quickstart_flow.yaml); one run per (objective, seed) keeps a checkpoint every --every steps, and
each checkpoint's EMA is exported and sampled as the quickstart does (10 classes × 20, guidance 3, ≈100 model
calls: 100 DDPM steps / 50 Heun steps), then scored by the quickstart's classifier. Runs alternate
objectives so a cut-short sweep stays balanced, --jobs at a time with one thread each; checkpoints are scored
while their run trains, and a run stops at its first checkpoint with >= 90 % (its answer). A stopped run
resumes from its last checkpoint when the command is rerun, also with a larger --max-steps (the learning rate
is constant). Results: <out>/results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A checkpoint is first sampled 5 per class; below 75 % recognised there (unlikely for a model at 90 %:
# binomial, n = 50: P ≈ 0.001) that quarter-size score is kept, else it is scored on the full 20 per class.
PROBE_PER_CLASS, PROBE_BAR = 5, 0.75


def evaluate(run: Path, kind: str, classifier) -> list[dict]:
    """Quality of every complete checkpoint of a run: its EMA exported and sampled as the
    quickstart does. Scores are kept in <run>/quality.json, so each checkpoint is sampled once."""
    from ditscale import quickstart_digits as qd
    from ditscale.engine.checkpoint import CheckpointError, list_tags, read_meta
    from ditscale.engine.export import export

    cache_path = run / "quality.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for step, ckpt in list_tags(run / "ckpt"):
        if str(step) in cache:
            continue
        try:
            read_meta(ckpt)  # complete: every rank's files as written (the run may still be saving it)
        except CheckpointError:
            continue
        out = run / "export" / f"{ckpt.name}.safetensors"
        if not out.exists():
            export(ckpt, out, log=lambda *_: None)
        probe = qd.digits_quality(*qd.sample_digits(out, kind, per_class=PROBE_PER_CLASS), classifier)
        if probe["accuracy"] < PROBE_BAR:  # far from 90 %: the quarter-size sample tells enough
            cache[str(step)] = {"step": step, **probe}
        else:
            samples, labels = qd.sample_digits(out, kind)
            cache[str(step)] = {"step": step, **qd.digits_quality(samples, labels, classifier)}
        cache_path.write_text(json.dumps(cache, indent=1))
    return sorted(cache.values(), key=lambda r: r["step"])


def _steps_to_90(rows: list[dict]) -> int | None:
    return next((r["step"] for r in rows if r["accuracy"] >= 0.9), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/objectives")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250, help="checkpoint (and evaluation) interval")
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once, one thread each (one per core)")
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
    import torch

    torch.set_num_threads(1)  # the evaluations share the cores with --jobs trainings
    classifier = qd.fit_classifier()
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    todo = [
        (f"{kind}/seed{seed}", kind, config, seed)
        for seed in [int(s) for s in args.seeds.split(",")]
        for kind, (config, _, _) in qd.RECIPES.items()
    ]
    todo = [
        t
        for t in todo
        if t[0] not in results
        or (results[t[0]]["steps_to_90"] is None and results[t[0]]["curve"][-1]["step"] < args.max_steps)
    ]
    running: dict[str, subprocess.Popen] = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            key, kind, config, seed = todo.pop(0)
            run = out / key
            run.mkdir(parents=True, exist_ok=True)
            running[key] = subprocess.Popen(
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
                stdout=open(run / "train.log", "a"),
                stderr=subprocess.STDOUT,
            )
        time.sleep(5)
        for key, proc in list(running.items()):
            rows = evaluate(out / key, key.split("/")[0], classifier)
            rc = proc.poll()
            if rc is None and _steps_to_90(rows) is None:
                continue
            if rc is None:  # reached 90 %: the rest of the run would not change the answer
                proc.terminate()
                rc = 0 if proc.wait() in (0, 85) else proc.returncode
            del running[key]
            if rc != 0:
                print(f"{key}: training failed ({rc}); see {out / key / 'train.log'}")
                for p in running.values():
                    p.terminate()
                return rc
            rows = evaluate(out / key, key.split("/")[0], classifier)
            results[key] = {"steps_to_90": _steps_to_90(rows), "curve": rows}
            results_path.write_text(json.dumps(results, indent=1))
            print(
                f"{key}: steps to 90 % = {results[key]['steps_to_90']}; "
                + ", ".join(f"{r['step']}: {r['accuracy']:.0%}" for r in rows),
                flush=True,
            )
    for kind in qd.RECIPES:
        firsts = [v["steps_to_90"] for k, v in results.items() if k.startswith(kind)]
        print(f"{kind}: steps to 90 % per seed {firsts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
