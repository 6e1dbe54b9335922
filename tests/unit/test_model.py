"""The DiT model: shapes, official layout and init, bf16, label dropout, errors, checkpointing, compile."""

import math

import numpy as np
import pytest
import torch

from ditscale.models import BLOCKS, DIT_PRESETS, DiT, build_dit, dit_config

from helpers import randomize

torch.set_num_threads(1)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def tiny(**kw):
    return DiT(**{**TINY, **kw})


def inputs(n=3, c=4, size=8, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c, size, size, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randint(0, num_classes, (n,), generator=g),
    )


# ---------------------------------------------------------------- shapes, layout, init


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape_and_backward(block, learn_sigma):
    model = randomize(tiny(block=block, learn_sigma=learn_sigma))
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8) and out.dtype == torch.float32
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_float_timesteps_and_pixel_mode():
    model = randomize(tiny(in_channels=1, input_size=8, patch_size=4))
    x, _, y = inputs(c=1)
    out = model(x, torch.tensor([0.5, 10.25, 999.0]), y)
    assert out.shape == (3, 2, 8, 8)


def official_keys(depth):
    """The key list and shapes of facebookresearch/DiT's DiT-XL/2 state dict (written out independently)."""
    d, keys = (
        1152,
        {
            "pos_embed": (1, 256, 1152),
            "x_embedder.proj.weight": (1152, 4, 2, 2),
            "x_embedder.proj.bias": (1152,),
            "t_embedder.mlp.0.weight": (1152, 256),
            "t_embedder.mlp.0.bias": (1152,),
            "t_embedder.mlp.2.weight": (1152, 1152),
            "t_embedder.mlp.2.bias": (1152,),
            "y_embedder.embedding_table.weight": (1001, 1152),
            "final_layer.linear.weight": (32, 1152),
            "final_layer.linear.bias": (32,),
            "final_layer.adaLN_modulation.1.weight": (2304, 1152),
            "final_layer.adaLN_modulation.1.bias": (2304,),
        },
    )
    for i in range(depth):
        for name, out, inp in [
            ("attn.qkv", 3 * d, d),
            ("attn.proj", d, d),
            ("mlp.fc1", 4 * d, d),
            ("mlp.fc2", d, 4 * d),
            ("adaLN_modulation.1", 6 * d, d),
        ]:
            keys[f"blocks.{i}.{name}.weight"], keys[f"blocks.{i}.{name}.bias"] = (out, inp), (out,)
    return keys


def test_state_dict_matches_official_layout():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_keys(28)
    assert not model.pos_embed.requires_grad and "pos_embed" not in dict(model.named_parameters())


def test_official_init():
    model = tiny(hidden_size=64, num_heads=4)
    for block in model.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
        assert not block.attn.qkv.bias.any()
        w = block.attn.qkv.weight
        bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))  # xavier-uniform
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    for layer in (model.final_layer.linear, model.final_layer.adaLN_modulation[1]):
        assert not layer.weight.any() and not layer.bias.any()
    for w in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight):
        assert abs(w.std().item() - 0.02) < 0.004


