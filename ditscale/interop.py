"""Checkpoints in and out: official-layout state dicts (the paper's DiT-XL-2-256x256.pt / -512x512.pt, official
train.py checkpoints, our exports) → our DiT; any DiT → a diffusers DiTPipeline directory.

    model = load_dit("DiT-XL-2-256x256.pt")                  # preset inferred from the tensor shapes
    export_diffusers(model, "out/pipe", vae="sd-vae-ft-ema", class_names=names)
    pipe = load_pipeline("out/pipe")                         # DiTPipeline.from_pretrained + match_dit_timesteps

Loading never unpickles code: .safetensors, or torch.load(weights_only=True) (argparse.Namespace, the
`args` entry of official training checkpoints, is the one class allowed besides tensors and containers).

About the exported pipeline (also written to its README.md):
- diffusers embeds timesteps slightly differently from DiT; `match_dit_timesteps` (done by `load_pipeline`)
  must be re-applied after every `DiTPipeline.from_pretrained`, as it is not part of diffusers' config.
- DiTPipeline guides all latent channels (our guide_channels=4; the paper guides 3) and hard-codes the
  null class id 1000, so its guidance (guidance_scale > 1) is only right for 1000-class models.
- Its scheduler is DDIM on our linear schedule with "leading" spacing: num_inference_steps=N walks the
  same steps as our sampler's "ddimN".
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import warnings
from pathlib import Path

import torch

from ditscale.models import DIT_PRESETS, DiT, dit_config

WEIGHTS = ("ema", "raw")
_PREFIXES = ("module.", "_orig_mod.")
_HEADS_BY_WIDTH = {p["hidden_size"]: p["num_heads"] for p in DIT_PRESETS.values()}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

def _torch_load(path: Path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (code in the pickle), RuntimeError (not a torch file), …
        raise ValueError(f"{path}: cannot be loaded as weights only ({type(e).__name__}: {str(e)[:300]}); "
                         "only state dicts (tensors in dicts) are accepted, never pickled code") from e


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
            raise ValueError(f"{index}: shard {shard} holds {sorted(set(tensors) - listed)[:3]} unlisted and lacks "
                             f"{sorted(listed - set(tensors))[:3]} listed tensors (shards of another export?)")
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


# --------------------------------------------------------------------------------------------------
# Shapes → configuration
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
    proj = _get(sd, "x_embedder.proj.weight")                                    # (D, C, p, p)
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
            raise ValueError(f"hidden size {hidden} matches no preset: give the number of attention heads "
                             f"(--num-heads) or a config")
        num_heads = _HEADS_BY_WIDTH[hidden]
    if "blocks.0.adaLN_modulation.1.weight" in sd:
        block = "adaln_zero" if sd["blocks.0.adaLN_modulation.1.weight"].shape[0] == 6 * hidden else "adaln"
    else:
        block = "cross_attention" if "blocks.0.cross_attn.q.weight" in sd else "in_context"
    qk_norm = None
    if "blocks.0.attn.q_norm.weight" in sd:
        qk_norm = "layernorm" if "blocks.0.attn.q_norm.bias" in sd else "rmsnorm"
    rows = _get(sd, "y_embedder.embedding_table.weight").shape[0]
    config = dit_config(dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        depth=max(blocks) + 1, num_heads=num_heads,
        mlp_ratio=_get(sd, "blocks.0.mlp.fc1.weight").shape[0] / hidden,
        class_dropout_prob=class_dropout_prob, num_classes=rows - int(class_dropout_prob > 0),
        learn_sigma=out_channels == 2 * in_channels, block=block, qk_norm=qk_norm))
    del config["checkpoint_every"]                                              # a training setting: as DiT.config
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
    inferred = infer_dit_config(sd, num_heads=given.get("num_heads", num_heads),
                                class_dropout_prob=given.get("class_dropout_prob", 0.1))
    config = dit_config({**inferred, **{k: v for k, v in given.items() if k in inferred}})
    model = DiT(**config)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit DiT({config}): {str(e)[:600]}") from e
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Export to diffusers
# --------------------------------------------------------------------------------------------------

_README = """# DiT exported by ditscale

    from ditscale.interop import load_pipeline
    pipe = load_pipeline("{dir}")          # DiTPipeline.from_pretrained(dir) + match_dit_timesteps
    images = pipe(class_labels=[207, 360], num_inference_steps=50, guidance_scale=4.0).images

With diffusers alone, call `ditscale.models.convert.match_dit_timesteps(pipe.transformer)` after every
`DiTPipeline.from_pretrained`: diffusers' DiT embeds timesteps with a slightly different frequency
convention, and that setting is not part of its saved config. Without it the outputs drift from the model.

