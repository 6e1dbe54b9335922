"""The paper's scaling study as a workflow: a sweep of configurations (model sizes × patch sizes, each
trained for `max_steps` with its EMA evaluated every `eval_every` steps), run one configuration per SLURM
array task or all in a row, then plotted as the paper's figures from the runs' metrics.

    python -m ditscale.study list configs/study_imagenet256.yaml            # index, name, run dir
    python -m ditscale.study run  configs/study_imagenet256.yaml --index 3  # train (and evaluate) one
    python -m ditscale.study run  SWEEP.yaml --all                          # every one, in a row
    python -m ditscale.study plot SWEEP.yaml --out figures/                 # PNGs + summary.json
    SWEEP=configs/study_imagenet256.yaml sbatch --array=0-11 slurm/study.sh # the array job (README)

A sweep file (YAML):
    base_config: configs/dit_xl_2_256.yaml   # experiment YAML every configuration starts from
    runs_root: runs/scaling                  # configuration NAME trains in runs_root/NAME
    models: [DiT-S, DiT-B, DiT-L, DiT-XL]    # preset families, or {name, preset, overrides} mappings
    patch_sizes: [8, 4, 2]
    max_steps: 400000
    eval_every: 50000                        # eval.every (and train.ckpt_every unless overridden)
    overrides: [eval.ref=..., eval.weights=...]   # dotted overrides for every configuration

Figures (from each run's config.yaml and metrics.jsonl "eval" events): FID vs training steps, one line
per configuration (the paper's Fig. 6); FID vs training compute = Gflops × batch × steps × 3 (backward ≈
2 × forward, as the paper's Fig. 9); final FID vs Gflops, bubble area ∝ Gflops (Fig. 2, left).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ditscale.config import ConfigError, config_from_dict, load_config
from ditscale.models.dit import DIT_PRESETS

SWEEP_KEYS = {"base_config", "runs_root", "models", "patch_sizes", "max_steps", "eval_every", "overrides"}


#################################################################################
#                                   The sweep                                   #
#################################################################################


@dataclass(frozen=True)
class Configuration:
    index: int
    name: str
    preset: str
    overrides: tuple[str, ...]
    run_dir: Path

    def train_args(self, base_config: str) -> list[str]:
        return ["--config", str(base_config), *self.overrides]


@dataclass
class Sweep:
    base_config: str
    runs_root: str
    models: list
    patch_sizes: list[int]
    max_steps: int
    eval_every: int
    overrides: list[str] = field(default_factory=list)
    source: str = "sweep"

    @classmethod
    def load(cls, path) -> Sweep:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read the sweep file ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with keys {sorted(SWEEP_KEYS)}")
        unknown, missing = set(data) - SWEEP_KEYS, SWEEP_KEYS - {"overrides"} - set(data)
        if unknown or missing:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        sweep = cls(**data, source=str(path))
        sweep.configurations()  # validates
        return sweep

    def _fail(self, key: str, message: str):
        raise ValueError(f"{self.source}: {key}: {message}")

    def _model(self, entry) -> tuple[str, str, list[str]]:
        """(name, preset family, overrides) of one `models` entry."""
        if isinstance(entry, str):
            entry = {"name": entry, "preset": entry}
        if not isinstance(entry, dict) or set(entry) - {"name", "preset", "overrides"} or "preset" not in entry:
            self._fail("models", f"{entry!r}: give a preset family (DiT-S) or {{name, preset, overrides}}")
        overrides = entry.get("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            self._fail("models", f"{entry.get('name')}: overrides must be a list of key=value strings")
        return str(entry.get("name", entry["preset"])), str(entry["preset"]), overrides

    def configurations(self) -> list[Configuration]:
        if not isinstance(self.models, list) or not self.models:
            self._fail("models", "needs at least one model")
        if not isinstance(self.patch_sizes, list) or not self.patch_sizes:
            self._fail("patch_sizes", "needs at least one patch size, e.g. [8, 4, 2]")
        for key in ("max_steps", "eval_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(key, f"must be an integer >= 1, got {value!r}")
        out: list = []
        for name, family, model_overrides in map(self._model, self.models):
            for patch in self.patch_sizes:
                preset = f"{family}/{patch}"
                if preset not in DIT_PRESETS:
                    self._fail("models", f"no preset {preset} (presets: {', '.join(sorted(DIT_PRESETS))})")
                full = f"{name}-{patch}"
                run_dir = Path(self.runs_root) / full
                overrides = (
                    f"model.preset={preset}",
                    f"run_dir={run_dir}",
                    f"train.max_steps={self.max_steps}",
                    f"train.ckpt_every={self.eval_every}",
                    f"eval.every={self.eval_every}",
                    *self.overrides,
                    *model_overrides,
                )
                out.append(Configuration(len(out), full, preset, overrides, run_dir))
        if len({c.name for c in out}) != len(out):
            self._fail("models", "configuration names repeat; give the models distinct names")
        return out

    def check(self) -> None:
        """Every configuration's experiment config loads (ConfigError naming the configuration)."""
        for c in self.configurations():
            try:
                load_config(self.base_config, list(c.overrides))
            except ConfigError as e:
                raise ValueError(f"{self.source}: configuration {c.index} ({c.name}): {e}") from None


