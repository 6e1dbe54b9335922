"""Gaussian diffusion (DDPM) with ε- or x₀-prediction, fixed or learned variances, and Improved DDPM's loss.

Timesteps t ∈ {0, …, T−1}; ᾱ_t = ∏_{s≤t} (1 − β_s), so x_t ~ N(√ᾱ_t·x₀, (1 − ᾱ_t)·I). The model is any
callable `model(x_t, t, **model_kwargs)` returning the ε (or x₀) prediction in its first C channels and,
with learned variances, a second C channels v.

The schedule is computed once in float64 and cached per (device, dtype); every per-step coefficient is a
gather from those tables, so the training loss and the sampling steps never synchronise with the host and
trace under torch.compile without graph breaks.
"""

from __future__ import annotations

import enum
import math

import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .samplers import Samplers


class ModelMeanType(enum.Enum):
    EPSILON = "epsilon"  # the model predicts the noise ε
    START_X = "start_x"  # the model predicts x₀


class ModelVarType(enum.Enum):
    LEARNED = "learned"  # the model outputs log σ² directly
    LEARNED_RANGE = "learned_range"  # v ∈ [-1, 1]: log σ² = frac·log β_t + (1 − frac)·log β̃_t, frac = (v+1)/2
    FIXED_SMALL = "fixed_small"  # σ² = β̃_t, the posterior variance
    FIXED_LARGE = "fixed_large"  # σ² = β_t (β̃_1 at t = 0, so the last step keeps a finite likelihood)


class LossType(enum.Enum):
    MSE = "mse"  # MSE on the mean prediction (+ the bound term with the mean detached if Σ is learned)
    RESCALED_MSE = "rescaled_mse"  # as MSE, bound term scaled by T / 1000
    KL = "kl"  # the bound term alone
    RESCALED_KL = "rescaled_kl"  # the bound term × T (an unbiased estimate of the whole bound)


def _as_enum(cls: type[enum.Enum], value, what: str):
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; expected one of {[m.value for m in cls]}") from None


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """Diffusion arithmetic runs in fp32 (fp64 when the caller works in fp64), whatever the model's dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _schedule_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every per-step coefficient of the forward process and its posterior, float64, shape (T,)."""
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    # β̃_0 = 0: its log is clipped to β̃_1 (β_0 when there is a single step), as ADM does.
    first = posterior_variance[1:2] if len(betas) > 1 else betas[:1]
    return {
        "betas": betas,
        "log_betas": torch.log(betas),
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(torch.cat([first, posterior_variance[1:]])),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        "fixed_large_variance": torch.cat([first, betas[1:]]),
    }


