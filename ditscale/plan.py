"""Memory and FLOP planner for training a DiT with DeepSpeed: ZeRO 0-3, bf16, CPU offload, activation
checkpointing. Pure arithmetic (the model is only built on the meta device, to list its tensors).

    python -m ditscale.plan --preset DiT-XL/2 --resolution 256 --micro-batch 32 --gpus 64 --gpu-mem 80 --zero 2
    python -m ditscale.plan --preset DiT-7B/2 --gpus 8 --gpu-mem 80 --sweep
    python -m ditscale.plan --ds-config ds_configs/zero3_offload_bf16.json --preset DiT-3B/2 --json

Per GPU, with P parameters, N data-parallel ranks, w = bytes of the model dtype (bf16: 2, fp32: 4) and
g = bytes of the gradient dtype (DeepSpeed's `data_types.grad_accum_dtype`, the model dtype by default):
- parameters: w·P under ZeRO 0-2; under ZeRO-3 w·P/N plus full copies of the small "persistent" ones.
- fp32 master weights 4·P/N (ZeRO ≥ 1 keeps them even for an fp32 model; ZeRO-0 bf16: 4·P; fp32: none).
- gradients: ZeRO-0/1 full g·P during backward (ZeRO-1 keeps g·P/N for the step; bf16 ZeRO-0 keeps all
  between steps); ZeRO-2/3 g·P/N.
- Adam moments 8·P/N (8·P under ZeRO-0); the EMA (fp32) of each rank's shard of the master weights, kept
  beside them (on CPU when the optimizer is offloaded), as ditscale.engine.ema does; ZeRO-0: of all P.
- activations: the tensors the DiT block saves for backward, counted tensor by tensor (`block_saved`): SDPA
  on its flash / memory-efficient path keeps q, k, v, its output and the log-sum-exp, never the T×T scores.
  With checkpointing every k-th block, those blocks keep only their input and one block is recomputed at a
  time in backward. Plus the backward's working set (gradients of one block's widest tensors).
- buffers: ZeRO-1/2 gradient buckets (`reduce_bucket_size` elements, two with `overlap_comm`; the parameter
  all-gather after the step is in place, so `allgather_bucket_size` costs nothing); ZeRO-3's bucket, the
  gathered parameters (a block plus `stage3_prefetch_bucket_size`, capped by `stage3_max_live_parameters`)
  and a module's full-size gradients before reduce-scatter; the optimizer step's flattened gradient and its
  fp32 copy (ZeRO-3: per `sub_group_size` sub-group).
- offload moves master weights, moments and fp32 gradients (and under ZeRO-3 the parameters) to CPU memory.
The peak is the largest of four moments: the start of backward (every saved activation alive), backward at
the first block (gradients of the rest produced, that block's activations alive), after backward (all
gradients, before ZeRO-1 frees the other ranks' share) and the optimizer step.
It fits when it is at most (1 - headroom) of the GPU's memory; the headroom stands for what the estimate
leaves out: the CUDA context, NCCL's buffers and the caching allocator's fragmentation.

FLOPs: 3 × the forward multiply-adds × 2 per image (`ditscale.models.flops`), plus one more forward of every
checkpointed block. `mfu` is taken as the fraction of the peak the GPU sustains on all executed FLOPs, so
checkpointing costs time; the step time leaves out offload traffic and the CPU optimizer step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass, field

import torch

from ditscale.models import DIT_PRESETS, DiT, block_type, dit_config
from ditscale.models.flops import dit_gflops, dit_params, train_flops_per_image

GiB = 2**30
OFFLOADS = ("none", "optimizer", "optimizer+params")
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
EMA_BYTES = {"fp32": 4, "bf16": 2, "none": 0}
LOSS_FP32_COPIES = 18.75  # fp32 latent-sized tensors the hybrid loss (MSE + VLB) keeps, measured on CPU
MAX_MICRO_BATCH = 1 << 16


#################################################################################
#                                    Inputs                                      #
#################################################################################


@dataclass(frozen=True)
class ZeroBuffers:
    """DeepSpeed's buffer settings (elements), with DeepSpeed's defaults; `from_ds_config` reads a ds config."""

    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool | None = None  # None: DeepSpeed's default (on for ZeRO-3 only)
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    sub_group_size: int = 1_000_000_000

    def __post_init__(self):
        for f in (
            "reduce_bucket_size",
            "prefetch_bucket_size",
            "max_live_parameters",
            "param_persistence_threshold",
            "sub_group_size",
        ):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"zero_optimization.{f} must be an int >= 0, got {v!r}")

    def overlap(self, stage):
        return stage == 3 if self.overlap_comm is None else self.overlap_comm


@dataclass(frozen=True)
class PlanInput:
    """One training setup. Validates itself; errors name the field (the CLI flag is the field with dashes)."""

    preset: str = "DiT-XL/2"
    resolution: int = 256
    micro_batch: int = 32
    gpus: int = 8
    gpu_mem: float = 80.0  # GiB per GPU, as torch.cuda reports it
    zero: int = 2
    offload: str = "none"  # none | optimizer | optimizer+params (ZeRO-3)
    checkpointing: int = 0  # 0 off, k: blocks 0, k, 2k, ... (1 = every block)
    precision: str = "bf16"  # model dtype: bf16 (DeepSpeed bf16) | fp32
    grad_dtype: str | None = None  # gradient accumulation dtype; None = the model dtype
    ema: str = "fp32"  # fp32 | bf16 | none
    ema_device: str = "auto"  # auto (with the master weights) | gpu | cpu
    grad_accum: int = 1
    latent_channels: int = 4
    vae_factor: int = 8
    mfu: float = 0.45
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    headroom: float = 0.1  # fraction of gpu_mem kept free (context, NCCL, fragmentation)
    cpu_mem: float | None = None  # GiB of host memory per node; None: not checked
    gpus_per_node: int = 8
    model: dict = field(default_factory=dict)  # DiT kwargs over the preset (depth=4, hidden_size=256, ...)
    buffers: ZeroBuffers = field(default_factory=ZeroBuffers)

    def __post_init__(self):
        if self.preset not in DIT_PRESETS:
            raise ValueError(f"preset: unknown DiT preset {self.preset!r}; valid presets: {', '.join(DIT_PRESETS)}")
        for f in ("resolution", "micro_batch", "gpus", "grad_accum", "latent_channels", "vae_factor", "gpus_per_node"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if isinstance(self.checkpointing, bool) or not isinstance(self.checkpointing, int) or self.checkpointing < 0:
            raise ValueError(
                f"checkpointing must be an int >= 0 (0 off, k = every k-th block), got {self.checkpointing!r}"
            )
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be a ZeRO stage 0, 1, 2 or 3, got {self.zero!r}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {OFFLOADS}, got {self.offload!r}")
        if self.offload != "none" and self.zero == 0:
            raise ValueError("offload needs ZeRO stage >= 1 (DeepSpeed offloads the partitioned optimizer)")
        if self.offload == "optimizer+params" and self.zero != 3:
            raise ValueError("offload=optimizer+params needs zero=3 (DeepSpeed offloads parameters only under ZeRO-3)")
        if self.precision not in DTYPE_BYTES:
            raise ValueError(f"precision must be one of {tuple(DTYPE_BYTES)}, got {self.precision!r}")
        if self.grad_dtype is not None and self.grad_dtype not in DTYPE_BYTES:
            raise ValueError(f"grad_dtype must be one of {tuple(DTYPE_BYTES)} or None, got {self.grad_dtype!r}")
        if self.ema not in EMA_BYTES:
            raise ValueError(f"ema must be one of {tuple(EMA_BYTES)}, got {self.ema!r}")
        if self.ema_device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"ema_device must be 'auto', 'gpu' or 'cpu', got {self.ema_device!r}")
        for f, lo, hi in (("gpu_mem", 0, math.inf), ("mfu", 0, 1), ("peak_tflops", 0, math.inf)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi:
                raise ValueError(f"{f} must be a number in ({lo}, {hi}], got {v!r}")
        if self.cpu_mem is not None and (
            isinstance(self.cpu_mem, bool) or not isinstance(self.cpu_mem, (int, float)) or self.cpu_mem <= 0
        ):
            raise ValueError(f"cpu_mem must be a positive number of GiB or None, got {self.cpu_mem!r}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {self.headroom!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a dict of DiT keyword arguments, got {type(self.model).__name__}")
        if not isinstance(self.buffers, ZeroBuffers):
            raise ValueError(f"buffers must be a ZeroBuffers, got {type(self.buffers).__name__}")
        try:
            self.dit_kwargs()
        except (ValueError, TypeError) as e:
            raise ValueError(f"model / resolution: {e}") from None

    def dit_kwargs(self):
        """Full DiT kwargs: the preset, the model overrides, input_size = resolution / vae_factor."""
        return dit_config(
            {**DIT_PRESETS[self.preset], **self.model}, self.resolution, self.latent_channels, self.vae_factor
        )

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


#################################################################################
#                                 Model shapes                                   #
#################################################################################


@dataclass(frozen=True)
class Shapes:
    """What the planner needs of the model's tensors, read from a meta-device build."""

    params: int  # all trainable parameters
    block_params: int  # one transformer block
    embed_params: int  # patch, timestep and label embedders (their gradients come last)
    largest_param: int  # largest single tensor
    largest_module: int  # most parameters owned directly by one module (ZeRO-3's fetch unit)
    small_params: int  # parameters in tensors of <= param_persistence_threshold elements


