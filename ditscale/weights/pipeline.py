"""A DiT as a diffusers DiTPipeline directory, and back.

About the exported pipeline (also written to its README.md):
- diffusers embeds timesteps slightly differently from DiT; `match_dit_timesteps` (done by `load_pipeline`)
  must be re-applied after every `DiTPipeline.from_pretrained`, as it is not part of diffusers' config.
- DiTPipeline guides all latent channels (our guide_channels=4; the paper guides 3) and hard-codes the
  null class id 1000, so its guidance (guidance_scale > 1) is only right for 1000-class models.
- Its scheduler is DDIM on our linear schedule with "leading" spacing: num_inference_steps=N walks the
  same steps as our sampler's "ddimN".
- That scheduler samples DDPM ε-prediction models only: a model trained with another objective (flow
  matching, x0-prediction) is refused on export, and the objective record written beside the pipeline
  (ditscale_objective.json) is checked again by `load_pipeline`.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

from ditscale.models import DiT
from ditscale.weights.load import preset_of

OBJECTIVE_FILE = "ditscale_objective.json"

_README = """# DiT exported by ditscale

    from ditscale.weights import load_pipeline
    pipe = load_pipeline("{dir}")          # DiTPipeline.from_pretrained(dir) + match_dit_timesteps
    images = pipe(class_labels=[207, 360], num_inference_steps=50, guidance_scale=4.0).images

With diffusers alone, call `ditscale.models.convert.match_dit_timesteps(pipe.transformer)` after every
`DiTPipeline.from_pretrained`: diffusers' DiT embeds timesteps with a slightly different frequency
convention, and that setting is not part of its saved config. Without it the outputs drift from the model.

Model: {model}; {num_classes} classes; VAE scaling_factor {scale}.
Guidance: DiTPipeline guides all {channels} latent channels (ditscale's guide_channels={channels}; the DiT paper
guides 3) and uses class id 1000 as the null class{null_note}.
Scheduler: DDIM, linear β 1e-4 … 2e-2 over 1000 steps, "leading" spacing (ditscale's "ddimN").
"""


def scheduler_for(noise_schedule: str = "linear", diffusion_steps: int = 1000):
    """A diffusers DDIMScheduler on our schedule; its N-step walk equals our "ddimN" respacing."""
    from diffusers import DDIMScheduler

    names = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
    if noise_schedule not in names:
        raise ValueError(f"unknown noise_schedule {noise_schedule!r}; choose linear or cosine")
    scale = 1000.0 / diffusion_steps  # as ditscale's linear_betas
    return DDIMScheduler(
        num_train_timesteps=diffusion_steps,
        beta_schedule=names[noise_schedule],
        beta_start=scale * 1e-4,
        beta_end=scale * 2e-2,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def export_diffusers(
    model: DiT,
    out_dir,
    *,
    vae,
    scale_factor=None,
    class_names=None,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    objective: dict | None = None,
):
    """Write `model` as a DiTPipeline directory (transformer, vae, scheduler, id2label) that
    `DiTPipeline.from_pretrained(out_dir)` loads offline. vae: a local AutoencoderKL directory or module
    (copied; its scaling_factor set to `scale_factor` when given). objective: the model's training
    objective record (None: the paper's DDPM); its noise schedule and steps override the arguments, and
    anything but DDPM ε-prediction is refused (DiTPipeline's scheduler samples nothing else). Returns the
    output Path."""
    from ditscale.objectives import check_record

    record = check_record(objective, "ddpm", "the model")
    if record.get("prediction") != "epsilon":
        raise ValueError(
            f"the model predicts {record.get('prediction')!r}: DiTPipeline's scheduler is set up for "
            "'epsilon' prediction only"
        )

    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    from ditscale.files import follow_umask
    from ditscale.models.convert import diffusers_config_for, official_to_diffusers
    from ditscale.sampling.core import load_vae

    noise_schedule = record.get("noise_schedule", noise_schedule)
    diffusion_steps = record.get("diffusion_steps", diffusion_steps)
    if isinstance(vae, AutoencoderKL):
        vae = copy.deepcopy(vae)  # scaling_factor may change
    elif vae is None or str(vae) == "none":
        raise ValueError("DiTPipeline needs a VAE: pixel-space models cannot be exported to it")
    else:
        vae = load_vae(vae)
    if vae.config.latent_channels != model.in_channels:
        raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels, the model {model.in_channels}")
    if scale_factor is not None:
        values = [float(s) for s in (scale_factor if isinstance(scale_factor, (list, tuple)) else [scale_factor])]
        if len(set(values)) != 1:
            raise ValueError(
                f"per-channel scale_factor {values} cannot be exported: DiTPipeline divides the "
                "latents by one vae.config.scaling_factor"
            )
        vae.register_to_config(scaling_factor=values[0])
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model of {model.num_classes} classes")
    if model.num_classes != 1000:
        warnings.warn(
            f"model has {model.num_classes} classes: DiTPipeline's guidance uses class id 1000 as "
            "the null class, so call the exported pipeline with guidance_scale=1",
            stacklevel=2,
        )

    cfg = diffusers_config_for(model.config)
    transformer = DiTTransformer2DModel(**cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    transformer.load_state_dict(official_to_diffusers(sd, cfg), strict=True)
    id2label = {str(i): str(n) for i, n in enumerate(class_names)} if class_names is not None else None
    pipe = DiTPipeline(
        transformer=transformer.eval(), vae=vae, scheduler=scheduler_for(noise_schedule, diffusion_steps)
    )
    pipe.register_to_config(id2label=id2label)
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    follow_umask(*out_dir.rglob("*.safetensors"))
    record = {**record, "noise_schedule": noise_schedule, "diffusion_steps": diffusion_steps}
    (out_dir / OBJECTIVE_FILE).write_text(json.dumps(record, indent=1))
    (out_dir / "README.md").write_text(
        _README.format(
            dir=out_dir,
            model=preset_of(model.config) or "custom DiT",
            num_classes=model.num_classes,
            scale=vae.config.scaling_factor,
            channels=model.in_channels,
            null_note="" if model.num_classes == 1000 else " (this model has other class counts: use guidance_scale=1)",
        )
    )
    return out_dir


def load_pipeline(path, **kwargs):
    """DiTPipeline.from_pretrained on a local directory (no download), with `match_dit_timesteps` applied;
    ObjectiveMismatch (a ValueError) when the directory records a model trained with another objective."""
    from ditscale.objectives import check_record

    if not Path(path).is_dir():
        raise ValueError(f"{path} is not a local DiTPipeline directory")
    recorded = Path(path) / OBJECTIVE_FILE
    try:
        record = json.loads(recorded.read_text()) if recorded.is_file() else None
    except ValueError as e:
        raise ValueError(f"{recorded}: not valid JSON ({e})") from None
    check_record(record, "ddpm", str(path))

    from diffusers import DiTPipeline

    from ditscale.models.convert import match_dit_timesteps

    pipe = DiTPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
    match_dit_timesteps(pipe.transformer)
    return pipe