#################################################################################
#                              Running a configuration                          #
#################################################################################


def train_command(sweep: Sweep, config: Configuration, launcher: list[str] | None = None) -> list[str]:
    """The trainer's command line for one configuration (the launcher defaults to this Python)."""
    return [*(launcher or [sys.executable, "-m"]), "ditscale.train", *config.train_args(sweep.base_config)]


def run_configs(sweep: Sweep, indices: list[int], launcher: list[str] | None = None) -> int:
    """Train (and evaluate) configurations one after another; the first failing exit code stops."""
    configs = sweep.configurations()
    for i in indices:
        c = configs[i]
        print(f"[ditscale.study] configuration {i} ({c.name}) -> {c.run_dir}", flush=True)
        rc = subprocess.call(train_command(sweep, c, launcher))
        if rc != 0:
            print(f"[ditscale.study] configuration {i} ({c.name}) exited {rc}", file=sys.stderr, flush=True)
            return rc
    return 0


#################################################################################
#                                     Results                                   #
#################################################################################


def eval_points(run_dir: Path, metric: str = "fid") -> list[tuple[int, float]]:
    """(step, value) of a run's "eval" events, sorted by step (the last event of a step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    points = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("event") == "eval" and metric in rec:
                points[rec["step"]] = rec[metric]
    return sorted(points.items())


def collect(sweep: Sweep, metric: str = "fid") -> list[dict]:
    """Per configuration: name, preset, Gflops, parameters, global batch and its evaluations (step, value,
    training compute in Gflops); configurations that have not started are listed without points."""
    from ditscale.models.flops import dit_gflops, dit_params

    rows = []
    for c in sweep.configurations():
        saved = c.run_dir / "config.yaml"
        row = {"index": c.index, "name": c.name, "preset": c.preset, "run_dir": str(c.run_dir), "points": []}
        if saved.is_file():
            cfg = config_from_dict(yaml.safe_load(saved.read_text()))
            kwargs = cfg.model.dit_kwargs()
            gflops, batch = dit_gflops(kwargs), cfg.train.global_batch
            row.update(
                gflops=gflops,
                params=dit_params(kwargs),
                global_batch=batch,
                points=[
                    {"step": s, metric: v, "compute_gflops": 3 * gflops * batch * s}
                    for s, v in eval_points(c.run_dir, metric)
                ],
            )
        rows.append(row)
    return rows


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 points or a constant input)."""
    import numpy as np
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(np.asarray(x), np.asarray(y)).statistic)


def trend(rows: list[dict], metric: str = "fid") -> dict:
    """Whether the paper's trend shows: final metric vs Gflops (negative rank correlation = bigger models
    score lower FID), and per configuration whether it fell from its first to its last evaluation."""
    done = [r for r in rows if r["points"]]
    finals = [r["points"][-1][metric] for r in done]
    falling = {r["name"]: r["points"][-1][metric] < r["points"][0][metric] for r in done if len(r["points"]) > 1}
    rho = spearman([r["gflops"] for r in done], finals)
    return {
        "spearman_final_vs_gflops": rho,
        "bigger_is_better": None if rho is None else rho < 0,
        "falls_during_training": falling,
    }


#################################################################################
#                                     Figures                                   #
#################################################################################


