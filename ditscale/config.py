"""Experiment configuration: dataclasses that validate themselves, loaded from YAML plus dotted overrides.

    cfg = load_config("configs/dit_xl_2_256.yaml", ["train.max_steps=10", "data.root=/data/in1k_256"])
    cfg = resolve_with_dataset(cfg, read_metadata(cfg.data.root))  # latent size, channels, classes
    save_config(cfg, "runs/x/config.yaml")

Every key is typed. An unknown key (with the closest valid ones), a value of the wrong type or out of
range is a `ConfigError` naming the dotted key; the trainer turns it into exit code 2. Sections:
model, objective, diffusion, data, optim, train, engine, log, sample, eval, repa; `run_dir` is top level.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value (exit code 2: fixing it needs a human, not a retry)."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value, key: str, choices) -> None:
    _require(value in choices, key, f"{value!r} is not one of {', '.join(map(str, choices))}")


#################################################################################
#                                    Sections                                   #
#################################################################################


@dataclass
class ModelConfig:
    """The DiT: a preset, optionally reshaped. input_size / in_channels / num_classes come from the
    dataset's dataset.json unless given (a given value must agree with it)."""

    preset: str = "DiT-XL/2"
    depth: int | None = None  # preset overrides, e.g. for tiny test models
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    input_size: int | None = None  # latent side (dataset latent_size)
    in_channels: int | None = None  # latent channels (dataset latent_channels)
    num_classes: int | None = None  # dataset classes
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    learn_sigma: bool = True
    block: str = "adaln_zero"  # a registered block type: adaln_zero | adaln | cross_attention | in_context
    qk_norm: str | None = None  # None | layernorm | rmsnorm
    checkpoint_every: int = 0  # activation checkpointing: 0 off, k = every k-th block

    def validate(self) -> None:
        from ditscale.models.dit import BLOCKS, DIT_PRESETS, QK_NORMS

        if self.preset not in DIT_PRESETS:
            close = difflib.get_close_matches(self.preset, list(DIT_PRESETS), n=3)
            raise ConfigError(
                f"model.preset: unknown preset {self.preset!r}"
                + (f"; did you mean {', '.join(close)}?" if close else f"; valid: {', '.join(DIT_PRESETS)}")
            )
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "num_classes"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"model.{name}", f"must be >= 1, got {value}")
        _require(self.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        _require(
            0 <= self.class_dropout_prob < 1,
            "model.class_dropout_prob",
            f"must be in [0, 1), got {self.class_dropout_prob}",
        )
        _choice(self.block, "model.block", BLOCKS)
        _choice(self.qk_norm, "model.qk_norm", QK_NORMS)
        _require(self.checkpoint_every >= 0, "model.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")

    def dit_kwargs(self) -> dict:
        """Keyword arguments of `ditscale.models.DiT` (needs input_size / in_channels / num_classes resolved)."""
        from ditscale.models.dit import DIT_PRESETS, validate_config

        missing = [k for k in ("input_size", "in_channels", "num_classes") if getattr(self, k) is None]
        if missing:
            raise ConfigError(f"model.{missing[0]} is not resolved: give it, or resolve it from the dataset")
        kwargs = dict(DIT_PRESETS[self.preset])
        kwargs.update(
            {
                k: getattr(self, k)
                for k in ("depth", "hidden_size", "num_heads", "patch_size")
                if getattr(self, k) is not None
            }
        )
        kwargs.update(
            mlp_ratio=self.mlp_ratio,
            input_size=self.input_size,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            class_dropout_prob=self.class_dropout_prob,
            learn_sigma=self.learn_sigma,
            block=self.block,
            qk_norm=self.qk_norm,
            checkpoint_every=self.checkpoint_every,
        )
        try:
            validate_config(kwargs)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        return kwargs


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion (ditscale.diffusion.create_diffusion); the defaults are the paper's."""

    noise_schedule: str = "linear"  # linear | cosine
    diffusion_steps: int = 1000
    predict_xstart: bool = False
    use_kl: bool = False
    rescale_learned_sigmas: bool = False
    sigma_small: bool = False

    def validate(self) -> None:
        _choice(self.noise_schedule, "diffusion.noise_schedule", ("linear", "cosine"))
        _require(self.diffusion_steps >= 2, "diffusion.diffusion_steps", f"must be >= 2, got {self.diffusion_steps}")


_BYTES = re.compile(r"\d+(\.\d+)?\s*(b|kb|mb|gb|tb|pb)?")  # streaming's sizes (kb = 1024 bytes)


@dataclass
class TimestepConfig:
    """How training draws times (ditscale.objectives.timesteps), for every objective kind."""

    sampling: str = "uniform"  # uniform (the paper, SiT) | logit_normal (SD3)
    mean: float = 0.0  # logit-normal location m
    std: float = 1.0  # logit-normal scale s
    shift: float = 1.0  # resolution shift s: u' = s·u / (1 + (s − 1)·u), u = noise fraction

    def validate(self) -> None:
        from ditscale.objectives import TIMESTEP_SAMPLINGS

        _choice(self.sampling, "objective.timesteps.sampling", TIMESTEP_SAMPLINGS)
        _require(self.std > 0, "objective.timesteps.std", f"must be > 0, got {self.std}")
        _require(self.shift > 0, "objective.timesteps.shift", f"must be > 0, got {self.shift}")
        if self.sampling == "uniform":
            for key in ("mean", "std"):
                _require(
                    getattr(self, key) == getattr(TimestepConfig, key),
                    f"objective.timesteps.{key}",
                    "applies to objective.timesteps.sampling=logit_normal only",
                )


@dataclass
class FlowConfig:
    """Flow matching as in SiT (ditscale.objectives.flow); read when objective.kind=flow."""

    path: str = "linear"  # linear | gvp | vp
    prediction: str = "velocity"  # velocity | noise | score
    loss_weight: str = "none"  # none | velocity | likelihood (noise / score predictions)
    train_eps: float | None = None  # None: SiT's default for the path and prediction
    sample_eps: float | None = None

    def validate(self) -> None:
        from ditscale.objectives.flow import LOSS_WEIGHTS, PATHS, PREDICTIONS

        _choice(self.path, "objective.flow.path", PATHS)
        _choice(self.prediction, "objective.flow.prediction", PREDICTIONS)
        _choice(self.loss_weight, "objective.flow.loss_weight", LOSS_WEIGHTS)
        _require(
            self.loss_weight == "none" or self.prediction != "velocity",
            "objective.flow.loss_weight",
            f"{self.loss_weight} weights noise / score predictions; velocity is trained unweighted (SiT)",
        )
        for key in ("train_eps", "sample_eps"):
            value = getattr(self, key)
            _require(value is None or 0 <= value < 0.5, f"objective.flow.{key}", f"must be in [0, 0.5), got {value}")


@dataclass
class ObjectiveConfig:
    """The training objective (ditscale.objectives). kind=ddpm reads the `diffusion` section, kind=flow
    `objective.flow`; a key of the other kind set away from its default is an error."""

    kind: str = "ddpm"  # ddpm (the paper) | flow (SiT)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    def validate(self) -> None:
        from ditscale.objectives import OBJECTIVES

        _choice(self.kind, "objective.kind", tuple(OBJECTIVES))
        self.timesteps.validate()
        self.flow.validate()

    def timestep_sampling(self):
        from ditscale.objectives import TimestepSampling

        t = self.timesteps
        return TimestepSampling(t.sampling, t.mean, t.std, t.shift)


def _untouched(section, prefix: str, kind: str, owner: str) -> None:
    """Every key of `section` at its default: it belongs to objective.kind=`owner`, not `kind`."""
    for f in dataclasses.fields(section):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        _require(
            getattr(section, f.name) == default,
            f"{prefix}.{f.name}",
            f"applies to objective.kind={owner}, but objective.kind={kind}",
        )


@dataclass
class DataConfig:
    """Where the data_prep dataset lives and how it is read."""

    root: str = ""  # dataset root (local dir or remote URL such as s3://...)
    cache: str | None = None  # local cache for a remote root (default: $DITSCALE_DATA_CACHE/...)
    cache_limit: str | None = None  # MDS cache size per node ("200gb", bytes): least recently used shards
    # are evicted past it (None: keep every shard fetched)
    remote_wait_s: float = 600.0  # how long a read waits for an unreachable object store before exit 2
    format: str = "auto"  # auto (dataset.json) | a registered format: mds, wds
    num_workers: int = 2  # loader processes per rank
    prefetch_factor: int = 4  # batches each worker keeps ready
    shuffle: bool = True
    shuffle_seed: int | None = None  # None: train.seed
    hflip: bool = True  # show each sample's stored mirror half the time (off for digits, text)

    def validate(self) -> None:
        _require(bool(self.root), "data.root", "is required (the dataset directory written by data_prep)")
        from ditscale.data.schema import FORMATS

        _choice(self.format, "data.format", ("auto", *FORMATS))
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        _require(
            self.cache_limit is None or _BYTES.fullmatch(str(self.cache_limit).strip().lower()) is not None,
            "data.cache_limit",
            f"must be a size such as 200gb, 512mb (1024-based) or a byte count, got {self.cache_limit!r}",
        )
        _require(self.remote_wait_s >= 0, "data.remote_wait_s", f"must be >= 0 seconds, got {self.remote_wait_s}")

    def cache_limit_bytes(self) -> int | None:
        """cache_limit in bytes (kb = 1024 as streaming counts), or None."""
        if self.cache_limit is None:
            return None
        m = _BYTES.fullmatch(str(self.cache_limit).strip().lower())
        assert m is not None, self.cache_limit
        units = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40, "pb": 1 << 50}
        return int(float(str(self.cache_limit).strip().lower().rstrip("bkmgtp ")) * units[m.group(2) or "b"])


