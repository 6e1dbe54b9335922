"""Parameters and forward GFLOPs of a DiT, in closed form (no model is built).

GFLOPs are forward multiply-adds per image, counted as the paper's Table 1 does: every matmul (patch
embedding, timestep MLP, qkv / projections / MLP, attention QKᵀ and AV, adaLN linears, final layer);
elementwise ops, norms and softmax are ignored. Parameters are those of `DiT.parameters()`: the fixed
sin-cos `pos_embed` is a buffer and not counted (the official code counts its T·D frozen values too).

    python -m ditscale.models.flops            # table of every preset at 256 and 512
"""

from __future__ import annotations

import argparse

from ditscale.models.dit import DIT_PRESETS, block_type, dit_config


def _shape(preset_or_kwargs, image_size, latent_channels, vae_factor):
    cfg = dit_config(preset_or_kwargs, image_size, latent_channels, vae_factor)
    d, p = cfg["hidden_size"], cfg["patch_size"]
    out = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)
    return cfg, d, int(d * cfg["mlp_ratio"]), p, out, (cfg["input_size"] // p) ** 2


def dit_params(preset_or_kwargs, image_size=256, latent_channels=4, vae_factor=8):
    """Number of parameters of the DiT given by a preset name or DiT kwargs."""
    cfg, d, m, p, out, _ = _shape(preset_or_kwargs, image_size, latent_channels, vae_factor)
    linear = lambda i, o: i * o + o
    head_dim = d // cfg["num_heads"]
    qk = {None: 0, "layernorm": 4 * head_dim, "rmsnorm": 2 * head_dim}[cfg["qk_norm"]]
    self_attn = linear(d, 3 * d) + linear(d, d) + qk
    block = self_attn + linear(d, m) + linear(m, d)
    kind = block_type(cfg["block"])
    if kind.conditioning == "adaln":
        block += linear(d, (6 if kind.gated else 4) * d)
        final = linear(d, 2 * d)
    else:
        block += 2 * 2 * d  # affine LayerNorms
        if kind.conditioning == "context":
            block += 2 * d + linear(d, d) + linear(d, 2 * d) + linear(d, d) + qk
        final = 2 * d
    embed = (p * p * cfg["in_channels"] * d + d) + linear(256, d) + linear(d, d)
    embed += (cfg["num_classes"] + int(cfg["class_dropout_prob"] > 0)) * d
    return embed + cfg["depth"] * block + final + linear(d, p * p * out)


def dit_gflops(preset_or_kwargs, image_size=256, latent_channels=4, vae_factor=8):
    """Forward multiply-adds per image, in units of 1e9 (the paper's "Gflops")."""
    cfg, d, m, p, out, t = _shape(preset_or_kwargs, image_size, latent_channels, vae_factor)
    kind = block_type(cfg["block"])
    seq = t + 2 if kind.conditioning == "tokens" else t
    block = seq * (4 * d * d + 2 * d * m) + 2 * seq * seq * d  # qkv+proj, MLP, QKᵀ and AV
    final = t * d * p * p * out
    if kind.conditioning == "adaln":
        block += (6 if kind.gated else 4) * d * d
        final += 2 * d * d
    elif kind.conditioning == "context":
        block += 2 * t * d * d + 2 * 2 * d * d + 2 * t * 2 * d  # q, proj; kv of 2 tokens; attention
    embed = t * p * p * cfg["in_channels"] * d + 256 * d + d * d
    return (embed + cfg["depth"] * block + final) / 1e9


def train_flops_per_image(preset_or_kwargs, image_size=256, latent_channels=4, vae_factor=8):
    """Model FLOPs of one training step per image (forward + backward = 3 × forward, 2 FLOPs per
    multiply-add), for MFU. Recomputation by activation checkpointing is not counted, by convention."""
    return 3 * 2 * dit_gflops(preset_or_kwargs, image_size, latent_channels, vae_factor) * 1e9


def preset_table(resolutions=(256, 512), latent_channels=4, vae_factor=8):
    """Markdown table: every preset's shape, parameters and forward GFLOPs at each resolution."""
    head = "| preset | depth | hidden | heads | params | " + " | ".join(f"GFLOPs@{r}" for r in resolutions) + " |"
    rows = [head, "|" + "---|" * (5 + len(resolutions))]
    for name, shape in DIT_PRESETS.items():
        n = dit_params(name, resolutions[0], latent_channels, vae_factor)
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        gf = " | ".join(f"{dit_gflops(name, r, latent_channels, vae_factor):.2f}" for r in resolutions)
        rows.append(f"| {name} | {shape['depth']} | {shape['hidden_size']} | {shape['num_heads']} | {size} | {gf} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ditscale.models.flops", description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--vae-factor", type=int, default=8, help="pixels per latent cell (1 = pixel space)")
    args = ap.parse_args(argv)
    print(preset_table(tuple(args.resolutions), args.latent_channels, args.vae_factor))


if __name__ == "__main__":
    main()
