"""Sampling throughput: DiT-XL/2 (random weights), 256×256, DDPM with classifier-free guidance (scale 4, 3
channels), batch 64 doubled to 128 for guidance, the loop of ditscale.sampling (GuidedSampler).

    baseline  eager-autocast: fp32 weights, bf16 autocast, eager (the official sample.py's setting; the
              issue measured 0.122 s per guided step, 2.1 images/s at 250 steps, on an H100)
    variants  bf16 weights, torch.compile of every block ("blocks") or of the whole step ("step"), the
              step as a CUDA graph, a forced SDPA backend; "ours" = the fastest that ran.

Each variant walks the same K timed steps from the same noise (warm-up, compilation included, excluded):
s/step = time / K, images/s = batch / (s/step · 250). Its final latents are compared with the baseline's
(max |Δ| / max |baseline|) and the host synchronisations of the timed loop are counted (CUDA sync debug
mode). A wall-clock budget skips what no longer fits; results are rewritten after every variant.

    python bench/sample_bench.py --out $OUT --budget 35      # GPU (bench/run_gpu.sh gives it a share)
    python bench/sample_bench.py --smoke                     # CPU: tiny DiT, few steps (automatic without CUDA)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ditscale.models import build_dit  # noqa: E402
from ditscale.sampling.core import GuidedSampler, generator_noise, sampling_diffusion  # noqa: E402

SMOKE_MODEL = dict(depth=2, hidden_size=64, num_heads=4, input_size=8)


@dataclass(frozen=True)
class Variant:
    name: str
    weights: str  # "fp32" (with bf16 autocast) | "bf16"
    compile: object = False  # GuidedSampler's compile
    sdpa: str | None = None  # force an SDPA backend: "flash" | "cudnn" | "efficient"
    est_s: float = 10.0  # build + compile + warm-up on an H100, to skip what cannot fit


VARIANTS = [  # priority order: a short budget still measures baseline and the expected winner
    Variant("eager-autocast", "fp32", est_s=6),
    Variant("blocks-bf16", "bf16", "blocks", est_s=25),
    Variant("eager-bf16", "bf16", est_s=5),
    Variant("blocks-autocast", "fp32", "blocks", est_s=25),
    Variant("blocks-bf16-flash", "bf16", "blocks", sdpa="flash", est_s=25),
    Variant("blocks-bf16-cudnn", "bf16", "blocks", sdpa="cudnn", est_s=25),
    Variant("step-bf16", "bf16", "step", est_s=120),
    Variant("step-cudagraphs-bf16", "bf16", "step-cudagraphs", est_s=150),
]
CPU_VARIANTS = ("eager-autocast", "blocks-bf16", "eager-bf16")


class TimeUp(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupt the block (compilation included) after `seconds` of wall-clock time."""
    if seconds <= 0:
        raise TimeUp()

    def _raise(signum, frame):
        raise TimeUp()

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sdpa_context(backend):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        }[backend]
    )