def reference_pos_embed(embed_dim, grid_size):
    """The official (MAE) numpy construction: meshgrid with w first; first half from grid[0]."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_is_the_official_table():
    model = tiny(hidden_size=48, num_heads=2, input_size=16)
    ref = torch.from_numpy(reference_pos_embed(48, 8)).float()
    assert torch.allclose(model.pos_embed[0], ref, atol=1e-6)


def test_timestep_embedding_frequencies_divide_by_half():
    t = torch.tensor([0, 7, 999])
    emb = tiny().t_embedder.timestep_embedding(t, 256)
    for divisor, same in [(128, True), (127, False)]:  # paper vs diffusers' default
        args = t.numpy()[:, None] * np.exp(-np.log(10000) * np.arange(128) / divisor)[None]
        ref = torch.from_numpy(np.concatenate([np.cos(args), np.sin(args)], 1)).float()
        assert torch.allclose(emb, ref, atol=5e-4) == same  # fp32 args up to t=999


def test_adaln_zero_blocks_start_as_identity():
    model = tiny()
    x, t, y = inputs()
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    assert torch.equal(model._run_blocks(h, c)[0], h)
    assert not model(x, t, y).any()  # zero decoder
    plain = tiny(block="adaln")  # no zero-init: blocks act
    assert not torch.allclose(plain._run_blocks(h, c)[0], h)


@pytest.mark.parametrize("block", ["adaln_zero", "cross_attention"])
def test_meta_build_then_materialise(block):
    with torch.device("meta"):
        model = tiny(block=block, qk_norm="layernorm")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(float("nan"))  # whatever to_empty left
    model.initialize_weights()
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert torch.equal(model.pos_embed, tiny().pos_embed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None]
    assert len(norms) >= 4 and all((m.weight == 1).all() and not m.bias.any() for m in norms)
    bound = (4 * 2 * 2) ** -0.5
    assert 0 < model.x_embedder.proj.bias.abs().max() <= bound
    x, t, y = inputs()
    assert model(x, t, y).shape == (3, 8, 8, 8)


@pytest.mark.parametrize("qk_norm,extra", [("layernorm", 4), ("rmsnorm", 2)])
def test_qk_norm_adds_per_head_norms_only(qk_norm, extra):
    base, model = set(tiny().state_dict()), randomize(tiny(qk_norm=qk_norm))
    added = set(model.state_dict()) - base
    assert base <= set(model.state_dict()) and len(added) == extra * TINY["depth"]
    assert model.blocks[0].attn.q_norm.weight.shape == (32 // 2,)
    x, t, y = inputs()
    assert torch.isfinite(model(x, t, y)).all()


# ---------------------------------------------------------------- bf16, label dropout


@pytest.mark.parametrize("block", BLOCKS)
def test_whole_module_in_bf16(block):
    model = randomize(tiny(block=block))
    x, t, y = inputs()
    ref = model(x, t, y)
    out = model.to(torch.bfloat16)(x, t, y)  # fp32 x, int64 t
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item())


def test_label_dropout_only_in_training():
    emb = tiny(class_dropout_prob=0.5).y_embedder
    labels = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    dropped = (emb.token_drop(labels) == 5).float().mean().item()
    assert 0.45 < dropped < 0.55
    table = emb.embedding_table.weight
    assert torch.equal(emb(labels, train=False), table[labels])
    trained = emb(labels, train=True)
    assert 0.45 < (trained == table[5]).all(1).float().mean().item() < 0.55
    forced = emb(torch.tensor([1, 2, 3]), train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(forced, table[torch.tensor([5, 2, 5])])


def test_model_train_mode_drops_labels_eval_does_not():
    model = randomize(tiny(class_dropout_prob=0.5))
    x, t, y = inputs(n=64)
    null = model(x, t, torch.full_like(y, 5))
    model.eval()
    assert torch.equal(model(x, t, y), model(x, t, y))
    assert not torch.isclose(model(x, t, y), null).flatten(1).all(1).any()
    model.train()
    torch.manual_seed(1)
    same_as_null = torch.isclose(model(x, t, y), null).flatten(1).all(1)
    assert 0 < same_as_null.sum() < 64


# ---------------------------------------------------------------- errors


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"unknown DiT preset 'DiT-XXL/2'.*DiT-S/2.*DiT-XL/2"):
        build_dit("DiT-XXL/2")
    with pytest.raises(ValueError, match="input_size=30 is not divisible by patch_size=4"):
        tiny(input_size=30, patch_size=4)
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        tiny(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown block 'film'"):
        tiny(block="film")
    with pytest.raises(ValueError, match="unknown qk_norm"):
        tiny(qk_norm="l2")
    with pytest.raises(ValueError, match="unknown DiT argument"):
        dit_config({"depth": 2, "hidden": 64})
    model = tiny()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="in_channels=4 channels, got 3"):
        model(x[:, :3], t, y)
    with pytest.raises(ValueError, match=r"input_size=8 .*got x of 16x16"):
        model(torch.randn(3, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="integer class labels"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match=r"t and y of shape \(3,\)"):
        model(x, t[:2], y)
    with pytest.raises(RuntimeError, match=r"class labels y out of range 0\.\.5 \(null class 5"):
        model(x, t, torch.tensor([0, 6, 1]))
    with pytest.raises(RuntimeError, match="out of range"):
        model(x, t, torch.tensor([0, -1, 1]))
    with pytest.raises(RuntimeError, match=r"out of range 0\.\.4"):
        tiny(class_dropout_prob=0.0)(x, t, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="force_drop_ids needs the null class"):
        tiny(class_dropout_prob=0.0)(x, t, y, force_drop_ids=torch.ones(3))
    with pytest.raises(ValueError, match="checkpoint_every"):
        model.set_checkpointing(-1)


# ---------------------------------------------------------------- presets


def test_presets():
    table1 = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for size, (depth, hidden, heads) in table1.items():
        for p in (2, 4, 8):
            assert DIT_PRESETS[f"DiT-{size}/{p}"] == dict(
                depth=depth, hidden_size=hidden, patch_size=p, num_heads=heads
            )
    beyond = [n for n in DIT_PRESETS if n.split("/")[0][4:] not in table1]
    assert len(DIT_PRESETS) == 21 and len(beyond) == 9
    for name in beyond:
        s = DIT_PRESETS[name]
        assert s["hidden_size"] % s["num_heads"] == 0 and 64 <= s["hidden_size"] // s["num_heads"] <= 128
    model = build_dit("DiT-S/8", depth=1, input_size=16, num_classes=3)
    assert len(model.blocks) == 1 and model.pos_embed.shape == (1, 4, 384)


# ---------------------------------------------------------------- checkpointing, compile


def grads(model, x, t, y):
    model.zero_grad()
    model(x, t, y).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("block", ["adaln_zero", "cross_attention"])
def test_checkpointing_gives_identical_gradients(block):
    model = randomize(tiny(block=block, depth=4, class_dropout_prob=0.0))
    x, t, y = inputs()
    ref = grads(model, x, t, y)
    calls = []
    for k, b in enumerate(model.blocks):  # count runs, recomputes included
        b.forward = lambda *a, k=k, f=b.forward: (calls.append(k), f(*a))[1]
    for every, recomputed in [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3])]:
        model.set_checkpointing(every)
        calls.clear()
        got = grads(model, x, t, y)
        assert sorted(calls) == sorted([0, 1, 2, 3] + recomputed)  # recomputed in backward
        for name in ref:
            assert torch.equal(got[name], ref[name]), name
    with torch.no_grad():  # nothing to recompute
        calls.clear()
        model(x, t, y)
        assert calls == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "block,every", [("adaln_zero", 0), ("adaln_zero", 1), ("in_context", 0), ("cross_attention", 2), ("adaln", 0)]
)
def test_compiles_without_graph_breaks(block, every):
    torch._dynamo.reset()
    model = tiny(block=block, checkpoint_every=every).train()
    x, t, y = inputs()
    explanation = torch._dynamo.explain(model)(x, t, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_matches_eager():
    torch._dynamo.reset()
    model = randomize(tiny(checkpoint_every=1)).eval()
    x, t, y = inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x, t, y), model(x, t, y), atol=1e-6)
