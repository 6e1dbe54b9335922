"""Class-conditional sampling with classifier-free guidance: noise → latents → images.

Noise comes from one of two sources:
- a `torch.Generator` for the whole batch: x_T, then one (N, C, H, W) draw per noisy step, in the order of
  the diffusion's own `p_sample_loop`, which this reproduces exactly without guidance;
- per-sample `seeds`: sample i draws all its noise (x_T and every step's) from its own generator, on the
  CPU, so it depends on nothing but its seed: not on the batch it lands in, the rank, or the device.
  `index_seeds(seed, indices)` derives those seeds from (run seed, sample index).

Guidance runs the model on the doubled batch [x; x] with labels [y; null] (ditscale.diffusion.guidance)
and keeps the first half, so the sampler's state and arithmetic stay at batch N.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ditscale.diffusion import cfg_wrapper, create_diffusion, prepare_cfg_inputs, space_timesteps
from ditscale.sampling.registry import Plan, check_fits, make_plan, sampler_info

COMPILE_MODES = (False, True, "blocks", "step", "step-cudagraphs")


class SamplingInterrupted(Exception):
    """`should_stop()` answered True before a sampler step (e.g. a stop signal during a sample grid)."""


# --------------------------------------------------------------------------------------------------
# Schedules, seeds, labels
# --------------------------------------------------------------------------------------------------


def respacing_for(sampler: str, steps: int, diffusion_steps: int = 1000) -> str:
    """The timestep_respacing spec of `steps` sampling steps: DDIM takes every k-th step ("ddimN", as
    diffusers' DDIMScheduler with "leading" spacing) when some stride gives exactly N, otherwise, like
    DDPM, N steps spread evenly over the T training steps (ADM's spacing)."""
    check_fits(sampler, "ddpm")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= diffusion_steps:
        raise ValueError(f"steps must be an int in 1..{diffusion_steps}, got {steps!r}")
    if sampler == "ddim":
        with contextlib.suppress(ValueError):
            space_timesteps(diffusion_steps, f"ddim{steps}")
            return f"ddim{steps}"
    return str(steps)


def sampling_diffusion(
    sampler="ddpm",
    steps=250,
    *,
    respacing=None,
    learn_sigma=True,
    noise_schedule="linear",
    diffusion_steps=1000,
    predict_xstart=False,
    sigma_small=False,
):
    """The respaced diffusion a sampler walks (the paper's linear schedule over 1000 steps by default);
    predict_xstart / sigma_small: the model's prediction (x0 instead of ε) and fixed variance (β̃ instead of
    β, for learn_sigma=False), as trained."""
    spec = respacing if respacing else respacing_for(sampler, steps, diffusion_steps)
    return create_diffusion(
        spec,
        noise_schedule=noise_schedule,
        learn_sigma=learn_sigma,
        diffusion_steps=diffusion_steps,
        predict_xstart=predict_xstart,
        sigma_small=sigma_small,
    )


def _index_states(seed: int, indices) -> np.ndarray:
    """(len(indices), 2) uint64 words from SeedSequence((seed, i)): [noise seed, label word]."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return np.array(
        [np.random.SeedSequence((int(seed), int(i))).generate_state(2, np.uint64) for i in indices], dtype=np.uint64
    ).reshape(-1, 2)


def index_seeds(seed: int, indices) -> list[int]:
    """Per-sample noise seeds for sample indices under run seed `seed` (independent streams)."""
    return [int(s) for s in _index_states(seed, indices)[:, 0]]


def index_labels(seed: int, indices, num_classes: int, mode: str = "balanced") -> np.ndarray:
    """Labels (int64) of sample indices: "balanced" i mod num_classes (exactly N / num_classes per class
    when it divides), "random" uniform from each index's own seed. Neither depends on N or the rank."""
    indices = np.asarray(list(indices), dtype=np.int64)
    if mode == "balanced":
        return indices % num_classes
    if mode == "random":
        return (_index_states(seed, indices)[:, 1] % np.uint64(num_classes)).astype(np.int64)
    raise ValueError(f"unknown label mode {mode!r}; choose 'balanced' or 'random'")


# --------------------------------------------------------------------------------------------------
# Noise sources: noise(k) is x_T for k = 0, else the noise of the k-th noisy step
# --------------------------------------------------------------------------------------------------


def generator_noise(shape, generator=None, device=None) -> Callable[[int], torch.Tensor]:
    """Draws from `generator` (the global RNG if None) on its device, lazily, in call order."""
    device = generator.device if generator is not None else torch.device(device or "cpu")
    return lambda k: torch.randn(*shape, generator=generator, device=device)


def seeded_noise(seeds, shape, num_draws: int, device=None) -> Callable[[int], torch.Tensor]:
    """Sample i's num_draws noise tensors come from one CPU generator seeded with seeds[i]: a single
    (num_draws, C, H, W) draw, moved to `device`. Memory: N · num_draws · C·H·W floats."""
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    table = torch.stack(
        [torch.randn(num_draws, *shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds], dim=1
    ).to(device or "cpu")  # (K, N, C, H, W)
    return lambda k: table[k]


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


def sampling_process(objective, sampler: str, steps: int = 250, respacing: str | None = None):
    """What `sampler` walks for a model trained with `objective` (an Objective, a record dict, or None for
    the paper's DDPM): the respaced diffusion for ddpm / ddim, the FlowObjective itself for flow samplers.
    A sampler of another objective kind is a ValueError naming the samplers that fit."""
    from ditscale.objectives import Objective, objective_from_record

    if not isinstance(objective, Objective):
        objective = objective_from_record(objective)
    check_fits(sampler, objective.kind)
    if objective.kind == "flow":
        return objective
    s = objective.settings
    return sampling_diffusion(
        sampler,
        steps,
        respacing=respacing,
        learn_sigma=s["learn_sigma"],
        noise_schedule=s["noise_schedule"],
        diffusion_steps=s["diffusion_steps"],
        predict_xstart=s["predict_xstart"],
        sigma_small=s["sigma_small"],
    )


@dataclass
class GuidedSampler:
    """Any registered sampler (ditscale.sampling.registry) with classifier-free guidance around a
    class-conditional `model`.

    process: what the sampler walks (`sampling_process`): a respaced diffusion (ddpm, ddim: its
    num_timesteps steps) or a FlowObjective (flow samplers: `steps` steps). cfg_scale 1 runs the conditional
    model alone; any other scale (≥ 0) guides the first `guide_channels` output channels (3 as the paper, 4
    or "all"); cfg_interval (lo, hi) guides only steps whose noise fraction (1 = pure noise, 0 = data; DDPM
    (t + 1)/T, flow 1 − t) lies in [lo, hi], the others run the conditional model alone (Kynkäänniemi et
    al. 2024). autocast: a dtype (torch.bfloat16 on GPU) for the model calls, or None. compile (each
    compiles once per batch shape, on the first call):
      "blocks" (or True): regional compilation, every transformer block of the model in place
                          (`block.compile()`); one compilation serves all blocks, so it is quick;
      "step":             the whole step (model, guidance, update) as one graph (fixed-step samplers);
      "step-cudagraphs":  the same, replayed as a CUDA graph (mode "reduce-overhead").
    """

    model: torch.nn.Module
    process: object
    sampler: str = "ddpm"
    cfg_scale: float = 4.0
    guide_channels: int | str = 3
    eta: float = 0.0
    autocast: torch.dtype | None = None
    compile: bool | str = False
    steps: int | None = None
    cfg_interval: tuple[float, float] | None = None
    options: dict | None = None
    plan: Plan = field(init=False, repr=False)

    def __post_init__(self):
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        if not 0 <= self.eta <= 1 or (self.eta and self.sampler != "ddim"):
            raise ValueError(
                f"eta must be in [0, 1] and is only for the ddim sampler, got eta={self.eta} "
                f"with sampler={self.sampler!r}; not both"
            )
        if self.cfg_interval is not None:
            lo, hi = self.cfg_interval
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"cfg_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if self.guided and getattr(getattr(self.model, "y_embedder", None), "dropout_prob", 1) == 0:
            raise ValueError(
                "the model has no null class (trained with class_dropout_prob=0): classifier-free "
                "guidance needs one; use cfg_scale=1"
            )
        self.plan = make_plan(self.sampler, self.process, self.steps, eta=self.eta, options=self.options)
        if self.guided:
            self._cfg = cfg_wrapper(self.model, self.cfg_scale, self.guide_channels)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.compile in ("step", "step-cudagraphs") and self.plan.adaptive:
            raise ValueError(f"compile={self.compile!r} needs a fixed-step sampler, not {self.sampler!r}; use 'blocks'")
        if self.compile in (True, "blocks"):
            for block in self.model.blocks:
                block.compile()
        mode = "reduce-overhead" if self.compile == "step-cudagraphs" else None
        wrap = (
            (lambda f: torch.compile(f, mode=mode, dynamic=False))
            if self.compile in ("step", "step-cudagraphs")
            else (lambda f: f)
        )
        self._steps = {"step": wrap(self._bind(self.plan.step))}
        if self.plan.final is not None:
            self._steps["final"] = wrap(self._bind(self.plan.final))

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1

    @property
    def noisy(self) -> bool:
        """Whether steps add noise (DDPM, DDIM with η > 0, SDEs)."""
        return any(self.plan.noisy_steps)

    @property
    def num_draws(self) -> int:
        """Noise tensors a sample needs: the starting noise, plus one per noisy step."""
        return self.plan.num_draws

    def latent_shape(self, n: int) -> tuple[int, ...]:
        return (n, self.model.in_channels, self.model.input_size, self.model.input_size)

    def _guides_at(self, time) -> bool:
        if not self.guided:
            return False
        if self.cfg_interval is None:
            return True
        lo, hi = self.cfg_interval
        return lo <= self.plan.noise_fraction(time) <= hi

    def _model(self, x, t, y, guide):
        """The model's output for x (N, C, H, W) at model times t, guided when `guide` (None: decided from t,
        for solvers that pick their own times)."""
        if guide is None:
            guide = self._guides_at(t.reshape(-1)[0].item())
        amp = torch.autocast(x.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with amp:
            if not guide:
                return self.model(x, t, y=y)
            x2, y2 = prepare_cfg_inputs(x, y, self.model.num_classes)  # (2N, …), (2N,)
            return self._cfg(x2, torch.cat([t, t]), y=y2)[: x.shape[0]]

    def _bind(self, step):
        """step(model_fn, x, t, t_next, noise) → f(x, t, t_next, noise, y, guide)."""
        return lambda x, t, t_next, noise, y, guide: step(
            lambda x_, t_: self._model(x_, t_, y, guide), x, t, t_next, noise
        )

    def _prime(self, x, labels):
        """Let a diffusion fill its per-device tables eagerly (a dummy model call), so that a compiled step
        does not see them appear and recompile."""
        if not hasattr(self.process, "p_mean_variance"):
            return
        channels = x.shape[1] * (2 if self.process.learn_sigma else 1)
        dummy = lambda x, t, **_: x.new_zeros(x.shape[0], channels, *x.shape[2:])
        self.process.p_mean_variance(dummy, x, torch.zeros_like(labels), model_kwargs={"y": labels})

    @torch.no_grad()
    def __call__(
        self,
        noise: Callable[[int], torch.Tensor],
        labels: torch.Tensor,
        progress=False,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Latents (N, C, H, W) fp32 from the noise source; labels (N,) int64 on the sampling device.
        should_stop: asked before every step; True raises SamplingInterrupted."""
        x = noise(0).float()
        n, device = x.shape[0], x.device
        labels = labels.to(device)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        zeros = torch.zeros_like(x)
        self._prime(x, labels)
        plan, draws = self.plan, 0
        steps = range(plan.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=self.sampler.upper(), unit="step", leave=False)
        for k in steps:
            if should_stop is not None and should_stop():
                raise SamplingInterrupted(f"stopped before step {k + 1} of {plan.num_steps}")
            t = torch.full((n,), plan.times[k], device=device, dtype=plan.time_dtype)
            t_next = torch.full((n,), plan.times[k + 1], device=device, dtype=plan.time_dtype)
            if plan.noisy_steps[k]:
                draws += 1
                z = noise(draws)
            else:
                z = zeros
            guide = None if plan.adaptive else self._guides_at(plan.times[k])
            step = self._steps["final" if plan.final is not None and k == plan.num_steps - 1 else "step"]
            if self.compile == "step-cudagraphs":
                torch.compiler.cudagraph_mark_step_begin()
                x = step(x, t, t_next, z, labels, guide).clone()  # outlive the graph's buffer
            else:
                x = step(x, t, t_next, z, labels, guide)
        return x


def sample_latents(
    model,
    process=None,
    labels=None,
    *,
    cfg_scale=4.0,
    guide_channels=3,
    sampler="ddpm",
    steps=None,
    eta=0.0,
    generator=None,
    seeds=None,
    device=None,
    autocast=None,
    compile=False,
    progress=False,
    objective=None,
    cfg_interval=None,
    options=None,
    should_stop=None,
) -> torch.Tensor:
    """Latents (N, C, H, W) fp32 for class `labels` (N,) from `model` (a DiT, in eval mode).

    process: what to walk (`sampling_process`), or None to build it from `objective` (an Objective or a
    checkpoint's record; None: the paper's DDPM with the model's learn_sigma) for `sampler` and `steps`
    (default 250 for ddpm / ddim, 50 for flow samplers); `steps`, if given with a respaced diffusion,
    must equal its num_timesteps. Noise: `seeds` (one int per sample, see `index_seeds`) or `generator`
    (None: the global RNG). device: default the model's. autocast: e.g. torch.bfloat16 on GPU.
    should_stop: asked before every sampler step; True raises SamplingInterrupted.
    """
    if labels is None:
        raise ValueError("labels are required: class ids (N,)")
    flow = sampler_info(sampler).kind == "flow"
    if process is None:
        if objective is None:
            objective = {"kind": "ddpm", "prediction": "epsilon", "learn_sigma": model.learn_sigma}
        process = sampling_process(objective, sampler, steps or (50 if flow else 250))
    elif not flow and steps is not None and steps != process.num_timesteps:
        raise ValueError(f"steps={steps} but the diffusion given has {process.num_timesteps} steps")
    if seeds is not None and generator is not None:
        raise ValueError("pass seeds= or generator=, not both")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
    run = GuidedSampler(
        model,
        process,
        sampler,
        cfg_scale,
        guide_channels,
        eta,
        autocast,
        compile,
        steps=(steps or 50) if flow else None,
        cfg_interval=cfg_interval,
        options=options,
    )
    shape = run.latent_shape(len(labels))
    if seeds is not None:
        noise = seeded_noise(list(seeds), shape, run.num_draws, device)
    else:
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, sampling on {device}")
        noise = generator_noise(shape, generator, device)
    return run(noise, labels, progress=progress, should_stop=should_stop)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def load_vae(path, device="cpu"):
    """A diffusers AutoencoderKL from a local directory (save_pretrained layout); never downloads."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    if not Path(path).is_dir():
        raise ValueError(
            f"VAE {path!r} is not a local directory: give a diffusers AutoencoderKL saved with "
            "save_pretrained (nothing is downloaded), or 'none' for pixel-space models"
        )
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"VAE {path}: cannot load a diffusers AutoencoderKL from it ({e})") from e
    return vae.eval().to(device)


def _scale_tensor(scale_factor, channels, like):
    scale = torch.as_tensor(scale_factor, dtype=torch.float32, device=like.device).reshape(-1)
    if scale.numel() not in (1, channels):
        raise ValueError(f"scale_factor has {scale.numel()} values for {channels} latent channels")
    return scale.reshape(1, -1, 1, 1)


@torch.no_grad()
def decode(latents, vae=None, scale_factor=1.0, batch_size=16) -> torch.Tensor:
    """Images (N, 3, H, W) fp32, nominally in [-1, 1]: vae.decode(latents / scale_factor), in fp32 and in
    batches of `batch_size`; with vae None (pixel mode) the latents / scale_factor are the images (one
    channel is repeated to grey RGB). scale_factor: a float or one per latent channel."""
    x = latents.float() / _scale_tensor(scale_factor, latents.shape[1], latents)
    if vae is None:
        if x.shape[1] not in (1, 3):
            raise ValueError(
                f"pixel-mode latents must have 1 or 3 channels, got {x.shape[1]} (latent-space models need a VAE)"
            )
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x
    vae_dtype = next(vae.parameters()).dtype
    parts = [vae.decode(chunk.to(vae_dtype)).sample.float() for chunk in x.split(batch_size)]
    return torch.cat(parts)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8, as the official DiT / ADM samplers round."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
