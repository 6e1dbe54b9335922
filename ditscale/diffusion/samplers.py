"""Sampling loops: ancestral DDPM and DDIM (η configurable), mixed into GaussianDiffusion.

All randomness comes from `generator` when one is given — the initial noise, then one standard-normal
draw of the sample's shape per step (DDPM: every step, the last one's scaled by 0; DDIM: every step when
η > 0, none when η = 0) — so a seeded generator reproduces the samples exactly. The loops make
T = num_timesteps model calls, at t = T − 1 … 0.
"""

from __future__ import annotations

from typing import Iterator

import torch


def _randn(shape, like_or_device, generator, dtype=torch.float32) -> torch.Tensor:
    device = like_or_device.device if isinstance(like_or_device, torch.Tensor) else like_or_device
    return torch.randn(*shape, generator=generator, device=device, dtype=dtype)


def _resolve_device(model, noise, device, generator) -> torch.device:
    """Explicit device, else the noise's, the generator's, the model's parameters', else CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    if generator is not None:
        return generator.device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _not_last(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 where t > 0 (noise is added), 0 at the final step, shaped to broadcast against x."""
    return (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def ddpm_update(out: dict, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The ancestral step x_{t−1} = μ + σ·z from p_mean_variance's `out` (no noise at t = 0)."""
    return out["mean"] + _not_last(t, x) * torch.exp(0.5 * out["log_variance"]) * noise


def ddim_update(
    diffusion, out: dict, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, eta: float
) -> torch.Tensor:
    """The DDIM step (Song et al. eq. 12) from p_mean_variance's `out`; `noise` is scaled by σ_η (0 at η = 0)."""
    eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
    ab, ab_prev = diffusion._extract("alphas_cumprod", t, x), diffusion._extract("alphas_cumprod_prev", t, x)
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    mean = out["pred_xstart"] * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
    return mean + _not_last(t, x) * sigma * noise


class Samplers:
    """Needs num_timesteps, p_mean_variance, _extract and _predict_eps_from_xstart from the diffusion."""

    # --------------------------------------------------------------------------------------------------
    # Single steps
    # --------------------------------------------------------------------------------------------------

    def p_sample(
        self, model, x, t, *, clip_denoised=False, denoised_fn=None, model_kwargs=None, generator=None
    ) -> dict:
        """x_{t−1} ~ p(x_{t−1} | x_t): {"sample", "pred_xstart"}."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = _randn(x.shape, x, generator, out["mean"].dtype)
        return {"sample": ddpm_update(out, x, t, noise), "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self, model, x, t, *, clip_denoised=False, denoised_fn=None, model_kwargs=None, eta=0.0, generator=None
    ) -> dict:
        """One DDIM step (Song et al. eq. 12): η = 0 deterministic, η = 1 ancestral-like."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        x = x.to(out["mean"].dtype)
        noise = _randn(x.shape, x, generator, x.dtype) if eta > 0 else torch.zeros_like(x)
        return {"sample": ddim_update(self, out, x, t, noise, eta), "pred_xstart": out["pred_xstart"]}

    # --------------------------------------------------------------------------------------------------
    # Loops
    # --------------------------------------------------------------------------------------------------

    def _loop(self, step, model, shape, noise, device, progress, generator, desc) -> Iterator[dict]:
        device = _resolve_device(model, noise, device, generator)
        shape = tuple(shape)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, sampling on {device}")
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            x = noise.to(device=device, dtype=torch.float64 if noise.dtype == torch.float64 else torch.float32)
        else:
            x = _randn(shape, device, generator)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=desc, unit="step")
        for i in steps:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, x, t)
            yield out
            x = out["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        *,
        clip_denoised=False,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
    ) -> Iterator[dict]:
        """Yields p_sample's {"sample", "pred_xstart"} after each of the T steps."""

        def step(model, x, t):
            return self.p_sample(
                model,
                x,
                t,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                model_kwargs=model_kwargs,
                generator=generator,
            )

        return self._loop(step, model, shape, noise, device, progress, generator, "DDPM")

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        *,
        clip_denoised=False,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T = noise (or a standard-normal draw) to x₀; returns x₀ (fp32)."""
        out = None
        for out in self.p_sample_loop_progressive(
            model,
            shape,
            noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            generator=generator,
        ):
            pass
        return out["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        *,
        clip_denoised=False,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
    ) -> Iterator[dict]:
        """Yields ddim_sample's {"sample", "pred_xstart"} after each of the T steps."""

        def step(model, x, t):
            return self.ddim_sample(
                model,
                x,
                t,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                model_kwargs=model_kwargs,
                eta=eta,
                generator=generator,
            )

        return self._loop(step, model, shape, noise, device, progress, generator, "DDIM")

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        *,
        clip_denoised=False,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
    ) -> torch.Tensor:
        """DDIM sampling from x_T to x₀ over this diffusion's T steps (respace it, e.g. "ddim50", for fewer)."""
        out = None
        for out in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
            generator=generator,
        ):
            pass
        return out["sample"]
