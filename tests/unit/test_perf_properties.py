"""Performance properties that need no GPU: the training step compiles without graph breaks, and runs
without a host synchronisation (the figures themselves come from bench/gpu_bench.py on a GPU).

Host syncs are caught on CPU by a dispatch mode that records every op which, on a CUDA tensor, makes the
host wait for the device: reading a value (`.item()`, `float(t)`, `if t:`), data-dependent shapes
(`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `repeat_interleave` without `output_size`)
and copies to the host (`.tolist()`, `.cpu()`, `.numpy()`, which bypass the dispatcher on CPU and are
patched). On CPU every tensor lives on the host, so the detector follows which tensors would in a GPU run
too (torch AdamW's step counters, the loader's batches, what is computed from them alone): reading those
is free.
"""

from __future__ import annotations

import contextlib
import copy
import traceback

import pytest
import torch
import torch._dynamo
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from ditscale.diffusion import create_diffusion
from ditscale.models import DiT

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


#################################################################################
#                              Host-sync detector                               #
#################################################################################

_VALUE_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
_DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten.argwhere.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.masked_scatter.default,
}
_HOST_COPIES = ("tolist", "cpu", "numpy")
_DETECTOR_FRAMES = {"_frames", "<listcomp>", "_caller", "_in_ditscale", "_record", "__torch_dispatch__", "method", "to"}


def _frames():
    return [
        f
        for f in reversed(traceback.extract_stack())
        if f.name not in _DETECTOR_FRAMES and "/torch/" not in f.filename.replace("\\", "/")
    ]


def _where(frame) -> str:
    """A frame as package-relative path:line (function): ditscale/…, deepspeed/…, tests/…"""
    path = frame.filename.replace("\\", "/")
    for anchor in ("/site-packages/", "/ditscale/", "/tests/", "/bench/"):
        if anchor in path:
            keep = anchor.strip("/") + "/" if anchor != "/site-packages/" else ""
            path = keep + path.rsplit(anchor, 1)[1]
            break
    return f"{path}:{frame.lineno} ({frame.name})"


def _caller() -> str:
    """The innermost frame outside torch (where the sync was asked for), and, when that is inside a
    library, the innermost frame of ditscale that led there."""
    frames = _frames()
    if not frames:
        return "?"
    ours = next((f for f in frames if "/ditscale/" in f.filename.replace("\\", "/")), None)
    where = _where(frames[0])
    return where if ours is None or ours is frames[0] else f"{where} <- {_where(ours)}"


def _in_ditscale() -> bool:
    frames = _frames()
    return bool(frames) and "/ditscale/" in frames[0].filename.replace("\\", "/")


