"""Weights files in the official DiT layout: one .safetensors / .pt file or a sharded safetensors export
(`<stem>-00001-of-0000N.safetensors` + `<stem>.safetensors.index.json`, the Hugging Face layout), read and
written; which file of a path or export directory holds the "ema" / "raw" weights; the `<stem>.json`
sidecar beside them (DiT kwargs, step, dataset).

Loading never unpickles code: .safetensors, or torch.load(weights_only=True) (argparse.Namespace, the
`args` entry of official training checkpoints, is the one class allowed besides tensors and containers).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Callable

import torch

WEIGHTS = ("ema", "raw")
_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _torch_load(path: Path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (code in the pickle), RuntimeError (not a torch file), …
        raise ValueError(
            f"{path}: cannot be loaded as weights only (torch.load(weights_only=True): "
            f"{type(e).__name__}: {str(e)[:300]}); only state dicts (tensors in dicts) are accepted, "
            "never pickled code"
        ) from e


def _select(obj, path: Path, weights: str) -> dict:
    """The state dict inside a loaded checkpoint object: a plain state dict, or official train.py's
    {"model", "ema", "opt", "args"} (weights picks "ema" or "model")."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    key = {"ema": "ema", "raw": "model"}[weights]
    if key in obj and isinstance(obj[key], dict):
        return obj[key]
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    raise ValueError(f"{path}: no {weights} weights (key {key!r}) in a checkpoint with keys {sorted(obj)[:8]}")


SHARD_INDEX = ".safetensors.index.json"
_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def shard_name(stem: str, number: int, count: int) -> str:
    """File name of shard `number` (from 1) of `count` of a sharded export: <stem>-00001-of-00003.safetensors."""
    return f"{stem}-{number:05d}-of-{count:05d}.safetensors"


