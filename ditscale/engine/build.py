"""The DeepSpeed engine: the ds_configs JSON completed from the experiment config, the model built
(under zero.Init for ZeRO-3, so no process ever holds the whole model), the optimizer, initialize.

The JSON owns how DeepSpeed works (ZeRO stage, offload, bf16, buckets); the experiment YAML owns what is
trained (batch, optimizer, clipping). bf16 is the precision of every GPU config; fp32 (bf16 disabled) is for
CPUs without bf16 units, where it is ~8x faster: ZeRO-1/2 (ds_configs/zero1_fp32_cpu.json, overlap_comm and
contiguous_gradients off: a CPU has no communication stream to overlap with) or stage 0
(ds_configs/zero0_fp32_cpu.json: plain data parallel, the module's fp32 parameters are the master weights,
no per-parameter gradient hooks, flat-buffer copies or flat optimizer step: the CPU demos' config,
bench/RESULTS.md). Under stage 0 DeepSpeed computes no gradient norm, so `StepGradNorm` computes (and clips
by) it before the optimizer step. Keys of the second kind in the JSON must be "auto" (or absent, or equal
to the YAML's value): a conflicting number there is an error naming the file and the key.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from ditscale.config import ConfigError, ExperimentConfig


def read_ds_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"engine.ds_config: {path} does not exist (see ds_configs/)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"engine.ds_config: cannot read {path}: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"engine.ds_config: {path} must hold a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if ds.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{path}: fp16 is not supported: use bf16 (or fp32 on CPUs without bf16 units)")
    if not is_bf16(ds) and stage == 3:
        raise ConfigError(f"{path}: fp32 (bf16.enabled false) is supported with ZeRO-1/2 only; enable bf16")
    if is_bf16(ds) and stage == 0:
        raise ConfigError(
            f"{path}: zero_optimization.stage 0 is supported with fp32 only (bf16.enabled false: the EMA "
            f"follows the module's own fp32 parameters); for bf16 use ZeRO-1 (ds_configs/zero1_bf16.json)"
        )
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds["zero_optimization"]["stage"])


def is_bf16(ds: dict) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))


def skips_nonfinite_steps(ds: dict) -> bool:
    """Whether DeepSpeed itself skips a step with non-finite gradients (bf16.check_grad_overflow)."""
    return is_bf16(ds) and ds["bf16"].get("check_grad_overflow", True)


def _fill(ds: dict, key: str, value, where: str) -> None:
    """Set ds[key] = value unless the JSON holds another explicit value (an error)."""
    node, *rest = key.split(".")
    if rest:
        _fill(ds.setdefault(node, {}), ".".join(rest), value, where)
        return
    current = ds.get(node, "auto")
    if current != "auto" and current != value:
        raise ConfigError(
            f"{where}: '{key}' is {current!r} but the experiment config gives {value!r}; "
            f'set it to "auto" and choose it in the experiment YAML'
        )
    ds[node] = value


def complete_ds_config(ds: dict, cfg: ExperimentConfig, world_size: int, *, universal: bool = False) -> dict:
    """The DeepSpeed config for this run: batch split, clipping, optimizer, warmup, checkpoint loading."""
    where = cfg.engine.ds_config
    ds = copy.deepcopy(ds)
    micro, accum = cfg.train.batch_split(world_size)
    _fill(ds, "train_batch_size", cfg.train.global_batch, where)
    _fill(ds, "train_micro_batch_size_per_gpu", micro, where)
    _fill(ds, "gradient_accumulation_steps", accum, where)
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, where)
    if zero_stage(ds) == 0:
        ds["gradient_clipping"] = 0.0  # StepGradNorm clips (DeepSpeed's stage-0 clipping keeps no norm)
    if "optimizer" in ds:  # DeepSpeed's own (e.g. DeepSpeedCPUAdam for offload)
        kind = ds["optimizer"].get("type", "")
        if kind.lower() not in ("adamw", "adam"):
            raise ConfigError(f"{where}: optimizer.type must be AdamW, got {kind!r}")
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (
            ("lr", cfg.optim.lr),
            ("betas", list(cfg.optim.betas)),
            ("eps", cfg.optim.eps),
            ("weight_decay", cfg.optim.weight_decay),
        ):
            _fill(params, key, value, f"{where} optimizer.params")
        if kind.lower() == "adam":
            params["adam_w_mode"] = True
    if cfg.optim.warmup_steps:
        if "scheduler" in ds:
            raise ConfigError(f"{where}: has a scheduler section; use optim.warmup_steps instead")
        ds["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.optim.lr,
                "warmup_num_steps": cfg.optim.warmup_steps,
                "warmup_type": "linear",
            },
        }
    if cfg.engine.compile == "blocks" and zero_stage(ds) == 3:
        raise ConfigError(
            f"engine.compile=blocks: {where} is ZeRO-3, whose per-module parameter gathers break "
            f"the compiled graphs; use engine.compile=off (or auto) with ZeRO-3, or ZeRO-1/2"
        )
    if cfg.engine.nonfinite_check == "async" and is_bf16(ds):
        ds["bf16"]["check_grad_overflow"] = False  # ditscale.engine.nonfinite watches instead
    ds.setdefault("steps_per_print", 2**62)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("checkpoint", {})["load_universal"] = universal
    return ds


def training_module(cfg: ExperimentConfig) -> torch.nn.Module:
    """What the engine trains: the DiT, or with REPA on the DiT plus its projector (ditscale.repa.model)."""
    from ditscale.models import DiT

    if not cfg.repa.enabled:
        return DiT(**cfg.model.dit_kwargs())
    from ditscale.repa.encoder import encoder_dim
    from ditscale.repa.model import DiTWithProjector

    return DiTWithProjector(
        align_block=cfg.repa.block,
        encoder_dim=encoder_dim(cfg.repa.encoder),
        projector_width=cfg.repa.projector_width,
        **cfg.model.dit_kwargs(),
    )


def build_model(cfg: ExperimentConfig, ds: dict) -> torch.nn.Module:
    """The training module in bf16 (fp32 when the JSON disables bf16); under ZeRO-3 built inside zero.Init,
    partitioned as each module is created."""
    import deepspeed

    dtype = torch.bfloat16 if is_bf16(ds) else torch.float32
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage(ds) == 3, dtype=dtype):
        model = training_module(cfg)
    # DeepSpeed casts parameters, not buffers: the fixed sin-cos positions follow the parameters' dtype.
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.data = buf.data.to(dtype)
    return model


def build_optimizer(model: torch.nn.Module, cfg: ExperimentConfig, device: torch.device):
    """torch AdamW over the parameters: fused kernels on CUDA, foreach on CPU."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        **fast,
    )


