"""The DiT paper's Gaussian diffusion: schedules, hybrid loss, respacing, DDPM / DDIM samplers, guidance."""

from __future__ import annotations

from .gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .guidance import ClassifierFreeGuidance, cfg_wrapper, prepare_cfg_inputs
from .respace import SpacedDiffusion, space_timesteps
from .schedule import get_named_beta_schedule


def create_diffusion(
    timestep_respacing="",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The diffusion of the DiT code release; the defaults are the paper's training setup.

    timestep_respacing: "" (or None) for all `diffusion_steps` steps, else a spec for space_timesteps
    ("250", "ddim50", "10,10,10", an int) — a SpacedDiffusion whose model calls see the original steps.
    use_kl trains on the rescaled bound alone; rescale_learned_sigmas scales the hybrid loss's bound term
    by T/1000; sigma_small / learn_sigma pick the variance (β̃ / β fixed, or learned between them).
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    kwargs = dict(
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
    if timestep_respacing is None or timestep_respacing == "":
        return GaussianDiffusion(betas, **kwargs)
    return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing), betas, **kwargs)


__all__ = [
    "ClassifierFreeGuidance",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "cfg_wrapper",
    "create_diffusion",
    "get_named_beta_schedule",
    "prepare_cfg_inputs",
    "space_timesteps",
]
