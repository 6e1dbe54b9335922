"""`python -m ditscale.evaluate`: FID, sFID, IS, precision / recall of an ADM sample .npz.

    python -m ditscale.evaluate --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth

The defaults give the numbers of ADM's evaluator (guided-diffusion evaluations/evaluator.py), which the
DiT paper and its successors report: TF1 bilinear resize inside the Inception graph, IS over chunks of
5,000 images, precision / recall distances in fp16. Prints the metrics as JSON and writes them next to
the samples (or to --out), with every setting that changes a number under "settings" and the samples'
own sampling settings (from the .npz's meta) under "sampling". Exit code 2 on bad input.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ditscale.evaluate.features import check_image_array, npz_array_info
from ditscale.evaluate.inception import RESIZE_MODES, WEIGHTS_HELP, file_sha256, load_inception
from ditscale.evaluate.metrics import ADM_IS_CHUNK, METRICS, PR_DISTANCES, MetricSettings, evaluate_npz
from ditscale.evaluate.reference import load_reference, reference_sha256, save_reference
from ditscale.sampling.npz import read_npz_meta


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m ditscale.evaluate",
        description="FID, sFID, Inception Score and precision / recall of an ADM sample .npz against a "
        "reference, as ADM's evaluator computes them; prints the metrics as JSON and writes them "
        "to a file.",
    )
    p.add_argument("--samples", required=True, help="ADM .npz: arr_0 (N, H, W, 3) uint8 (arr_1 labels ignored)")
    p.add_argument(
        "--ref",
        required=True,
        help="ADM reference batch .npz (arr_0 and/or mu/sigma/mu_s/sigma_s), a .npz written by "
        "--save-ref, or a folder of real images",
    )
    p.add_argument("--inception", help=WEIGHTS_HELP)
    p.add_argument("--out", help="metrics JSON (default: <samples>.metrics.json)")
    p.add_argument(
        "--metrics", default=",".join(METRICS), help=f"comma-separated subset of {', '.join(METRICS)} (default: all)"
    )
    p.add_argument(
        "--resize",
        default="tf1",
        choices=RESIZE_MODES,
        help="resize to 299×299 and scaling: 'tf1' (default) the TF1 bilinear resize inside the graph "
        "of ADM's evaluator, as published numbers; 'torch' pytorch-fid's (not ADM's numbers)",
    )
    is_parts = p.add_mutually_exclusive_group()
    is_parts.add_argument(
        "--is-chunk-size",
        type=int,
        default=ADM_IS_CHUNK,
        help=f"Inception Score over consecutive chunks of this many images, averaged (default: {ADM_IS_CHUNK}, ADM)",
    )
    is_parts.add_argument(
        "--is-equal-splits",
        type=int,
        default=None,
        metavar="K",
        help="Inception Score over K equal splits instead (improved-GAN / torch-fidelity "
        "convention; equals ADM's only when N = K × 5000)",
    )
    p.add_argument(
        "--pr-distances",
        default="fp16",
        choices=PR_DISTANCES,
        help="precision / recall distances: fp16 as ADM's TF graph (default), or exact fp32",
    )
    p.add_argument("--pr-k", "--k", type=int, default=3, help="neighbourhood size of precision / recall (default: 3)")
    p.add_argument("--batch-size", type=int, default=200, help="images per network call (default: 200)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument(
        "--ref-resolution",
        type=int,
        default=None,
        help="centre-crop size for a folder of images (default: the samples' size)",
    )
    p.add_argument("--save-ref", default=None, help="write the reference's statistics and features to this .npz")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes for a folder (default: 4)")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_of(args) -> MetricSettings:
    return MetricSettings(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        is_chunk_size=args.is_chunk_size,
        is_splits=args.is_equal_splits,
        pr_distances=args.pr_distances,
        pr_k=args.pr_k,
    )


def run(args, net=None):
    """The metrics dict for parsed arguments; `net` replaces the Inception (any feature network)."""
    start = time.time()
    settings = settings_of(args)
    shape, dtype = npz_array_info(args.samples)
    check_image_array(shape, dtype, f"{args.samples}: arr_0")
    custom = net is not None
    if not custom:
        # Full fp32 convolutions: TF32 would move the features (and FID) a little on Ampere or newer GPUs.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        net = load_inception(args.inception, device=device, resize=args.resize)
    ref = load_reference(
        args.ref,
        net,
        with_features="pr" in settings.metrics or args.save_ref is not None,
        resolution=args.ref_resolution or shape[1],
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.no_progress,
    )
    if args.save_ref:
        save_reference(ref, args.save_ref, meta={"inception": args.inception, "resize": args.resize})
    result = evaluate_npz(args.samples, ref, net, settings, batch_size=args.batch_size, progress=not args.no_progress)
    recorded = {
        "num_samples": result["num_samples"],
        "feature_network": type(net).__name__ if custom else "FID Inception-v3 (2015-12-05)",
        "resize": None if custom else args.resize,
        "inception": None if custom else str(args.inception),
        "inception_sha256": None if custom else file_sha256(args.inception),
        "reference_sha256": reference_sha256(args.ref),
        **settings.record(),
    }
    recorded["adm_defaults"] = not custom and args.resize == "tf1" and settings.is_adm
    return {
        "samples": str(args.samples),
        "reference": str(args.ref),
        "num_reference": ref.num_images,
        **result,
        "settings": recorded,
        "sampling": read_npz_meta(args.samples),
        "seconds": round(time.time() - start, 1),
    }


def main(argv=None, net=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if net is None and not args.inception:
        parser.error(f"--inception is required. {WEIGHTS_HELP}")
    try:
        result = run(args, net)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".metrics.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
