"""Samplers by name, one implementation of each step, and the plan each walks.

    info = sampler_info("heun")                  # unknown name: ValueError listing the choices
    plan = make_plan("heun", objective_or_diffusion, steps=50)

DDPM objective (a respaced GaussianDiffusion; the steps are ditscale.diffusion.samplers' ddpm_update /
ddim_update, shared with the diffusion's own loops):
  ddpm            ancestral sampling, one noise draw per step but the last
  ddim            DDIM with η (η > 0 draws noise per step)
Flow objective (ditscale.objectives.flow; t from t₀ near noise to t₁ near data):
  euler           x ← x + Δt·v(x, t),                                 `steps` model calls
  heun            x ← x + Δt/2·(v(x, t) + v(x + Δt·v(x, t), t + Δt)),   2·steps model calls
  dopri5          adaptive Dormand–Prince (torchdiffeq), `atol` / `rtol` (SiT: 1e-6 / 1e-3)
  euler_maruyama  SiT's SDE: dx = [v + D(t)·s] dt + √(2·D(t)) dW over `steps` − 1 steps on
                  linspace(t₀, t₁, steps), then a last step of size h to t = 1 (`last_step`:
                  none | mean | tweedie | euler; h = last_step_size, SiT: 0.04). D(t) = `diffusion_form`
                  × `diffusion_norm` with forms constant, sbdm (= b(t)), sigma (σ_t, SiT's default),
                  linear (1 − t), decreasing (¼(norm·cos πt + 1)², norm not multiplied),
                  increasing_decreasing (sin² πt).
Each plan step is `step(model_fn, x, t, t_next, noise)`; model_fn(x, t) is the guided model output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ditscale.diffusion.samplers import ddim_update, ddpm_update


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    kind: str  # the objective kind it samples
    options: tuple[str, ...] = ()  # keyword options it takes besides steps


SAMPLERS: dict[str, SamplerInfo] = {
    s.name: s
    for s in (
        SamplerInfo("ddpm", "ddpm"),
        SamplerInfo("ddim", "ddpm", ("eta",)),
        SamplerInfo("euler", "flow"),
        SamplerInfo("heun", "flow"),
        SamplerInfo("dopri5", "flow", ("atol", "rtol")),
        SamplerInfo("euler_maruyama", "flow", ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")),
    )
}
DIFFUSION_FORMS = ("constant", "sbdm", "sigma", "linear", "decreasing", "increasing_decreasing")
LAST_STEPS = ("none", "mean", "tweedie", "euler")
SDE_DEFAULTS = {"diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "mean", "last_step_size": 0.04}
ODE_DEFAULTS = {"atol": 1e-6, "rtol": 1e-3}
SBDM_MIN_T = 1e-3  # SiT's SBDM coefficient b(t) ~ 1/t: an SDE with it starts no earlier than this


def sampler_info(name: str) -> SamplerInfo:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_fits(name: str, kind: str) -> SamplerInfo:
    """The sampler's info; ValueError when it does not sample objective `kind`, naming the ones that do."""
    info = sampler_info(name)
    if info.kind != kind:
        fits = [s.name for s in SAMPLERS.values() if s.kind == kind]
        raise ValueError(
            f"sampler {name!r} samples {info.kind} models, this model was trained with objective "
            f"{kind!r}: choose one of {', '.join(fits)}"
        )
    return info


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


#################################################################################
#                             Flow steps (one of each)                          #
#################################################################################


def euler_step(velocity, x, t, t_next):
    return x + _bcast(t_next - t, x) * velocity(x, t)


def heun_step(velocity, x, t, t_next):
    dt = _bcast(t_next - t, x)
    k1 = velocity(x, t)
    k2 = velocity(x + dt * k1, t_next)
    return x + dt / 2 * (k1 + k2)


def euler_maruyama_step(x, drift, diffusion, dt, noise):
    """x + f·Δt + √(2·D)·√Δt·z: SiT's Euler–Maruyama step (D is its "diffusion" coefficient)."""
    return x + drift * dt + torch.sqrt(2 * diffusion) * torch.sqrt(dt) * noise


