"""`python -m ditscale.interop`: official-layout checkpoints (the paper's DiT-XL-2-256x256.pt / -512x512.pt,
official train.py checkpoints, our exports) inspected, or exported to a diffusers DiTPipeline directory.

    python -m ditscale.interop inspect --ckpt DiT-XL-2-256x256.pt          # the DiT config its shapes imply
    python -m ditscale.interop export --ckpt ema.safetensors --vae sd-vae-ft-ema --out pipe/

The library behind it is `ditscale.weights` (load_dit, export_diffusers, load_pipeline, …); `load_pipeline`
is also importable from here, as older exported pipelines' README.md say.
"""

from __future__ import annotations

import argparse
import json
import sys

from ditscale.sample import read_dataset_meta
from ditscale.weights import WEIGHTS, export_diffusers, load_model, load_objective, load_pipeline, preset_of

__all__ = ["load_pipeline", "main"]


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m ditscale.interop",
        description="Inspect official-layout DiT checkpoints; export them to diffusers.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print the DiT configuration a checkpoint's shapes imply")
    export = sub.add_parser("export", help="write a diffusers DiTPipeline directory")
    for q in (inspect, export):
        q.add_argument("--ckpt", required=True, help="official-layout .pt/.pth/.safetensors (or a trainer export)")
        q.add_argument("--weights", default="ema", choices=WEIGHTS)
        q.add_argument("--num-heads", type=int, default=None, help="attention heads (default: the preset's)")
    export.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--dataset", default=None, help="dataset root or dataset.json: class names, scale_factor")
    export.add_argument(
        "--scale-factor",
        type=float,
        default=None,
        help="latent scale (default: the dataset's, else the VAE's scaling_factor)",
    )
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = load_model(args.ckpt, args.weights, num_heads=args.num_heads)
        if args.command == "inspect":
            objective = load_objective(args.ckpt, args.weights)
            print(json.dumps({"preset": preset_of(model.config), **model.config, "objective": objective}, indent=2))
            return 0
        meta = read_dataset_meta(args.dataset) if args.dataset else {}
        scale = args.scale_factor if args.scale_factor is not None else meta.get("scale_factor")
        out = export_diffusers(
            model,
            args.out,
            vae=args.vae,
            scale_factor=scale,
            class_names=meta.get("classes"),
            objective=load_objective(args.ckpt, args.weights),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
