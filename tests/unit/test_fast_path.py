"""The trainer's fast path (issue 22): engine.compile resolution and refusals, the non-finite watch that reads
a device counter without waiting, and the loader → device prefetcher (its order and its resume position).
The compiled trainer itself (inductor on CPU) is tests/slow/test_compiled_trainer.py; host syncs of the
real loop are tests/unit/test_perf_properties.py."""

from __future__ import annotations

import pytest
import torch

from data_prep import make_dataset
from data_prep.testing import write_image_folder
from ditscale.config import ConfigError, load_config
from ditscale.data import build_dataloader, build_dataset
from ditscale.data.prefetch import DevicePrefetcher
from ditscale.engine import build
from ditscale.engine.build import compile_mode, complete_ds_config, read_ds_config
from ditscale.engine.nonfinite import NonfiniteWatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


#################################################################################
#                                  engine.compile                               #
#################################################################################


def resolved(compile: str, ds_config: str, device: torch.device) -> str:
    cfg = load_config(None, ["data.root=x", f"engine.compile={compile}", f"engine.ds_config={ds_config}"])
    ds = complete_ds_config(read_ds_config(ds_config), cfg, 1)
    return compile_mode(cfg, ds, device)


def test_auto_compiles_blocks_on_cuda_under_zero_1_and_2_only():
    assert resolved("auto", "ds_configs/zero2_bf16.json", CUDA) == "blocks"
    assert resolved("auto", "ds_configs/zero1_bf16.json", CUDA) == "blocks"
    assert resolved("auto", "ds_configs/zero3_bf16.json", CUDA) == "off"
    assert resolved("auto", "ds_configs/zero2_bf16.json", CPU) == "off"
    assert resolved("off", "ds_configs/zero2_bf16.json", CUDA) == "off"


def test_compile_blocks_under_zero3_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="engine.compile=blocks.*ZeRO-3"):
        resolved("blocks", "ds_configs/zero3_bf16.json", CUDA)


def test_compile_blocks_on_cpu_without_a_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setattr(build, "_cxx_compiler", lambda: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler.*g\\+\\+"):
        resolved("blocks", "ds_configs/zero2_bf16.json", CPU)


def test_unknown_compile_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="engine.compile"):
        load_config(None, ["data.root=x", "engine.compile=max"])


def test_async_nonfinite_check_turns_deepspeeds_overflow_check_off():
    cfg = load_config(None, ["data.root=x", "engine.nonfinite_check=async"])
    ds = complete_ds_config(read_ds_config("ds_configs/zero2_bf16.json"), cfg, 1)
    assert build.skips_nonfinite_steps(ds) is False
    cfg = load_config(None, ["data.root=x"])
    assert build.skips_nonfinite_steps(complete_ds_config(read_ds_config("ds_configs/zero2_bf16.json"), cfg, 1))


@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_stage0_grad_norm_hook_reports_the_norm_before_clipping_and_clips(max_norm):
    """Stage 0: DeepSpeed computes no norm; the optimizer pre-hook leaves the global norm (before clipping,
    as ZeRO reports it) where the engine reads it, and clips as optim.grad_clip says."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.register_step_pre_hook(build.StepGradNorm(max_norm))
    model(torch.randn(8, 4)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    opt.step()
    assert isinstance(opt._global_grad_norm, torch.Tensor) and torch.allclose(opt._global_grad_norm, norm)
    scale = min(1.0, max_norm / float(norm)) if max_norm else 1.0
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g * scale)


#################################################################################
#                                The non-finite watch                           #
#################################################################################


def test_poll_reports_each_steps_count_one_step_late_and_drain_resets():
    counter = torch.zeros((), dtype=torch.int64)
    watch = NonfiniteWatch(counter, world_size=1, every_step=True)
    assert watch.poll() == 0  # step 1: nothing read yet
    counter += 2  # step 2 has two non-finite samples
    assert watch.poll() == 0  # step 2 reads step 1's count
    assert watch.poll() == 2  # step 3 reads step 2's
    assert watch.drain() == 2 and int(counter) == 0
    assert watch.poll() == 0 and watch.poll() == 0


def test_check_blocks_before_saves_and_polls_otherwise():
    counter = torch.zeros((), dtype=torch.int64)
    polling = NonfiniteWatch(counter, world_size=1, every_step=True)
    counter += 1
    assert polling.check(saving=False, logging=True) == 0  # async: a log does not wait
    assert polling.check(saving=True, logging=False) == 1  # a save always does
    counter += 1
    at_logs = NonfiniteWatch(counter, world_size=1)
    assert at_logs.check(saving=False, logging=False) == 0  # fp32 "step" mode: only at logs and saves
    assert at_logs.check(saving=False, logging=True) == 1


#################################################################################
#                                 The prefetcher                                #
#################################################################################


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("prefetch")
    images = write_image_folder(str(base / "images"), classes=2, per_class=5, min_side=8, max_side=12)
    return make_dataset(images, str(base / "mds"), resolution=8, decode_workers=0)


def loader(root, tmp_path, name, state=None):
    ds = build_dataset(root, batch_size=4, seed=1, local=str(tmp_path / name))
    out = build_dataloader(ds, batch_size=4, num_workers=0)
    if state is not None:
        out.load_state_dict(state)
    return out


def indices(batches, n):
    return [next(batches)["index"].tolist() for _ in range(n)]


def test_prefetcher_keeps_the_order_and_resumes_at_the_first_batch_not_handed_out(root, tmp_path):
    """10 samples, batches of 4: an epoch is 2 batches, so 5 batches cross two epoch ends; a checkpoint
    taken with a batch held ahead (on either side of an epoch end) resumes at the next batch handed out."""
    plain = DevicePrefetcher(loader(root, tmp_path, "a"), CPU, ahead=False)
    expected = indices(plain, 7)
    for taken in (1, 2, 3):
        ahead = DevicePrefetcher(loader(root, tmp_path, f"b{taken}"), CPU, ahead=True)
        assert indices(ahead, taken) == expected[:taken]
        assert ahead.held is not None  # the next batch is already taken
        resumed = DevicePrefetcher(loader(root, tmp_path, f"c{taken}", ahead.state_dict()), CPU, ahead=True)
        assert indices(resumed, 7 - taken) == expected[taken:]


def test_prefetcher_moves_all_but_host_keys():
    batches = [{"mean": torch.ones(2, 1), "label": torch.arange(2), "index": torch.arange(2)}] * 3
    moved = next(DevicePrefetcher(batches, "meta", ahead=True))
    assert moved["mean"].device.type == "meta" and moved["label"].device.type == "meta"
    assert moved["index"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetcher_copies_on_a_side_stream():
    batches = [{"mean": torch.full((64, 64), float(i)).pin_memory(), "index": torch.tensor([i])} for i in range(4)]
    prefetcher = DevicePrefetcher(batches, CUDA)
    assert prefetcher.stream is not None and prefetcher.stream != torch.cuda.current_stream()
    for i in range(3):
        batch = next(prefetcher)
        assert batch["mean"].is_cuda and float(batch["mean"][0, 0]) == i
