"""Weights out of a training checkpoint, in the official DiT layout, as safetensors (or a .pt state dict).

    python -m ditscale.engine.export RUN_DIR/ckpt --out ema.safetensors               # EMA, newest checkpoint
    python -m ditscale.engine.export RUN_DIR/ckpt/step_00050000 --weights raw --out raw.safetensors
    python -m ditscale.engine.export RUN_DIR --out big.safetensors --max-shard-size 5GB

Works for a checkpoint of any ZeRO stage and world size: the EMA is assembled from the per-rank shard
files, the raw weights are the optimizer's fp32 master copy (DeepSpeed's zero_to_fp32, lazily; under
stage 0 the module's fp32 state dict in rank 0's model file, memory-mapped), a shard at a time. Training-only parameters (REPA's projector) are left out. Output is fp32, with the fixed
sin-cos `pos_embed`, so `DiT(**config).load_state_dict(..., strict=True)` takes it. Past --max-shard-size the weights go into numbered shards
plus a `<name>.safetensors.index.json` (the Hugging Face layout), written one shard at a time: no
process holds more than one shard (raw weights of ZeRO-1/2: the fp32 model, which zero_to_fp32 joins
whole; such models fit one GPU). A `<name>.json` beside the weights holds the DiT kwargs, the step,
the dataset's vae / scale factor / classes and the training objective's record (what `ditscale.sample`
reads); the objective is also in the safetensors / index metadata, so the weights alone carry it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from ditscale.engine.checkpoint import POINTER, CheckpointError, read_meta
from ditscale.objectives import build_objective
from ditscale.weights import sidecar, write_weights


def official_state_dict(params: dict[str, torch.Tensor], dit_kwargs: dict) -> dict[str, torch.Tensor]:
    """Trained parameters + the model's fixed buffers (pos_embed), fp32: a full official DiT state dict."""
    from ditscale.models.dit import get_2d_sincos_pos_embed

    grid = dit_kwargs["input_size"] // dit_kwargs["patch_size"]
    out = dict(params)
    out["pos_embed"] = get_2d_sincos_pos_embed(dit_kwargs["hidden_size"], grid).float().unsqueeze(0)
    return out


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a ckpt/ root (its `latest`), or a run directory."""
    path = Path(path)
    for root in (path, path / "ckpt"):
        if (root / POINTER).is_file():
            return root / (root / POINTER).read_text().strip()
    if path.is_dir() and not (path / "meta.json").exists() and not path.name.startswith("step_"):
        raise CheckpointError(
            f"no checkpoint in {path}: give a ckpt/step_* directory, a ckpt/ directory with a "
            f"'latest' file, or a run directory"
        )
    return path


def expected_shapes(dit_kwargs: dict) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of the DiT and its shape, from a model on the meta device (no memory)."""
    from ditscale.models import DiT

    with torch.device("meta"):
        model = DiT(**dit_kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _zero_fp32(ckpt: Path) -> dict:
    """DeepSpeed's lazy zero_to_fp32 view of a checkpoint (its own progress output silenced)."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)


def _stage0_fp32(ckpt: Path) -> dict:
    """A stage-0 checkpoint's fp32 module state dict (every rank saved the same: rank 0's file), mapped."""
    f = ckpt / "mp_rank_00_model_states.pt"
    try:
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)["module"]
    except Exception as e:
        raise CheckpointError(f"cannot read the weights in {f}: {e}") from None


def weight_reader(ckpt: Path, meta: dict, weights: str) -> tuple[dict[str, tuple], Callable[[list[str]], dict]]:
    """(shapes of the trained parameters, a reader of full fp32 parameters by name, a list at a time).

    The reader holds only what it is asked for: the EMA comes slice by slice from the rank files. The raw
    weights come through DeepSpeed's lazy zero_to_fp32, whose optimizer files are memory-mapped: pages read
    stay resident until the mapping closes, so under ZeRO-3 it is reopened for every call (one shard).
    ZeRO-1/2's zero_to_fp32 concatenates the whole fp32 model anyway; it is opened once."""
    if weights == "ema":
        from ditscale.engine.ema import ShardIndex

        files = sorted((ckpt / "ema").glob("rank_*.safetensors"))
        if len(files) != meta["world_size"]:
            raise CheckpointError(
                f"{ckpt / 'ema'} holds {len(files)} EMA files; the checkpoint has {meta['world_size']} ranks"
            )
        index = ShardIndex(files)
        return {n: index.shapes[n] for n in index.names()}, lambda names: {n: index.full(n) for n in names}
    from ditscale.repa.model import is_training_only

    lazy = _stage0_fp32(ckpt) if meta["zero_stage"] == 0 else _zero_fp32(ckpt)
    shapes = {n: tuple(t.shape) for n, t in lazy.items() if n != "pos_embed" and not is_training_only(n)}
    kept = lazy if meta["zero_stage"] < 3 else None
    del lazy

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        source = kept if kept is not None else _zero_fp32(ckpt)
        return {n: source[n].contiguous().float() for n in names}

    return shapes, read