@functools.lru_cache(maxsize=256)
def _shapes(kwargs_items, persistence_threshold):
    kwargs = dict(kwargs_items)
    with torch.device("meta"):
        model = DiT(**kwargs)
    sizes = [p.numel() for p in model.parameters()]
    per_module = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return Shapes(
        params=sum(sizes),
        block_params=sum(p.numel() for p in model.blocks[0].parameters()),
        embed_params=sum(
            p.numel() for m in (model.x_embedder, model.t_embedder, model.y_embedder) for p in m.parameters()
        ),
        largest_param=max(sizes),
        largest_module=max(per_module),
        small_params=sum(s for s in sizes if s <= persistence_threshold),
    )


def model_shapes(inp: PlanInput) -> Shapes:
    return _shapes(tuple(sorted(inp.dit_kwargs().items())), inp.buffers.param_persistence_threshold)


#################################################################################
#                                  Activations                                   #
#################################################################################


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch. `saved`: alive when backward starts (block tensors, checkpointed
    blocks' inputs, embeddings, final layer, loss); `block`: one block's full saved set (what a checkpointed
    block recomputes); `recompute`: what the last block recomputes once backward reaches it (when it is
    checkpointed), by which time the final layer's and the loss's `head` are freed; `workspace`: the
    backward's transient gradients inside one block; `embeddings`: what is left at the first block."""

    saved: int
    block: int
    checkpointed_blocks: int
    recompute: int
    workspace: int
    embeddings: int
    head: int

    @property
    def backward_start(self):
        return max(self.saved, self.saved - self.head + self.recompute) + self.workspace

    @property
    def at_first_block(self):
        return self.embeddings + self.block + self.workspace


def _tokens(cfg):
    t = (cfg["input_size"] // cfg["patch_size"]) ** 2
    return t + 2 if block_type(cfg["block"]).conditioning == "tokens" else t


def block_saved(cfg, n, act_bytes):
    """[(tensor, bytes)] one block saves for backward at micro-batch n, as PyTorch autograd keeps them
    (a tensor saved by several ops, or views of one output, counted once). Statistics of LayerNorm
    (mean, rstd) and SDPA's log-sum-exp are fp32, as on CUDA; RMSNorm q/k normalisation as CUDA's fused
    kernel saves it (input and rstd; the CPU's composite RMSNorm keeps fp32 intermediates besides)."""
    d, h, t = cfg["hidden_size"], cfg["num_heads"], _tokens(cfg)
    m = int(d * cfg["mlp_ratio"])
    a, tok, x = act_bytes, n * t, n * t * d * act_bytes
    ln_stats = 2 * tok * 4
    lse = n * h * t * 4
    qk_norm = cfg["qk_norm"]
    attention = [
        ("qkv input", x),
        ("q, k, v (one qkv output)", 3 * x),
        ("attention output = proj input", x),
        ("attention log-sum-exp", lse),
    ]
    if qk_norm:
        # Normalised q, k; SDPA's output then comes back in (N, h, T, d) layout, so proj copies it.
        stats = (2 if qk_norm == "layernorm" else 1) * 2 * n * h * t * 4
        attention += [("normalised q, k", 2 * x), ("proj input copy", x), ("q/k norm statistics", stats)]
    mlp = [("fc1 input", x), ("fc1 output (GELU input)", tok * m * a), ("GELU output (fc2 input)", tok * m * a)]
    kind = block_type(cfg["block"])
    if kind.conditioning == "adaln":
        items = [("block input (norm1 input)", x), ("norm1 output (modulate)", x), ("norm1 statistics", ln_stats)]
        items += attention
        items += [("norm2 input", x), ("norm2 output (modulate)", x), ("norm2 statistics", ln_stats)] + mlp
        # adaLN: SiLU(c) for the linear, (1 + scale) twice for modulate; the gates are views of the (N, 6D)
        # modulation output and keep all of it.
        items += [("adaLN SiLU(c), 1 + scale ×2", 3 * n * d * a)]
        if kind.gated:
            items += [
                ("attention branch output (gate)", x),
                ("MLP branch output (gate)", x),
                ("adaLN modulation output (gate views)", n * 6 * d * a),
            ]
        return items
    items = [("block input (norm1 input)", x), ("norm1 statistics", ln_stats)] + attention
    if kind.conditioning == "context":
        items += [
            ("norm_cross input", x),
            ("norm_cross statistics", ln_stats),
            ("q input", x),
            ("q output", x),
            ("cross-attention output = proj input", x),
            ("cross-attention log-sum-exp", lse),
            ("k, v of the condition tokens", n * 2 * 2 * d * a),
        ]
    items += [("norm2 input", x), ("norm2 statistics", ln_stats)] + mlp
    return items


def embeddings_saved(cfg, n, act_bytes):
    """[(tensor, bytes)] saved before the blocks: patch, timestep and label embeddings."""
    d, a = cfg["hidden_size"], act_bytes
    latent = n * cfg["in_channels"] * cfg["input_size"] ** 2
    return [
        ("patch embedding input", latent * a),
        ("timestep features, MLP hidden ×2", n * (256 + 2 * d) * a),
        ("condition c", n * d * a),
    ]


def head_saved(cfg, n, act_bytes):
    """[(tensor, bytes)] saved after the blocks: final layer, model output and the diffusion loss."""
    d, p, t = cfg["hidden_size"], cfg["patch_size"], (cfg["input_size"] // cfg["patch_size"]) ** 2
    a, x = act_bytes, n * t * d * act_bytes
    latent = n * cfg["in_channels"] * cfg["input_size"] ** 2
    out_ch = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)
    items = [("final norm input", x), ("final norm statistics", 2 * n * t * 4), ("final linear input", x)]
    if block_type(cfg["block"]).conditioning == "adaln":
        items += [("final norm output (modulate)", x), ("final adaLN SiLU(c), 1 + scale", 2 * n * d * a)]
    return items + [("model output", n * t * p * p * out_ch * a), ("loss (fp32)", int(LOSS_FP32_COPIES * latent * 4))]


def activation_memory(cfg, micro_batch, act_bytes, checkpoint_every):
    """Activations of one micro-batch for DiT kwargs `cfg` (see `Activations`)."""
    n, d, depth = micro_batch, cfg["hidden_size"], cfg["depth"]
    t = _tokens(cfg)
    block = sum(b for _, b in block_saved(cfg, n, act_bytes))
    embeddings = sum(b for _, b in embeddings_saved(cfg, n, act_bytes))
    head = sum(b for _, b in head_saved(cfg, n, act_bytes))
    ckpt = len(range(0, depth, checkpoint_every)) if checkpoint_every else 0
    block_input = n * t * d * act_bytes
    saved = (depth - ckpt) * block + ckpt * block_input + embeddings + head
    # Backward meets a checkpointed block before freeing any other only if the last block is one.
    last_checkpointed = bool(checkpoint_every) and (depth - 1) % checkpoint_every == 0
    # Backward of the MLP: the residual-stream gradient, the branch's gradient and that of the hidden layer.
    workspace = n * t * (2 * d + int(d * cfg["mlp_ratio"])) * act_bytes
    return Activations(
        saved=saved,
        block=block,
        checkpointed_blocks=ckpt,
        recompute=block if last_checkpointed else 0,
        workspace=workspace,
        embeddings=embeddings,
        head=head,
    )


#################################################################################
#                              States, buffers, peak                             #
#################################################################################

CATEGORIES = ("parameters", "master weights", "gradients", "optimizer", "EMA", "activations", "buffers")
PHASES = ("backward start", "backward, first block", "after backward", "optimizer step")


def _memory(inp: PlanInput, shapes: Shapes, acts: Activations):
    """GPU bytes per category at each phase, CPU bytes per category, per rank."""
    P, N, s = shapes.params, inp.gpus, inp.zero
    w = DTYPE_BYTES[inp.precision]
    g = DTYPE_BYTES[inp.grad_dtype or inp.precision]
    shard = lambda x: math.ceil(x / N)
    off_opt, off_par = inp.offload != "none", inp.offload == "optimizer+params"
    buf = inp.buffers
    gpu, cpu = dict.fromkeys(CATEGORIES, 0), {}

    # Parameters in the model dtype.
    if s < 3:
        gpu["parameters"] = w * P
    else:
        persistent = w * shapes.small_params if N > 1 else 0  # one rank: the partition is the parameter
        if off_par:
            cpu["parameters"] = w * shard(P)
            gpu["parameters"] = persistent
        else:
            gpu["parameters"] = w * shard(P) + persistent

    # fp32 master weights and Adam moments.
    master = 0 if (s == 0 and inp.precision == "fp32") else 4 * (P if s == 0 else shard(P))
    moments = 8 * (P if s == 0 else shard(P))
    if off_opt:
        cpu["master weights"], cpu["optimizer"] = master, moments
    else:
        gpu["master weights"], gpu["optimizer"] = master, moments

    ema_on_cpu = inp.ema_device == "cpu" or (inp.ema_device == "auto" and off_opt)
    (cpu if ema_on_cpu else gpu)["EMA"] = EMA_BYTES[inp.ema] * (P if s == 0 else shard(P))

    # Gradients on the GPU at each phase. ZeRO-0/1 produce full gradients during backward (all but the
    # first block's at its end; all of them when accumulating); ZeRO-1 then moves its partition into a
    # contiguous buffer (freeing those originals) and frees the rest at the step. ZeRO-2/3 reduce through
    # the buckets into a partition held all along.
    full_end = g * (P if inp.grad_accum > 1 else P - shapes.block_params - shapes.embed_params)
    partition = 0 if off_opt else g * shard(P)
    if s == 0 and inp.precision == "bf16":
        grads = dict.fromkeys(PHASES, g * P)  # DeepSpeed's bf16 ZeRO-0 keeps them between steps
    elif s in (0, 1):
        # With overlap_comm ZeRO-1 reduces during backward, into a partition buffer allocated at the first bucket.
        early = partition if s == 1 and buf.overlap(s) else 0
        grads = {
            "backward start": g * P if inp.grad_accum > 1 else 0,
            "backward, first block": full_end + early,
            "after backward": g * P,
            "optimizer step": g * P if s == 0 else partition,
        }
    else:
        grads = dict.fromkeys(PHASES, partition)
    if off_opt:
        # ZeRO-1/2: the fp32 partition and a copy-back buffer in the model dtype; ZeRO-3: the reduced partition
        # in the gradient dtype and the optimizer's fp32 sub-groups.
        cpu["gradients"] = (4 + w if s < 3 else g + 4) * shard(P)

    # Communication buffers during backward, temporaries of the optimizer step.
    comm = step_tmp = 0
    if s in (1, 2) and buf.contiguous_gradients:
        comm = g * buf.reduce_bucket_size * (2 if buf.overlap(s) else 1)
    elif s == 0 and N > 1:
        comm = g * min(buf.reduce_bucket_size, P)
    if s in (1, 2) and off_opt:
        comm += g * shapes.largest_param  # GPU staging of one gradient for the copy
    if s == 3:
        # One block gathered (its parameters are reused within `max_reuse_distance` in backward) plus the
        # prefetch; on one rank the partition is the parameter and nothing is gathered.
        working = max(shapes.block_params, shapes.largest_module) + buf.prefetch_bucket_size
        gathered = min(buf.max_live_parameters, working, P) if N > 1 else 0
        comm = g * buf.reduce_bucket_size * buf.contiguous_gradients + w * gathered + g * shapes.largest_module
    if s == 0 and inp.precision == "bf16":
        step_tmp = 8 * P  # fp32 copies of each gradient, then flattened
    elif not off_opt and s > 0:
        # The step flattens the gradient partition (ZeRO-3: one sub-group at a time) and casts it to fp32.
        n_step = shard(P) if s < 3 else shard(min(buf.sub_group_size, P))
        step_tmp = g * n_step + (4 * n_step if g != 4 else 0)

    phases = {}
    for phase in PHASES:
        mem = dict(gpu)
        mem["gradients"] = grads[phase]
        if phase == "backward start":
            mem["activations"], mem["buffers"] = acts.backward_start, comm
        elif phase == "backward, first block":
            mem["activations"], mem["buffers"] = acts.at_first_block, comm
        elif phase == "after backward":
            mem["activations"], mem["buffers"] = acts.embeddings, comm
        else:
            mem["buffers"] = step_tmp
        phases[phase] = mem
    return phases, cpu


#################################################################################
#                                     Plan                                       #
#################################################################################


@dataclass(frozen=True)
class Plan:
    input: PlanInput
    params: int
    tokens: int
    memory: dict  # GPU bytes per category at the peak phase
    peak_bytes: int
    peak_phase: str
    phases: dict  # phase -> {category: bytes}
    activations: Activations
    cpu: dict  # CPU bytes per category, per GPU rank
    cpu_bytes: int
    cpu_bytes_per_node: int
    usable_bytes: int
    fits: bool
    max_micro_batch: int  # largest micro-batch that fits with these settings (0: none)
    suggestions: tuple  # what would make it fit (empty when it fits)
    global_batch: int
    model_flops_per_step: float  # 6 × forward multiply-adds × global batch
    hardware_flops_per_step: float  # + the recomputed forward of checkpointed blocks
    step_time_s: float
    images_per_s: float
    images_per_s_per_gpu: float

    def to_json(self):
        d = dataclasses.asdict(self)
        d["activations"].update(
            backward_start=self.activations.backward_start, at_first_block=self.activations.at_first_block
        )
        return d


def _estimate(inp: PlanInput):
    cfg = inp.dit_kwargs()
    shapes = model_shapes(inp)
    acts = activation_memory(cfg, inp.micro_batch, DTYPE_BYTES[inp.precision], inp.checkpointing)
    phases, cpu = _memory(inp, shapes, acts)
    peak_phase = max(PHASES, key=lambda p: sum(phases[p].values()))
    return cfg, shapes, acts, phases, cpu, peak_phase, sum(phases[peak_phase].values())


def _usable(inp):
    return int(inp.gpu_mem * GiB * (1 - inp.headroom))


def _cpu_ok(inp, cpu):
    per_node = sum(cpu.values()) * min(inp.gpus, inp.gpus_per_node)
    return inp.cpu_mem is None or per_node <= inp.cpu_mem * GiB * (1 - inp.headroom)


def peak_bytes(inp: PlanInput) -> int:
    """Peak GPU bytes of one training step per GPU."""
    return _estimate(inp)[-1]


def fits(inp: PlanInput) -> bool:
    """GPU peak within (1 - headroom) of gpu_mem, and the node's offloaded bytes within cpu_mem if given."""
    *_, cpu, _, peak = _estimate(inp)
    return peak <= _usable(inp) and _cpu_ok(inp, cpu)


def largest_micro_batch(inp: PlanInput, limit=MAX_MICRO_BATCH) -> int:
    """Largest micro-batch that fits with `inp`'s other settings (memory grows with the micro-batch); 0 if none."""
    if not fits(inp.replace(micro_batch=1)):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(inp.replace(micro_batch=hi)):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(inp.replace(micro_batch=mid)) else (lo, mid)
    return lo


def settings(inp: PlanInput):
    """Every ZeRO stage × offload × checkpointing (off, every 2nd block, every block) that DeepSpeed allows,
    cheapest first (each later option trades speed or CPU memory for GPU memory)."""
    out = []
    for ckpt in (0, 2, 1):
        for zero in (0, 1, 2, 3):
            for offload in OFFLOADS:
                if (offload != "none" and zero == 0) or (offload == "optimizer+params" and zero != 3):
                    continue
                if ckpt == 2 and inp.model.get("depth", DIT_PRESETS[inp.preset]["depth"]) < 2:
                    continue
                out.append(inp.replace(zero=zero, offload=offload, checkpointing=ckpt))
    return out


def _describe(inp):
    ck = {0: "no checkpointing", 1: "checkpointing every block"}.get(
        inp.checkpointing, f"checkpointing every {inp.checkpointing}th block"
    )
    off = "" if inp.offload == "none" else f" + offload {inp.offload}"
    return f"ZeRO-{inp.zero}{off}, {ck}"


def suggestions(inp: PlanInput):
    """Single changes that make `inp` fit, then (if none does) the cheapest combination at this micro-batch."""
    out = []
    if inp.checkpointing != 1 and fits(inp.replace(checkpointing=1)):
        out.append("activation checkpointing on every block (--checkpointing every)")
    for zero in range(inp.zero + 1, 4):
        if fits(inp.replace(zero=zero)):
            out.append(f"ZeRO stage {zero} (--zero {zero})")
            break
    if inp.zero >= 1 and inp.offload == "none" and fits(inp.replace(offload="optimizer")):
        out.append("optimizer offload to CPU (--offload optimizer)")
    if inp.zero == 3 and inp.offload != "optimizer+params" and fits(inp.replace(offload="optimizer+params")):
        out.append("parameter and optimizer offload to CPU (--offload optimizer+params)")
    mb = largest_micro_batch(inp)
    if mb:
        out.append(f"micro-batch {mb} (--micro-batch {mb}; keep the global batch with --grad-accum)")
    if not out:
        for alt in settings(inp):
            if fits(alt):
                out.append(f"{_describe(alt)} at micro-batch {inp.micro_batch}")
                break
        else:
            out.append(
                f"nothing fits at micro-batch {inp.micro_batch} on {inp.gpus} GPUs of {inp.gpu_mem:g} GiB; "
                "more GPUs (ZeRO-3 shards by their number), a smaller model or resolution"
            )
    return tuple(out)


def plan(inp: PlanInput) -> Plan:
    """Memory split, verdict and FLOP / time estimate for one setup."""
    cfg, shapes, acts, phases, cpu, peak_phase, peak = _estimate(inp)
    usable = _usable(inp)
    ok = peak <= usable and _cpu_ok(inp, cpu)
    global_batch = inp.micro_batch * inp.gpus * inp.grad_accum
    model_flops = train_flops_per_image(cfg) * global_batch
    block_macs = (dit_gflops({**cfg, "depth": 2}) - dit_gflops({**cfg, "depth": 1})) * 1e9
    hardware_flops = model_flops + 2 * block_macs * acts.checkpointed_blocks * global_batch
    step_time = hardware_flops / inp.gpus / (inp.mfu * inp.peak_tflops * 1e12)
    cpu_bytes = sum(cpu.values())
    return Plan(
        input=inp,
        params=dit_params(cfg),
        tokens=_tokens(cfg),
        memory=phases[peak_phase],
        peak_bytes=peak,
        peak_phase=peak_phase,
        phases=phases,
        activations=acts,
        cpu=cpu,
        cpu_bytes=cpu_bytes,
        cpu_bytes_per_node=cpu_bytes * min(inp.gpus, inp.gpus_per_node),
        usable_bytes=usable,
        fits=ok,
        max_micro_batch=largest_micro_batch(inp),
        suggestions=() if ok else suggestions(inp),
        global_batch=global_batch,
        model_flops_per_step=model_flops,
        hardware_flops_per_step=hardware_flops,
        step_time_s=step_time,
        images_per_s=global_batch / step_time,
        images_per_s_per_gpu=global_batch / step_time / inp.gpus,
    )


def sweep(inp: PlanInput):
    """[(setup, largest micro-batch, Plan at it or None)] for every setting of `settings`."""
    rows = []
    for alt in settings(inp):
        mb = largest_micro_batch(alt)
        rows.append((alt, mb, plan(alt.replace(micro_batch=mb)) if mb else None))
    return rows


#################################################################################
#                                     Output                                     #
#################################################################################


def _gib(b):
    return f"{b / GiB:.2f}"


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(r))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def format_plan(p: Plan) -> str:
    inp = p.input
    w = inp.precision
    labels = {
        "parameters": f"parameters ({w})",
        "master weights": "master weights (fp32)",
        "gradients": f"gradients ({inp.grad_dtype or w})",
        "optimizer": "Adam moments (fp32)",
        "EMA": f"EMA ({inp.ema})",
        "activations": "activations",
        "buffers": "buffers / buckets / temporaries",
    }
    rows = [(labels[c], *(_gib(p.phases[ph][c]) for ph in PHASES)) for c in CATEGORIES]
    rows.append(("total", *(_gib(sum(p.phases[ph].values())) for ph in PHASES)))
    a = p.activations
    out = [
        f"{inp.preset}{''.join(f' {k}={v}' for k, v in inp.model.items())} at {inp.resolution}px: "
        f"{p.params / 1e6:,.1f}M parameters, {p.tokens} tokens; "
        f"micro-batch {inp.micro_batch} x {inp.gpus} GPUs x {inp.grad_accum} accumulation = {p.global_batch}",
        f"{_describe(inp)}, {inp.precision}" + (", EMA on CPU" if "EMA" in p.cpu else ""),
        "",
        "GPU memory per GPU (GiB) at each moment of the step:",
        _table(rows, ("", *PHASES)),
        "",
        f"activations: {_gib(a.saved)} saved ({a.checkpointed_blocks} checkpointed blocks), "
        f"{_gib(a.block)} per block, {_gib(a.workspace)} backward working set",
        f"peak {_gib(p.peak_bytes)} GiB at {p.peak_phase}; usable {_gib(p.usable_bytes)} of {inp.gpu_mem:g} GiB "
        f"({inp.headroom:.0%} headroom) -> {'FITS' if p.fits else 'DOES NOT FIT'}",
    ]
    if p.cpu_bytes:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in p.cpu.items() if v)
        out.append(
            f"CPU memory: {_gib(p.cpu_bytes)} GiB per GPU ({parts}); "
            f"{_gib(p.cpu_bytes_per_node)} GiB per node of {min(inp.gpus, inp.gpus_per_node)} GPUs"
            + (
                ""
                if inp.cpu_mem is None
                else f" (usable {inp.cpu_mem * (1 - inp.headroom):.2f} of "
                f"{inp.cpu_mem:g} GiB: {'fits' if _cpu_ok(inp, p.cpu) else 'DOES NOT FIT'})"
            )
        )
    out.append(f"largest micro-batch that fits with these settings: {p.max_micro_batch or 'none'}")
    if p.suggestions:
        out.append("would fit with: " + "; ".join(p.suggestions))
    ratio = p.hardware_flops_per_step / p.model_flops_per_step
    out += [
        "",
        f"FLOPs per step: {p.model_flops_per_step / 1e15:.2f} PFLOP model"
        + (f", {p.hardware_flops_per_step / 1e15:.2f} PFLOP with recomputation (x{ratio:.2f})" if ratio > 1 else ""),
        f"at MFU {inp.mfu:.0%} of {inp.peak_tflops:g} TFLOP/s: step {p.step_time_s * 1e3:.1f} ms, "
        f"{p.images_per_s:,.0f} images/s ({p.images_per_s_per_gpu:,.1f} per GPU)"
        + ("; offload traffic and the CPU optimizer step not included" if inp.offload != "none" else ""),
    ]
    return "\n".join(out)


