"""`python -m ditscale.sample`: images from a DiT checkpoint — a labelled PNG grid, or the ADM evaluator's
.npz sampled over every rank, resumable.

    python -m ditscale.sample --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema --classes 207,360,387 \\
        --num-per-class 4 --out grid.png
    torchrun --nproc_per_node 8 -m ditscale.sample --ckpt run/export/ema.safetensors --dataset data/in256 \\
        --npz-out run/fid50k --num-samples 50000 --cfg-scale 1.5       # srun works the same way

Same flags and seed → same images, on any number of ranks (noise and label of sample i come from
(seed, i)). A killed --npz-out run is resumed by rerunning the same command. Exit code 2 on bad input.
Library use: `sample_latents`, `decode`, `to_uint8`, `save_grid`, `ema_grid` (re-exported here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ditscale.evaluate.inception import RESIZE_MODES
from ditscale.objectives import OBJECTIVES, objective_class
from ditscale.runtime import RankEnv, pick_device, rank_env
from ditscale.sampling.core import (
    GuidedSampler,
    decode,
    index_labels,
    index_seeds,
    sample_latents,
    sampling_process,
    seeded_noise,
    to_uint8,
)
from ditscale.sampling.grid import GridConfig, ema_grid, save_grid, vae_and_scale
from ditscale.sampling.npz import prepare_dir, run_chunks
from ditscale.sampling.registry import DIFFUSION_FORMS, LAST_STEPS, SAMPLERS, check_fits
from ditscale.weights import WEIGHTS, load_model, load_objective, preset_of

__all__ = [
    "GridConfig",
    "decode",
    "ema_grid",
    "load_model",
    "main",
    "read_dataset_meta",
    "sample_latents",
    "save_grid",
    "to_uint8",
]


# --------------------------------------------------------------------------------------------------
# Inputs: dataset metadata (the checkpoint: `ditscale.weights.load_model`)
# --------------------------------------------------------------------------------------------------


def read_dataset_meta(path) -> dict:
    """dataset.json (from its directory or the file itself): classes, scale_factor, vae, …"""
    path = Path(path)
    path = path / "dataset.json" if path.is_dir() else path
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--dataset: cannot read {path} ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"--dataset: {path} is not a JSON object")
    names = meta.get("classes", [])
    if not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        raise ValueError(f"--dataset: {path}: 'classes' must be a list of class names")
    return meta


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float or comma-separated floats, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _interval(text: str) -> tuple[float, float]:
    values = _floats(text)
    if not isinstance(values, list) or len(values) != 2 or not 0 <= values[0] <= values[1] <= 1:
        raise argparse.ArgumentTypeError(f"expected lo,hi with 0 <= lo <= hi <= 1, got {text!r}")
    return values[0], values[1]


def _guide(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 3, 4 (any count) or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--guide-channels must be >= 1, got {value}")
    return value


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ditscale.sample", description=__doc__.split("\n\n")[0], formatter_class=_Help
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--ckpt",
        required=True,
        help="official-layout weights (.safetensors / .pt, e.g. the paper's "
        "DiT-XL-2-256x256.pt), a sharded export's .safetensors.index.json, or an export directory",
    )
    g.add_argument("--weights", default="ema", choices=WEIGHTS, help="EMA or raw weights of a checkpoint")
    g.add_argument(
        "--config",
        default=None,
        help="model config: JSON/YAML file or inline JSON such as "
        "'{\"num_heads\": 16}' (default: a config next to the weights; shapes give the rest)",
    )
    g.add_argument("--num-heads", type=int, default=None, help="attention heads when no preset has this width")
    g.add_argument("--dataset", default=None, help="dataset root or dataset.json: class names, scale_factor, vae")
    g.add_argument(
        "--vae",
        default=None,
        help="local diffusers AutoencoderKL directory, or 'none' for pixel mode (default: the dataset's)",
    )
    g.add_argument(
        "--scale-factor",
        type=_floats,
        default=None,
        help="latent scale, one float or one per channel (default: the dataset's, else the VAE's)",
    )
    s = p.add_argument_group("sampler")
    s.add_argument(
        "--objective",
        default=None,
        choices=tuple(OBJECTIVES),
        help="refuse a checkpoint trained with another objective (default: take the recorded one)",
    )
    s.add_argument(
        "--sampler",
        default=None,
        choices=tuple(SAMPLERS),
        help="ddpm / ddim for DDPM models; euler / heun / dopri5 / euler_maruyama for flow models "
        "(default: ddpm, or heun for flow)",
    )
    s.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default 250; 50 for the flow ODEs; dopri5 chooses its own)",
    )
    s.add_argument("--respacing", default=None, help="explicit timestep respacing (e.g. 'ddim50', '10,10,10')")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    s.add_argument(
        "--cfg-scale",
        type=float,
        default=4.0,
        help="classifier-free guidance scale; 1 = none (the paper: 4.0 for images, 1.5 for FID)",
    )
    s.add_argument("--guide-channels", type=_guide, default=3, help="guided channels: 3 (paper), 4 or 'all'")
    s.add_argument(
        "--cfg-interval",
        type=_interval,
        default=None,
        help="lo,hi: guide only where the noise fraction (1 = noise, 0 = data) is in [lo, hi]",
    )
    s.add_argument(
        "--noise-schedule",
        default=None,
        choices=("linear", "cosine"),
        help="DDPM training schedule of weights that record no objective (default: linear, the paper's)",
    )
    s.add_argument(
        "--diffusion-steps",
        type=int,
        default=None,
        help="DDPM training steps of weights that record no objective (default: 1000)",
    )
    s.add_argument("--atol", type=float, default=None, help="dopri5 absolute tolerance (SiT: 1e-6)")
    s.add_argument("--rtol", type=float, default=None, help="dopri5 relative tolerance (SiT: 1e-3)")
    s.add_argument(
        "--diffusion-form",
        default=None,
        choices=DIFFUSION_FORMS,
        help="euler_maruyama diffusion coefficient (SiT: sigma)",
    )
    s.add_argument("--diffusion-norm", type=float, default=None, help="euler_maruyama coefficient scale (1.0)")
    s.add_argument("--last-step", default=None, choices=LAST_STEPS, help="euler_maruyama last step (SiT: mean)")
    s.add_argument("--last-step-size", type=float, default=None, help="euler_maruyama last step size (0.04)")
    s.add_argument("--seed", type=int, default=0, help="sample i's noise and label come from (seed, i)")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=64, help="images per model call (per GPU; doubled for guidance)")
    r.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK when CUDA is present, else cpu; $DITSCALE_DEVICE overrides)",
    )
    r.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "bf16-weights", "fp32"),
        help="bf16 = bf16 autocast, fp32 weights (auto on GPU); bf16-weights casts the model; fp32 (auto on CPU)",
    )
    r.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "off", "blocks", "step", "step-cudagraphs"),
        help="torch.compile: each transformer block (quick), the whole sampling step, or the step "
        "as a CUDA graph; auto = blocks for --npz-out on CUDA, else off",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    o = p.add_argument_group("grid output")
    o.add_argument("--out", default=None, help="PNG grid path")
    o.add_argument("--classes", type=_ints, default=None, help="class ids, one grid row each, e.g. 207,360,387")
    o.add_argument("--num-per-class", type=int, default=4, help="images per class (grid columns)")
    n = p.add_argument_group("npz output (all ranks)")
    n.add_argument("--npz-out", default=None, help="directory of chunk files and the final ADM .npz")
    n.add_argument("--num-samples", type=int, default=50000, help="images in the .npz")
    n.add_argument(
        "--labels",
        default="balanced",
        choices=("balanced", "random"),
        help="balanced: sample i gets class i mod num_classes (recent papers: 50 per class); random: "
        "uniform, seeded per sample (what the DiT paper did)",
    )
    n.add_argument(
        "--samples-per-class",
        type=int,
        default=None,
        metavar="N",
        help="balanced labels, exactly N images per class: sets --num-samples to N × classes",
    )
    n.add_argument(
        "--stall-timeout",
        type=float,
        default=3600.0,
        help="rank 0 gives up when no other rank finishes a chunk for this many seconds",
    )
    n.add_argument("--eval-ref", default=None, help="then run ditscale.evaluate against this reference")
    n.add_argument("--inception", default=None, help="Inception weights file for --eval-ref")
    n.add_argument(
        "--eval-resize",
        default="tf1",
        choices=RESIZE_MODES,
        help="resize of the evaluation (tf1: ADM's, as published numbers; see ditscale.evaluate)",
    )
    return p


def _check_args(args, parser):
    if (args.out is None) == (args.npz_out is None):
        parser.error("give exactly one of --out (PNG grid) or --npz-out (ADM .npz directory)")
    if args.out is not None and not args.classes:
        parser.error("--out needs --classes (comma-separated class ids)")
    if args.samples_per_class is not None and args.labels != "balanced":
        parser.error("--samples-per-class needs --labels balanced")
    for flag in ("batch_size", "num_per_class", "num_samples", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.eval_ref and not args.inception:
        parser.error("--eval-ref needs --inception (the Inception weights file)")


SAMPLER_OPTIONS = ("atol", "rtol", "diffusion_form", "diffusion_norm", "last_step", "last_step_size")


def _objective(args, model) -> dict:
    """The objective record the weights carry (checked against --objective); DDPM weights that record no
    schedule (the paper's) take the model's learn_sigma and --noise-schedule / --diffusion-steps."""
    record = load_objective(args.ckpt, args.weights, args.objective)
    if record["kind"] == "ddpm":
        record.setdefault("learn_sigma", model.learn_sigma)
    for key in ("noise_schedule", "diffusion_steps"):
        value, flag = getattr(args, key), "--" + key.replace("_", "-")
        if value is None:
            continue
        if record["kind"] != "ddpm":
            raise ValueError(f"{flag} is for DDPM weights; {args.ckpt} records objective {record['kind']!r}")
        if key in record and record[key] != value:
            raise ValueError(f"{flag} {value} contradicts {args.ckpt}'s recorded objective ({key}={record[key]})")
        record[key] = value
    return record


def _setup(args, env: RankEnv) -> SimpleNamespace:
    """device, model, sampler, vae (+ its path), scale, class names for the parsed arguments."""
    device = pick_device(env, args.device or "auto")
    meta = read_dataset_meta(args.dataset) if args.dataset else {}
    vae_path = args.vae if args.vae is not None else meta.get("vae")
    if vae_path is None:
        raise ValueError(
            "--vae is required: a local AutoencoderKL directory, or 'none' for pixel-space models "
            "(or --dataset with a 'vae' entry)"
        )
    model = load_model(args.ckpt, args.weights, args.config, args.num_heads)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    model = model.to(device=device, dtype=torch.bfloat16 if precision == "bf16-weights" else torch.float32)
    compile_mode = args.compile
    if compile_mode == "auto":
        compile_mode = "blocks" if device.type == "cuda" and args.npz_out else "off"
    record = _objective(args, model)
    args.sampler = args.sampler or objective_class(record["kind"]).default_sampler
    flow = check_fits(args.sampler, record["kind"]).kind == "flow"
    if flow and args.respacing:
        raise ValueError(f"--respacing respaces a DDPM schedule; the {args.sampler} sampler takes --steps")
    if args.steps is None:
        args.steps = 250 if not flow or args.sampler == "euler_maruyama" else 50
    options = {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k) is not None}
    process = sampling_process(record, args.sampler, args.steps, respacing=args.respacing)
    sampler = GuidedSampler(
        model,
        process,
        args.sampler,
        args.cfg_scale,
        args.guide_channels,
        args.eta,
        autocast=torch.bfloat16 if precision == "bf16" else None,
        compile=False if compile_mode == "off" else compile_mode,
        steps=args.steps if flow else None,
        cfg_interval=args.cfg_interval,
        options=options,
    )
    scale = args.scale_factor if args.scale_factor is not None else meta.get("scale_factor")
    vae, scale = vae_and_scale(vae_path, scale, device)
    channels = vae.config.latent_channels if vae is not None else None
    if vae is not None and channels != model.in_channels:
        raise ValueError(f"--vae has {channels} latent channels, the model {model.in_channels}")
    names = meta.get("classes")
    if names is not None and len(names) != model.num_classes:
        raise ValueError(f"--dataset has {len(names)} classes, the model {model.num_classes}")
    return SimpleNamespace(
        device=device,
        model=model,
        objective=record,
        sampler=sampler,
        vae=vae,
        vae_path=str(vae_path),
        scale=scale,
        names=names,
    )


def _images(run, seeds, labels, batch_size, pad=False, progress=False) -> np.ndarray:
    """uint8 images (n, H, W, 3) for per-sample seeds and labels, batch_size at a time (the last batch padded
    to full size with copies of its last sample when `pad`, so a compiled step sees one shape)."""
    out = []
    for start in range(0, len(seeds), batch_size):
        s, y = list(seeds[start : start + batch_size]), list(labels[start : start + batch_size])
        n = len(s)
        if pad:
            s, y = s + [s[-1]] * (batch_size - n), y + [y[-1]] * (batch_size - n)
        noise = seeded_noise(s, run.sampler.latent_shape(len(s)), run.sampler.num_draws, run.device)
        latents = run.sampler(noise, torch.tensor(y, dtype=torch.long), progress=progress)[:n]
        out.append(to_uint8(decode(latents, run.vae, run.scale)))
    return np.concatenate(out)


def _grid(args, run):
    bad = [c for c in args.classes if not 0 <= c < run.model.num_classes]
    if bad:
        raise ValueError(f"--classes {bad} out of range for a model of {run.model.num_classes} classes")
    labels = [c for c in args.classes for _ in range(args.num_per_class)]
    seeds = index_seeds(args.seed, range(len(labels)))
    images = _images(run, seeds, labels, args.batch_size, pad=bool(run.sampler.compile), progress=not args.no_progress)
    save_grid(images, labels, args.out, run.names)
    print(f"wrote {args.out} ({len(args.classes)} classes × {args.num_per_class})")


def _npz(args, env, run):
    model = run.model
    if args.samples_per_class is not None:
        if args.samples_per_class < 1:
            raise ValueError(f"--samples-per-class must be >= 1, got {args.samples_per_class}")
        args.num_samples = args.samples_per_class * model.num_classes
    settings = {
        "ckpt": str(Path(args.ckpt).resolve()),
        "weights": args.weights,
        "objective": run.objective,
        "sampler": args.sampler,
        "sampler_options": run.sampler.options,
        "steps": args.steps,
        "respacing": args.respacing,
        "eta": args.eta,
        "cfg_scale": args.cfg_scale,
        "cfg_interval": args.cfg_interval,
        "guide_channels": args.guide_channels,
        "seed": args.seed,
        "num_samples": args.num_samples,
        "labels": args.labels,
        "num_classes": model.num_classes,
        "vae": run.vae_path,
        "scale_factor": run.scale,
        "precision": args.precision,
    }
    chunk_size = prepare_dir(args.npz_out, settings, args.batch_size)

    def produce(indices):
        labels = index_labels(args.seed, indices, model.num_classes, args.labels).tolist()
        images = _images(run, index_seeds(args.seed, indices), labels, args.batch_size, pad=bool(run.sampler.compile))
        return images, labels

    out = run_chunks(
        args.npz_out,
        args.num_samples,
        chunk_size,
        produce,
        env,
        progress=not args.no_progress,
        stall_timeout=args.stall_timeout,
    )
    if out is None:
        return 0
    print(f"wrote {out}")
    if args.eval_ref:
        from ditscale.evaluate.__main__ import main as evaluate

        return evaluate(
            ["--samples", str(out), "--ref", args.eval_ref, "--inception", args.inception, "--resize", args.eval_resize]
        )
    print(f"evaluate: python -m ditscale.evaluate --samples {out} --ref REFERENCE.npz --inception WEIGHTS.pth")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    try:
        env = rank_env()
        if args.out and env.rank != 0:
            return 0  # a grid is one process's job
        run = _setup(args, env)
        if env.rank == 0:
            print(
                f"model: {preset_of(run.model.config) or 'DiT'} {json.dumps(run.model.config)} on {run.device}; "
                f"{args.sampler} {run.sampler.plan.num_steps} steps, cfg {args.cfg_scale}",
                file=sys.stderr,
            )
        if args.out:
            _grid(args, run)
            return 0
        return _npz(args, env, run)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
