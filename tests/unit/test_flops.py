"""Parameter and GFLOP counts against the paper's tables, torch's FLOP counter and real models."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from ditscale.models import BLOCKS, DIT_PRESETS, build_dit, dit_config
from ditscale.models.dit import DiT
from ditscale.models.flops import dit_gflops, dit_params, main, preset_table, train_flops_per_image

torch.set_num_threads(1)

# Table 1 of Peebles & Xie (Gflops at 256×256).
TABLE_1 = {
    "S/8": 0.36,
    "S/4": 1.41,
    "S/2": 6.06,
    "B/8": 1.42,
    "B/4": 5.56,
    "B/2": 23.01,
    "L/8": 5.01,
    "L/4": 19.70,
    "L/2": 80.71,
    "XL/8": 7.39,
    "XL/4": 29.05,
    "XL/2": 118.64,
}


@pytest.mark.parametrize("name,paper", TABLE_1.items())
def test_gflops_match_table_1(name, paper):
    assert dit_gflops(f"DiT-{name}") == pytest.approx(paper, rel=0.01)


def test_xl2_at_512_and_parameters():
    assert dit_gflops("DiT-XL/2", image_size=512) == pytest.approx(524.60, rel=0.01)
    n = dit_params("DiT-XL/2")
    assert round(n / 1e6) == 675
    assert n + 256 * 1152 == 675_129_632  # official count incl. frozen pos_embed


@pytest.mark.parametrize(
    "block,paper", [("in_context", 119.4), ("cross_attention", 137.6), ("adaln", 118.6), ("adaln_zero", 118.6)]
)
def test_gflops_of_figure_5_blocks(block, paper):
    assert dit_gflops({**DIT_PRESETS["DiT-XL/2"], "block": block}) == pytest.approx(paper, rel=0.01)


def measured(cfg):
    """(parameters, forward multiply-adds) of a model built on the meta device, by torch's FLOP counter."""
    with torch.device("meta"):
        model = DiT(**cfg)
        n = cfg["input_size"]
        args = torch.randn(1, cfg["in_channels"], n, n), torch.ones(1), torch.ones(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        model(*args)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2


@pytest.mark.parametrize("name,size", [("DiT-XL/2", 256), ("DiT-S/8", 512), ("DiT-7B/2", 256), ("DiT-1B/4", 512)])
def test_counts_equal_real_models(name, size):
    params, macs = measured(dit_config(name, size))
    assert dit_params(name, size) == params
    assert dit_gflops(name, size) * 1e9 == pytest.approx(macs, rel=1e-12)


def test_counts_of_an_instantiated_model():
    model = build_dit("DiT-S/4", depth=3, num_classes=10, input_size=16, qk_norm="layernorm")
    kw = {**DIT_PRESETS["DiT-S/4"], "depth": 3, "num_classes": 10, "qk_norm": "layernorm"}
    assert dit_params(kw, image_size=128) == sum(p.numel() for p in model.parameters())


@settings(max_examples=25, deadline=None)
@given(
    block=st.sampled_from(list(BLOCKS)),
    qk_norm=st.sampled_from([None, "layernorm", "rmsnorm"]),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([4, 8, 12]),
    depth=st.integers(1, 3),
    patch=st.sampled_from([1, 2, 4]),
    grid=st.integers(1, 4),
    channels=st.integers(1, 4),
    learn_sigma=st.booleans(),
    num_classes=st.integers(1, 20),
    dropout=st.sampled_from([0.0, 0.1]),
    mlp_ratio=st.sampled_from([2.0, 4.0, 2.5]),
)
def test_counts_equal_real_models_for_any_config(
    block, qk_norm, heads, head_dim, depth, patch, grid, channels, learn_sigma, num_classes, dropout, mlp_ratio
):
    cfg = dit_config(
        dict(
            block=block,
            qk_norm=qk_norm,
            num_heads=heads,
            hidden_size=heads * head_dim,
            depth=depth,
            patch_size=patch,
            input_size=patch * grid,
            in_channels=channels,
            learn_sigma=learn_sigma,
            num_classes=num_classes,
            class_dropout_prob=dropout,
            mlp_ratio=mlp_ratio,
        )
    )
    params, macs = measured(cfg)
    assert dit_params(cfg) == params
    assert dit_gflops(cfg) * 1e9 == pytest.approx(macs, rel=1e-12)


def test_resolution_and_latent_arguments():
    assert dit_gflops("DiT-XL/2", 512) == dit_gflops({**DIT_PRESETS["DiT-XL/2"], "input_size": 64})
    pixel = dit_params("DiT-S/2", image_size=32, latent_channels=3, vae_factor=1)
    assert pixel == sum(p.numel() for p in build_dit("DiT-S/2", input_size=32, in_channels=3).parameters())
    assert train_flops_per_image("DiT-XL/2") == pytest.approx(6 * 118.621e9, rel=1e-4)
    with pytest.raises(ValueError, match="image_size=250 is not divisible by vae_factor=8"):
        dit_params("DiT-XL/2", image_size=250)
    with pytest.raises(ValueError, match="valid presets"):
        dit_gflops("DiT-H/2")


def test_cli_prints_every_preset(capsys):
    main(["--resolutions", "256", "512"])
    out = capsys.readouterr().out
    assert out == preset_table((256, 512)) + "\n"
    for name in DIT_PRESETS:
        assert f"| {name} |" in out
    assert "| DiT-XL/2 | 28 | 1152 | 16 | 674.8M | 118.62 | 524.54 |" in out
