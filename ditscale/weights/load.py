"""A DiT from weights: its configuration inferred from the tensor shapes (completed by a sidecar or a
given config), the weights loaded strictly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from ditscale.models import DIT_PRESETS, DiT, dit_config
from ditscale.weights.files import config_near, read_objective, read_state_dict, weights_file

_HEADS_BY_WIDTH = {p["hidden_size"]: p["num_heads"] for p in DIT_PRESETS.values()}


# --------------------------------------------------------------------------------------------------
# Shapes → configuration → model
# --------------------------------------------------------------------------------------------------


def _get(sd, key):
    if key not in sd:
        raise ValueError(f"not an official-layout DiT state dict: no {key!r} (keys: {sorted(sd)[:6]} …)")
    return sd[key]


def infer_dit_config(sd: dict, num_heads: int | None = None, class_dropout_prob: float = 0.1) -> dict:
    """DiT kwargs that reproduce an official-layout state dict's shapes. num_heads is not visible in the
    shapes: it defaults to the preset of the same width (16 for XL). The label table is taken to hold a
    null row (class_dropout_prob > 0, as the release: 1001 rows = 1000 classes); pass
    class_dropout_prob=0 for a model trained without one."""
    proj = _get(sd, "x_embedder.proj.weight")  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    tokens = _get(sd, "pos_embed").shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ValueError("not an official-layout DiT state dict: no blocks.N.* entries")
    out_channels = _get(sd, "final_layer.linear.weight").shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final_layer.linear gives {out_channels} output channels for {in_channels} input channels")
    if num_heads is None:
        if hidden not in _HEADS_BY_WIDTH:
            raise ValueError(
                f"hidden size {hidden} matches no preset: give the number of attention heads (--num-heads) or a config"
            )
        num_heads = _HEADS_BY_WIDTH[hidden]
    if "blocks.0.adaLN_modulation.1.weight" in sd:
        block = "adaln_zero" if sd["blocks.0.adaLN_modulation.1.weight"].shape[0] == 6 * hidden else "adaln"
    else:
        block = "cross_attention" if "blocks.0.cross_attn.q.weight" in sd else "in_context"
    qk_norm = None
    if "blocks.0.attn.q_norm.weight" in sd:
        qk_norm = "layernorm" if "blocks.0.attn.q_norm.bias" in sd else "rmsnorm"
    rows = _get(sd, "y_embedder.embedding_table.weight").shape[0]
    config = dit_config(
        dict(
            input_size=grid * patch,
            patch_size=patch,
            in_channels=in_channels,
            hidden_size=hidden,
            depth=max(blocks) + 1,
            num_heads=num_heads,
            mlp_ratio=_get(sd, "blocks.0.mlp.fc1.weight").shape[0] / hidden,
            class_dropout_prob=class_dropout_prob,
            num_classes=rows - int(class_dropout_prob > 0),
            learn_sigma=out_channels == 2 * in_channels,
            block=block,
            qk_norm=qk_norm,
        )
    )
    del config["checkpoint_every"]  # a training setting: as DiT.config
    return config


def preset_of(config: dict) -> str | None:
    """The DIT_PRESETS name whose depth / width / patch / heads match a DiT config, if any."""
    keys = ("depth", "hidden_size", "patch_size", "num_heads")
    return next((name for name, p in DIT_PRESETS.items() if all(p[k] == config[k] for k in keys)), None)


def load_dit(path, weights: str = "ema", config: dict | None = None, num_heads: int | None = None) -> DiT:
    """A DiT (fp32, CPU, eval mode) from an official-layout checkpoint file. The configuration comes from
    the tensor shapes (`infer_dit_config`); `config` (DiT kwargs, e.g. from the trainer's export) supplies
    what shapes cannot tell (num_heads, class_dropout_prob) and must agree with them on the rest."""
    sd = read_state_dict(path, weights)
    given = dict(config or {})
    inferred = infer_dit_config(
        sd, num_heads=given.get("num_heads", num_heads), class_dropout_prob=given.get("class_dropout_prob", 0.1)
    )
    config = dit_config({**inferred, **{k: v for k, v in given.items() if k in inferred}})
    model = DiT(**config)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit DiT({config}): {str(e)[:600]}") from e
    return model.eval()


def _read_config(path: Path) -> dict:
    """DiT kwargs from a JSON/YAML file: its top level, or its "model" section (a trainer config)."""
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except Exception as e:
        raise ValueError(f"cannot parse config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config {path} is not a mapping")
    model = data.get("model", data)
    return model if isinstance(model, dict) else {}


def load_model(ckpt, weights: str = "ema", config=None, num_heads: int | None = None):
    """DiT from a checkpoint file or export directory. config: a JSON/YAML path, inline JSON or a dict of DiT
    kwargs (top level or under "model"); by default one found next to the weights; shapes supply the rest.
    The training objective it records: `load_objective`."""
    file = weights_file(Path(ckpt), weights)
    if config is None and (near := config_near(file)) is not None:
        config = near
    if isinstance(config, str) and config.lstrip().startswith("{"):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config: invalid inline JSON ({e})") from None
    if config is not None and not isinstance(config, dict):
        config = _read_config(Path(config))
    return load_dit(file, weights, config=config, num_heads=num_heads)


def load_objective(ckpt, weights: str = "ema", expected: str | None = None) -> dict:
    """The objective record of a checkpoint file or export directory (the paper's DDPM when none is
    recorded); ObjectiveMismatch (a ValueError) naming both kinds when `expected` is another kind."""
    from ditscale.objectives import check_record

    file = weights_file(Path(ckpt), weights)
    return check_record(read_objective(file), expected, str(file))
