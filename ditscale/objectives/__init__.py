"""Training objectives behind one seam (see base.py for the contract), registered by `kind`.

    objective = build_objective(cfg)            # cfg.objective.kind picks the class
    terms = objective.loss(model, x0, labels, generator, drop_prob=0.1)
    record = objective.record()                 # into checkpoint meta and every export

Adding an objective: a module here with an `Objective` subclass (kind, samplers, loss, record,
from_config, from_record), one line in OBJECTIVES, its config keys as a section under `objective` in
ditscale/config.py, and its sampler steps in ditscale/sampling/registry.py. Flow matching was added so.
"""

from __future__ import annotations

from .base import AuxLoss, CapturingModel, Objective, ObjectiveMismatch, conditioning
from .ddpm import DDPMObjective
from .flow import FlowObjective
from .timesteps import TIMESTEP_SAMPLINGS, TimestepSampling, shift_noise_fraction

OBJECTIVES: dict[str, type[Objective]] = {"ddpm": DDPMObjective, "flow": FlowObjective}

# What a checkpoint without an objective record (the paper's weights, runs from before the seam) was trained with.
LEGACY_RECORD = {"kind": "ddpm", "prediction": "epsilon"}


def objective_class(kind: str) -> type[Objective]:
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective kind {kind!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind]


def build_objective(cfg) -> Objective:
    """The objective of an experiment config (ditscale.config.ExperimentConfig, resolved)."""
    return objective_class(cfg.objective.kind).from_config(cfg)


def objective_from_record(record: dict | None) -> Objective:
    """The objective a checkpoint / export records (None: the paper's DDPM)."""
    record = dict(record or LEGACY_RECORD)
    cls = objective_class(record.get("kind", ""))
    return cls.from_record(record)


def check_record(record: dict | None, expected_kind: str | None, where: str) -> dict:
    """The record (legacy DDPM when absent); ObjectiveMismatch naming both kinds when it is not `expected_kind`."""
    record = dict(record or LEGACY_RECORD)
    if expected_kind is not None and record.get("kind") != expected_kind:
        raise ObjectiveMismatch(
            f"{where} was trained with objective {record.get('kind')!r} ({record.get('prediction')} prediction, "
            f"{record.get('time', 'its own time')}), not {expected_kind!r}: it cannot be sampled as a "
            f"{expected_kind} model; use a {record.get('kind')} sampler "
            f"({', '.join(OBJECTIVES[record['kind']].samplers) if record.get('kind') in OBJECTIVES else '?'})"
        )
    return record


__all__ = [
    "AuxLoss",
    "CapturingModel",
    "DDPMObjective",
    "FlowObjective",
    "LEGACY_RECORD",
    "OBJECTIVES",
    "Objective",
    "ObjectiveMismatch",
    "TIMESTEP_SAMPLINGS",
    "TimestepSampling",
    "build_objective",
    "check_record",
    "conditioning",
    "objective_class",
    "objective_from_record",
    "shift_noise_fraction",
]
