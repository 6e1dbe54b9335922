"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023), as the paper and its code define it.

State dicts use the layout of the official release (facebookresearch/DiT models.py), so its checkpoints
(DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) load with `load_state_dict(strict=True)` for the default
adaLN-Zero block. Beyond the release:
- the paper's other conditioning blocks (Figure 5): `block="in_context" | "cross_attention" | "adaln"`,
  block types registered by name in `BLOCKS` (`register_block`);
- the module works when cast whole to bf16 (inputs and timestep frequencies follow the parameter dtype);
- per-block activation checkpointing (`checkpoint_every`, `set_checkpointing`);
- optional per-head q/k normalisation (`qk_norm`) for bf16 stability at scale (adds q_norm/k_norm keys);
- presets beyond XL (~1B, 3B, 7B parameters).
Forward has no host syncs and compiles without graph breaks. Classifier-free guidance lives in
`ditscale.diffusion`; the null class id is `num_classes`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

QK_NORMS = (None, "layernorm", "rmsnorm")


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _linear(d_in, d_out, init="xavier"):
    """nn.Linear tagged with its initialisation ("xavier", "normal" = N(0, 0.02), "zeros"); see `_init_module`."""
    layer = nn.Linear(d_in, d_out, bias=True)
    layer.dit_init = init
    return layer


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Scalar timesteps → (N, D): 256 sinusoidal frequencies exp(-ln(10000)·i/128), then Linear-SiLU-Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            _linear(frequency_embedding_size, hidden_size, "normal"),
            nn.SiLU(),
            _linear(hidden_size, hidden_size, "normal"),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) int or float timesteps → (N, dim) fp32 [cos | sin] features (GLIDE / official DiT)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(embedding, (0, dim % 2))

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels → (N, D). With dropout_prob > 0 the table has a null row (id num_classes), which
    training-time label dropout and `force_drop_ids` (1 = drop) substitute, for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if force_drop_ids is not None and self.dropout_prob == 0:
            raise ValueError("force_drop_ids needs the null class, which exists only with class_dropout_prob > 0")
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → linear projection (a stride-p conv): (N, C, H, W) → (N, T, D)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head attention through SDPA. Self-attention (fused `qkv`, as timm) or, with cross=True,
    cross-attention from x to a context sequence (`q`, `kv`). Optional per-head q/k normalisation."""

    def __init__(self, dim, num_heads, qk_norm=None, cross=False):
        super().__init__()
        self.num_heads = num_heads
        if cross:
            self.q, self.kv = _linear(dim, dim), _linear(dim, 2 * dim)
        else:
            self.qkv = _linear(dim, 3 * dim)
        head_dim = dim // num_heads
        norm = {None: nn.Identity, "layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}[qk_norm]
        self.q_norm = norm(head_dim, eps=1e-6) if qk_norm else norm()
        self.k_norm = norm(head_dim, eps=1e-6) if qk_norm else norm()
        self.proj = _linear(dim, dim)

    def forward(self, x, context=None):
        if context is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # (N, T, D) each
        else:
            q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)  # (N, T, D), (N, S, D)
        q, k, v = (z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for z in (q, k, v))  # (N, h, T, d)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).flatten(2))  # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = _linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = _linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN block: shift/scale regressed from c = t + y; with gated=True (adaLN-Zero) also the residual
    gates α, all zero-initialised so the block starts as the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=None, gated=True):
        super().__init__()
        self.gated = gated
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        n_mod = 6 if gated else 4
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), _linear(hidden_size, n_mod * hidden_size, "zeros" if gated else "xavier")
        )

    def forward(self, x, c):
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class ViTBlock(nn.Module):
    """Standard pre-LN ViT block, used unmodified by in-context conditioning; with cross_attention=True a
    multi-head cross-attention over the condition tokens [t, y] follows self-attention (paper §3.2)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=None, cross_attention=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads, qk_norm, cross=True)
        self.cross_attention = cross_attention
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c):
        x = x + self.attn(self.norm1(x))
        if self.cross_attention:
            x = x + self.cross_attn(self.norm_cross(x), c)  # c: (N, 2, D)
        return x + self.mlp(self.norm2(x))


