"""What each rank holds: its parameters, gradients, optimizer state and EMA, counted from the tensors
themselves, and its process memory (RSS now and at its peak).

Tensors are counted by storage, each storage once, so views into DeepSpeed's flat buffers count as the
buffer (with its padding) and a released ZeRO-3 parameter (an empty placeholder) counts nothing:

    params     ZeRO-3: this rank's partitions (`ds_tensor`) + parameters gathered right now (the
               persistent small ones); ZeRO-1/2: the whole module
    grads      ZeRO-3: the partitioned gradient buffer; any `.grad` of the module or of the fp32 master
               partitions (ZeRO-1/2 free theirs after the step)
    optimizer  the fp32 master partitions the optimizer steps + its state (Adam moments, step counts)
    ema        this rank's EMA shards (ema.py)

The trainer measures after the first step (Adam's moments exist from then on) and at the end of the run
(the peak RSS then covers every step and save), writes every rank's record into metrics.jsonl (event
"memory") and logs it: what ZeRO-3 saves, measured.
"""

from __future__ import annotations

import resource

import torch


def _held(tensors) -> dict[str, int]:
    """Elements and bytes of the distinct storages behind `tensors` (None and empty ones skipped)."""
    seen: dict[int, tuple[int, int]] = {}
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = (storage.nbytes() // t.element_size(), storage.nbytes())
    return {"numel": sum(n for n, _ in seen.values()), "bytes": sum(b for _, b in seen.values())}


def _optimizer_tensors(optimizer):
    """The torch optimizer inside DeepSpeed's wrapper: the tensors it steps (the fp32 master partitions;
    ZeRO-3 empties its param_groups, so also the keys of its state) and every tensor of its state."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for group in inner.param_groups for p in group["params"]] + list(inner.state)
    state = [v for per_param in inner.state.values() for v in per_param.values() if torch.is_tensor(v)]
    return params, state


def process_memory() -> dict[str, float]:
    """Resident set size of this process now and at its peak, GiB (Linux /proc; peak from getrusage
    elsewhere)."""
    out = {"rss_gib": None, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out["rss_gib"] = int(fields["VmRSS"].split()[0]) / 2**20
        out["peak_rss_gib"] = int(fields["VmHWM"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        pass
    return out


def rank_state(engine, ema, rss_before_model_gib: float | None = None) -> dict:
    """This rank's record: elements / bytes of each kind of state, the model's total parameter count,
    process memory (and the accelerator's, on CUDA); `rss_before_model_gib`, the RSS measured before the
    model was built, is kept as the baseline of the others."""
    module, opt = engine.module, engine.optimizer
    zero3 = engine.zero_optimization_stage() == 3
    params = list(module.parameters())
    master, opt_state = _optimizer_tensors(opt)
    own = {p.untyped_storage().data_ptr() for p in params}
    master = [m for m in master if m.untyped_storage().data_ptr() not in own]  # stage 0 steps the module's own
    held_params = [p.ds_tensor for p in params] + [p.data for p in params] if zero3 else [p.data for p in params]
    grads = [p.grad for p in params] + [m.grad for m in master]
    if zero3:
        grads.append(getattr(opt, "grad_partitions_flat_buffer", None))
    rec = {
        "rank": torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
        "model_numel": sum(p.ds_numel if zero3 else p.numel() for p in params),
        "params": _held(held_params),
        "grads": _held(grads),
        "optimizer": _held(master + opt_state),
        "ema": _held(ema.ema),
        **process_memory(),
        "rss_before_model_gib": rss_before_model_gib,
    }
    device = next(iter(params)).device if params else torch.device("cpu")
    if device.type == "cuda":
        rec["device_gib"] = torch.cuda.memory_allocated(device) / 2**30
        rec["device_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return rec


def gather_states(engine, ema, rss_before_model_gib: float | None = None) -> list[dict]:
    """Every rank's `rank_state`, on every rank (a collective: call it on all ranks)."""
    import torch.distributed as dist

    mine = rank_state(engine, ema, rss_before_model_gib)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def describe(rec: dict) -> str:
    """One rank's record as a log line: GiB of each kind of state and its share of the full fp32 model
    (params, grads: of its elements; optimizer, EMA: of its fp32 bytes, so Adam's master + 2 moments
    held whole would read 300%)."""
    full_fp32 = 4 * rec["model_numel"]
    parts = []
    for kind in ("params", "grads", "optimizer", "ema"):
        held = rec[kind]
        share = held["numel"] / rec["model_numel"] if kind in ("params", "grads") else held["bytes"] / full_fp32
        parts.append(
            f"{kind} {_size(held['bytes'])} ({share:.0%})"
            if held["bytes"] or kind != "grads"
            else "grads freed after the step"
        )
    rss = "?" if rec["rss_gib"] is None else f"{rec['rss_gib']:.2f}"
    before = rec.get("rss_before_model_gib")
    line = (
        f"rank {rec['rank']}: "
        + ", ".join(parts)
        + f"; RSS {rss} GiB (peak {rec['peak_rss_gib']:.2f}"
        + (f", {before:.2f} before the model)" if before is not None else ")")
    )
    if "device_gib" in rec:
        line += f"; device {rec['device_gib']:.2f} GiB (peak {rec['device_peak_gib']:.2f})"
    return line