@contextlib.contextmanager
def count_syncs(device, sink: list):
    """Record the host synchronisations CUDA's sync debug mode reports inside the block."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sink.extend(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower())


def build_base(args, device):
    """The fp32 model with random weights (DiT's zero-initialised gates would make every output 0)."""
    kwargs = SMOKE_MODEL if args.smoke else dict(input_size=args.resolution // 8)
    with torch.device(device):
        model = build_dit("DiT-S/2" if args.smoke else args.preset, **kwargs).eval()
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model


def run_variant(v: Variant, base, args, device, labels, reference, time_left) -> dict:
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    if v.weights == "bf16":
        model = model.to(torch.bfloat16)
    autocast = torch.bfloat16 if v.weights == "fp32" else None
    diffusion = sampling_diffusion("ddpm", args.timed_steps)
    sampler = GuidedSampler(model, diffusion, "ddpm", args.cfg_scale, 3, autocast=autocast, compile=v.compile)
    shape = sampler.latent_shape(args.batch)
    noise = lambda: generator_noise(shape, torch.Generator(device).manual_seed(1), device)
    out = {
        "variant": v.name,
        "weights": v.weights,
        "autocast": autocast is not None,
        "compile": v.compile,
        "sdpa": v.sdpa or "default",
    }
    with deadline(time_left), sdpa_context(v.sdpa):
        t0 = time.perf_counter()
        sampler(noise(), labels)  # compilation + warm-up
        synchronize(device)
        out["warmup_s"] = round(time.perf_counter() - t0, 2)
        syncs: list[str] = []
        t1 = time.perf_counter()
        with count_syncs(device, syncs):
            latents = sampler(noise(), labels)
            synchronize(device)
        elapsed = time.perf_counter() - t1
    step_s = elapsed / args.timed_steps
    out.update(
        step_s=round(step_s, 5),
        images_per_s=round(args.batch / (step_s * args.steps), 3),
        host_syncs=len(syncs) if device.type == "cuda" else None,
        sync_sites=sorted(set(syncs))[:6],
        finite=bool(torch.isfinite(latents).all()),
    )
    if reference is not None:
        out["max_rel_diff"] = float((latents - reference).abs().max() / reference.abs().max())
    out["latents"] = latents
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(report) -> str:
    lines = [
        f"# Sampling throughput: {report['model']}, batch {report['batch']} (×2 for guidance), "
        f"{report['steps']}-step DDPM, cfg {report['cfg_scale']}",
        "",
        f"{report['device']} · torch {report['torch']} · commit {report['commit']} · {report['date']} · "
        f"timed {report['timed_steps']} steps per variant",
        "",
        "| variant | weights | compile | SDPA | warm-up s | s/step | images/s | × baseline | rel. Δ | syncs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "step_s" not in r:
            lines.append(f"| {r['variant']} | | | | | | {r['status']} | | | |")
            continue
        weights = r["weights"] + (" +autocast" if r["autocast"] else "")
        lines.append(
            f"| {r['variant']} | {weights} | {r['compile'] or '—'} | {r['sdpa']} | {r['warmup_s']} "
            f"| {r['step_s']:.4f} | {r['images_per_s']:.2f} | {r.get('ratio', 1.0):.2f} "
            f"| {r.get('max_rel_diff', 0.0):.1e} | {r['host_syncs']} |"
        )
    if report.get("ours"):
        o = report["ours"]
        lines += [
            "",
            f"**ours = {o['variant']}: {o['images_per_s']:.2f} images/s, {o['ratio']:.2f}× the eager "
            f"bf16-autocast baseline ({report['baseline_images_per_s']:.2f} images/s)**",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for sample_bench.json / .md")
    p.add_argument("--budget", type=float, default=None, help="wall-clock seconds for everything")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (automatic without CUDA)")
    p.add_argument("--preset", default="DiT-XL/2")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=None, help="images (before doubling); default 64, smoke 2")
    p.add_argument("--steps", type=int, default=250, help="sampling steps the images/s figure is for")
    p.add_argument(
        "--timed-steps",
        type=int,
        default=None,
        help="steps timed per variant; default 10 with a budget under 120 s, else 50; smoke 3",
    )
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {[v.name for v in VARIANTS]}")
    args = p.parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.smoke = args.smoke or device.type == "cpu"
    args.batch = args.batch or (2 if args.smoke else 64)
    args.timed_steps = args.timed_steps or (3 if args.smoke else 10 if (args.budget or 1e9) < 120 else 50)
    names = (
        args.variants.split(",")
        if args.variants
        else [v.name for v in VARIANTS if device.type == "cuda" or v.name in CPU_VARIANTS]
    )
    unknown = set(names) - {v.name for v in VARIANTS}
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as official sample.py
    torch.manual_seed(0)
    out_dir = Path(args.out) if args.out else None
    report = {
        "model": f"smoke DiT {SMOKE_MODEL}" if args.smoke else f"{args.preset} {args.resolution}px",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "batch": args.batch,
        "steps": args.steps,
        "timed_steps": args.timed_steps,
        "cfg_scale": args.cfg_scale,
        "budget_s": args.budget,
        "results": [],
    }

    def save():
        done = [r for r in report["results"] if "step_s" in r]
        base = next((r for r in done if r["variant"] == "eager-autocast"), None)
        if base:
            report["baseline_images_per_s"] = base["images_per_s"]
            for r in done:
                r["ratio"] = round(r["images_per_s"] / base["images_per_s"], 3)
            others = [r for r in done if r is not base and r["finite"]]
            report["ours"] = max(others, key=lambda r: r["images_per_s"]) if others else None
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "sample_bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
            (out_dir / "sample_bench.md").write_text(markdown(report))

    base = build_base(args, device)
    labels = torch.randint(0, base.num_classes, (args.batch,), generator=torch.Generator().manual_seed(0)).to(device)
    reference = None
    for v in (v for v in VARIANTS if v.name in names):
        left = (args.budget - (time.monotonic() - start) - 2) if args.budget else 3600.0
        if args.budget and not args.smoke and left < v.est_s:
            report["results"].append({"variant": v.name, "status": f"skipped (budget: {left:.0f} s left)"})
            save()
            continue
        print(f"--- {v.name} ({left:.0f} s left)", flush=True)
        try:
            r = run_variant(v, base, args, device, labels, reference, left)
            if v.name == "eager-autocast":
                reference, r["max_rel_diff"] = r["latents"], 0.0
            del r["latents"]
            r["status"] = "ok"
            print(
                f"    {r['images_per_s']:.2f} images/s, {r['step_s'] * 1000:.1f} ms/step, warm-up {r['warmup_s']} s, "
                f"syncs {r['host_syncs']}, max rel. Δ {r.get('max_rel_diff', 0):.1e}",
                flush=True,
            )
        except TimeUp:
            r = {"variant": v.name, "status": "timed out"}
        except torch.cuda.OutOfMemoryError:
            r = {"variant": v.name, "status": "oom"}
        except Exception as e:  # a failing variant must not cost the others their numbers
            traceback.print_exc()
            r = {"variant": v.name, "status": f"error: {type(e).__name__}: {str(e)[:200]}"}
        report["results"].append(r)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    print(markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
