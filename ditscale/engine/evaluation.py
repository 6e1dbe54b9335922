"""FID during training: every `eval.every` steps (and at train.max_steps) the EMA samples eval.num_samples
images over all ranks, each rank turns its images into features, and rank 0 computes FID (IS, sFID,
precision / recall as asked) against eval.ref, logs them to metrics.jsonl ("eval" events) and TensorBoard
(eval/*), and prints what the evaluation cost.

    RUN_DIR/eval/step_00010000-<settings>/manifest.json       what the chunks were made with
    RUN_DIR/eval/step_00010000-<settings>/chunks/000003.npz   features, labels, indices of one chunk
    RUN_DIR/eval/step_00010000-<settings>/result.json         the metrics; written last (= done)

Chunk j (sample indices [j·B, (j+1)·B), B = eval.batch_size) belongs to rank j mod world_size; sample i's
noise and label come from (eval.seed, i) alone. Between rounds of chunks the ranks agree on a stop signal:
a preempted evaluation returns None, the trainer checkpoints and exits 85, and the resumed run (the EMA of
the same step: restored, or recomputed bit-exactly) finishes only the missing chunks.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ditscale.evaluate.features import extract_features
from ditscale.evaluate.metrics import MetricSettings, compute_metrics
from ditscale.sampling.npz import chunk_path, chunk_ranges, prepare_dir

NUMBERS = ("fid", "sfid", "inception_score", "precision", "recall")


def check_inputs(ec) -> None:
    """ConfigError naming eval.ref / eval.weights when a file the evaluation needs is missing."""
    from ditscale.config import ConfigError

    for key in ("ref", "weights"):
        if not Path(getattr(ec, key)).exists():
            raise ConfigError(f"eval.{key}: {getattr(ec, key)} does not exist (needed for eval.every={ec.every})")


def load_feature_network(name: str, weights, device, resize: str = "tf1"):
    """The FID Inception ("inception") or the digits classifier ("digits") from a local weights file."""
    if name == "digits":
        from ditscale.evaluate.digits import load_digits_net

        return load_digits_net(weights, device)
    from ditscale.evaluate.inception import load_inception

    return load_inception(weights, device=device, resize=resize)


def ema_model(cfg, ema, all_ranks: bool = False):
    """The EMA weights as a full DiT on the CPU: on rank 0 (None elsewhere), or on every rank."""
    from ditscale.engine.ema import gather_full
    from ditscale.engine.export import official_state_dict
    from ditscale.models import DiT

    params = gather_full(ema, all_ranks=all_ranks)
    if params is None:
        return None
    kwargs = cfg.model.dit_kwargs()
    model = DiT(**kwargs)
    model.load_state_dict(official_state_dict(params, kwargs), strict=True)
    return model


def _savez(f, arrays: dict) -> None:
    np.savez(f, **arrays)


def _collective(fn: Callable[[], object]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        fn()


class TrainingEval:
    """The trainer's evaluator; `metrics` is its ditscale.engine.metrics.Metrics (events, TensorBoard)."""

    def __init__(self, cfg, meta: dict, rank: int, world_size: int, device: torch.device, metrics, log=print):
        from ditscale.sampling.grid import vae_and_scale

        self.cfg, self.ec, self.meta = cfg, cfg.eval, meta
        self.rank, self.world, self.device, self.metrics, self.log = rank, world_size, device, metrics, log
        try:
            self.net = load_feature_network(self.ec.network, self.ec.weights, device, self.ec.resize)
        except (OSError, ValueError) as e:
            from ditscale.config import ConfigError

            raise ConfigError(f"eval.weights: {e}") from None
        self.vae, self.scale = vae_and_scale(cfg.sample.vae or meta["vae"], meta["scale_factor"], device)
        self.reference = None  # rank 0, loaded at the first evaluation
        self.sampler = self.ec.sampler_for(cfg.objective.kind)
        self.settings = {
            k: getattr(self.ec, k)
            for k in (
                "num_samples",
                "sampler",
                "steps",
                "cfg_scale",
                "labels",
                "seed",
                "batch_size",
                "network",
                "resize",
            )
        }
        self.settings.update(
            sampler=self.sampler,
            weights=str(Path(self.ec.weights).resolve()),
            model_weights="ema",
            guide_channels=self.guide_channels,
        )
        tag = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:8]
        self.tag, self.root = tag, Path(cfg.run_dir) / "eval"
        self.since: float | None = None  # end of this process's last evaluation (None: none yet)
        self.kept = (0, 0)  # (chunks found written by an interrupted evaluation, chunks in all)

    @property
    def guide_channels(self):
        return 3 if self.cfg.model.dit_kwargs()["in_channels"] == 4 else "all"  # the official quirk

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}-{self.tag}"

    def due(self, step: int) -> bool:
        return bool(self.ec.every) and step > 0 and (step % self.ec.every == 0 or step == self.cfg.train.max_steps)

    def pending(self, step: int) -> bool:
        """Due at `step` and not finished (by this run or one before it)."""
        return self.due(step) and not (self.step_dir(step) / "result.json").is_file()

    # ---------------------------------------------------------------------------------------- sampling

    def _sampler(self, ema):
        from ditscale.objectives import build_objective
        from ditscale.sampling.core import GuidedSampler, sampling_process
        from ditscale.sampling.registry import sampler_info

        model = ema_model(self.cfg, ema, all_ranks=True).to(self.device).eval()
        process = sampling_process(build_objective(self.cfg), self.sampler, self.ec.steps)
        return GuidedSampler(
            model,
            process,
            self.sampler,
            self.ec.cfg_scale,
            self.guide_channels,
            autocast=torch.bfloat16 if self.device.type == "cuda" else None,
            steps=self.ec.steps if sampler_info(self.sampler).kind == "flow" else None,
        )

    def _chunk(self, sampler, indices: range) -> dict[str, np.ndarray]:
        from ditscale.sampling.core import decode, index_labels, index_seeds, seeded_noise, to_uint8

        labels = index_labels(self.ec.seed, indices, sampler.model.num_classes, self.ec.labels)
        noise = seeded_noise(
            index_seeds(self.ec.seed, indices), sampler.latent_shape(len(indices)), sampler.num_draws, self.device
        )
        latents = sampler(noise, torch.from_numpy(labels))  # (n, C, h, w)
        images = to_uint8(decode(latents, self.vae, self.scale))  # (n, H, W, 3)
        feats = extract_features(self.net, [images], progress=False)
        return {**feats, "labels": labels, "indices": np.asarray(list(indices), np.int64)}

    def _sample_all(self, step: int, ema, should_stop: Callable[[], bool]) -> bool:
        """This rank's missing chunks, round by round (one stop agreement per round); False if stopped.
        Sets self.kept: how many chunks an interrupted evaluation had already written."""
        from ditscale.sampling.npz import atomic_write

        root = self.step_dir(step)
        chunk = prepare_dir(root, self.settings, self.ec.batch_size)
        ranges = chunk_ranges(self.ec.num_samples, chunk)
        self.kept = (sum(chunk_path(root, j).is_file() for j in range(len(ranges))), len(ranges))
        if self.kept[0] == len(ranges):
            return True  # the same answer on every rank: none writes yet
        sampler = self._sampler(ema)  # a collective: every rank, before any chunk
        for first in range(0, len(ranges), self.world):
            j = first + self.rank
            if j < len(ranges) and not chunk_path(root, j).is_file():
                arrays = self._chunk(sampler, ranges[j])
                atomic_write(chunk_path(root, j), partial(_savez, arrays=arrays))
            if should_stop():
                return False
        del sampler
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    # ---------------------------------------------------------------------------------------- metrics

    def _metrics(self, step: int) -> dict:
        from ditscale.evaluate.reference import load_reference, reference_sha256

        root = self.step_dir(step)
        settings = MetricSettings(metrics=tuple(self.ec.metrics))
        if self.reference is None:
            self.reference = load_reference(
                self.ec.ref,
                self.net,
                with_features="pr" in settings.metrics,
                resolution=self.meta["resolution"],
                progress=False,
            )
            self.reference_sha256 = reference_sha256(self.ec.ref)
        files = sorted((root / "chunks").glob("*.npz"))
        parts = [dict(np.load(f)) for f in files]
        feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in ("labels", "indices")}
        if sum(len(p["indices"]) for p in parts) != self.ec.num_samples:
            raise RuntimeError(
                f"{root}: chunks hold {sum(len(p['indices']) for p in parts)} samples, expected {self.ec.num_samples}"
            )
        out = compute_metrics(feats, self.reference, settings, device=self.device)
        return {
            **out,
            "settings": {
                **self.settings,
                **settings.record(),
                "ref": self.ec.ref,
                "reference_sha256": self.reference_sha256,
            },
        }

    def run(self, step: int, ema, should_stop: Callable[[], bool]) -> dict | None:
        """Evaluate the EMA at `step` (a collective: every rank calls it). Returns the result on rank 0 ({} on
        the others), or None when a stop signal interrupted the sampling (finished chunks are kept)."""
        t0 = time.perf_counter()
        train_s = t0 - self.since if self.since is not None else None
        if not self._sample_all(step, ema, should_stop):
            return None
        _collective(lambda: torch.distributed.barrier())
        sampled = time.perf_counter()
        result = {}
        if self.rank == 0:
            result = self._metrics(step)
            end = time.perf_counter()
            result.update(
                sampling_s=round(sampled - t0, 2), metrics_s=round(end - sampled, 2), seconds=round(end - t0, 2)
            )
            (self.step_dir(step) / "result.json").write_text(json.dumps({"step": step, **result}, indent=2) + "\n")
            self._report(step, result, train_s)
        _collective(lambda: torch.distributed.barrier())
        self.since = time.perf_counter()
        return result

    def _report(self, step: int, result: dict, train_s: float | None) -> None:
        """The numbers, and what they cost. The share of training time only between two evaluations of this
        process, all of whose chunks it sampled: a first evaluation after a (re)start, or one that finishes an
        interrupted evaluation's chunks, has no honest denominator."""
        numbers = {k: result[k] for k in NUMBERS if k in result}
        self.metrics.write_event(
            event="eval",
            step=step,
            num_samples=result["num_samples"],
            **numbers,
            seconds=result["seconds"],
            sampling_s=result["sampling_s"],
            metrics_s=result["metrics_s"],
            settings=result["settings"],
        )
        if self.metrics.tb is not None:
            for k, v in numbers.items():
                self.metrics.tb.add_scalar(f"eval/{k}", v, step)
            self.metrics.tb.flush()
        shown = " | ".join(f"{k} {v:.4g}" for k, v in numbers.items())
        kept, total = self.kept
        if kept:
            share = f"; {kept} of {total} chunks were kept from an interrupted evaluation"
        elif train_s:
            share = f", {result['seconds'] / train_s:.1%} of the {train_s:.0f} s trained since the last one"
        else:
            share = ""
        self.log(
            f"eval at step {step}: {shown} | cost {result['seconds']:.1f} s for {result['num_samples']} "
            f"samples (sampling {result['sampling_s']:.1f} s, metrics {result['metrics_s']:.1f} s{share})"
        )