@dataclass
class OptimConfig:
    """AdamW; the paper: lr 1e-4 constant, no weight decay. warmup_steps > 0 ramps lr linearly from 0."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    warmup_steps: int = 0

    def validate(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"must be two values in [0, 1), got {self.betas}",
        )
        _require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    """The schedule. global_batch is over all ranks; micro_batch per rank per forward (None: no
    accumulation), gradient accumulation = global_batch / (micro_batch × ranks)."""

    global_batch: int = 256
    micro_batch: int | None = None
    max_steps: int = 400_000
    ckpt_every: int = 5_000  # steps between checkpoints (also one at exit)
    keep_last: int = 3  # complete checkpoints kept
    ema_decay: float = 0.9999
    seed: int = 0
    max_nonfinite: int = 20  # non-finite steps in a row before stopping (exit 3)
    resume: str = "auto"  # auto (newest complete checkpoint, else fresh) | none | a checkpoint dir
    resume_ignore: list[str] = field(default_factory=list)  # keys allowed to differ from the checkpoint's
    stop_check_every: int = 1  # steps between the ranks' agreement on a stop signal
    stop_data_wait_s: float = 10.0  # after a stop signal, a wait for data ends (no new checkpoint) after this
    hang_timeout_min: float = 10.0  # no step completed for this long: the rank exits 4 (0 = off; watchdog.py)
    deterministic: bool = False  # deterministic kernels (bit-exact resume on GPUs; slower)

    def validate(self) -> None:
        for name in ("global_batch", "max_steps", "ckpt_every", "keep_last", "max_nonfinite", "stop_check_every"):
            _require(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(
            self.micro_batch is None or self.micro_batch >= 1,
            "train.micro_batch",
            f"must be >= 1, got {self.micro_batch}",
        )
        _require(
            self.micro_batch is None or self.global_batch % self.micro_batch == 0,
            "train.micro_batch",
            f"{self.micro_batch} does not divide train.global_batch={self.global_batch}",
        )
        _require(0 <= self.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        _require(
            self.hang_timeout_min >= 0,
            "train.hang_timeout_min",
            f"must be >= 0 (0 = no watchdog), got {self.hang_timeout_min}",
        )
        _require(
            self.stop_data_wait_s >= 0,
            "train.stop_data_wait_s",
            f"must be >= 0 (0 = stop at once), got {self.stop_data_wait_s}",
        )
        _require(bool(self.resume), "train.resume", "must be auto, none or a checkpoint directory")

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """(micro_batch, gradient accumulation steps) for `world_size` ranks."""
        if self.micro_batch is None:
            _require(
                self.global_batch % world_size == 0,
                "train.global_batch",
                f"{self.global_batch} is not divisible by the {world_size} ranks",
            )
            return self.global_batch // world_size, 1
        per_step = self.micro_batch * world_size
        _require(
            self.global_batch % per_step == 0,
            "train.global_batch",
            f"{self.global_batch} is not a multiple of train.micro_batch × ranks = {self.micro_batch} × {world_size}",
        )
        return self.micro_batch, self.global_batch // per_step


@dataclass
class EngineConfig:
    """DeepSpeed: the JSON with the ZeRO stage and bf16 settings; batch, optimizer and clipping
    come from this file's sections. `compile` and `nonfinite_check` are the trainer's fast path
    (ditscale.engine.build.compile_mode, ditscale.engine.nonfinite)."""

    ds_config: str = "ds_configs/zero2_bf16.json"
    device: str = "auto"  # auto (cuda if available) | cuda | cpu; $DITSCALE_DEVICE overrides
    dist_timeout_min: int = 30
    compile: str = "auto"  # auto (blocks on CUDA under ZeRO-1/2, else off) | off | blocks
    nonfinite_check: str = "step"  # step (DeepSpeed skips bad steps; 2 host syncs/step) | async (none)

    def validate(self) -> None:
        _require(bool(self.ds_config), "engine.ds_config", "is required (a JSON in ds_configs/)")
        _choice(self.device, "engine.device", ("auto", "cuda", "cpu"))
        _choice(self.compile, "engine.compile", ("auto", "off", "blocks"))
        _choice(self.nonfinite_check, "engine.nonfinite_check", ("step", "async"))
        _require(self.dist_timeout_min >= 1, "engine.dist_timeout_min", f"must be >= 1, got {self.dist_timeout_min}")


@dataclass
class LogConfig:
    """Rank 0 writes run_dir/metrics.jsonl and TensorBoard events every `every` steps."""

    every: int = 100
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "ditscale"
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs' bf16 dense peak, else no MFU
    progress: str = "auto"  # auto (when stderr is a terminal) | on | off

    def validate(self) -> None:
        _require(self.every >= 1, "log.every", f"must be >= 1, got {self.every}")
        _require(
            self.peak_tflops is None or self.peak_tflops > 0, "log.peak_tflops", f"must be > 0, got {self.peak_tflops}"
        )
        _choice(self.progress, "log.progress", ("auto", "on", "off"))
        if self.wandb:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("log.wandb: true, but wandb is not installed (pip install wandb)") from None


@dataclass
class SampleConfig:
    """In-training sample grids from the EMA weights (ditscale.sampling.grid.ema_grid) written to
    run_dir/samples every `every` steps (0 = off)."""

    every: int = 0
    classes: list[int] | None = None  # None: the official showcase for 1000 classes, else the first 8
    num_per_class: int = 4
    sampler: str | None = None  # None: ddim (objective ddpm) / heun (flow); any sampler of the objective
    steps: int = 50
    cfg_interval: list[float] | None = None  # [lo, hi]: guide only where the noise fraction is in it
    cfg_scale: float = 4.0
    seed: int = 0
    vae: str | None = None  # AutoencoderKL directory; None: the dataset's (dataset.json vae)

    def sampler_for(self, kind: str) -> str:
        """The grid sampler for objective `kind`: the configured one, else DDIM for ddpm (fast grids), else the
        objective's default."""
        from ditscale.objectives import objective_class

        return self.sampler or ("ddim" if kind == "ddpm" else objective_class(kind).default_sampler)

    def validate(self) -> None:
        _require(self.every >= 0, "sample.every", f"must be >= 0 (0 = off), got {self.every}")
        _require(self.num_per_class >= 1, "sample.num_per_class", f"must be >= 1, got {self.num_per_class}")
        if self.sampler is not None:
            from ditscale.sampling.registry import SAMPLERS

            _choice(self.sampler, "sample.sampler", tuple(SAMPLERS))
        _require(
            self.cfg_interval is None
            or (len(self.cfg_interval) == 2 and 0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1),
            "sample.cfg_interval",
            f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {self.cfg_interval}",
        )
        _require(self.steps >= 1, "sample.steps", f"must be >= 1, got {self.steps}")
        _require(self.cfg_scale >= 1, "sample.cfg_scale", f"must be >= 1, got {self.cfg_scale}")
        _require(self.classes is None or len(self.classes) > 0, "sample.classes", "needs at least one class")