def format_sweep(inp: PlanInput, rows) -> str:
    table = []
    for alt, mb, p in rows:
        ck = {0: "off", 1: "every block"}.get(alt.checkpointing, f"every {alt.checkpointing}")
        table.append(
            (
                f"ZeRO-{alt.zero}",
                alt.offload,
                ck,
                mb or "-",
                _gib(p.peak_bytes) if p else "-",
                _gib(p.cpu_bytes) if p else "-",
                f"{p.images_per_s_per_gpu:,.1f}" if p else "-",
            )
        )
    head = (
        f"{inp.preset} at {inp.resolution}px on {inp.gpus} GPUs of {inp.gpu_mem:g} GiB "
        f"({inp.headroom:.0%} headroom), {inp.precision}: largest micro-batch per setting"
    )
    return (
        head
        + "\n"
        + _table(table, ("stage", "offload", "checkpointing", "micro-batch", "peak GiB", "CPU GiB/GPU", "images/s/GPU"))
    )


#################################################################################
#                                      CLI                                       #
#################################################################################


def from_ds_config(config) -> dict:
    """PlanInput fields from a DeepSpeed config (a dict or a JSON path): zero, offload, precision, grad_dtype,
    buffers. Raises ValueError naming the file and key for what the planner cannot use."""
    where = "ds config"
    if not isinstance(config, dict):
        where = str(config)
        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: cannot read DeepSpeed config: {e}") from None
    zero = config.get("zero_optimization", {}) or {}

    def num(key, default, src=zero):
        v = src.get(key, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}: zero_optimization.{key} must be a number, got {v!r}")
        return v

    out = {"zero": num("stage", 0)}
    if config.get("fp16", {}).get("enabled"):
        raise ValueError(f"{where}: fp16 is not modelled; the planner covers bf16 and fp32")
    out["precision"] = "bf16" if config.get("bf16", {}).get("enabled") else "fp32"
    accum = (config.get("data_types", {}) or {}).get("grad_accum_dtype")
    if accum is not None:
        names = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
        if accum not in names:
            raise ValueError(f"{where}: data_types.grad_accum_dtype {accum!r} is not modelled (fp32 or bf16)")
        out["grad_dtype"] = names[accum]
    dev = lambda key: (zero.get(key) or {}).get("device") or "none"
    opt, par = dev("offload_optimizer"), dev("offload_param")
    if "nvme" in (opt, par):
        raise ValueError(f"{where}: NVMe offload is not modelled")
    out["offload"] = "optimizer+params" if par == "cpu" else ("optimizer" if opt == "cpu" else "none")
    defaults = ZeroBuffers()
    out["buffers"] = ZeroBuffers(
        reduce_bucket_size=num("reduce_bucket_size", defaults.reduce_bucket_size),
        overlap_comm=zero.get("overlap_comm"),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        prefetch_bucket_size=num("stage3_prefetch_bucket_size", defaults.prefetch_bucket_size),
        max_live_parameters=num("stage3_max_live_parameters", defaults.max_live_parameters),
        param_persistence_threshold=num("stage3_param_persistence_threshold", defaults.param_persistence_threshold),
        sub_group_size=num("sub_group_size", defaults.sub_group_size),
    )
    return out