def compile_mode(cfg: ExperimentConfig, ds: dict, device: torch.device) -> str:
    """engine.compile resolved to "blocks" or "off". auto is blocks on CUDA under ZeRO-1/2: inductor fuses
    what eager runs as separate kernels in every block (ditscale.models.fused), paid once by a compile of
    one block (~1 min for XL). auto is off on CPU, where a compile costs more than a short run saves and
    needs a C++ compiler, and under ZeRO-3 (its gather hooks break the graphs)."""
    if cfg.engine.compile == "auto":
        return "blocks" if device.type == "cuda" and zero_stage(ds) != 3 else "off"
    if cfg.engine.compile == "blocks" and device.type == "cpu" and not _cxx_compiler():
        raise ConfigError(
            "engine.compile=blocks on CPU: inductor needs a C++ compiler and none was found "
            "($CXX, g++, c++, clang++); install g++ (Debian: apt-get install g++) or use engine.compile=off"
        )
    return cfg.engine.compile


def _cxx_compiler() -> str | None:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


class StepGradNorm:
    """An optimizer step pre-hook for stage 0: the global gradient norm before clipping (the gradients are
    already all-reduced, whole on every rank), clipped to optim.grad_clip when it is set, left on the device
    (no host sync) where DeepSpeed's engine reads an optimizer's norm after its step
    (`_global_grad_norm`, as ZeRO's optimizers keep it): engine.get_global_grad_norm() then answers as
    under ZeRO."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)  # ()
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm, foreach=True)
        optimizer._global_grad_norm = norm


def build_engine(cfg: ExperimentConfig, ds: dict, device: torch.device):
    """The DeepSpeed engine for `ds` completed by `complete_ds_config`; with engine.compile=blocks every
    block is compiled before DeepSpeed wraps the model (ZeRO-1/2 only add gradient hooks, which compiled
    blocks keep; activation checkpointing recomputes through the same compiled graph)."""
    import deepspeed

    from ditscale.models.fused import compile_blocks

    model = build_model(cfg, ds)
    if compile_mode(cfg, ds, device) == "blocks":
        compile_blocks(model)
    optimizer = None if "optimizer" in ds else build_optimizer(model, cfg, device)
    from ditscale.engine.ema import zero_partition_padding

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=None if optimizer else model.parameters(), config=ds
    )
    zero_partition_padding(engine)
    if zero_stage(ds) == 0:
        engine.optimizer.register_step_pre_hook(StepGradNorm(cfg.optim.grad_clip))
        if engine.dp_world_size == 1:  # one replica: no gradients to average (~4 ms of a tiny CPU step)
            engine.enable_backward_allreduce = False
    return engine
