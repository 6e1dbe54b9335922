"""The DiT paper's objective: DDPM ε-prediction with Improved DDPM's hybrid loss (ditscale.diffusion).

Draw order from the generator (what exact resume relies on): t (N,), then ε (N, C, H, W), then the label
dropout (N,). Uniform times are `randint(0, T)` as in the paper; other timestep samplings draw noise
fractions u and take step ⌊u·T⌋.
"""

from __future__ import annotations

import torch

from ditscale.diffusion import create_diffusion

from .base import CapturingModel, Objective, add_aux, conditioning
from .timesteps import TimestepSampling


class DDPMObjective(Objective):
    kind = "ddpm"
    samplers = ("ddpm", "ddim")
    default_sampler = "ddpm"

    def __init__(
        self,
        *,
        noise_schedule="linear",
        diffusion_steps=1000,
        predict_xstart=False,
        use_kl=False,
        rescale_learned_sigmas=False,
        sigma_small=False,
        learn_sigma=True,
        timesteps: TimestepSampling = TimestepSampling(),
    ):
        self.settings = dict(
            noise_schedule=noise_schedule,
            diffusion_steps=diffusion_steps,
            predict_xstart=predict_xstart,
            use_kl=use_kl,
            sigma_small=sigma_small,
            rescale_learned_sigmas=rescale_learned_sigmas,
            learn_sigma=learn_sigma,
        )
        self.diffusion = create_diffusion("", **self.settings)
        self.timesteps = timesteps

    @classmethod
    def from_config(cls, cfg) -> DDPMObjective:
        d = cfg.diffusion
        return cls(
            noise_schedule=d.noise_schedule,
            diffusion_steps=d.diffusion_steps,
            predict_xstart=d.predict_xstart,
            use_kl=d.use_kl,
            rescale_learned_sigmas=d.rescale_learned_sigmas,
            sigma_small=d.sigma_small,
            learn_sigma=cfg.model.learn_sigma,
            timesteps=cfg.objective.timestep_sampling(),
        )

    def draw_timesteps(self, n: int, generator, device) -> torch.Tensor:
        """(n,) int64 training steps in [0, T)."""
        T = self.diffusion.num_timesteps
        if self.timesteps.is_uniform:
            return torch.randint(0, T, (n,), device=device, generator=generator)
        u = self.timesteps.noise_fraction(n, generator, device)
        return (u * T).long().clamp_(0, T - 1)

    def loss(self, model, x0, labels, generator, *, drop_prob=0.0, model_kwargs=None, aux=()):
        t = self.draw_timesteps(x0.shape[0], generator, x0.device)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        kwargs = conditioning(labels, generator, drop_prob, model_kwargs)
        capture = CapturingModel(model)
        terms = self.diffusion.training_losses(capture, x0, t, kwargs, noise=noise)
        return add_aux(terms, aux, capture.extras, x0, labels)

    def record(self) -> dict:
        s = self.settings
        return {
            "kind": self.kind,
            "prediction": "x0" if s["predict_xstart"] else "epsilon",
            "time": "discrete steps 0..T-1, noise at T-1",
            "noise_schedule": s["noise_schedule"],
            "diffusion_steps": s["diffusion_steps"],
            "learn_sigma": s["learn_sigma"],
            "sigma_small": s["sigma_small"],
        }

    @classmethod
    def from_record(cls, rec: dict) -> DDPMObjective:
        return cls(
            noise_schedule=rec.get("noise_schedule", "linear"),
            diffusion_steps=rec.get("diffusion_steps", 1000),
            predict_xstart=rec.get("prediction") == "x0",
            learn_sigma=rec.get("learn_sigma", True),
            sigma_small=rec.get("sigma_small", False),
        )
