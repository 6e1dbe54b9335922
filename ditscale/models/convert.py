"""Official DiT state dicts (ours, facebookresearch/DiT's) ⇄ diffusers' DiTTransformer2DModel.

    cfg = diffusers_config_for("DiT-XL/2", image_size=256)
    hf = DiTTransformer2DModel(**cfg)
    hf.load_state_dict(official_to_diffusers(model.state_dict(), cfg))
    match_dit_timesteps(hf)          # reproduce DiT exactly (see 1.)

What an export to diffusers changes:
1. Timestep frequencies. diffusers embeds t with exp(-ln(10000)·i/(half-1)) (its `Timesteps` with
   downscale_freq_shift=1); DiT divides by half. As exported, the diffusers model therefore computes a
   slightly different function (max abs output difference ~0.02 on DiT-S/2 with N(0, 0.02) random
   weights, more with larger ones). `match_dit_timesteps(model)` sets downscale_freq_shift=0 in every
   block, after which outputs agree (bit-identical in our fp32 CPU tests). The setting is not part of
   diffusers' config: set it again after every `from_pretrained`.
2. Duplicated embedders. diffusers gives every block its own timestep MLP and label table
   (transformer_blocks.N.norm1.emb) and conditions its final layer on block 0's; DiT shares one. Export
   copies them into every block (+2.8M parameters per block for XL/2). Import requires all blocks' copies
   to be equal and refuses otherwise: a diffusers model trained with distinct per-block embedders has no
   DiT equivalent.
3. LayerNorm eps. `diffusers_config_for` sets norm_eps=1e-6 as in DiT; diffusers' default 1e-5 (used by the
   hub's facebook/DiT-XL-2-* configs) changes the pre-MLP norm slightly.
4. pos_embed. diffusers does not store it (it recomputes the same sin-cos table, in fp32); import rebuilds
   it from the config's sample_size and patch_size.
5. Null class. diffusers always has num_classes + 1 label rows; a DiT trained with class_dropout_prob=0 (no
   null row) is exported with a zero null row.
Only the adaLN-Zero block with mlp_ratio 4 and no q/k normalisation exists in diffusers. The adaLN
chunk order is the same on both sides (shift, scale, gate for attention, then for the MLP).
"""

from __future__ import annotations

import torch

from ditscale.models.dit import dit_config, get_2d_sincos_pos_embed

_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_EMB = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
}
_LABELS = ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight")
_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
_WB = ("weight", "bias")


def diffusers_config_for(preset_or_kwargs, image_size=256, latent_channels=4, vae_factor=8):
    """DiTTransformer2DModel kwargs for a DiT preset name or DiT kwargs (e.g. `model.config`)."""
    cfg = dit_config(preset_or_kwargs, image_size, latent_channels, vae_factor)
    for key, ok, why in (
        ("block", "adaln_zero", "diffusers has only the adaLN-Zero block"),
        ("mlp_ratio", 4.0, "diffusers' FeedForward is 4 × hidden"),
        ("qk_norm", None, "diffusers' DiT has no q/k normalisation"),
    ):
        if cfg[key] != ok:
            raise ValueError(f"cannot export {key}={cfg[key]!r} to diffusers: {why}")
    return dict(
        num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=cfg["in_channels"],
        out_channels=cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1),
        num_layers=cfg["depth"],
        sample_size=cfg["input_size"],
        patch_size=cfg["patch_size"],
        num_embeds_ada_norm=cfg["num_classes"],
        norm_eps=1e-6,
        dropout=0.0,
        attention_bias=True,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )


def match_dit_timesteps(model):
    """Make a diffusers DiTTransformer2DModel embed timesteps as DiT does (frequencies ÷ half). In place."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def _cfg(config, key):
    try:
        return config[key]
    except KeyError:
        raise ValueError(
            f"config lacks {key!r}: pass DiTTransformer2DModel kwargs (diffusers_config_for(...) or model.config)"
        ) from None


def _check_keys(sd, expected, what):
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"not a {what} state dict of this config: missing {missing[:6]}"
            f"{' …' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{' …' if len(unexpected) > 6 else ''}"
        )


def _official_keys(depth):
    keys = [f"{k}.{wb}" for k in [*_TOP, *_EMB] for wb in _WB] + [_LABELS[0], "pos_embed"]
    per_block = [*_BLOCK, "attn.qkv"]
    return keys + [f"blocks.{i}.{k}.{wb}" for i in range(depth) for k in per_block for wb in _WB]


def _diffusers_keys(depth):
    keys = [f"{k}.{wb}" for k in _TOP.values() for wb in _WB]
    per_block = [*_BLOCK.values(), *_EMB.values(), *_QKV]
    return keys + [
        f"transformer_blocks.{i}.{k}"
        for i in range(depth)
        for k in [f"{m}.{wb}" for m in per_block for wb in _WB] + [_LABELS[1]]
    ]


def official_to_diffusers(sd, config):
    """Official-layout DiT state dict → DiTTransformer2DModel state dict for `config` (its kwargs)."""
    depth, num_classes = _cfg(config, "num_layers"), _cfg(config, "num_embeds_ada_norm")
    _check_keys(sd, _official_keys(depth), "official DiT (adaLN-Zero, no qk_norm)")
    table = sd[_LABELS[0]]
    if table.shape[0] == num_classes:
        table = torch.cat([table, table.new_zeros(1, table.shape[1])])
    elif table.shape[0] != num_classes + 1:
        raise ValueError(
            f"{_LABELS[0]} has {table.shape[0]} rows; config num_embeds_ada_norm={num_classes} "
            f"expects {num_classes + 1} (classes + null)"
        )
    out = {f"{new}.{wb}": sd[f"{old}.{wb}"] for old, new in _TOP.items() for wb in _WB}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for wb in _WB:
            out.update({f"{dst}{new}.{wb}": sd[f"{src}{old}.{wb}"] for old, new in _BLOCK.items()})
            out.update({f"{dst}{new}.{wb}": sd[f"{old}.{wb}"].clone() for old, new in _EMB.items()})
            q, k, v = sd[f"{src}attn.qkv.{wb}"].chunk(3)
            out.update({f"{dst}{name}.{wb}": z.clone() for name, z in zip(_QKV, (q, k, v))})
        out[dst + _LABELS[1]] = table.clone()
    return out


def diffusers_to_official(sd, config):
    """DiTTransformer2DModel state dict (kwargs `config`) → official-layout DiT state dict. Raises if the
    blocks' embedders differ (DiT has one shared timestep MLP and label table)."""
    depth = _cfg(config, "num_layers")
    _check_keys(sd, _diffusers_keys(depth), "diffusers DiTTransformer2DModel")
    shared = [*(f"{k}.{wb}" for k in _EMB.values() for wb in _WB), _LABELS[1]]
    for i in range(1, depth):
        for key in shared:
            if not torch.equal(sd[f"transformer_blocks.{i}.{key}"], sd[f"transformer_blocks.0.{key}"]):
                raise ValueError(
                    f"transformer_blocks.{i}.{key} differs from block 0's: DiT shares one timestep "
                    "and label embedder, so per-block embedders cannot be converted"
                )
    out = {f"{old}.{wb}": sd[f"{new}.{wb}"] for old, new in _TOP.items() for wb in _WB}
    out.update({f"{old}.{wb}": sd[f"transformer_blocks.0.{new}.{wb}"] for old, new in _EMB.items() for wb in _WB})
    out[_LABELS[0]] = sd["transformer_blocks.0." + _LABELS[1]]
    hidden = out["x_embedder.proj.weight"].shape[0]
    grid = _cfg(config, "sample_size") // _cfg(config, "patch_size")
    out["pos_embed"] = get_2d_sincos_pos_embed(hidden, grid).to(out["x_embedder.proj.weight"].dtype).unsqueeze(0)
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for wb in _WB:
            out.update({f"{dst}{old}.{wb}": sd[f"{src}{new}.{wb}"] for old, new in _BLOCK.items()})
            out[f"{dst}attn.qkv.{wb}"] = torch.cat([sd[f"{src}{name}.{wb}"] for name in _QKV])
    return out
