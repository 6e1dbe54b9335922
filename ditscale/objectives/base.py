"""The objective seam: what the trainer, the samplers and the checkpoints know of a training objective.

An objective owns its noise and time draws and its loss:

    terms = objective.loss(model, x0, labels, generator, drop_prob=0.1)    # {"loss": (N,), **parts}

`loss` draws, from `generator` and in a fixed order, its times and noise, then (drop_prob > 0) the label
dropout of classifier-free guidance, calls `model(x_t, t, y=labels, force_drop_ids=…, **model_kwargs)`
and returns per-sample fp32 terms: "loss" (what is minimised) and named parts that the metrics log as
they come. `record()` is the objective's identity (kind, prediction, direction of time, …), written
into checkpoints and exports and checked by every loader, so a model is never sampled as another kind.

Extra terms (REPA's representation alignment and the like) compose without touching an objective: a
model may return `(prediction, extras)` with `extras` a dict (e.g. hidden states asked for through
`model_kwargs`), and each `AuxLoss` in `aux` maps (extras, x0, labels) to a weighted (N,) term that is
added to "loss" and reported under its own name.
"""

from __future__ import annotations

from typing import Protocol

import torch


class AuxLoss(Protocol):
    name: str

    def __call__(self, extras: dict, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A weighted per-sample term (N,) from what the model returned beside its prediction."""


class ObjectiveMismatch(ValueError):
    """A model trained with one objective handed to code expecting another."""


class CapturingModel:
    """model(x, t, **kw) → its prediction; extras of a model that returns (prediction, extras) are kept."""

    def __init__(self, model):
        self.model, self.extras = model, {}

    def __call__(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        if isinstance(out, tuple):
            out, self.extras = out
        return out


def conditioning(labels: torch.Tensor, generator, drop_prob: float, model_kwargs: dict | None) -> dict:
    """The model's keyword arguments: labels, plus the label dropout of CFG training (drop_prob > 0),
    drawn from `generator` (1 = replaced by the null class)."""
    kwargs = {"y": labels, **(model_kwargs or {})}
    if drop_prob > 0:
        n = labels.shape[0]
        kwargs["force_drop_ids"] = (torch.rand(n, device=labels.device, generator=generator) < drop_prob).long()
    return kwargs


def add_aux(terms: dict, aux, extras: dict, x0: torch.Tensor, labels: torch.Tensor) -> dict:
    """terms with each auxiliary term added to "loss" and reported under its name."""
    for term in aux:
        if term.name in terms:
            raise ValueError(f"auxiliary loss {term.name!r} clashes with the objective's own term")
        value = term(extras, x0, labels).float()
        terms[term.name] = value
        terms["loss"] = terms["loss"] + value
    return terms


class Objective:
    """Base of the objectives registered in ditscale.objectives (see there for how to add one)."""

    kind: str = ""
    samplers: tuple[str, ...] = ()  # sampler names (ditscale.sampling.registry) that fit this objective
    default_sampler: str = ""

    def loss(
        self,
        model,
        x0: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None,
        *,
        drop_prob: float = 0.0,
        model_kwargs: dict | None = None,
        aux=(),
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def record(self) -> dict:
        """JSON-able identity: {"kind", "prediction", "time", …}; equal records mean interchangeable models."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg) -> Objective:
        """The objective of a resolved experiment config."""
        raise NotImplementedError

    @classmethod
    def from_record(cls, rec: dict) -> Objective:
        """The objective a checkpoint / export records (`record()`)."""
        raise NotImplementedError
