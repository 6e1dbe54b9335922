"""Official DiT layout ⇄ diffusers' DiTTransformer2DModel: parity of outputs both ways, exact round trips."""

import pytest
import torch

from ditscale.models import build_dit
from ditscale.models.convert import (
    diffusers_config_for,
    diffusers_to_official,
    match_dit_timesteps,
    official_to_diffusers,
)

from helpers import randomize

diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

CASES = {  # small depths keep it fast; the shapes of the real presets otherwise
    "S/2": ("DiT-S/2", dict(depth=2, input_size=16)),
    "B/4": ("DiT-B/4", dict(depth=2, input_size=16)),
    "S/4 7 classes, no sigma": ("DiT-S/4", dict(depth=3, input_size=8, num_classes=7, learn_sigma=False)),
    "S/8 3 channels": ("DiT-S/8", dict(depth=1, input_size=16, in_channels=3, num_classes=13)),
}


def ours(name, kw):
    return randomize(build_dit(name, **kw)).eval()


def batch(model, n=4):
    g = torch.Generator().manual_seed(1)
    c, s = model.in_channels, model.input_size
    y = torch.randint(0, model.num_classes, (n,), generator=g)
    y[-1] = model.num_classes  # the null class
    return torch.randn(n, c, s, s, generator=g), torch.tensor([0, 1, 500, 999])[:n], y


def hf_model(cfg, state=None):
    model = diffusers.DiTTransformer2DModel(**cfg).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def max_diff(ours_model, hf, args):
    with torch.no_grad():
        return (ours_model(*args) - hf(*args).sample).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_official_to_diffusers_parity(case):
    model = ours(*CASES[case])
    cfg = diffusers_config_for(model.config)
    hf = hf_model(cfg, official_to_diffusers(model.state_dict(), cfg))
    args = batch(model)
    unmatched = max_diff(model, hf, args)
    match_dit_timesteps(hf)
    assert max_diff(model, hf, args) < 1e-4
    assert unmatched > 1e-3  # the known timestep convention


@pytest.mark.parametrize("case", CASES)
def test_diffusers_to_official_parity(case):
    name, kw = CASES[case]
    cfg = diffusers_config_for({**build_dit(name, **kw).config})
    hf = randomize(hf_model(cfg), seed=3)
    with torch.no_grad():  # DiT shares one embedder
        for block in hf.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(hf.transformer_blocks[0].norm1.emb.state_dict())
    match_dit_timesteps(hf)
    model = build_dit(name, **kw).eval()
    model.load_state_dict(diffusers_to_official(hf.state_dict(), cfg), strict=True)
    assert max_diff(model, hf, batch(model)) < 1e-4


def test_round_trips_are_exact():
    model = ours("DiT-S/2", dict(depth=3, input_size=8, num_classes=11))
    cfg = diffusers_config_for(model.config)
    sd = model.state_dict()
    hf_sd = official_to_diffusers(sd, cfg)
    back = diffusers_to_official(hf_sd, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    again = official_to_diffusers(back, cfg)
    assert again.keys() == hf_sd.keys() and all(torch.equal(again[k], hf_sd[k]) for k in hf_sd)


def test_export_has_no_shared_storage():
    from safetensors.torch import save

    model = ours("DiT-S/2", dict(depth=2, input_size=8))
    save(official_to_diffusers(model.state_dict(), diffusers_config_for(model.config)))


def test_model_without_null_class_exports_a_zero_null_row():
    model = ours("DiT-S/2", dict(depth=2, input_size=8, num_classes=5, class_dropout_prob=0.0))
    cfg = diffusers_config_for(model.config)
    hf_sd = official_to_diffusers(model.state_dict(), cfg)
    table = hf_sd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"]
    assert table.shape == (6, 384) and not table[5].any()
    hf = match_dit_timesteps(hf_model(cfg, hf_sd))
    x, t, y = batch(model)
    assert max_diff(model, hf, (x, t, y.clamp(max=4))) < 1e-4


def test_what_cannot_be_converted_is_refused():
    hf_cfg = diffusers_config_for("DiT-S/2", image_size=64)
    hf_sd = hf_model({**hf_cfg, "num_layers": 2}).state_dict()
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb.* differs from block 0"):
        diffusers_to_official(hf_sd, {**hf_cfg, "num_layers": 2})
    for bad, why in [
        ({"block": "in_context"}, "adaLN-Zero"),
        ({"mlp_ratio": 2.0}, "4 × hidden"),
        ({"qk_norm": "rmsnorm"}, "q/k normalisation"),
    ]:
        with pytest.raises(ValueError, match=why):
            diffusers_config_for({"depth": 2, "hidden_size": 64, "num_heads": 2, **bad})
    model = build_dit("DiT-S/2", depth=2, input_size=8, qk_norm="layernorm")
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.0\.attn\.k_norm\.bias'"):
        official_to_diffusers(model.state_dict(), {**hf_cfg, "num_layers": 2})
    with pytest.raises(ValueError, match=r"missing \['blocks\.2\.adaLN_modulation\.1\.bias'"):
        official_to_diffusers(build_dit("DiT-S/2", depth=2).state_dict(), {**hf_cfg, "num_layers": 3})
    with pytest.raises(ValueError, match="config lacks 'num_layers'"):
        official_to_diffusers(model.state_dict(), {"depth": 2})
    with pytest.raises(ValueError, match="1001 rows; config num_embeds_ada_norm=10"):
        official_to_diffusers(
            build_dit("DiT-S/2", depth=2).state_dict(), {**hf_cfg, "num_layers": 2, "num_embeds_ada_norm": 10}
        )