class HostSyncDetector(TorchDispatchMode):
    """Records (op, caller) for every op that would make the host wait for a CUDA device.

    On CPU every tensor is a host tensor, so the detector tracks which would be host tensors in a GPU run
    too: those named in `host_resident` (optimizer step counters, loader batches via `mark_host`) and
    everything computed from host tensors alone. `Tensor.to(device)` of a host tensor is a device copy
    (a new tensor here as well). Reading a host value is free; reading any other one is a sync.
    """

    def __init__(self, host_resident=()):
        super().__init__()
        self.host = WeakTensorKeyDictionary()
        self.mark_host(host_resident)
        self.syncs: list[tuple[str, str]] = []

    def mark_host(self, tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.host[t] = True

    def is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.host

    def _record(self, what):
        self.syncs.append((what, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        host_only = bool(inputs) and all(self.is_host(t) for t in inputs)
        if not host_only:
            if func in _VALUE_READS or func in _DATA_DEPENDENT:
                self._record(str(func))
            elif func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
                self._record("aten.index.Tensor (boolean mask)")
            elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                self._record("aten.repeat_interleave.Tensor (no output_size)")
            elif func is aten.lift_fresh.default and args[0].numel() > 1 and _in_ditscale():
                # torch.tensor(python data, device=…) in our code: on a GPU, a blocking copy from pageable memory
                self._record("aten.lift_fresh (tensor from Python data, copied to the device)")
        out = func(*args, **kwargs)
        if host_only:
            self.mark_host(pytree.tree_leaves(out))
        return out

    @contextlib.contextmanager
    def patched_methods(self):
        originals = {name: getattr(torch.Tensor, name) for name in (*_HOST_COPIES, "to")}

        def spy(name):
            def method(t, *a, **k):
                if not self.is_host(t):
                    self._record(f"Tensor.{name}")
                return originals[name](t, *a, **k)

            return method

        def to(t, *a, **k):
            out = originals["to"](t, *a, **k)
            moves = any(isinstance(v, (torch.device, str)) for v in (*a, k.get("device")))
            if moves and self.is_host(t):  # the device copy of a host tensor (on CPU: the same tensor)
                out = out.clone() if out is t else out
                self.host.pop(out, None)
            return out

        for name in _HOST_COPIES:
            setattr(torch.Tensor, name, spy(name))
        torch.Tensor.to = to
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)

    def __enter__(self):
        self._patches = self.patched_methods()
        self._patches.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.__exit__(*exc)


def optimizer_host_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """torch optimizers keep the step counter as a CPU tensor unless fused / capturable: a host value."""
    return [
        s["step"] for s in opt.state.values() if isinstance(s.get("step"), torch.Tensor) and not (s["step"].is_cuda)
    ]


#################################################################################
#                   The step: model + diffusion loss + AdamW + EMA              #
#################################################################################


def ema_update(ema_params, params, decay):
    """The foreach EMA (one fused lerp over all tensors); the trainer's own EMA is checked below when the
    engine provides one."""
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def make_step(checkpoint_every=0, block="adaln_zero"):
    torch.manual_seed(0)
    model = DiT(**TINY, checkpoint_every=checkpoint_every, block=block).train()
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
    diffusion = create_diffusion()
    x = torch.randn(4, 4, 8, 8)
    y = torch.randint(0, 10, (4,))

    def loss_fn(x, y):
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return diffusion.training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean()

    def step():
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, params, 0.9999)
        return loss.detach()

    return step, loss_fn, (x, y), opt


#################################################################################
#                                    Tests                                      #
#################################################################################


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_training_loss_compiles_as_one_graph(checkpoint_every):
    """diffusion.training_losses + the model's forward trace as one graph, with checkpointing too."""
    _, loss_fn, inputs, _ = make_step(checkpoint_every)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_fn)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_ema_update_compiles_as_one_graph():
    ema = [torch.randn(3, 2), torch.randn(5)]
    params = [torch.randn(3, 2), torch.randn(5)]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ema_update)(ema, params, 0.999)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_ema_update_is_the_ema():
    ema, params = [torch.zeros(4)], [torch.ones(4)]
    ema_update(ema, params, 0.9)
    torch.testing.assert_close(ema[0], torch.full((4,), 0.1))


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_training_step_has_no_host_sync(checkpoint_every):
    step, _, _, opt = make_step(checkpoint_every)
    step()  # optimizer state exists from here on
    with HostSyncDetector(host_resident=optimizer_host_state(opt)) as detector:
        loss = step()
    assert detector.syncs == []
    assert torch.isfinite(loss)


def test_detector_catches_each_kind_of_sync():
    x = torch.randn(8)
    cases = {
        "item": lambda: x.sum().item(),
        "float": lambda: float(x.sum()),
        "branch": lambda: bool(x.sum() > 0),
        "mask": lambda: x[x > 0],
        "nonzero": lambda: torch.nonzero(x),
        "tolist": lambda: x.tolist(),
        "cpu": lambda: x.cpu(),
        "repeat_interleave": lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3])),
    }
    for name, fn in cases.items():
        with HostSyncDetector() as detector:
            fn()
        assert detector.syncs, f"{name} was not caught"
    with HostSyncDetector() as detector:  # device-side work and async asserts are not syncs
        torch._assert_async((x > -1e9).all())
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]), output_size=6)
        torch.where(x > 0, x, 0.0).sum()
    assert detector.syncs == []


