"""fp32 EMA of the weights, kept where the fp32 master weights live: each rank only for its own shards.

Under DeepSpeed bf16 the true weights are the optimizer's fp32 master copy, flat and partitioned over the
ranks (ZeRO-1/2: contiguous slices of a flat buffer per parameter group; ZeRO-3: one slice of every
parameter). Under stage 0 (plain data parallel, fp32) the module's own parameters are the master weights,
whole on every rank: each rank follows one contiguous 1/world of their concatenation. A `Shard` is this rank's piece [start, start + numel) of one flattened parameter, as a view
into that buffer; the EMA holds one fp32 tensor per shard and updates all of them with one foreach
lerp after each optimizer step: no gather, no copy, no host sync, 1/world of the memory.

On disk a rank's EMA is a safetensors file of 1-D tensors named "<param>@<start>", with the full
shapes in its metadata. Any set of such files, from any world size or ZeRO stage, can be re-cut for
another layout (`load_resharded`) or assembled into full tensors (`assemble`) one parameter at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

EMA_FORMAT = "ditscale-ema-shards-v1"


@dataclass
class Shard:
    name: str  # parameter name (official DiT layout)
    start: int  # offset in the flattened parameter
    shape: tuple[int, ...]  # the full parameter's shape
    master: torch.Tensor  # 1-D fp32 view into the optimizer's master weights, numel elements

    @property
    def numel(self) -> int:
        return self.master.numel()


#################################################################################
#                       Where this rank's master weights are                    #
#################################################################################


def _followed(engine):
    """(name, parameter) pairs the EMA follows: trainable, and exported (a training module may keep
    parameters that never leave it, e.g. REPA's projector: its `exports_parameter(name)` says so)."""
    exported = getattr(engine.module, "exports_parameter", lambda name: True)
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad and exported(n)]


def _zero3_partitions(engine, params):
    """(name, param, group, offset in the group's flat fp32 buffer, partition numel, start in the flattened
    parameter, real elements) of this rank's slice of each ZeRO-3 parameter in `params` ((name, param)
    pairs). A parameter is cut into world equal slices, so the last ranks' slices run past its end:
    partition - real elements of padding."""
    import torch.distributed as dist

    opt = engine.optimizer
    for name, p in params:
        group, offset, part = opt.grad_position[opt.get_param_id(p)]
        start = dist.get_rank(group=p.ds_process_group) * p.partition_numel()
        yield name, p, group, offset, part, start, max(0, min(part, p.ds_numel - start))


def _zero3_shards(engine) -> list[Shard]:
    flats = engine.optimizer.fp32_partitioned_groups_flat
    return [
        Shard(name, start, tuple(p.ds_shape), flats[group].narrow(0, offset, real))
        for name, p, group, offset, part, start, real in _zero3_partitions(engine, _followed(engine))
        if real
    ]


@torch.no_grad()
def zero_partition_padding(engine) -> int:
    """Zero the padding of ZeRO-3's partitions (DeepSpeed leaves it uninitialised: it may hold NaN and
    differs between identical runs) in the bf16 partitions, the fp32 master copy and the optimizer state,
    so checkpoints compare byte for byte and a NaN scan means something. Returns the padded elements.
    A no-op for ZeRO-1/2 (their flat buffers are zero-initialised)."""
    if engine.zero_optimization_stage() != 3:
        return 0
    opt = engine.optimizer
    padded = 0
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    for name, p, group, offset, part, start, real in _zero3_partitions(engine, trainable):
        if real == part:
            continue
        padded += part - real
        p.ds_tensor.narrow(0, real, part - real).zero_()
        flat = opt.fp32_partitioned_groups_flat[group]
        targets = [flat] + [
            s for s in opt.optimizer.state.get(flat, {}).values() if torch.is_tensor(s) and s.shape == flat.shape
        ]
        for t in targets:
            if t.numel():  # NVMe-swapped groups hold no memory here
                t.narrow(0, offset + real, part - real).zero_()
    return padded


def _hp_mapping_shards(engine) -> list[Shard]:
    shards = []
    for name, p in _followed(engine):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            continue  # no piece of p on this rank
        shards.append(Shard(name, mapping.lp_fragment_address.start, tuple(p.shape), mapping.get_hp_fragment()))
    return shards