def sde_diffusion(objective, form: str, norm: float, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """D(t) broadcast against x."""
    from ditscale.objectives.flow import drift_coefficients, path_coefficients

    if form == "constant":
        d = torch.full_like(t, norm)
    elif form == "sbdm":
        d = norm * drift_coefficients(objective.path, t)[1]
    elif form == "sigma":
        d = norm * path_coefficients(objective.path, t)[2]
    elif form == "linear":
        d = norm * (1 - t)
    elif form == "decreasing":
        d = 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    elif form == "increasing_decreasing":
        d = norm * torch.sin(math.pi * t) ** 2
    else:
        raise ValueError(f"unknown diffusion_form {form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")
    return _bcast(d, x)


#################################################################################
#                                     Plans                                     #
#################################################################################


@dataclass
class Plan:
    """What a sampler walks: `times` (K + 1 host numbers; step k goes times[k] → times[k + 1] as (N,)
    tensors of `time_dtype`), which steps draw noise, the step (`final` replaces it for the last step when
    given), and noise_fraction(time) ∈ [0, 1] (1 = pure noise) that places a step for the guidance interval."""

    name: str
    times: list
    step: object
    noisy_steps: list[bool]
    noise_fraction: object
    time_dtype: torch.dtype = torch.float32
    final: object = None
    adaptive: bool = False  # the step evaluates the model at times of its own choosing

    @property
    def num_steps(self) -> int:
        return len(self.times) - 1

    @property
    def num_draws(self) -> int:
        return 1 + sum(self.noisy_steps)

    def step_at(self, k: int):
        return self.final if self.final is not None and k == self.num_steps - 1 else self.step


def _diffusion_plan(name, diffusion, eta: float) -> Plan:
    T = diffusion.num_timesteps
    original = getattr(diffusion, "timestep_map", None)
    T_train = getattr(diffusion, "original_num_steps", T)
    times = list(range(T - 1, -2, -1))  # respaced steps T−1 … 0, then "done"
    noisy = [(name == "ddpm" or eta > 0) and i > 0 for i in times[:-1]]

    def step(model_fn, x, t, t_next, noise):
        out = diffusion.p_mean_variance(lambda x, t, **_: model_fn(x, t), x, t)
        return ddpm_update(out, x, t, noise) if name == "ddpm" else ddim_update(diffusion, out, x, t, noise, eta)

    def noise_fraction(i: int) -> float:
        step_index = int(original[i]) if original is not None else i
        return (step_index + 1) / T_train

    return Plan(name, times, step, noisy, noise_fraction, time_dtype=torch.long)


def _flow_plan(name, objective, steps: int, options: dict) -> Plan:
    sde = name == "euler_maruyama"
    opts = {**(SDE_DEFAULTS if sde else ODE_DEFAULTS if name == "dopri5" else {}), **options}
    last = opts.get("last_step", "none")
    size = float(opts.get("last_step_size", 0.0)) if last != "none" else 0.0
    sbdm = opts.get("diffusion_form") == "sbdm"
    t0, t1 = objective.interval(objective.sample_eps, sde=sde, sbdm=sbdm, last_step_size=size)
    if sde and sbdm and objective.path != "vp":
        t0 = max(t0, SBDM_MIN_T)
    noise_fraction = lambda t: 1.0 - float(t)  # noqa: E731
    if name == "dopri5":
        from torchdiffeq import odeint

        def solve(model_fn, x, t, t_next, noise):
            velocity = _velocity(objective, model_fn)
            span = torch.stack([t[0], t_next[0]]).to(x.dtype)
            return odeint(
                lambda s, y: velocity(y, s.expand(y.shape[0])),
                x,
                span,
                method="dopri5",
                atol=opts["atol"],
                rtol=opts["rtol"],
            )[-1]

        return Plan(name, [t0, t1], solve, [False], noise_fraction, adaptive=True)
    if not sde:
        fn = euler_step if name == "euler" else heun_step
        return Plan(
            name,
            torch.linspace(t0, t1, steps + 1).tolist(),
            lambda model_fn, x, t, t_next, noise: fn(_velocity(objective, model_fn), x, t, t_next),
            [False] * steps,
            noise_fraction,
        )
    if steps < 2:
        raise ValueError("euler_maruyama needs steps >= 2 (steps − 1 SDE steps, then the last step)")
    form, norm = opts["diffusion_form"], float(opts["diffusion_norm"])

    def terms(model_fn, x, t):
        """(velocity, score, D(t)) at (x, t) from one model call."""
        pred = objective.prediction_of(model_fn(x, t), x)
        return objective.velocity(pred, x, t), objective.score(pred, x, t), sde_diffusion(objective, form, norm, t, x)

    def step(model_fn, x, t, t_next, noise):
        v, s, d = terms(model_fn, x, t)
        return euler_maruyama_step(x, v + d * s, d, _bcast(t_next - t, x), noise)

    def final(model_fn, x, t, t_next, noise):
        if last == "none":
            return x
        v, s, d = terms(model_fn, x, t)
        if last == "tweedie":
            from ditscale.objectives.flow import path_coefficients

            alpha, _, sigma, _ = (_bcast(c, x) for c in path_coefficients(objective.path, t))
            return x / alpha + sigma**2 / alpha * s
        return x + _bcast(t_next - t, x) * (v + d * s if last == "mean" else v)

    grid = torch.linspace(t0, t1, steps).tolist() + [1.0]
    return Plan(name, grid, step, [True] * (steps - 1) + [False], noise_fraction, final=final)


def _velocity(objective, model_fn):
    """v(x, t) of a flow model function (its prediction converted)."""
    return lambda x, t: objective.velocity(objective.prediction_of(model_fn(x, t), x), x, t)


def make_plan(name: str, process, steps: int | None = None, *, eta: float = 0.0, options: dict | None = None) -> Plan:
    """The plan of sampler `name` over `process`: a respaced GaussianDiffusion (ddpm/ddim; its own
    num_timesteps) or a FlowObjective (`steps` steps)."""
    info = sampler_info(name)
    kind = "flow" if hasattr(process, "velocity") else "ddpm"
    check_fits(name, kind)
    options = dict(options or {})
    bad = sorted(set(options) - set(info.options))
    if bad:
        raise ValueError(
            f"sampler {name!r} takes no option {', '.join(bad)}"
            + (f" (it takes {', '.join(info.options)})" if info.options else "")
        )
    if "diffusion_form" in options and options["diffusion_form"] not in DIFFUSION_FORMS:
        raise ValueError(
            f"unknown diffusion_form {options['diffusion_form']!r}; choose one of {', '.join(DIFFUSION_FORMS)}"
        )
    if "last_step" in options and options["last_step"] not in LAST_STEPS:
        raise ValueError(f"unknown last_step {options['last_step']!r}; choose one of {', '.join(LAST_STEPS)}")
    if kind == "ddpm":
        return _diffusion_plan(name, process, eta)
    if name != "dopri5" and (steps is None or steps < 1):
        raise ValueError(f"flow sampler {name!r} needs steps >= 1, got {steps}")
    return _flow_plan(name, process, steps or 0, options)  # dopri5 picks its own steps