Model: {model}; {num_classes} classes; VAE scaling_factor {scale}.
Guidance: DiTPipeline guides all {channels} latent channels (ditscale's guide_channels={channels}; the DiT paper
guides 3) and uses class id 1000 as the null class{null_note}.
Scheduler: DDIM, linear β 1e-4 … 2e-2 over 1000 steps, "leading" spacing (ditscale's "ddimN").
"""


def scheduler_for(noise_schedule: str = "linear", diffusion_steps: int = 1000):
    """A diffusers DDIMScheduler on our schedule; its N-step walk equals our "ddimN" respacing."""
    from diffusers import DDIMScheduler

    names = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
    if noise_schedule not in names:
        raise ValueError(f"unknown noise_schedule {noise_schedule!r}; choose linear or cosine")
    scale = 1000.0 / diffusion_steps                                            # as ditscale's linear_betas
    return DDIMScheduler(num_train_timesteps=diffusion_steps, beta_schedule=names[noise_schedule],
                         beta_start=scale * 1e-4, beta_end=scale * 2e-2, clip_sample=False,
                         set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                         prediction_type="epsilon")


def export_diffusers(model: DiT, out_dir, *, vae, scale_factor=None, class_names=None,
                     noise_schedule: str = "linear", diffusion_steps: int = 1000):
    """Write `model` as a DiTPipeline directory (transformer, vae, scheduler, id2label) that
    `DiTPipeline.from_pretrained(out_dir)` loads offline. vae: a local AutoencoderKL directory or module
    (copied; its scaling_factor set to `scale_factor` when given). Returns the output Path."""
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    from ditscale.files import follow_umask
    from ditscale.models.convert import diffusers_config_for, official_to_diffusers
    from ditscale.sampling.core import load_vae

    if isinstance(vae, AutoencoderKL):
        vae = copy.deepcopy(vae)                                                # scaling_factor may change
    elif vae is None or str(vae) == "none":
        raise ValueError("DiTPipeline needs a VAE: pixel-space models cannot be exported to it")
    else:
        vae = load_vae(vae)
    if vae.config.latent_channels != model.in_channels:
        raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels, the model "
                         f"{model.in_channels}")
    if scale_factor is not None:
        values = [float(s) for s in (scale_factor if isinstance(scale_factor, (list, tuple)) else [scale_factor])]
        if len(set(values)) != 1:
            raise ValueError(f"per-channel scale_factor {values} cannot be exported: DiTPipeline divides the "
                             "latents by one vae.config.scaling_factor")
        vae.register_to_config(scaling_factor=values[0])
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model of {model.num_classes} classes")
    if model.num_classes != 1000:
        warnings.warn(f"model has {model.num_classes} classes: DiTPipeline's guidance uses class id 1000 as "
                      "the null class, so call the exported pipeline with guidance_scale=1", stacklevel=2)

    cfg = diffusers_config_for(model.config)
    transformer = DiTTransformer2DModel(**cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    transformer.load_state_dict(official_to_diffusers(sd, cfg), strict=True)
    id2label = {str(i): str(n) for i, n in enumerate(class_names)} if class_names is not None else None
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=scheduler_for(noise_schedule,
                                                                                        diffusion_steps))
    pipe.register_to_config(id2label=id2label)
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    follow_umask(*out_dir.rglob("*.safetensors"))
    (out_dir / "README.md").write_text(_README.format(
        dir=out_dir, model=preset_of(model.config) or "custom DiT", num_classes=model.num_classes,
        scale=vae.config.scaling_factor, channels=model.in_channels,
        null_note="" if model.num_classes == 1000 else " (this model has other class counts: use guidance_scale=1)"))
    return out_dir


def load_pipeline(path, **kwargs):
    """DiTPipeline.from_pretrained on a local directory (no download), with `match_dit_timesteps` applied."""
    from diffusers import DiTPipeline

    from ditscale.models.convert import match_dit_timesteps

    if not Path(path).is_dir():
        raise ValueError(f"{path} is not a local DiTPipeline directory")
    pipe = DiTPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
    match_dit_timesteps(pipe.transformer)
    return pipe


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(prog="python -m ditscale.interop",
                                description="Inspect official-layout DiT checkpoints; export them to diffusers.")
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
    export.add_argument("--scale-factor", type=float, default=None,
                        help="latent scale (default: the dataset's, else the VAE's scaling_factor)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from ditscale.sample import load_model, read_dataset_meta

    try:
        model = load_model(args.ckpt, args.weights, num_heads=args.num_heads)
        if args.command == "inspect":
            print(json.dumps({"preset": preset_of(model.config), **model.config}, indent=2))
            return 0
        meta = read_dataset_meta(args.dataset) if args.dataset else {}
        scale = args.scale_factor if args.scale_factor is not None else meta.get("scale_factor")
        out = export_diffusers(model, args.out, vae=args.vae, scale_factor=scale, class_names=meta.get("classes"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