def parse_size(text: str) -> int:
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        return int(float(number) * units[t[len(number) :]])
    except (ValueError, KeyError):
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB or 500MB") from None


def export(
    ckpt: str | Path, out: str | Path, weights: str = "ema", max_shard_bytes: int = 10 * 10**9, log=print
) -> list[Path]:
    """Write the weights of a checkpoint (`write_weights`) and the `<stem>.json` sidecar; returns the
    weights files written (weights, then the index if any)."""
    from ditscale.config import config_from_dict, model_from_dict

    ckpt, out = find_checkpoint(ckpt), Path(out)
    meta = read_meta(ckpt)
    dit_kwargs = model_from_dict(meta["config"]["model"]).dit_kwargs()
    expected = expected_shapes(dit_kwargs)
    shapes, read = weight_reader(ckpt, meta, weights)
    fixed = official_state_dict({}, dit_kwargs)
    shapes = {**shapes, **{k: tuple(v.shape) for k, v in fixed.items()}}
    if shapes != expected:
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
        raise CheckpointError(
            f"{ckpt}: {weights} weights do not fit the configured DiT (missing {missing[:5]}, "
            f"unexpected {extra[:5]}, other shapes {wrong[:5]})"
        )

    def tensors(names: list[str]) -> dict[str, torch.Tensor]:
        trained = read([n for n in names if n not in fixed])
        return {n: fixed[n] if n in fixed else trained[n] for n in names}

    objective = meta.get("objective") or build_objective(config_from_dict(meta["config"])).record()  # pre-seam runs
    file_meta = {
        "format": "pt",
        "weights": weights,
        "step": str(meta["step"]),
        "layout": "official-dit",
        "objective": json.dumps(objective),
    }
    files = write_weights(out, shapes, tensors, max_shard_bytes, file_meta, log)
    side = {
        "model": dit_kwargs,
        "weights": weights,
        "step": meta["step"],
        "images_seen": meta.get("images_seen"),
        "checkpoint": str(ckpt),
        "config_hash": meta.get("config_hash"),
        "dataset": meta.get("dataset", {}),
        "objective": objective,
    }
    sidecar(out).write_text(json.dumps(side, indent=1))
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ditscale.engine.export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint directory (ckpt/step_*), a ckpt/ root, or a run directory")
    ap.add_argument("--out", required=True, help="output .safetensors (or .pt) file")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or the raw weights")
    ap.add_argument("--max-shard-size", default="10GB", help="shard the output above this size (default 10GB)")
    args = ap.parse_args(argv)
    try:
        files = export(args.checkpoint, args.out, args.weights, parse_size(args.max_shard_size))
    except (CheckpointError, ValueError, OSError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.weights} weights: {', '.join(map(str, files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