@dataclass
class EvalConfig:
    """FID (and IS / sFID / precision-recall) of the EMA during training, every `every` steps and at
    train.max_steps (0 = off): num_samples images sampled over all ranks, compared with `ref` in the
    features of `network` (ditscale.engine.evaluation). Defaults: the paper's training-curve setting
    (250 DDPM steps, no guidance) and ADM's metric conventions."""

    every: int = 0
    num_samples: int = 10_000
    ref: str = ""  # ADM reference batch .npz, a saved reference, or a folder of images
    network: str = "inception"  # inception | digits (ditscale.evaluate.digits, for 8×8 digits)
    weights: str = ""  # the network's weights file (pt_inception-2015-12-05-6726825d.pth)
    resize: str = "tf1"  # Inception input resize: tf1 (ADM) | torch (pytorch-fid)
    metrics: list[str] = field(default_factory=lambda: ["fid"])  # of fid, sfid, is, pr
    sampler: str | None = None  # None: the objective's default (ddpm, the paper's; heun for flow)
    steps: int = 250
    cfg_scale: float = 1.0  # 1 = no guidance (the paper's FID-vs-training curves)
    labels: str = "balanced"  # balanced (num_samples / classes each) | random (the DiT paper)
    seed: int = 0
    batch_size: int = 64  # images per rank per model call (also the chunk size)

    def sampler_for(self, kind: str) -> str:
        """The sampler for objective `kind`: the configured one, else the objective's default."""
        from ditscale.objectives import objective_class

        return self.sampler or objective_class(kind).default_sampler

    def validate(self) -> None:
        from ditscale.evaluate.metrics import METRICS

        _require(self.every >= 0, "eval.every", f"must be >= 0 (0 = off), got {self.every}")
        _choice(self.network, "eval.network", ("inception", "digits"))
        _choice(self.resize, "eval.resize", ("tf1", "torch"))
        if self.sampler is not None:
            from ditscale.sampling.registry import SAMPLERS

            _choice(self.sampler, "eval.sampler", tuple(SAMPLERS))
        _choice(self.labels, "eval.labels", ("balanced", "random"))
        bad = [m for m in self.metrics if m not in METRICS]
        _require(bool(self.metrics) and not bad, "eval.metrics", f"{bad or '[]'}: choose from {', '.join(METRICS)}")
        for name in ("num_samples", "steps", "batch_size"):
            _require(getattr(self, name) >= 1, f"eval.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.cfg_scale >= 1, "eval.cfg_scale", f"must be >= 1 (1 = no guidance), got {self.cfg_scale}")
        _require(self.seed >= 0, "eval.seed", f"must be >= 0, got {self.seed}")
        if self.every:
            _require(bool(self.ref), "eval.ref", "is required with eval.every > 0 (a reference .npz or folder)")
            _require(
                bool(self.weights),
                "eval.weights",
                f"is required with eval.every > 0 (the {self.network} network's weights file)",
            )


@dataclass
class RepaConfig:
    """REPA (ditscale.repa): align the tokens after DiT block `block`, through a 3-layer MLP projector, to
    the patch features a frozen DINOv2 gives the clean image; `coeff` · mean negative cosine is added to the
    loss. The paper's settings: DINOv2 ViT-B/14, block 8 for XL (4 for B and S), coeff 0.5. The dataset
    must keep images (data_prep encode --keep-image)."""

    enabled: bool = False
    encoder: str = "dinov2_vitb14"  # dinov2_vits14 | dinov2_vitb14 | dinov2_vitl14 | dinov2_vitg14
    encoder_weights: str = ""  # local .safetensors / .pth of that encoder (downloaded once)
    encoder_resolution: int | None = None  # encoder input side; None: 224 per 256 px (REPA), whole patches
    block: int = 8  # align the tokens after this block (1-based)
    coeff: float = 0.5  # λ
    projector_width: int = 2048

    def validate(self) -> None:
        if not self.enabled:
            return
        from ditscale.repa.encoder import ENCODERS, PATCH

        _choice(self.encoder, "repa.encoder", tuple(ENCODERS))
        _require(
            bool(self.encoder_weights),
            "repa.encoder_weights",
            "is required with repa.enabled (a local weights file; README 'REPA')",
        )
        _require(self.block >= 1, "repa.block", f"must be >= 1, got {self.block}")
        _require(self.coeff >= 0, "repa.coeff", f"must be >= 0 (0: the term is logged, not trained), got {self.coeff}")
        _require(self.projector_width >= 1, "repa.projector_width", f"must be >= 1, got {self.projector_width}")
        _require(
            self.encoder_resolution is None
            or (self.encoder_resolution >= PATCH and self.encoder_resolution % PATCH == 0),
            "repa.encoder_resolution",
            f"must be a multiple of the patch size {PATCH}, got {self.encoder_resolution}",
        )


@dataclass
class ExperimentConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def validate(self) -> ExperimentConfig:
        """Check every section and the keys that relate across sections; returns self."""
        _require(bool(self.run_dir), "run_dir", "is required")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        from ditscale.sampling.registry import check_fits

        for key, sampler in (("sample.sampler", self.sample.sampler), ("eval.sampler", self.eval.sampler)):
            try:
                if sampler is not None:
                    check_fits(sampler, self.objective.kind)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
        if self.objective.kind != "ddpm":
            _untouched(self.diffusion, "diffusion", self.objective.kind, "ddpm")
        if self.objective.kind != "flow":
            _untouched(self.objective.flow, "objective.flow", self.objective.kind, "flow")
        if self.sample.every and self.sample.classes and self.model.num_classes is not None:
            bad = [y for y in self.sample.classes if not 0 <= y < self.model.num_classes]
            _require(not bad, "sample.classes", f"{bad} outside the {self.model.num_classes} classes")
        if self.repa.enabled:
            from ditscale.models.dit import DIT_PRESETS

            depth = self.model.depth or DIT_PRESETS[self.model.preset]["depth"]
            _require(self.repa.block <= depth, "repa.block", f"{self.repa.block} is past the model's depth {depth}")
        unknown = [k for k in self.train.resume_ignore if k not in flatten(to_dict(self))]
        _require(not unknown, "train.resume_ignore", f"unknown key(s) {unknown}")
        return self


#################################################################################
#                        Building from dicts, typed and strict                  #
#################################################################################


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls=ExperimentConfig, prefix="") -> list[str]:
    keys = []
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    keys = _all_keys()
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.75) if k not in close]
    hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint, key: str, raw: str | None = None) -> Any:
    """`value` checked against the type hint (int, float, bool, str, X | None, list[X]); `raw` is the
    override's text, used where YAML's guess differs from the field's type (a str field, "1e-4")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (raw is not None and raw.strip().lower() in ("null", "none", "~")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key, raw)
    if origin is list:
        if isinstance(value, str):  # an override such as "1,2,3"
            value = [v.strip() for v in value.split(",") if v.strip()]
            value = [v if args[0] is str else yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if raw is not None:
            return raw
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(hint)}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise _unknown_key(full)
        hint = hints[key]
        kwargs[key] = (
            _build(hint, value or {}, full + ".") if dataclasses.is_dataclass(hint) else _coerce(value, hint, full)
        )
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 0}} → {"train.seed": 0}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def apply_override(data: dict, override: str) -> None:
    """Set `a.b=value` in the nested dict `data`, typed by the field it names."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.max_steps=10")
    key, raw = (s.strip() for s in override.split("=", 1))
    parts = key.split(".")
    cls, node = ExperimentConfig, data
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise _unknown_key(key)
        hint = hints[part]
        if dataclasses.is_dataclass(hint):
            if i == len(parts) - 1:
                raise ConfigError(f"override {override!r}: '{key}' is a section; set one of its keys")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, cls = node[part], hint
            continue
        if i != len(parts) - 1:
            raise _unknown_key(key)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node[part] = _coerce(value, hint, key, raw=raw)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Defaults ← YAML file ← dotted overrides, typed and validated."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    return config_from_dict(data)