def shard_stem(stem: str) -> str:
    """The export's stem of a shard file's stem (`ema` of `ema-00001-of-00003`); other stems unchanged."""
    return _SHARD_SUFFIX.sub("", stem)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def read_tensors(path, unwrap: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of any weights file (a DiT's, an encoder's, Inception's), never unpickling code: a
    .safetensors file, or a torch file loaded with weights_only=True holding a dict of tensors, directly or
    under the keys of `unwrap` in turn (e.g. ("model", "state_dict")). ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    state = _load_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)
    for key in unwrap:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def read_sharded(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded safetensors export: `<name>.safetensors.index.json` (the Hugging Face layout
    that `ditscale.engine.export` writes past --max-shard-size) and the shard files its weight_map names."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a readable safetensors index ({type(e).__name__}: {e})") from e
    out: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        tensors = _load_safetensors(index.parent / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != listed:
            raise ValueError(
                f"{index}: shard {shard} holds {sorted(set(tensors) - listed)[:3]} unlisted and lacks "
                f"{sorted(listed - set(tensors))[:3]} listed tensors (shards of another export?)"
            )
        out.update(tensors)
    return out


def read_state_dict(path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """Official-layout DiT state dict from a .safetensors or .pt/.pth/.bin file, or a sharded export's
    `.safetensors.index.json`, on the CPU; strips the "module." (DDP) and "_orig_mod." (torch.compile)
    prefixes."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist or is not a file")
    if path.name.endswith(SHARD_INDEX):
        sd = read_sharded(path)
    elif path.suffix == ".safetensors":
        sd = _load_safetensors(path)
    else:
        sd = _select(_torch_load(path), path, weights)
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def read_objective(path) -> dict | None:
    """The training objective recorded with a weights file (`ditscale.objectives` record): in the
    safetensors metadata or a sharded index's "metadata" under "objective" (JSON), else in the sidecar
    `<stem>.json` beside it. None when nothing records one (the paper's checkpoints: DDPM)."""
    path = Path(path)
    text = None
    try:
        if path.name.endswith(SHARD_INDEX):
            text = json.loads(path.read_text()).get("metadata", {}).get("objective")
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                text = (f.metadata() or {}).get("objective")
        if text is None and sidecar(path).is_file():
            record = json.loads(sidecar(path).read_text()).get("objective")
            text = json.dumps(record) if record is not None else None
        record = json.loads(text) if text is not None else None
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable objective record ({type(e).__name__}: {e})") from e
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("kind"), str)):
        raise ValueError(f"{path}: the recorded objective {record!r} is not a record with a 'kind'")
    return record


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def plan_shards(shapes: dict[str, tuple], max_bytes: int) -> list[list[str]]:
    """Names grouped into consecutive shards of at most max_bytes of fp32 (a larger tensor gets its own)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_weights(
    out: Path,
    shapes: dict[str, tuple],
    tensors: Callable[[list[str]], dict[str, torch.Tensor]],
    max_shard_bytes: int,
    metadata: dict[str, str],
    log=print,
) -> list[Path]:
    """`out` as one .safetensors (or .pt) file; past max_shard_bytes of fp32, numbered shards
    `<stem>-00001-of-0000N.safetensors` + `<stem>.safetensors.index.json`, each shard asked of `tensors` and
    written before the next. Files of an earlier export to the same `out` in the other form are removed,
    so the path never names stale weights. Returns the files written (weights, then the index if any)."""
    from ditscale.files import save_safetensors

    out.parent.mkdir(parents=True, exist_ok=True)
    groups = plan_shards(shapes, max_shard_bytes)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    if out.suffix == ".pt":
        if len(groups) > 1:
            raise ValueError(f"--out {out}: a .pt file is one piece; use .safetensors to shard above the limit")
        torch.save(tensors(list(shapes)), out)
        files = [out]
    elif len(groups) == 1:
        save_safetensors(tensors(groups[0]), out, metadata=metadata)
        files = [out]
    else:
        files, weight_map = [], {}
        for i, names in enumerate(groups):
            shard = out.parent / shard_name(stem, i + 1, len(groups))
            save_safetensors(tensors(names), shard, metadata=metadata)
            weight_map.update({n: shard.name for n in names})
            files.append(shard)
            log(f"wrote {shard}")
        index = out.parent / f"{stem}{SHARD_INDEX}"
        total = sum(4 * math.prod(s) for s in shapes.values())
        index.write_text(
            json.dumps({"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}, indent=1)
        )
        files.append(index)
    stale = [
        out,
        out.parent / f"{stem}{SHARD_INDEX}",
        *(p for p in out.parent.glob(f"{stem}-*.safetensors") if shard_stem(p.stem) == stem),
    ]
    for f in stale:
        if f not in files and f.is_file():
            f.unlink()
            log(f"removed {f} (an earlier export to {out})")
    return files


# --------------------------------------------------------------------------------------------------
# Which file
# --------------------------------------------------------------------------------------------------


def weights_stem(weights: Path) -> str:
    """A weights file's name without its suffix: `ema` of ema.safetensors and of ema.safetensors.index.json."""
    return weights.name[: -len(SHARD_INDEX)] if weights.name.endswith(SHARD_INDEX) else weights.stem


def sidecar(out: Path) -> Path:
    """The `<stem>.json` written beside an export's weights (ema.safetensors, its shards and index → ema.json)."""
    return out.parent / f"{weights_stem(out)}.json"


def config_near(ckpt: Path) -> Path | None:
    """A config written next to the weights: <name>.json/.yaml, config.json/.yaml, model_config.json."""
    names = [weights_stem(ckpt) + s for s in (".json", ".yaml", ".yml")]
    names += ["config.json", "config.yaml", "config.yml", "model_config.json"]
    return next((ckpt.parent / n for n in names if (ckpt.parent / n).is_file() and ckpt.parent / n != ckpt), None)


def weights_file(path: Path, weights: str) -> Path:
    """The weights file of a checkpoint path: the file itself; for a sharded export its index, also when
    given as the export's --out path (ema.safetensors → ema.safetensors.index.json); in a directory the one
    weights file or index whose name contains "ema" / "raw" (or the only one)."""
    if path.is_file():
        return path
    index = path.with_name(path.name + ".index.json")
    if path.name.endswith(".safetensors") and index.is_file():
        return index
    if not path.is_dir():
        raise ValueError(f"--ckpt {path} does not exist")
    indexes = sorted(p for p in path.iterdir() if p.name.endswith(SHARD_INDEX))
    sharded = {weights_stem(i) for i in indexes}
    files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".bin")]
    files = sorted([p for p in files if shard_stem(p.stem) not in sharded] + indexes)
    named = [p for p in files if weights in weights_stem(p).lower()] or (files if len(files) == 1 else [])
    if len(named) != 1:
        raise ValueError(
            f"--ckpt {path}: cannot pick the {weights} weights among {[p.name for p in files]}; give the file"
        )
    return named[0]
