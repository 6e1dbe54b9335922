"""`python -m ditscale.evaluate`: FID, sFID, IS, precision / recall of an ADM sample .npz.

    python -m ditscale.evaluate --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
        --inception pt_inception-2015-12-05-6726825d.pth

Prints the metrics as JSON and writes them next to the samples (or to --out). Exit code 2 on bad input.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ditscale.evaluate.features import check_image_array, npz_array_info
from ditscale.evaluate.inception import RESIZE_MODES, WEIGHTS_HELP, file_sha256, load_inception
from ditscale.evaluate.metrics import METRICS, evaluate_npz
from ditscale.evaluate.reference import load_reference, save_reference


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m ditscale.evaluate",
        description="FID, sFID, Inception Score and precision / recall of an ADM sample .npz against a "
                    "reference; prints the metrics as JSON and writes them to a file.")
    p.add_argument("--samples", required=True, help="ADM .npz: arr_0 (N, H, W, 3) uint8 (arr_1 labels ignored)")
    p.add_argument("--ref", required=True,
                   help="ADM reference batch .npz (arr_0 and/or mu/sigma/mu_s/sigma_s), a .npz written by "
                        "--save-ref, or a folder of real images")
    p.add_argument("--inception", help=WEIGHTS_HELP)
    p.add_argument("--out", help="metrics JSON (default: <samples>.metrics.json)")
    p.add_argument("--metrics", default=",".join(METRICS),
                   help=f"comma-separated subset of {', '.join(METRICS)} (default: all)")
    p.add_argument("--resize", default="torch", choices=RESIZE_MODES,
                   help="resize to 299×299 and scaling: 'torch' (default) as pytorch-fid, 'tf1' as the TF graph "
                        "inside ADM's evaluator")
    p.add_argument("--batch-size", type=int, default=200, help="images per network call (default: 200)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--ref-resolution", type=int, default=None,
                   help="centre-crop size for a folder of images (default: the samples' size)")
    p.add_argument("--save-ref", default=None, help="write the reference's statistics and features to this .npz")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes for a folder (default: 4)")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of precision / recall (default: 3)")
    p.add_argument("--splits", type=int, default=10, help="splits of the Inception Score (default: 10)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args, net=None):
    """The metrics dict for parsed arguments; `net` replaces the Inception (any feature network)."""
    start = time.time()
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    shape, dtype = npz_array_info(args.samples)
    check_image_array(shape, dtype, f"{args.samples}: arr_0")
    if net is None:
        # Full fp32 convolutions: TF32 would move the features (and FID) a little on Ampere or newer GPUs.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        net = load_inception(args.inception, device=device, resize=args.resize)
    ref = load_reference(args.ref, net, with_features="pr" in metrics or args.save_ref is not None,
                         resolution=args.ref_resolution or shape[1], batch_size=args.batch_size,
                         workers=args.workers, progress=not args.no_progress)
    if args.save_ref:
        save_reference(ref, args.save_ref, meta={"inception": args.inception, "resize": args.resize})
    result = evaluate_npz(args.samples, ref, net, metrics=metrics, batch_size=args.batch_size, k=args.k,
                          splits=args.splits, progress=not args.no_progress)
    return {
        "samples": str(args.samples), "reference": str(args.ref), "num_reference": ref.num_images,
        "inception": args.inception, "resize": args.resize,
        "inception_sha256": file_sha256(args.inception) if args.inception else None,
        **result, "seconds": round(time.time() - start, 1),
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