#################################################################################
#                                  Block Types                                  #
#################################################################################

CONDITIONINGS = ("adaln", "context", "tokens")


@dataclass(frozen=True)
class BlockType:
    """A conditioning variant: `make(hidden_size, num_heads, mlp_ratio, qk_norm)` builds one block, called
    as block(x (N, T, D), c). How DiT hands it the condition:
    - "adaln": c = t + y (N, D) regresses shift/scale in every block and in the final layer; `gated`
      adds the residual gates, zero-initialised with the final modulation (adaLN-Zero);
    - "context": c = [t, y] (N, 2, D) for cross-attention, plain final layer;
    - "tokens": [t, y] prepended to the sequence (N, T+2, D), c = None, plain final layer."""

    make: Callable[[int, int, float, str | None], nn.Module]
    conditioning: str
    gated: bool = False

    def __post_init__(self):
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"BlockType: conditioning {self.conditioning!r} is not one of {CONDITIONINGS}")


BLOCKS: dict[str, BlockType] = {}


def register_block(name: str, block_type: BlockType) -> BlockType:
    if name in BLOCKS:
        raise ValueError(f"DiT block type {name!r} is already registered")
    BLOCKS[name] = block_type
    return block_type


def block_type(name: str) -> BlockType:
    if name not in BLOCKS:
        raise ValueError(f"DiT: unknown block {name!r}; choose one of {', '.join(BLOCKS)}")
    return BLOCKS[name]


register_block("adaln_zero", BlockType(lambda d, h, r, q: DiTBlock(d, h, r, q, gated=True), "adaln", gated=True))
register_block("adaln", BlockType(lambda d, h, r, q: DiTBlock(d, h, r, q, gated=False), "adaln"))
register_block("cross_attention", BlockType(lambda d, h, r, q: ViTBlock(d, h, r, q, cross_attention=True), "context"))
register_block("in_context", BlockType(lambda d, h, r, q: ViTBlock(d, h, r, q, cross_attention=False), "tokens"))


class FinalLayer(nn.Module):
    """Layer norm (adaptive for the adaLN blocks, plain otherwise) + linear decoder to p·p·out_channels.
    The decoder is zero-initialised for every block type, as in the official code."""

    def __init__(self, hidden_size, patch_size, out_channels, adaptive=True, zero_modulation=True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = _linear(hidden_size, patch_size * patch_size * out_channels, "zeros")
        if adaptive:
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(), _linear(hidden_size, 2 * hidden_size, "zeros" if zero_modulation else "xavier")
            )
        self.adaptive = adaptive

    def forward(self, x, c):
        x = self.norm_final(x)
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)  # (N, T, p*p*out)