def plot(rows: list[dict], out_dir, metric: str = "fid") -> list[Path]:
    """fid_vs_steps.png, fid_vs_compute.png, fid_vs_gflops.png in out_dir (configurations with points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = sorted((r for r in rows if r["points"]), key=lambda r: r["gflops"])
    if not done:
        raise ValueError("no configuration has evaluations yet (metrics.jsonl 'eval' events): nothing to plot")
    label = metric.upper() if metric in ("fid", "sfid") else metric
    colours = plt.get_cmap("viridis")
    colour = {r["name"]: colours(i / max(1, len(done) - 1)) for i, r in enumerate(done)}
    paths = []
    for x_key, x_label, name in (
        ("step", "training steps", "fid_vs_steps.png"),
        ("compute_gflops", "training compute (Gflops = 3 × forward × batch × steps)", "fid_vs_compute.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for r in done:
            xs, ys = [p[x_key] for p in r["points"]], [p[metric] for p in r["points"]]
            ax.plot(xs, ys, marker="o", ms=3, color=colour[r["name"]], label=f"{r['name']} ({r['gflops']:.3g} Gflops)")
        ax.set(xlabel=x_label, ylabel=label, yscale="log", title=f"{label} vs {x_label.split(' (')[0]}")
        if x_key == "compute_gflops":
            ax.set_xscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        paths.append(out_dir / name)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sizes = [r["gflops"] for r in done]
    area = [600 * s / max(sizes) + 20 for s in sizes]
    ax.scatter(sizes, [r["points"][-1][metric] for r in done], s=area, c=[colour[r["name"]] for r in done], alpha=0.7)
    for r in done:
        ax.annotate(r["name"], (r["gflops"], r["points"][-1][metric]), fontsize=7, ha="center")
    ax.set(
        xscale="log",
        xlabel="model Gflops (forward, per image)",
        ylabel=f"final {label}",
        title=f"final {label} vs model Gflops",
    )
    fig.tight_layout()
    fig.savefig(out_dir / "fid_vs_gflops.png", dpi=120)
    plt.close(fig)
    return [*paths, out_dir / "fid_vs_gflops.png"]


#################################################################################
#                                      CLI                                      #
#################################################################################


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ditscale.study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="the configurations: index, name, preset, run dir")
    ls.add_argument("sweep")
    ls.add_argument("--count", action="store_true", help="print only how many (for sbatch --array=0-(N-1))")
    args = sub.add_parser("args", help="one configuration's trainer arguments, one per line (slurm/study.sh)")
    args.add_argument("sweep")
    args.add_argument("--index", type=int, required=True)
    run = sub.add_parser("run", help="train and evaluate configurations here, without SLURM")
    run.add_argument("sweep")
    which = run.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, nargs="+", help="configuration indices")
    which.add_argument("--all", action="store_true")
    run.add_argument(
        "--launcher",
        default=None,
        help="command before 'ditscale.train', e.g. 'torchrun --nproc_per_node 8 -m' (default: this Python, -m)",
    )
    pl = sub.add_parser("plot", help="figures and summary.json from the runs' metrics")
    pl.add_argument("sweep")
    pl.add_argument("--out", required=True, help="directory for the PNGs and summary.json")
    pl.add_argument("--metric", default="fid", help="eval metric to plot: fid, sfid, inception_score, ...")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep = Sweep.load(args.sweep)
        configs = sweep.configurations()
        if args.command == "list":
            print(
                len(configs)
                if args.count
                else "\n".join(f"{c.index}\t{c.name}\t{c.preset}\t{c.run_dir}" for c in configs)
            )
            return 0
        if args.command == "args":
            if not 0 <= args.index < len(configs):
                raise ValueError(f"--index {args.index}: the sweep has configurations 0..{len(configs) - 1}")
            print("\n".join(configs[args.index].train_args(sweep.base_config)))
            return 0
        if args.command == "run":
            sweep.check()
            indices = range(len(configs)) if args.all else args.index
            bad = [i for i in indices if not 0 <= i < len(configs)]
            if bad:
                raise ValueError(f"--index {bad}: the sweep has configurations 0..{len(configs) - 1}")
            return run_configs(sweep, list(indices), args.launcher.split() if args.launcher else None)
        rows = collect(sweep, args.metric)
        paths = plot(rows, args.out, args.metric)
        summary = {
            "sweep": str(args.sweep),
            "metric": args.metric,
            "configurations": rows,
            "trend": trend(rows, args.metric),
        }
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("\n".join(str(p) for p in [*paths, Path(args.out) / "summary.json"]))
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