def config_from_dict(data: dict) -> ExperimentConfig:
    return _build(ExperimentConfig, data).validate()


def model_from_dict(data: dict) -> ModelConfig:
    """The model section alone (e.g. from a checkpoint's saved config), checked."""
    model = _build(ModelConfig, data, "model.")
    model.validate()
    return model


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    from ditscale.files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


#################################################################################
#                        Dataset resolution and resume identity                 #
#################################################################################


def resolve_with_dataset(cfg: ExperimentConfig, meta: dict) -> ExperimentConfig:
    """Fill model.input_size / in_channels / num_classes from dataset.json; a value given in the
    config must agree with the dataset (a latent model cannot read other latents)."""
    found = {
        "input_size": meta["latent_size"],
        "in_channels": meta["latent_channels"],
        "num_classes": len(meta["classes"]),
    }
    model = dataclasses.replace(cfg.model)
    for key, value in found.items():
        given = getattr(model, key)
        if given is None:
            setattr(model, key, value)
        elif key != "num_classes" and given != value:
            raise ConfigError(f"model.{key}={given} but the dataset at {cfg.data.root} has {value}")
        elif key == "num_classes" and given < value:
            raise ConfigError(f"model.num_classes={given} but the dataset at {cfg.data.root} has {value} classes")
    if cfg.repa.enabled and not meta.get("image"):
        raise ConfigError(
            f"repa.enabled: the dataset at {cfg.data.root} holds no images (dataset.json has no "
            f"'image'); REPA needs the clean image: re-encode it with data_prep encode --keep-image"
        )
    if cfg.data.format != "auto" and cfg.data.format != meta["format"]:
        raise ConfigError(f"data.format={cfg.data.format} but {cfg.data.root}/dataset.json says {meta['format']}")
    if cfg.data.cache_limit is not None and meta["format"] != "mds":
        raise ConfigError(
            f"data.cache_limit: {cfg.data.root} is a {meta['format']} dataset, read in place without "
            f"a cache; the limit applies to MDS datasets"
        )
    out = dataclasses.replace(cfg, model=model)
    out.validate()
    out.model.dit_kwargs()
    return out