def _init_module(module):
    """Official DiT initialisation, one module at a time (so DeepSpeed zero.Init's patched
    `Module.apply` can gather each module's shards): xavier-uniform linears with zero bias, unless tagged
    "normal" (timestep MLP) or "zeros" (adaLN-Zero modulation, final decoder); the patch projection like a
    linear; label table N(0, 0.02); affine norms to identity. Also what makes `to_empty` + re-init work."""
    if isinstance(module, nn.Linear):
        init = getattr(module, "dit_init", "xavier")
        if init == "zeros":
            nn.init.zeros_(module.weight)
        elif init == "normal":
            nn.init.normal_(module.weight, std=0.02)
        else:
            nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)  # PyTorch's default, kept by official
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
        module.reset_parameters()


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone. forward(x (N, C, H, W), t (N,), y (N,)) →
    (N, 2C, H, W) with learn_sigma (ε then the variance interpolation v), else (N, C, H, W)."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        block="adaln_zero",
        qk_norm=None,
        checkpoint_every=0,
    ):
        super().__init__()
        self.config = dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            block=block,
            qk_norm=qk_norm,
        )
        validate_config(self.config)
        self.input_size, self.patch_size, self.block = input_size, patch_size, block
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes = learn_sigma, num_classes

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, grid).float().unsqueeze(0))  # (1, T, D)

        kind = block_type(block)
        self.conditioning = kind.conditioning
        self.blocks = nn.ModuleList([kind.make(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(
            hidden_size,
            patch_size,
            self.out_channels,
            adaptive=kind.conditioning == "adaln",
            zero_modulation=kind.gated,
        )
        self.set_checkpointing(checkpoint_every)
        self.initialize_weights()

    def initialize_weights(self):
        """(Re)initialise as the official code does; also refills the fixed sin-cos `pos_embed`
        (e.g. after `to_empty` from the meta device)."""
        self.apply(_init_module)
        grid = self.input_size // self.patch_size
        with torch.no_grad():
            table = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid).unsqueeze(0)
            self.pos_embed.copy_(table.to(self.pos_embed.device, self.pos_embed.dtype))

    def set_checkpointing(self, every):
        """Activation checkpointing: 0 off, k > 0 on blocks 0, k, 2k, … (1 = every block)."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0 (0 = off, k = every k-th block), got {every!r}")
        self.checkpoint_every = every

    @property
    def dtype(self):
        return self.x_embedder.proj.weight.dtype

    def _check_inputs(self, x, t, y):
        if x.ndim != 4:
            raise ValueError(f"DiT expects x of shape (N, C, H, W), got {tuple(x.shape)}")
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(
                f"DiT expects x with in_channels={self.in_channels} channels, got {c} (x of shape {tuple(x.shape)})"
            )
        if h != self.input_size or w != self.input_size:
            raise ValueError(
                f"DiT was built for input_size={self.input_size} ({self.input_size}x{self.input_size}), "
                f"got x of {h}x{w}"
            )
        if t.shape != (n,) or y.shape != (n,):
            raise ValueError(f"DiT expects t and y of shape ({n},), got t {tuple(t.shape)}, y {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"DiT expects integer class labels y, got dtype {y.dtype}")
        top = self.y_embedder.embedding_table.num_embeddings - 1
        null = f" (null class {self.num_classes} included)" if top == self.num_classes else ""
        # Checked on the device without a host sync: raises at once on CPU, as a device assert on GPU.
        torch._assert_async(((y >= 0) & (y <= top)).all(), f"DiT: class labels y out of range 0..{top}{null}")

    def _run_blocks(self, x, c, hidden_block=None):
        """(x after all blocks, the tokens after block hidden_block (1-based) or None)."""
        k = self.checkpoint_every if torch.is_grad_enabled() else 0
        hidden = None
        for i, block in enumerate(self.blocks):
            if k and i % k == 0:
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
            if i + 1 == hidden_block:
                hidden = x
        return x, hidden

    def unpatchify(self, x):
        """(N, T, p*p*C) → (N, C, H, W)."""
        c, p, h = self.out_channels, self.patch_size, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y, force_drop_ids=None, hidden_block=None):
        """hidden_block=k (1..depth): also return the image tokens after block k, (out, (N, T, D))."""
        self._check_inputs(x, t, y)
        if hidden_block is not None and not 1 <= hidden_block <= len(self.blocks):
            raise ValueError(f"DiT: hidden_block={hidden_block} outside 1..depth={len(self.blocks)}")
        x = self.x_embedder(x.to(self.dtype)) + self.pos_embed  # (N, T, D), T = H*W/p**2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        if self.conditioning == "tokens":
            x = torch.cat([t.unsqueeze(1), y.unsqueeze(1), x], dim=1)  # (N, T+2, D)
            c, skip = None, 2
        elif self.conditioning == "context":
            c, skip = torch.stack([t, y], dim=1), 0  # context (N, 2, D)
        else:
            c, skip = t + y, 0  # (N, D)
        x, hidden = self._run_blocks(x, c, hidden_block)
        x = self.final_layer(x[:, skip:], c if self.conditioning == "adaln" else None)  # (N, T, p*p*out)
        x = self.unpatchify(x)  # (N, out, H, W)
        return x if hidden_block is None else (x, hidden[:, skip:])


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################


def get_1d_sincos_pos_embed(embed_dim, pos):
    """(M,) positions → (M, embed_dim) float64 [sin | cos], frequencies 1/10000^(2i/embed_dim)."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) float64 table in row-major token order; as the official (MAE) code, the
    first half encodes the column index and the second half the row index."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    cols, rows = coords.repeat(grid_size), coords.repeat_interleave(grid_size)
    return torch.cat(
        [get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)], dim=1
    )


#################################################################################
#                                   DiT Configs                                  #
#################################################################################

# name: (depth, hidden_size, num_heads); parameters at patch 2, 256×256 (input 32, 4 channels, 1000 classes).
_SIZES = {
    "S": (12, 384, 6),  # 33M   (Table 1)
    "B": (12, 768, 12),  # 130M
    "L": (24, 1024, 16),  # 458M
    "XL": (28, 1152, 16),  # 675M
    "1B": (32, 1280, 16),  # 0.95B  ViT-H shape (width 1280, 32 layers, head dim 80)
    "3B": (40, 2048, 16),  # 3.0B   head dim 128
    "7B": (40, 3072, 24),  # 6.8B   width/heads of FLUX-class DiTs (head dim 128)
}
DIT_PRESETS = {
    f"DiT-{size}/{p}": dict(depth=d, hidden_size=h, patch_size=p, num_heads=n)
    for size, (d, h, n) in _SIZES.items()
    for p in (2, 4, 8)
}


def validate_config(cfg):
    """Raise ValueError naming the bad DiT argument."""
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"DiT: {key} must be a positive int, got {cfg[key]!r}")
    if cfg["input_size"] % cfg["patch_size"]:
        raise ValueError(f"DiT: input_size={cfg['input_size']} is not divisible by patch_size={cfg['patch_size']}")
    if cfg["hidden_size"] % cfg["num_heads"]:
        raise ValueError(f"DiT: hidden_size={cfg['hidden_size']} is not divisible by num_heads={cfg['num_heads']}")
    if (cfg["hidden_size"] // 2) % 2:
        raise ValueError(f"DiT: hidden_size={cfg['hidden_size']} must be divisible by 4 (2-D sin-cos positions)")
    if not 0 <= cfg["class_dropout_prob"] < 1:
        raise ValueError(f"DiT: class_dropout_prob must be in [0, 1), got {cfg['class_dropout_prob']}")
    if not cfg["mlp_ratio"] > 0:
        raise ValueError(f"DiT: mlp_ratio must be > 0, got {cfg['mlp_ratio']}")
    block_type(cfg["block"])
    if cfg["qk_norm"] not in QK_NORMS:
        raise ValueError(f"DiT: unknown qk_norm {cfg['qk_norm']!r}; choose one of {QK_NORMS}")


def _preset(name):
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; valid presets: {', '.join(DIT_PRESETS)}")
    return dict(DIT_PRESETS[name])


def dit_config(preset_or_kwargs, image_size=256, latent_channels=4, vae_factor=8):
    """Full, validated DiT kwargs from a preset name or a dict of DiT kwargs. input_size defaults to
    image_size // vae_factor (use vae_factor=1 for pixel-space models), in_channels to latent_channels."""
    kwargs = _preset(preset_or_kwargs) if isinstance(preset_or_kwargs, str) else dict(preset_or_kwargs)
    params = inspect.signature(DiT.__init__).parameters
    unknown = set(kwargs) - set(params) - {"self"}
    if unknown:
        raise ValueError(f"unknown DiT argument(s) {sorted(unknown)}; valid: {[p for p in params if p != 'self']}")
    if "input_size" not in kwargs:
        if image_size % vae_factor:
            raise ValueError(f"image_size={image_size} is not divisible by vae_factor={vae_factor}")
        kwargs["input_size"] = image_size // vae_factor
    kwargs.setdefault("in_channels", latent_channels)
    cfg = {k: kwargs.get(k, p.default) for k, p in params.items() if k != "self"}
    validate_config(cfg)
    return cfg


def build_dit(name, **overrides):
    """DiT of preset `name` (e.g. "DiT-XL/2"); overrides are DiT kwargs (input_size=64 for 512×512, …)."""
    return DiT(**{**_preset(name), **overrides})