def test_detector_catches_a_logging_sync_in_the_step():
    """The check can fail: a step that logs its loss with .item() is reported, with the line."""
    step, _, _, opt = make_step()
    step()
    with HostSyncDetector(host_resident=optimizer_host_state(opt)) as detector:
        loss = step().item()
    assert [op for op, _ in detector.syncs] == ["aten._local_scalar_dense.default"]
    assert "test_detector_catches_a_logging_sync_in_the_step" in detector.syncs[0][1]
    assert isinstance(loss, float)


def test_optimizer_step_counter_is_the_only_allowed_host_value():
    """Without naming AdamW's CPU step counters as host values, its bias correction reads them."""
    step, _, _, _ = make_step()
    step()
    with HostSyncDetector() as detector:
        step()
    assert detector.syncs and all("_local_scalar_dense" in op for op, _ in detector.syncs)


#################################################################################
#                      Compiled blocks (ditscale.models.fused)                  #
#################################################################################


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_compiled_blocks_share_one_graph_and_match_eager(checkpoint_every):
    """All blocks trace as one full graph (fullgraph: a break would raise), reused by every block, also
    under activation checkpointing; forward and gradients equal eager's. backend="eager" keeps the test
    to dynamo's tracing (inductor's kernels are the GPU bench's business)."""
    from torch._dynamo.utils import counters

    from ditscale.models.fused import compile_blocks

    torch.manual_seed(0)
    eager = DiT(**{**TINY, "depth": 3}, checkpoint_every=checkpoint_every).train()
    for p in eager.parameters():  # adaLN-Zero starts as the identity: make blocks matter
        torch.nn.init.normal_(p, std=0.05)
    compiled = compile_blocks(copy.deepcopy(eager), backend="eager")
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    counters.clear()
    drop = torch.zeros(4, dtype=torch.long)
    outs = []
    for model in (eager, compiled):
        out = model(x, t, y, force_drop_ids=drop)
        out.square().mean().backward()
        outs.append((out, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for g_compiled, g_eager in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g_compiled, g_eager)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["graph_break"] == {}


def test_compile_blocks_rejects_models_without_blocks():
    from ditscale.models.fused import compile_blocks

    with pytest.raises(ValueError, match="no `blocks`"):
        compile_blocks(torch.nn.Linear(2, 2))


#################################################################################
#                    The real trainer's loop (ditscale.train)                   #
#################################################################################


def trainer_loop_syncs(
    workdir: str, ds_config: str = "ds_configs/zero2_bf16.json", nonfinite_check: str = "step"
) -> dict:
    """Run ditscale.train.train (tiny DiT, CPU, one rank on gloo, 6 steps, log every 2) and record the host
    syncs of steps 3-4: data, micro_step (posterior draw, loss, backward, DeepSpeed step), EMA, metrics,
    stop check. Observation only: Metrics.log is wrapped to switch the detector on and off, build_engine
    to learn which values the optimizer keeps on the host."""
    import ditscale.data.prefetch as prefetch
    import ditscale.engine.build as build
    from data_prep.testing import write_synthetic_latents
    from ditscale import train as T
    from ditscale.engine import launch
    from ditscale.engine.metrics import Metrics

    torch.set_num_threads(1)
    root = write_synthetic_latents(f"{workdir}/data", 32, latent_size=8, num_classes=10)
    overrides = [
        f"data.root={root}",
        f"run_dir={workdir}/run",
        f"data.cache={workdir}/cache",
        "data.num_workers=1",
        "model.preset=DiT-S/2",
        "model.depth=2",
        "model.hidden_size=64",
        "model.num_heads=4",
        "train.global_batch=4",
        "train.max_steps=6",
        "train.ckpt_every=1000",
        "log.every=2",
        "log.tensorboard=false",
        "log.progress=off",
        "sample.every=0",
        f"engine.ds_config={ds_config}",
        "engine.device=cpu",
        f"engine.nonfinite_check={nonfinite_check}",
    ]
    cfg, meta, ds = T.prepare(T.parse_args(overrides), 1)
    env = launch.detect()
    device = launch.pick_device(env, "cpu")
    launch.init_distributed(env, device)
    engines, detector, logged = [], None, []
    original_build, original_log, original_endless = build.build_engine, Metrics.log, prefetch.endless

    def endless(loader):  # the loader's batches are host tensors in a GPU run too
        for batch in original_endless(loader):
            if detector is not None:
                detector.mark_host(batch.values())
            yield batch

    def build_engine(*a, **k):
        engines.append(original_build(*a, **k))
        return engines[-1]

    def log(metrics, step, *a, **k):
        nonlocal detector
        if detector is not None:  # end of the observed interval: before this log's own sync
            detector.__exit__(None, None, None)
            logged.append(list(detector.syncs))
            detector = None
        rec = original_log(metrics, step, *a, **k)
        if step == 2:
            inner = getattr(engines[0].optimizer, "optimizer", engines[0].optimizer)
            detector = HostSyncDetector(host_resident=optimizer_host_state(inner))
            detector.__enter__()
        return rec

    build.build_engine, Metrics.log, prefetch.endless = build_engine, log, endless
    try:
        code = T.train(cfg, meta, ds, env, device)
    finally:
        build.build_engine, Metrics.log, prefetch.endless = original_build, original_log, original_endless
        launch.shutdown()
    return {"exit": code, "syncs": logged[0] if logged else None, "steps": 2}


def _run_probe(tmp_path, *args) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "DITSCALE_DS_LOG_LEVEL": "ERROR",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [sys.executable, __file__, "--trainer-loop", str(tmp_path), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# DeepSpeed's bf16 overflow check (`bf16.check_grad_overflow: true`, which makes it skip steps whose gradients
# are not finite: the trainer's max_nonfinite rule needs that) reads the overflow flag and the norm's validity.
DEEPSPEED_OVERFLOW_SITES = ("(has_overflow)", "(is_invalid_grad_norm)")


@pytest.mark.parametrize("zero", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_trainer_loop_has_no_host_sync_but_deepspeeds_overflow_check(tmp_path, zero):
    """Two steps of the real loop (data, posterior draw, loss, backward, DeepSpeed step, EMA, metrics): no
    host sync from ditscale's code; DeepSpeed's own are its bf16 overflow check, at most two per step."""
    result = _run_probe(tmp_path, f"ds_configs/zero{zero}_bf16.json")
    if result["exit"] != 0 or result["syncs"] is None:
        raise RuntimeError(f"the trainer probe did not run its steps: {result}")  # not the expected failure
    theirs = [where for _, where in result["syncs"] if not where.startswith("ditscale/")]
    if (
        not all(any(site in w for site in DEEPSPEED_OVERFLOW_SITES) for w in theirs)
        or len(theirs) > 2 * result["steps"]
    ):
        raise RuntimeError(f"DeepSpeed syncs beyond its overflow check: {theirs}")
    ours = [(op, where) for op, where in result["syncs"] if where.startswith("ditscale/")]
    assert ours == [], ours


def test_trainer_loop_with_async_nonfinite_check_has_no_host_sync(tmp_path):
    """engine.nonfinite_check=async: DeepSpeed's overflow check is off and the trainer reads its device-side
    count of non-finite values a step late without waiting: not one host sync in the steady-state step."""
    result = _run_probe(tmp_path, "ds_configs/zero2_bf16.json", "async")
    if result["exit"] != 0 or result["syncs"] is None:
        raise RuntimeError(f"the trainer probe did not run its steps: {result}")
    assert result["syncs"] == [], result["syncs"]


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:2] == ["--trainer-loop"]:
        print(json.dumps(trainer_loop_syncs(sys.argv[2], *sys.argv[3:])))
