"""Flow matching as in SiT (Ma et al. 2024, stochastic interpolants): x_t = α_t·x₁ + σ_t·ε.

SiT's conventions, kept so its recipes carry over: x₁ is the data, ε ~ N(0, I) the noise, and time runs
from noise (t = 0) to data (t = 1); the model sees t ∈ [0, 1] unscaled. Paths:
  linear  α = t,            σ = 1 − t
  gvp     α = sin(πt/2),    σ = cos(πt/2)
  vp      α = exp(μ(t)),    σ = √(1 − α²),   μ(t) = −¼(1−t)²(β₁ − β₀) − ½(1−t)β₀,  β₀ = 0.1, β₁ = 20
The target velocity is u_t = α'·x₁ + σ'·ε. For any path the probability-flow velocity and the score s
relate by v = a·x + b·s with a = α'/α and b = a·σ² − σ·σ' (b is SiT's "drift variance"). Predictions:
  velocity  loss ‖v̂ − u_t‖²                (unweighted, as SiT)
  noise     loss w·‖ε̂ − ε‖²,      s = −ε̂/σ
  score     loss w·‖σ·ŝ + ε‖²
with w = 1 (none), (b/σ)² (velocity), b/σ² (likelihood). Times are drawn in [t₀, t₁]: linear/gvp
velocity use [0, 1]; other predictions [ε, 1 − ε]; vp [0, 1 − ε]; ε = train_eps (SiT's defaults: vp
1e-5, non-velocity 1e-3) while training, sample_eps (1e-3; 0 for linear/gvp velocity) while sampling.
"""

from __future__ import annotations

import math

import torch

from ditscale.diffusion.losses import mean_flat

from .base import CapturingModel, Objective, add_aux, conditioning
from .timesteps import TimestepSampling

