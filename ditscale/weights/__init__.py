"""Weights I/O, in one place: official-layout DiT state dicts in and out (one file or a sharded safetensors
export), the DiT configuration their shapes imply, and diffusers DiTPipeline directories.

    model = load_model("DiT-XL-2-256x256.pt")            # preset inferred from the tensor shapes
    model = load_model("runs/x/export")                  # an export directory: its ema weights + sidecar
    record = load_objective("runs/x/export", expected="flow")   # its training objective, checked
    export_diffusers(model, "out/pipe", vae="sd-vae-ft-ema", class_names=names)
    pipe = load_pipeline("out/pipe")                     # DiTPipeline.from_pretrained + match_dit_timesteps

files: reading and writing weights files (`read_tensors`: any model's, e.g. the REPA encoder's or
Inception's), shard names, which file of a directory, the sidecar;
load: shapes → DiT kwargs → model, and the objective recorded with the weights; pipeline: diffusers.
Used by the trainer's export, `ditscale.sample` and `ditscale.interop`; imports only `ditscale.models`,
`ditscale.objectives` (to check a record) and `ditscale.sampling.core.load_vae` (for a VAE).
"""

from ditscale.weights.files import (
    SHARD_INDEX,
    WEIGHTS,
    config_near,
    plan_shards,
    read_objective,
    read_sharded,
    read_state_dict,
    read_tensors,
    shard_name,
    shard_stem,
    sidecar,
    weights_file,
    weights_stem,
    write_weights,
)
from ditscale.weights.load import infer_dit_config, load_dit, load_model, load_objective, preset_of
from ditscale.weights.pipeline import export_diffusers, load_pipeline, scheduler_for

__all__ = [
    "SHARD_INDEX",
    "WEIGHTS",
    "config_near",
    "export_diffusers",
    "infer_dit_config",
    "load_dit",
    "load_model",
    "load_objective",
    "load_pipeline",
    "plan_shards",
    "preset_of",
    "read_objective",
    "read_sharded",
    "read_state_dict",
    "read_tensors",
    "scheduler_for",
    "shard_name",
    "shard_stem",
    "sidecar",
    "weights_file",
    "weights_stem",
    "write_weights",
]
