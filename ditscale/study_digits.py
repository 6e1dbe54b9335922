"""The miniature scaling study: configs/study_digits.yaml on scikit-learn's digits, end to end on a CPU.

    python -m ditscale.study_digits OUT      # data, digits feature network, reference, 4 runs, figures

OUT receives digits_mds/ (data_prep, pixel mode), digits_net.safetensors (the stand-in for the Inception),
digits_ref.npz (the real digits as an ADM reference batch), study.yaml (the sweep with its paths under OUT),
study/<configuration>/ (the runs) and figures/ (ditscale.study plot: PNGs and summary.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "configs" / "study_digits.yaml"


def prepare(out, max_steps: int | None = None, net_steps: int = 300) -> Path:
    """Everything the sweep needs under `out`; returns the sweep file to run (paths made absolute)."""
    from data_prep import make_dataset
    from ditscale.evaluate.digits import real_digit_images, save_digits_net, train_digits_net
    from ditscale.quickstart_digits import write_image_folder

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "digits_mds" / "dataset.json").exists():
        write_image_folder(out / "digits_images")
        make_dataset(
            str(out / "digits_images"),
            str(out / "digits_mds"),
            resolution=8,
            vae="none",
            format="mds",
            image_channels=1,
            decode_workers=0,
        )
    if not (out / "digits_net.safetensors").exists():
        net, accuracy = train_digits_net(net_steps)
        save_digits_net(net, out / "digits_net.safetensors")
        print(f"[study_digits] digits feature network: {accuracy:.1%} held-out accuracy")
    np.savez(out / "digits_ref.npz", arr_0=real_digit_images()[0])
    data = yaml.safe_load(SWEEP.read_text().replace("quickstart_out/", f"{out}/"))
    data["base_config"] = str(REPO / data["base_config"])
    if max_steps is not None:
        data["max_steps"], data["eval_every"] = max_steps, max(1, max_steps // 3)
    sweep = out / "study.yaml"
    sweep.write_text(yaml.safe_dump(data, sort_keys=False))
    return sweep


def main(argv=None) -> int:
    from ditscale import study

    p = argparse.ArgumentParser(prog="python -m ditscale.study_digits", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="train steps per configuration (default: the sweep file's; evaluations at thirds)",
    )
    args = p.parse_args(argv)
    sweep = prepare(args.out, args.max_steps)
    rc = study.main(["run", str(sweep), "--all"])
    if rc:
        return rc
    rc = study.main(["plot", str(sweep), "--out", str(Path(args.out) / "figures")])
    summary = json.loads((Path(args.out) / "figures" / "summary.json").read_text())
    print(json.dumps(summary["trend"], indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