class GaussianDiffusion(Samplers):
    """DDPM over T = len(betas) steps; see the module docstring for the conventions."""

    def __init__(
        self,
        betas,
        model_mean_type: ModelMeanType | str = ModelMeanType.EPSILON,
        model_var_type: ModelVarType | str = ModelVarType.LEARNED_RANGE,
        loss_type: LossType | str = LossType.MSE,
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):  # β = 1 would make ᾱ = 0 and x₀ unrecoverable
            raise ValueError(
                f"betas must lie in (0, 1), got min {betas.min().item():.4g}, max {betas.max().item():.4g}"
            )
        self.model_mean_type = _as_enum(ModelMeanType, model_mean_type, "model_mean_type")
        self.model_var_type = _as_enum(ModelVarType, model_var_type, "model_var_type")
        self.loss_type = _as_enum(LossType, loss_type, "loss_type")
        self.num_timesteps = int(betas.numel())
        self.original_num_steps = self.num_timesteps  # the steps the model was trained on (respacing keeps it)
        self.timestep_map = torch.arange(self.num_timesteps)  # this diffusion's step i is original step map[i]
        self.tables = _schedule_tables(betas)
        self.betas = self.tables["betas"]
        self.alphas_cumprod = self.tables["alphas_cumprod"]
        self._device_tables: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    @property
    def learn_sigma(self) -> bool:
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    # --------------------------------------------------------------------------------------------------
    # Schedule lookups
    # --------------------------------------------------------------------------------------------------

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """tables[name][t] on like's device in fp32 (fp64 for fp64 like), shaped (N, 1, …, 1) to broadcast."""
        key = (like.device, _work_dtype(like))
        tables = self._device_tables.get(key)
        if tables is None:
            tables = {k: v.to(key[1]).to(key[0]) for k, v in self.tables.items()}
            self._device_tables[key] = tables
        out = tables[name][t]
        return out.reshape(out.shape + (1,) * (like.ndim - 1))

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model sees; respaced diffusions map them back to the original steps."""
        return t

    def _model_output(self, model, x: torch.Tensor, t: torch.Tensor, model_kwargs) -> torch.Tensor:
        """Call the model and check its channel count; the output is cast to x's (fp32/fp64) dtype."""
        out = model(x, self._model_timesteps(t), **(model_kwargs or {}))
        channels = x.shape[1] * (2 if self.learn_sigma else 1)
        if out.shape != (x.shape[0], channels, *x.shape[2:]):
            raise ValueError(
                f"model output has shape {tuple(out.shape)}, expected {(x.shape[0], channels, *x.shape[2:])} "
                f"({'2×' if self.learn_sigma else ''}{x.shape[1]} channels: learn_sigma={self.learn_sigma})"
            )
        return out.to(x.dtype)

    # --------------------------------------------------------------------------------------------------
    # Forward process q
    # --------------------------------------------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """q(x_t | x₀) = N(√ᾱ_t·x₀, (1 − ᾱ_t)·I): (mean, variance, log_variance)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = 1.0 - self._extract("alphas_cumprod", t, x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A draw from q(x_t | x₀), with the given standard-normal noise if any."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x_start {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t−1} | x_t, x₀): (mean, variance β̃_t, log-variance clipped at t = 0)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # --------------------------------------------------------------------------------------------------
    # Reverse process p
    # --------------------------------------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None) -> dict:
        """p(x_{t−1} | x_t) and the model's x₀ estimate: {"mean", "variance", "log_variance", "pred_xstart"}.

        denoised_fn is applied to the x₀ estimate before it is (optionally) clipped to [-1, 1].
        """
        x = x.to(_work_dtype(x))
        model_output = self._model_output(model, x, t, model_kwargs)
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised=False, denoised_fn=None) -> dict:
        C = x.shape[1]
        if self.learn_sigma:
            model_output, var_values = model_output[:, :C], model_output[:, C:]
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                frac = (var_values + 1.0) / 2.0
                log_variance = frac * self._extract("log_betas", t, x) + (1.0 - frac) * self._extract(
                    "posterior_log_variance_clipped", t, x
                )
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            log_variance = torch.log(self._extract("fixed_large_variance", t, x)).expand_as(x)
        else:
            log_variance = self._extract("posterior_log_variance_clipped", t, x).expand_as(x)

        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        else:
            pred_xstart = model_output
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    # --------------------------------------------------------------------------------------------------
    # Training loss
    # --------------------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=False):
        """One term of the variational bound, bits per dimension, (N,): KL(q ‖ p) for t > 0,
        −log p(x₀ | x₁) (discretised Gaussian) at t = 0. Also returns the x₀ estimate."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl), out["pred_xstart"]

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict[str, torch.Tensor]:
        """Per-sample losses at timesteps t (N,): {"loss", "mse", "vb"}, each (N,) in fp32 (fp64 for fp64 input).

        mse: mean-flat squared error of the mean prediction (ε or x₀). vb: the bound term in bits per
        dimension — with MSE losses and learned Σ it is computed with the predicted mean detached, so it
        trains only the variance (Improved DDPM's hybrid loss); zeros with fixed Σ under MSE losses.
        loss = mse + vb for MSE losses, vb (× T for rescaled_kl) for KL losses.
        """
        x_start = x_start.to(_work_dtype(x_start))
        if noise is None:
            noise = torch.randn_like(x_start)
        noise = noise.to(x_start.dtype)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._model_output(model, x_t, t, model_kwargs)
        C = x_t.shape[1]
        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start
        mse = mean_flat((target - model_output[:, :C]) ** 2)

        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            vb, _ = self._vb_terms_bpd(model_output, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_KL:
                vb = vb * self.num_timesteps
            return {"loss": vb, "mse": mse, "vb": vb}

        if self.learn_sigma:
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            vb, _ = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                vb = vb * (self.num_timesteps / 1000.0)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