PATHS = ("linear", "gvp", "vp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


#################################################################################
#                                     Paths                                     #
#################################################################################


def path_coefficients(path: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(α, α', σ, σ') at times t (any shape)."""
    if path == "linear":
        return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
    if path == "gvp":
        h = t * (math.pi / 2)
        return torch.sin(h), math.pi / 2 * torch.cos(h), torch.cos(h), -math.pi / 2 * torch.sin(h)
    if path == "vp":
        span = VP_BETA_MAX - VP_BETA_MIN
        alpha = torch.exp(-0.25 * (1 - t) ** 2 * span - 0.5 * (1 - t) * VP_BETA_MIN)
        d_log_alpha = 0.5 * (1 - t) * span + 0.5 * VP_BETA_MIN  # = β(t)/2
        sigma = torch.sqrt(1 - alpha**2)
        return alpha, alpha * d_log_alpha, sigma, -(alpha**2) * d_log_alpha / sigma
    raise ValueError(f"unknown flow path {path!r}; choose one of {', '.join(PATHS)}")


def drift_coefficients(path: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of v = a·x + b·s. a = α'/α is infinite where α = 0 (t = 0 on linear/gvp)."""
    if path == "vp":
        beta = VP_BETA_MIN + (1 - t) * (VP_BETA_MAX - VP_BETA_MIN)
        return beta / 2, beta / 2
    alpha, d_alpha, sigma, d_sigma = path_coefficients(path, t)
    a = d_alpha / alpha
    return a, a * sigma**2 - sigma * d_sigma


def default_eps(path: str, prediction: str) -> tuple[float, float]:
    """SiT's (train_eps, sample_eps) for a path and prediction."""
    if path == "vp":
        return 1e-5, 1e-3
    if prediction != "velocity":
        return 1e-3, 1e-3
    return 0.0, 0.0


#################################################################################
#                                   Objective                                   #
#################################################################################


class FlowObjective(Objective):
    kind = "flow"
    samplers = ("euler", "heun", "dopri5", "euler_maruyama")
    default_sampler = "heun"

    def __init__(
        self,
        *,
        path="linear",
        prediction="velocity",
        loss_weight="none",
        train_eps=None,
        sample_eps=None,
        timesteps: TimestepSampling = TimestepSampling(),
    ):
        for value, name, choices in (
            (path, "path", PATHS),
            (prediction, "prediction", PREDICTIONS),
            (loss_weight, "loss_weight", LOSS_WEIGHTS),
        ):
            if value not in choices:
                raise ValueError(f"unknown flow {name} {value!r}; choose one of {', '.join(choices)}")
        d_train, d_sample = default_eps(path, prediction)
        self.path, self.prediction, self.loss_weight = path, prediction, loss_weight
        self.train_eps = d_train if train_eps is None else float(train_eps)
        self.sample_eps = d_sample if sample_eps is None else float(sample_eps)
        self.timesteps = timesteps

    @classmethod
    def from_config(cls, cfg) -> FlowObjective:
        f = cfg.objective.flow
        return cls(
            path=f.path,
            prediction=f.prediction,
            loss_weight=f.loss_weight,
            train_eps=f.train_eps,
            sample_eps=f.sample_eps,
            timesteps=cfg.objective.timestep_sampling(),
        )

    @classmethod
    def from_record(cls, rec: dict) -> FlowObjective:
        return cls(
            path=rec["path"],
            prediction=rec["prediction"],
            loss_weight=rec.get("loss_weight", "none"),
            train_eps=rec.get("train_eps"),
            sample_eps=rec.get("sample_eps"),
        )

    def record(self) -> dict:
        return {
            "kind": self.kind,
            "prediction": self.prediction,
            "path": self.path,
            "time": "continuous t in [0, 1], noise at t=0, data at t=1 (SiT)",
            "loss_weight": self.loss_weight,
            "train_eps": self.train_eps,
            "sample_eps": self.sample_eps,
        }

    # ---------------------------------------------------------------------------------------------
    # Time intervals
    # ---------------------------------------------------------------------------------------------

    def interval(self, eps: float, *, sde: bool = False, sbdm: bool = False, last_step_size: float = 0.0):
        """(t₀, t₁) integrated or trained over, SiT's rules: the ends where a coefficient blows up are cut
        by eps (an SDE's last step of size h > 0 ends it at 1 − h instead)."""
        end = 1 - (last_step_size if sde and last_step_size > 0 else eps)
        if self.path == "vp":
            return 0.0, end
        if self.prediction != "velocity" or sde:
            return (eps if self.prediction != "velocity" or sbdm else 0.0), end
        return 0.0, 1.0

    def draw_times(self, n: int, generator, device) -> torch.Tensor:
        """(n,) fp32 training times: t = t₀ + (1 − u)(t₁ − t₀) for the timestep sampling's noise fractions u."""
        t0, t1 = self.interval(self.train_eps)
        u = self.timesteps.noise_fraction(n, generator, device)
        return t0 + (1 - u) * (t1 - t0)

    # ---------------------------------------------------------------------------------------------
    # Loss
    # ---------------------------------------------------------------------------------------------

    def loss(self, model, x0, labels, generator, *, drop_prob=0.0, model_kwargs=None, aux=()):
        """x0 is the clean data (SiT's x₁)."""
        x1 = x0.float()
        t = self.draw_times(x1.shape[0], generator, x1.device)  # (N,)
        noise = torch.randn(x1.shape, device=x1.device, generator=generator)  # (N, C, H, W)
        kwargs = conditioning(labels, generator, drop_prob, model_kwargs)
        alpha, d_alpha, sigma, d_sigma = (_bcast(c, x1) for c in path_coefficients(self.path, t))
        xt = alpha * x1 + sigma * noise
        capture = CapturingModel(model)
        out = self.prediction_of(capture(xt, t, **kwargs), x1)
        if self.prediction == "velocity":
            mse = mean_flat((out - (d_alpha * x1 + d_sigma * noise)) ** 2)
            terms = {"loss": mse, "mse": mse}
        else:
            err = out - noise if self.prediction == "noise" else out * sigma + noise
            mse = mean_flat(err**2)
            terms = {"loss": self.weight(t) * mse, "mse": mse}
        return add_aux(terms, aux, capture.extras, x0, labels)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) loss weight of noise / score predictions."""
        if self.loss_weight == "none":
            return torch.ones_like(t)
        _, b = drift_coefficients(self.path, t)
        sigma = path_coefficients(self.path, t)[2]
        return (b / sigma) ** 2 if self.loss_weight == "velocity" else b / sigma**2

    @staticmethod
    def prediction_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The prediction in the model's output: its first C channels (a learn_sigma model's second half is
        unused, as in SiT), in fp32."""
        return out[:, : x.shape[1]].float()

    # ---------------------------------------------------------------------------------------------
    # Velocity and score of a prediction (what the samplers integrate)
    # ---------------------------------------------------------------------------------------------

    def velocity(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Probability-flow velocity at (x, t) from the model's prediction."""
        if self.prediction == "velocity":
            return pred
        a, b = (_bcast(c, x) for c in drift_coefficients(self.path, t))
        return a * x + b * self.score(pred, x, t)

    def score(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇ log p_t(x) from the prediction; from a velocity s = (α·v − α'·x) / (α'·σ² − α·σ·σ'), which
        stays finite at α = 0."""
        if self.prediction == "score":
            return pred
        alpha, d_alpha, sigma, d_sigma = (_bcast(c, x) for c in path_coefficients(self.path, t))
        if self.prediction == "noise":
            return -pred / sigma
        return (alpha * pred - d_alpha * x) / (d_alpha * sigma**2 - alpha * sigma * d_sigma)