# Keys that may change when a run resumes: where things are, how often to save / log, how the work is
# split over ranks. Everything else (model, diffusion, optimizer, batch, seeds, data order) must match.
RESUME_MAY_CHANGE = (
    "run_dir",
    "train.max_steps",
    "train.ckpt_every",
    "train.keep_last",
    "train.max_nonfinite",
    "train.resume",
    "train.resume_ignore",
    "train.stop_check_every",
    "train.stop_data_wait_s",
    "train.hang_timeout_min",
    "train.micro_batch",
    "train.deterministic",
    "model.checkpoint_every",
    "data.root",
    "data.cache",
    "data.cache_limit",
    "data.remote_wait_s",
    "data.num_workers",
    "data.prefetch_factor",
    "engine.",
    "log.",
    "sample.",
    "eval.",
    "repa.encoder_weights",
)


def identity(cfg: ExperimentConfig | dict) -> dict[str, Any]:
    """The flattened keys that define the training trajectory (what a resume must match)."""
    flat = flatten(cfg if isinstance(cfg, dict) else to_dict(cfg))
    return {
        k: v
        for k, v in flat.items()
        if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_MAY_CHANGE)
    }


def config_hash(cfg: ExperimentConfig | dict) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(saved: dict, now: ExperimentConfig, ignore: list[str] = ()) -> list[str]:
    """'key: checkpoint X, now Y' for each trajectory key that differs (keys in `ignore` excepted). A key the
    checkpoint's config predates counts as its default (objective.kind of a run from before the key: ddpm)."""
    a, b = {**identity(ExperimentConfig()), **identity(saved)}, identity(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        out.append(f"{key}: checkpoint {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
    return out