def replica_shards(params: list[tuple[str, torch.nn.Parameter]], rank: int, world: int) -> list[Shard]:
    """Stage 0: every rank holds all fp32 parameters; rank `rank` follows elements [lo, hi) of the
    concatenation of `params` ((name, parameter) pairs), 1/world of the whole, as views into them."""
    wrong = [(n, p.dtype) for n, p in params if p.dtype != torch.float32]
    if wrong:
        raise RuntimeError(
            f"stage 0 keeps no fp32 master copy: the EMA needs fp32 parameters, {wrong[0][0]} is "
            f"{wrong[0][1]} (set bf16.enabled false, or use ZeRO-1/2 for bf16)"
        )
    total = sum(p.numel() for _, p in params)
    per_rank = -(-total // world)
    lo, hi = rank * per_rank, min(total, (rank + 1) * per_rank)
    shards, offset = [], 0
    for name, p in params:
        start, end = max(lo, offset), min(hi, offset + p.numel())
        if start < end:
            flat = p.detach().view(-1)  # (numel,): a view, never a copy
            shards.append(Shard(name, start - offset, tuple(p.shape), flat.narrow(0, start - offset, end - start)))
        offset += p.numel()
    return shards


def master_shards(engine) -> list[Shard]:
    """This rank's pieces of the fp32 master weights of a DeepSpeed engine (ZeRO-1/2/3 with bf16 or fp32;
    stage 0 with fp32). Views: call again after `load_checkpoint`, which may rebuild the buffers."""
    if engine.zero_optimization_stage() == 3:
        return _zero3_shards(engine)
    if engine.zero_optimization_stage() == 0:
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return replica_shards(_followed(engine), rank, world)
    if not any(hasattr(p, "_hp_mapping") for p in engine.module.parameters()):
        raise RuntimeError(
            f"{type(engine.optimizer).__name__} keeps no fp32 master mapping: the EMA needs "
            f"bf16 with a ZeRO stage (ds_configs/zero*_bf16.json)"
        )
    return _hp_mapping_shards(engine)


def module_shards(module: torch.nn.Module) -> list[Shard]:
    """Whole parameters of a plain module as shards (fp32 copies; for single-process use and tests)."""
    return [Shard(n, 0, tuple(p.shape), p.detach().float().reshape(-1)) for n, p in module.named_parameters()]


#################################################################################
#                                     The EMA                                   #
#################################################################################


class ShardedEMA:
    """ema ← decay·ema + (1 − decay)·master over this rank's shards, in fp32."""

    def __init__(self, shards: list[Shard], decay: float):
        self.decay = decay
        self.shards = shards
        self.ema = [s.master.detach().clone().float() for s in shards]

    @torch.no_grad()
    def update(self) -> None:
        if self.ema:
            torch._foreach_lerp_(self.ema, [s.master for s in self.shards], 1.0 - self.decay)

    def rebind(self, shards: list[Shard]) -> None:
        """Point at new master views with the same layout (after the engine loaded a checkpoint)."""
        if [(s.name, s.start, s.numel) for s in shards] != [(s.name, s.start, s.numel) for s in self.shards]:
            raise RuntimeError("the master weights' shard layout changed; load the EMA with load_resharded")
        self.shards = shards

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{s.name}@{s.start}": e for s, e in zip(self.shards, self.ema)}

    def save(self, path: str | Path) -> None:
        from ditscale.files import save_safetensors

        shapes = {s.name: list(s.shape) for s in self.shards}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_safetensors(
            tensors, path, metadata={"format": EMA_FORMAT, "decay": repr(self.decay), "shapes": json.dumps(shapes)}
        )

    def load(self, path: str | Path) -> None:
        """Load a file saved by a rank with the same layout (same world size and ZeRO stage)."""
        from safetensors.torch import load_file

        try:
            saved = load_file(str(path))
        except Exception as e:
            raise RuntimeError(f"cannot read EMA file {path}: {e}") from None
        mine = self.state_dict()
        if set(saved) != set(mine):
            missing, extra = sorted(set(mine) - set(saved))[:3], sorted(set(saved) - set(mine))[:3]
            raise RuntimeError(f"EMA file {path} has another shard layout (missing {missing}, unexpected {extra})")
        for key, ema in mine.items():
            if saved[key].shape != ema.shape:
                raise RuntimeError(f"EMA file {path}: {key} has {tuple(saved[key].shape)}, expected {tuple(ema.shape)}")
            ema.copy_(saved[key])

    def load_resharded(self, files: list[str | Path]) -> None:
        """Fill this rank's shards from the EMA files of any other layout (other world size / stage)."""
        index = ShardIndex(files)
        for shard, ema in zip(self.shards, self.ema):
            ema.copy_(index.read(shard.name, shard.start, shard.numel))


#################################################################################
#                         Reading sets of shard files                           #
#################################################################################

_KEY = re.compile(r"^(?P<name>.+)@(?P<start>\d+)$")


class ShardIndex:
    """The pieces of every parameter across a set of EMA shard files, read lazily (one slice at a time)."""

    def __init__(self, files: list[str | Path]):
        from safetensors import safe_open

        if not files:
            raise RuntimeError("no EMA shard files to read")
        self.files = [str(f) for f in files]
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.pieces: dict[str, list[tuple[int, int, str, str]]] = {}  # name -> [(start, numel, file, key)]
        for f in self.files:
            try:
                with safe_open(f, framework="pt") as h:
                    meta = h.metadata() or {}
                    if meta.get("format") != EMA_FORMAT:
                        raise RuntimeError(f"format {meta.get('format')!r}, expected {EMA_FORMAT!r}")
                    self.shapes.update({k: tuple(v) for k, v in json.loads(meta["shapes"]).items()})
                    for key in h.keys():
                        m = _KEY.match(key)
                        if m is None:
                            raise RuntimeError(f"unexpected tensor name {key!r}")
                        numel = h.get_slice(key).get_shape()[0]
                        self.pieces.setdefault(m["name"], []).append((int(m["start"]), numel, f, key))
            except RuntimeError as e:
                raise RuntimeError(f"EMA file {f}: {e}") from None
            except Exception as e:
                raise RuntimeError(f"cannot read EMA file {f}: {e}") from None
        for name in self.pieces:
            self.pieces[name].sort()

    def names(self) -> list[str]:
        return list(self.pieces)

    def read(self, name: str, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of the flattened parameter `name`, fp32."""
        from safetensors import safe_open

        if name not in self.pieces:
            raise RuntimeError(f"parameter {name} is in none of the EMA files {self.files[:2]}...")
        out = torch.empty(numel, dtype=torch.float32)
        filled = 0
        for p_start, p_numel, f, key in self.pieces[name]:
            lo, hi = max(start, p_start), min(start + numel, p_start + p_numel)
            if lo >= hi:
                continue
            with safe_open(f, framework="pt") as h:
                out[lo - start : hi - start] = h.get_slice(key)[lo - p_start : hi - p_start]
            filled += hi - lo
        if filled != numel:
            raise RuntimeError(
                f"EMA files cover {filled} of elements [{start}, {start + numel}) of {name}: "
                f"files missing or of different runs"
            )
        return out

    def full(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        numel = 1
        for d in shape:
            numel *= d
        return self.read(name, 0, numel).view(shape)


def gather_full(ema: ShardedEMA, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
    """The full fp32 EMA on rank 0 (None elsewhere), or on every rank with all_ranks: every rank's shards
    gathered to CPU memory. A collective, for occasional use (sample grids, evaluation); it holds the
    whole model on each receiving rank."""
    import torch.distributed as dist

    mine = [(s.name, s.start, s.shape, e.detach().cpu()) for s, e in zip(ema.shards, ema.ema)]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        everyone = [mine]
    elif all_ranks:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if dist.get_rank() != 0:
            return None
    full: dict[str, torch.Tensor] = {}
    for pieces in everyone:
        for name, start, shape, values in pieces:
            if name not in full:
                full[name] = torch.zeros(shape, dtype=torch.float32)
            full[name].view(-1)[start : start + values.numel()] = values
    return full


def assemble(files: list[str | Path]) -> dict[str, torch.Tensor]:
    """Full fp32 tensors from a set of EMA shard files (holds the whole model: see export for shards)."""
    index = ShardIndex(files)
    return {name: index.full(name) for name in index.names()}
