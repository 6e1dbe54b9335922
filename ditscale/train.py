"""Train a DiT with DeepSpeed ZeRO + bf16 on data_prep's shards, with an fp32 EMA and exact resume.

    python -m ditscale.train --config configs/dit_xl_2_256.yaml data.root=/data/in1k_256 run_dir=runs/xl
    deepspeed --num_gpus 8 --module ditscale.train --config ... ;  torchrun ... ;  srun python -m ditscale.train ...
    python -m ditscale.train --config ... --check [--deep]   # validate config, data, run dir; exit 0 / 2

The story: parse → validate → build → resume → loop (step, EMA, log, save) → exit code:
0 finished (a complete checkpoint of max_steps exists), 2 bad configuration or input (also: no space
for a checkpoint), 3 non-finite steps (too many in a row, non-finite losses that reached the weights, or
max_steps reached inside a run of skipped steps), 4 a checkpoint write failed (I/O error), 5 hung (no step
completed for train.hang_timeout_min), 85 preempted (SIGTERM / SIGUSR1) after a complete checkpoint, or
during start-up with nothing new to save. A stop signal is handled from the first line of main() to the exit:
after the final checkpoint it changes nothing (exit 0). `run_dir` holds config.yaml, metrics.jsonl, tb/, ckpt/,
samples/.

Exactness: a step is a pure function of the weights, the batch and (seed, step, rank, micro-batch): the
latent draw and the objective's draws (times, noise, label dropout; ditscale.objectives) all come from a
generator seeded with those, on the device. With the loader's position, the optimizer state and the EMA in every checkpoint, a resumed run
repeats the uninterrupted one bit for bit (same world size and ZeRO stage, deterministic kernels).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditscale import runtime
from ditscale.config import (
    ConfigError,
    ExperimentConfig,
    config_diff,
    config_hash,
    load_config,
    resolve_with_dataset,
    save_config,
    to_dict,
)
from ditscale.engine.signals import EXIT_PREEMPTED, catch_stop_signals, pause_for_test, signal_name, stop_received

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_SAVE_FAILED = 0, 2, 3, 4


def say(*parts) -> None:
    if runtime.rank_env().rank == 0:
        print("[ditscale.train]", *parts, flush=True)


#################################################################################
#                             Configuration and checks                          #
#################################################################################


def last_line(error: Exception) -> str:
    """The message of an error, without the worker traceback a DataLoader re-raise puts in front of it."""
    text = str(error).strip()
    return text.splitlines()[-1].split(": ", 1)[-1] if "Original Traceback" in text else text


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ditscale.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="experiment YAML (configs/*.yaml); defaults apply without one")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    ap.add_argument(
        "--check",
        action="store_true",
        help="validate the config, the data (index, shard files and sizes), the run dir and the "
        "DeepSpeed JSON, then exit 0 or 2",
    )
    ap.add_argument(
        "--deep",
        action="store_true",
        help="with --check: also every hash of every shard (reads the whole dataset once; time printed)",
    )
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    return ap.parse_args(argv)


def prepare(args, world_size: int) -> tuple[ExperimentConfig, dict, dict]:
    """(resolved config, dataset.json, DeepSpeed JSON) or ConfigError: everything checked before any work."""
    from ditscale.data import DataError, read_metadata
    from ditscale.data.check import check_dataset, check_fills_batch
    from ditscale.engine.build import complete_ds_config, read_ds_config

    cfg = load_config(args.config, args.overrides)
    ds = read_ds_config(cfg.engine.ds_config)
    complete_ds_config(ds, cfg, world_size)
    try:
        meta = read_metadata(cfg.data.root)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.root: {e}") from None
    cfg = resolve_with_dataset(cfg, meta)
    if cfg.repa.enabled:
        load_repa(cfg, meta, torch.device("cpu"))  # the encoder file fits its architecture, before any GPU work
    micro, _ = cfg.train.batch_split(world_size)
    try:
        found = check_dataset(cfg.data.root, meta, deep=args.check and args.deep)
        check_fills_batch(
            meta, global_batch=cfg.train.global_batch, ranks=world_size, micro_batch=micro, workers=cfg.data.num_workers
        )
    except DataError as e:
        raise ConfigError(f"data.root: {e}") from None
    if found.problems:
        raise ConfigError(
            f"data.root: {len(found.problems)} problem(s) with the shards of {cfg.data.root}:\n  "
            + "\n  ".join(found.problems[:20])
            + ("\n  ..." if len(found.problems) > 20 else "")
        )
    if args.check and args.deep:
        say(f"data: {found.shards} shards, {found.bytes / 1e9:.2f} GB hashed in {found.seconds:.1f} s")
    vae = cfg.sample.vae or meta["vae"]
    if cfg.sample.every and vae != "none" and not Path(vae).exists():
        raise ConfigError(f"sample.vae: {vae} does not exist (needed for sample grids; sample.every=0 turns them off)")
    if cfg.eval.every:
        from ditscale.engine.evaluation import check_inputs

        check_inputs(cfg.eval)
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ConfigError(f"run_dir: {run_dir} is not writable ({e.strerror})") from None
    return cfg, meta, ds


def check_resume(cfg: ExperimentConfig):
    """(checkpoint dir, its meta) to resume from, or (None, None); ConfigError when it cannot be used."""
    from ditscale.engine.checkpoint import CKPT_DIR, newest_complete, read_meta, resolve_resume, verify_across_ranks

    path = resolve_resume(
        cfg.run_dir, cfg.train.resume, log=say, verify=lambda p, m: verify_across_ranks(p, m, log=say)
    )
    if path is None:
        existing = newest_complete(Path(cfg.run_dir) / CKPT_DIR, log=lambda *_: None)
        if cfg.train.resume == "none" and existing is not None:
            raise ConfigError(
                f"train.resume=none but run_dir {cfg.run_dir} holds checkpoints ({existing.name}); "
                f"use train.resume=auto to continue it, or another run_dir"
            )
        return None, None
    meta = read_meta(path)
    diff = config_diff(meta["config"], cfg, ignore=cfg.train.resume_ignore)
    if diff:
        raise ConfigError(
            f"the config does not match checkpoint {path} (saved with config hash "
            f"{meta.get('config_hash')}):\n  "
            + "\n  ".join(diff)
            + "\nresume in another run_dir, or list the keys in train.resume_ignore"
        )
    return path, meta


#################################################################################
#                                    One step                                   #
#################################################################################


def step_generator(device: torch.device, seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch's randomness, a pure function of its coordinates."""
    words = np.random.SeedSequence([seed, step, rank, micro]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed((int(words[0]) << 31) ^ int(words[1]))
    return g


def micro_step(
    engine, objective, batch: dict, g: torch.Generator, scale_factor, drop_prob: float, device: torch.device, extra=None
) -> dict[str, torch.Tensor]:
    """Forward + backward of one micro-batch; returns the objective's per-sample terms (N,) in fp32.
    Draw order from g: the latent, then the objective's own draws (see its module). `extra` (e.g. REPA's
    ditscale.repa.term.Repa) gives per batch the model's extra kwargs and the terms added to the loss."""
    from ditscale.data import sample_latents

    mean = batch["mean"].to(device, non_blocking=True)
    logvar = batch["logvar"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    x = sample_latents(mean, logvar, scale_factor, generator=g)  # (N, C, h, w) fp32
    model_kwargs, aux = extra.for_batch(batch) if extra is not None else (None, ())
    terms = objective.loss(engine, x, y, g, drop_prob=drop_prob, model_kwargs=model_kwargs, aux=aux)
    engine.backward(terms["loss"].mean())
    engine.step()
    return terms


def report_memory(engine, ema, metrics, step: int, rss_before_model_gib: float | None) -> None:
    """What every rank holds (params, grads, optimizer state, EMA, RSS now and peak), after the run's first
    step and at its end: a "memory" event in metrics.jsonl, a log line for rank 0 and the rank of the
    highest peak RSS."""
    from ditscale.engine.memory import describe, gather_states

    states = gather_states(engine, ema, rss_before_model_gib)
    metrics.write_event(event="memory", step=step, ranks=states)
    top = max(states, key=lambda r: r["peak_rss_gib"])
    for rec in [states[0]] + ([top] if top is not states[0] else []):
        say(f"memory at step {step}: {describe(rec)}")


#################################################################################
#                                   Sample grids                                #
#################################################################################


def sample_grid(cfg: ExperimentConfig, meta: dict, ema, step: int, device, tb, should_stop=None) -> None:
    """An EMA sample grid in run_dir/samples (rank 0 samples; every rank contributes its EMA shards).
    should_stop (the trainer's: a stop signal arrived) is asked before every sampler step; True leaves the
    grid unwritten (the other ranks wait in a barrier meanwhile), and the trainer saves and stops at the step
    boundary that follows."""
    from ditscale.engine.evaluation import ema_model
    from ditscale.objectives import build_objective
    from ditscale.sampling.core import SamplingInterrupted
    from ditscale.sampling.grid import GridConfig, ema_grid

    model = ema_model(cfg, ema)
    if model is None:
        return
    pause_for_test(f"grid:{step}")
    grid = GridConfig.from_dataset(
        meta,
        classes=cfg.sample.classes,
        num_per_class=cfg.sample.num_per_class,
        sampler=cfg.sample.sampler_for(cfg.objective.kind),
        steps=cfg.sample.steps,
        cfg_scale=cfg.sample.cfg_scale,
        seed=cfg.sample.seed,
        guide_channels=3 if model.in_channels == 4 else "all",  # official quirk
        vae=cfg.sample.vae or meta["vae"],
        objective=build_objective(cfg).record(),
        cfg_interval=tuple(cfg.sample.cfg_interval) if cfg.sample.cfg_interval else None,
    )
    try:
        path = ema_grid(
            model.to(device),
            grid,
            step,
            Path(cfg.run_dir) / "samples",
            tb_writer=tb,
            should_stop=should_stop,
        )
    except SamplingInterrupted as e:
        say(f"sample grid of step {step} left unfinished: {signal_name(stop_received())}, {e}")
        return
    say(f"sample grid {path}")


#################################################################################
#                                    The run                                    #
#################################################################################


class Hooks:
    """Observers of a run (`train(..., hooks=)`: benchmarks, tests), called on every rank. A hook may raise
    to end the run: the trainer closes its files and saves nothing."""

    def engine_built(self, engine) -> None:
        """The DeepSpeed engine, before the first step."""

    def step_end(self, step: int, record: dict | None) -> None:
        """After step `step` (update, EMA, log, save, sample grid); record: the log record when it logged
        (rank 0), else None."""


@dataclass
class Start:
    """Where a run begins: the engine and EMA, restored from a checkpoint or fresh."""

    engine: object
    ema: object
    step: int = 0
    images_seen: int = 0
    client: dict | None = None  # this rank's saved state (loader position)
    resumed_from: Path | None = None


def start(cfg: ExperimentConfig, ds: dict, env, device: torch.device) -> Start:
    """Build the engine (same initial weights on every rank) and restore the newest / given checkpoint,
    through DeepSpeed's universal form when the world size changed."""
    from ditscale.engine import checkpoint
    from ditscale.engine.build import build_engine, complete_ds_config, zero_stage
    from ditscale.engine.ema import ShardedEMA, master_shards

    resume_dir, resume_meta = check_resume(cfg)
    stage = zero_stage(ds)
    universal = resume_meta is not None and checkpoint.needs_universal(resume_meta, env.world_size, stage)
    if resume_meta is not None and (problem := checkpoint.stage_change_problem(resume_meta, stage)):
        raise ConfigError(f"engine.ds_config: {resume_dir} {problem} ({cfg.engine.ds_config})")
    relaid = resume_meta is not None and (resume_meta["world_size"], resume_meta["zero_stage"]) != (
        env.world_size,
        stage,
    )
    if resume_dir is not None and resume_dir.parent.resolve() == (Path(cfg.run_dir) / checkpoint.CKPT_DIR).resolve():
        if env.rank == 0:
            checkpoint.abandon_newer(resume_dir.parent, resume_meta["step"], log=say)
        torch.distributed.barrier()
    universal_dir = checkpoint.make_universal(resume_dir, cfg.run_dir, log=say) if universal else None
    checkpoint.seed_everything(cfg.train.seed)
    engine = build_engine(cfg, complete_ds_config(ds, cfg, env.world_size, universal=universal), device)
    if resume_dir is None:
        checkpoint.seed_everything(cfg.train.seed + 1_000_003 * (env.rank + 1))
        return Start(engine, ShardedEMA(master_shards(engine), cfg.train.ema_decay))
    client = checkpoint.load(engine, resume_dir, resume_meta, universal_dir=universal_dir, log=say)
    ema = ShardedEMA(master_shards(engine), cfg.train.ema_decay)
    checkpoint.load_ema(ema, resume_dir, resume_meta, same_layout=not relaid)
    how = "universal" if universal else "stage 0, loaded as is"
    say(
        f"resumed from {resume_dir} at step {resume_meta['step']}"
        + (
            f" ({how}: {resume_meta['world_size']} -> {env.world_size} ranks, ZeRO-{resume_meta['zero_stage']} -> "
            f"ZeRO-{stage})"
            if relaid
            else ""
        )
    )
    return Start(engine, ema, resume_meta["step"], resume_meta["images_seen"], client, resume_dir)


def load_repa(cfg: ExperimentConfig, meta: dict, device: torch.device):
    """REPA's frozen encoder and settings (ditscale.repa.term.Repa, the `extra` of micro_step) when
    repa.enabled, else None; a weights file that is missing or does not fit the encoder is a ConfigError
    naming it."""
    if not cfg.repa.enabled:
        return None
    from ditscale.repa.encoder import EncoderError
    from ditscale.repa.term import build_repa

    try:
        return build_repa(cfg.repa, meta["image"]["size"], device)
    except EncoderError as e:
        raise ConfigError(str(e)) from None


def make_loader(cfg: ExperimentConfig, micro_batch: int, device: torch.device, client: dict | None):
    """The rank's loader over the shards, at the saved position when resuming."""
    from ditscale.data import build_dataloader, build_dataset
    from ditscale.data.shm import release_stale_loader_shm

    rank = runtime.rank_env().rank
    # a killed job's segments on this node (else "Reused local directory"), told by the rank that frees them
    release_stale_loader_shm(log=lambda msg: print(f"[ditscale.train] rank {rank}: {msg}", flush=True))
    seed = cfg.train.seed if cfg.data.shuffle_seed is None else cfg.data.shuffle_seed
    limit = cfg.data.cache_limit_bytes()
    dataset = build_dataset(
        cfg.data.root,
        batch_size=micro_batch,
        seed=seed,
        shuffle=cfg.data.shuffle,
        local=cfg.data.cache,
        hflip=cfg.data.hflip,
        with_image=cfg.repa.enabled,
        remote_wait_s=cfg.data.remote_wait_s,
        **({"cache_limit": limit} if limit else {}),
    )
    workers = cfg.data.num_workers
    loader = build_dataloader(
        dataset,
        batch_size=micro_batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=cfg.data.prefetch_factor if workers else None,
    )
    if client is not None and client.get("loader") is not None:
        loader.load_state_dict(client["loader"])
    return loader


def train(cfg: ExperimentConfig, meta: dict, ds: dict, env, device: torch.device, hooks: Hooks | None = None) -> int:
    from ditscale.data.prefetch import DevicePrefetcher
    from ditscale.engine import checkpoint
    from ditscale.engine.build import complete_ds_config, skips_nonfinite_steps, zero_stage
    from ditscale.engine.memory import process_memory
    from ditscale.engine.metrics import Metrics
    from ditscale.engine.nonfinite import NonfiniteWatch
    from ditscale.engine.signals import StopRequest, StopWaiting
    from ditscale.engine.watchdog import StepWatchdog
    from ditscale.models.flops import train_flops_per_image
    from ditscale.objectives import build_objective

    tc = cfg.train
    stop = StopRequest(tc.stop_check_every, data_wait_s=tc.stop_data_wait_s)
    watchdog = StepWatchdog(tc.hang_timeout_min, env.rank)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rss_before_model = process_memory()["rss_gib"]
    repa = load_repa(cfg, meta, device)
    run = start(cfg, ds, env, device)
    engine, ema, step, images_seen = run.engine, run.ema, run.step, run.images_seen
    hooks = hooks or Hooks()
    hooks.engine_built(engine)
    if env.rank == 0:
        save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    micro, accum = tc.batch_split(env.world_size)
    batches = DevicePrefetcher(make_loader(cfg, micro, device, run.client), device)
    objective = build_objective(cfg)
    metrics = Metrics(
        cfg.run_dir,
        cfg.log,
        rank=env.rank,
        world_size=env.world_size,
        device=device,
        images_per_step=tc.global_batch,
        start_step=step,
        max_steps=tc.max_steps,
        flops_per_image=train_flops_per_image(cfg.model.dit_kwargs()),
    )
    metrics.write_event(
        event="start",
        step=step,
        world_size=env.world_size,
        zero_stage=zero_stage(ds),
        resumed_from=str(run.resumed_from or ""),
        config_hash=config_hash(cfg),
    )
    evaluator = None
    if cfg.eval.every:
        from ditscale.engine.evaluation import TrainingEval

        evaluator = TrainingEval(cfg, meta, env.rank, env.world_size, device, metrics, log=say)
    say(
        f"{env.world_size} rank(s) on {device.type}, ZeRO-{zero_stage(ds)}, micro-batch {micro} x {accum} "
        f"accumulation, step {step} -> {tc.max_steps}"
    )
    dataset_info = {
        k: meta[k]
        for k in ("vae", "scale_factor", "classes", "resolution", "latent_size", "latent_channels", "num_samples")
    }

    def save(at: int) -> None:
        nonlocal saved_at
        t0 = time.perf_counter()
        with watchdog.paused("checkpoint save"):
            checkpoint.save(
                engine,
                ema,
                cfg.run_dir,
                at,
                keep_last=tc.keep_last,
                log=say,
                client={"loader": batches.state_dict(), "step": at, "images_seen": images_seen},
                meta={
                    "images_seen": images_seen,
                    "config": to_dict(cfg),
                    "config_hash": config_hash(cfg),
                    "dataset": dataset_info,
                    "objective": objective.record(),
                },
            )
        saved_at = at
        metrics.write_event(event="checkpoint", step=at, seconds=round(time.perf_counter() - t0, 1))

    def last_checkpoint():
        return checkpoint.newest_complete(Path(cfg.run_dir) / checkpoint.CKPT_DIR, log=lambda *_: None)

    def diverged(count: int, why: str) -> int:
        say(f"error: {why} at step {step}: stopping; last good checkpoint: {last_checkpoint() or 'none'}")
        metrics.write_event(event="nonfinite_stop", step=step, count=count)
        return EXIT_NONFINITE

    # DeepSpeed skips a step whose gradients are not finite; engine.was_step_applied() says which (fp32 and
    # bf16 alike), and only the losses of applied steps are counted. With bf16.check_grad_overflow every
    # non-finite step is skipped and there is nothing to read. Without it (engine.nonfinite_check=async,
    # or check_grad_overflow=false) a non-finite loss reaches the weights: it is caught at the next step
    # (async) or the next log, always before a save, and the run stops. fp32 checks at log / save.
    skips_nonfinite = skips_nonfinite_steps(complete_ds_config(ds, cfg, env.world_size))  # what DeepSpeed got
    watch = NonfiniteWatch(metrics.nonfinite, env.world_size, every_step=cfg.engine.nonfinite_check == "async")
    engine.train()
    scale, drop = meta["scale_factor"], cfg.model.class_dropout_prob
    nonfinite_run, saved_at = 0, (step if run.resumed_from else None)

    def preempted() -> int:
        print(f"[ditscale.train] rank {env.rank}: stop agreed at step {step} ({stop.name})", flush=True)
        if saved_at != step:
            save(step)
        say(f"stopping at step {step}: checkpoint complete, exit {EXIT_PREEMPTED}")
        metrics.write_event(event="preempted", step=step)
        return EXIT_PREEMPTED

    def evaluated() -> bool:
        """False when a stop signal interrupted the evaluation due at this step (if any)."""
        if evaluator is None or not evaluator.pending(step):
            return True
        with watchdog.paused("evaluation"):
            return evaluator.run(step, ema, lambda: stop.agreed(step, now=True)) is not None

    try:
        pause_for_test("loop")
        if step < tc.max_steps and stop.agreed(step, now=True):  # a stop signal during start-up
            say(f"stop signal ({stop.name}) before the first step: nothing new to save, exit {EXIT_PREEMPTED}")
            metrics.write_event(event="preempted", step=step, before_first_step=True)
            return EXIT_PREEMPTED
        if not evaluated():  # the evaluation a preempted run left unfinished
            return preempted()
        while step < tc.max_steps:
            data_wait = 0.0
            for m in range(accum):
                t0 = time.perf_counter()
                try:
                    with stop.waiting():
                        pause_for_test(f"data:{step + 1}")
                        batch = next(batches)
                except StopWaiting as e:
                    print(
                        f"[ditscale.train] rank {env.rank}: {e}, and no batch for step {step + 1} within "
                        f"train.stop_data_wait_s={tc.stop_data_wait_s:g} s: stopping without a new checkpoint "
                        f"(resume from {last_checkpoint() or 'the start'}), exit {EXIT_PREEMPTED}",
                        flush=True,
                    )
                    metrics.write_event(event="preempted", step=step, waiting_for_data=True)
                    return EXIT_PREEMPTED
                data_wait += time.perf_counter() - t0
                g = step_generator(device, tc.seed, step, env.rank, m)
                metrics.add_losses(micro_step(engine, objective, batch, g, scale, drop, device, repa))
                metrics.add_indices(batch["index"])
            applied = engine.was_step_applied()
            if applied:
                ema.update()
            step += 1
            watchdog.beat(step)
            pause_for_test(f"step:{step}")
            images_seen += tc.global_batch
            nonfinite_run = 0 if applied else nonfinite_run + 1
            metrics.add_step(applied, engine.get_global_grad_norm() if applied else None, data_wait)
            if step == run.step + 1:
                report_memory(engine, ema, metrics, step, rss_before_model)

            save_due = step % tc.ckpt_every == 0 or step == tc.max_steps
            if not skips_nonfinite and (bad := watch.check(saving=save_due, logging=metrics.due(step))):
                return diverged(
                    bad,
                    f"{bad} non-finite values (losses or gradient norms) in steps DeepSpeed "
                    f"applied: the weights took them",
                )
            record = metrics.log(step, engine.get_lr()[0], images_seen) if metrics.due(step) else None
            if nonfinite_run >= tc.max_nonfinite:
                return diverged(
                    nonfinite_run,
                    f"{nonfinite_run} non-finite steps in a row "
                    f"(train.max_nonfinite={tc.max_nonfinite}), all skipped by DeepSpeed",
                )
            if save_due and nonfinite_run:  # no saves inside a run of skipped steps
                if step == tc.max_steps:
                    return diverged(
                        nonfinite_run,
                        f"train.max_steps reached, but the last {nonfinite_run} step(s) "
                        f"were skipped by DeepSpeed (non-finite gradients): no checkpoint "
                        f"of step {step} is written",
                    )
                say(
                    f"not saving at step {step}: the last {nonfinite_run} step(s) were skipped by DeepSpeed "
                    f"(non-finite gradients); the next save follows an applied step"
                )
            elif save_due:
                save(step)
            if cfg.sample.every and step % cfg.sample.every == 0:
                with watchdog.paused("sample grid"):
                    sample_grid(cfg, meta, ema, step, device, metrics.tb, lambda: stop_received() is not None)
                    torch.distributed.barrier()  # the other ranks wait here, not in the next step
            hooks.step_end(step, record)
            if not evaluated() or (stop.agreed(step) and step < tc.max_steps):
                return preempted()
        report_memory(engine, ema, metrics, step, rss_before_model)  # peak RSS of the whole run, saves included
        skipped = (
            f", {engine.skipped_steps} skipped by DeepSpeed (non-finite gradients)" if engine.skipped_steps else ""
        )
        say(f"done: {step} steps{skipped}, {images_seen} images; checkpoint {checkpoint.tag_for(step)} is complete")
        metrics.write_event(event="done", step=step)
        pause_for_test("done")
        return EXIT_OK
    finally:
        watchdog.close()
        metrics.close()


def main(argv=None) -> int:
    catch_stop_signals()  # from here to the exit a stop signal is recorded, never fatal (engine/signals.py)
    pause_for_test("start")
    from ditscale.engine import launch

    args = parse_args(argv)
    env = launch.detect()
    world = env.world_size if env.launcher != "single" else env.job_tasks  # a batch shell plans for srun's
    try:
        cfg, meta, ds = prepare(args, world)
    except ConfigError as e:
        print(f"[ditscale.train] error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if args.check:
        say(
            f"config ok: {cfg.model.preset} on {cfg.data.root} ({meta['num_samples']} samples), "
            f"{cfg.engine.ds_config}, {world} rank(s), run_dir {cfg.run_dir}"
        )
        return EXIT_OK

    logging.getLogger("DeepSpeed").setLevel(os.environ.get("DITSCALE_DS_LOG_LEVEL", "WARNING").upper())
    device = launch.pick_device(env, cfg.engine.device)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # ranks sharing a host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    launch.init_distributed(env, device, cfg.engine.dist_timeout_min)
    from ditscale.data import DataError
    from ditscale.engine.checkpoint import CheckpointError, SaveError

    code = None
    try:
        code = train(cfg, meta, ds, env, device)
        if code == EXIT_OK and stop_received():
            say(f"got {signal_name(stop_received())} after the final checkpoint: the run is finished, exit 0")
        return code
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"[ditscale.train] rank {env.rank}: error: {last_line(e)}", file=sys.stderr, flush=True)
        return EXIT_SAVE_FAILED if isinstance(e, SaveError) and not e.no_space else EXIT_BAD_INPUT
    finally:
        launch.shutdown(together=code == EXIT_OK)


if __name__ == "__main__":
    import faulthandler

    from ditscale.engine import launch

    faulthandler.enable(all_threads=True)  # a rank killed by SIGSEGV/SIGABRT/SIGBUS prints every thread's stack
    launch.exit_process(main())