def _checkpointing(v):
    v = v.strip().lower()
    if v in ("every", "all", "on"):
        return 1
    if v in ("off", "none", "0"):
        return 0
    if v.isdigit() and int(v) > 0:
        return int(v)
    raise argparse.ArgumentTypeError(f"--checkpointing takes every, off or a block interval k >= 1, got {v!r}")


def _model_arg(v):
    key, sep, val = v.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--model-arg takes KEY=VALUE (e.g. depth=4), got {v!r}")
    try:
        val = json.loads(val)
    except json.JSONDecodeError:
        pass  # a bare string: block=adaln, qk_norm=rmsnorm
    return key.strip(), val


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m ditscale.plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="DiT-XL/2", help="DiT preset (e.g. DiT-XL/2, DiT-7B/2)")
    ap.add_argument(
        "--model-arg",
        type=_model_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DiT keyword argument over the preset (depth=4, qk_norm=rmsnorm, ...); repeatable",
    )
    ap.add_argument("--resolution", type=int, default=256, help="image size in pixels")
    ap.add_argument("--micro-batch", type=int, default=32, help="images per GPU per micro-step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (ZeRO shards over them)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--cpu-mem", type=float, help="GiB of host memory per node, to check offloaded bytes")
    ap.add_argument(
        "--headroom", type=float, default=0.1, help="fraction of GPU memory left for CUDA context, NCCL, fragmentation"
    )
    ap.add_argument("--ds-config", help="DeepSpeed JSON: stage, offload, bf16 and bucket sizes (flags override)")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 2)")
    ap.add_argument("--offload", choices=OFFLOADS, help="CPU offload (default none)")
    ap.add_argument("--precision", choices=tuple(DTYPE_BYTES), help="model dtype (default bf16)")
    ap.add_argument("--checkpointing", type=_checkpointing, default=0, help="every | off | k (every k-th block)")
    ap.add_argument("--ema", choices=tuple(EMA_BYTES), default="fp32")
    ap.add_argument(
        "--ema-device",
        choices=("auto", "gpu", "cpu"),
        default="auto",
        help="auto: beside the fp32 master weights (CPU when the optimizer is offloaded)",
    )
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--vae-factor", type=int, default=8, help="pixels per latent cell (1 = pixel space)")
    ap.add_argument("--mfu", type=float, default=0.45, help="fraction of peak FLOP/s sustained")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak dense bf16 TFLOP/s")
    ap.add_argument("--sweep", action="store_true", help="largest micro-batch for every stage/offload/checkpointing")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args(argv)

    fields = {}
    try:
        if args.ds_config:
            fields.update(from_ds_config(args.ds_config))
        for flag in ("zero", "offload", "precision"):
            if getattr(args, flag) is not None:
                fields[flag] = getattr(args, flag)
        fields.setdefault("zero", 2)
        inp = PlanInput(
            preset=args.preset,
            model=dict(args.model_arg),
            resolution=args.resolution,
            micro_batch=args.micro_batch,
            grad_accum=args.grad_accum,
            gpus=args.gpus,
            gpus_per_node=args.gpus_per_node,
            gpu_mem=args.gpu_mem,
            headroom=args.headroom,
            cpu_mem=args.cpu_mem,
            checkpointing=args.checkpointing,
            ema=args.ema,
            ema_device=args.ema_device,
            latent_channels=args.latent_channels,
            vae_factor=args.vae_factor,
            mfu=args.mfu,
            peak_tflops=args.peak_tflops,
            **fields,
        )
    except ValueError as e:
        ap.error(str(e))
    if args.sweep:
        rows = sweep(inp)
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "zero": a.zero,
                            "offload": a.offload,
                            "checkpointing": a.checkpointing,
                            "max_micro_batch": mb,
                            "plan": p.to_json() if p else None,
                        }
                        for a, mb, p in rows
                    ],
                    indent=1,
                    default=str,
                )
            )
        else:
            print(format_sweep(inp, rows))
        return 0
    p = plan(inp)
    print(json.dumps(p.to_json(), indent=1, default=str) if args.json else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
