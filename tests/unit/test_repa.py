"""REPA's parts: the frozen encoder from a local file (a tiny random ViT saved here, nothing downloaded),
the alignment loss and token-grid match, the projector, the DiT's hidden state of block k, and the
training module whose projector never reaches an export."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditscale.models import DiT
from ditscale.repa.align import alignment_loss, build_projector, match_tokens
from ditscale.repa.encoder import ENCODERS, EncoderError, build_vit, encoder_dim, encoder_input_size, load_encoder
from ditscale.repa.model import DiTWithProjector, is_training_only

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = build_vit("vit_tiny_test")
    path = tmp_path_factory.mktemp("enc") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path, vit


# --- encoder -------------------------------------------------------------------------------------------


def test_encoder_matches_timm_reference_computation(tiny_vit_file):
    """Our preprocessing + patch tokens equal torchvision's normalise/resize and timm's own forward."""
    import torchvision.transforms.functional as TF

    path, vit = tiny_vit_file
    enc = load_encoder("vit_tiny_test", path, torch.device("cpu"))
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    size = encoder_input_size(32)
    tokens = enc(images, size)
    assert size == 28 and tokens.shape == (3, (28 // 14) ** 2, 32) and tokens.dtype == torch.float32
    x = TF.normalize(images.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    x = F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False)
    ref = vit.eval().forward_features(x)[:, 1:]  # drop the class token
    torch.testing.assert_close(tokens, ref)
    grey = enc(images[:, :1], size)  # grey → RGB
    torch.testing.assert_close(grey, enc(images[:, :1].expand(-1, 3, -1, -1), size))


def test_encoder_sizes_follow_repa():
    assert encoder_input_size(256) == 224 and encoder_input_size(512) == 448
    assert [encoder_dim(n) for n in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14")] == [
        384,
        768,
        1024,
        1536,
    ]


@pytest.mark.parametrize(
    "name,timm_name", [("dinov2_vitb14", "vit_base_patch14_dinov2"), ("dinov2_vitg14", "vit_giant_patch14_dinov2")]
)
def test_encoder_architectures_are_timms_dinov2(name, timm_name):
    import timm

    with torch.device("meta"):
        ours, theirs = build_vit(name), timm.create_model(timm_name, pretrained=False, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_meta_layout_pth_loads_with_weights_only(tiny_vit_file, tmp_path):
    """Meta's dinov2_*_pretrain.pth layout (mask_token, plain state dict) through torch.load(weights_only)."""
    path, vit = tiny_vit_file
    state = {**vit.state_dict(), "mask_token": torch.zeros(1, 32)}
    torch.save(state, tmp_path / "meta.pth")
    enc = load_encoder("vit_tiny_test", tmp_path / "meta.pth", torch.device("cpu"))
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(enc(images, 28), load_encoder("vit_tiny_test", path, torch.device("cpu"))(images, 28))


def test_encoder_refuses_bad_files(tiny_vit_file, tmp_path):
    path, _ = tiny_vit_file
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder("vit_tiny_test", tmp_path / "missing.safetensors", torch.device("cpu"))
    with pytest.raises(EncoderError, match=f"{path}.*does not fit repa.encoder=dinov2_vits14"):
        load_encoder("dinov2_vits14", path, torch.device("cpu"))
    with pytest.raises(EncoderError, match="unknown encoder"):
        load_encoder("dinov3", path, torch.device("cpu"))
    torch.save({"weights": np.zeros(3)}, tmp_path / "pickled.pt")  # needs unpickling: refused
    with pytest.raises(EncoderError, match="cannot read"):
        load_encoder("vit_tiny_test", tmp_path / "pickled.pt", torch.device("cpu"))
    assert set(ENCODERS) >= {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"}


# --- loss, grid match, projector ------------------------------------------------------------------------


def test_alignment_loss_is_mean_negative_cosine_per_sample():
    torch.manual_seed(0)
    a = torch.randn(2, 4, 8)
    assert torch.allclose(alignment_loss(a, 3 * a), torch.full((2,), -1.0))
    assert torch.allclose(alignment_loss(a, -a), torch.full((2,), 1.0))
    b = torch.randn(2, 4, 8)
    ref = -F.cosine_similarity(a, b, dim=-1).mean(1)
    torch.testing.assert_close(alignment_loss(a.bfloat16(), b), ref, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="differ"):
        alignment_loss(a, b[:, :3])


def test_match_tokens_interpolates_differing_grids():
    target = torch.randn(2, 16, 5)
    assert match_tokens(target, 16) is target
    const = torch.ones(1, 16, 3) * torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(match_tokens(const, 4), torch.ones(1, 4, 3) * torch.tensor([1.0, 2.0, 3.0]))
    grid = torch.arange(16.0).view(1, 4, 4, 1).expand(1, 4, 4, 2).reshape(1, 16, 2)
    down = match_tokens(grid, 4).view(2, 2, 2)[..., 0]  # 2x2 means of the 4x4 ramp
    torch.testing.assert_close(down, torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert match_tokens(torch.randn(1, 4, 3), 64).shape == (1, 64, 3)
    with pytest.raises(ValueError, match="square"):
        match_tokens(torch.randn(1, 6, 3), 4)


def test_projector_is_repas_mlp():
    proj = build_projector(1152, 768)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in proj if isinstance(m, torch.nn.Linear)] == [
        (1152, 2048),
        (2048, 2048),
        (2048, 768),
    ]


# --- model: hidden state of block k, training module ----------------------------------------------------


def _inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.tensor([1, 500, 999][:n]), torch.tensor([0, 4, 2][:n])


@pytest.mark.parametrize("block", ["adaln_zero", "in_context", "cross_attention"])
def test_dit_returns_the_tokens_after_block_k_and_nothing_else_changes(block):
    torch.manual_seed(0)
    model = DiT(**TINY, block=block).eval()
    for p in model.parameters():  # zero-init gates would make every block the identity
        p.data.normal_(0, 0.05)
    x, t, y = _inputs()
    out, hidden = model(x, t, y, hidden_block=2)
    torch.testing.assert_close(out, model(x, t, y))
    captured = []
    model.blocks[1].register_forward_hook(lambda m, i, o: captured.append(o))
    model(x, t, y)
    expected = captured[0][:, 2:] if block == "in_context" else captured[0]
    torch.testing.assert_close(hidden, expected)
    assert hidden.shape == (3, 16, 32)
    with pytest.raises(ValueError, match="hidden_block=4 outside 1..depth=3"):
        model(x, t, y, hidden_block=4)


def test_training_module_projects_block_k_and_keeps_official_names():
    torch.manual_seed(0)
    model = DiTWithProjector(align_block=2, encoder_dim=24, checkpoint_every=1, **TINY)
    plain = DiT(**TINY)
    names = set(model.state_dict())
    assert {n for n in names if not is_training_only(n)} == set(plain.state_dict())
    assert {n for n in names if is_training_only(n)} == {
        f"repa_projector.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")
    }
    x, t, y = _inputs()
    out, extras = model(x, t, y, align=True)
    assert extras["repa_tokens"].shape == (3, 16, 24)
    torch.testing.assert_close(out, model(x, t, y))
    alignment_loss(extras["repa_tokens"], torch.randn(3, 16, 24)).sum().backward()  # through checkpointed blocks
    assert model.repa_projector[0].weight.grad.abs().sum() > 0
    assert model.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() > 0  # zero-init gates learn
    assert model.blocks[2].adaLN_modulation[1].weight.grad is None  # after block k: untouched
    with pytest.raises(ValueError, match="repa.block=4"):
        DiTWithProjector(align_block=4, encoder_dim=24, **TINY)


def test_ema_follows_the_dit_and_not_the_projector():
    from types import SimpleNamespace

    from ditscale.engine.ema import _followed

    model = DiTWithProjector(align_block=1, encoder_dim=8, projector_width=16, **TINY)
    followed = [n for n, _ in _followed(SimpleNamespace(module=model))]
    assert followed == [n for n, p in DiT(**TINY).named_parameters()]
    assert len(list(model.parameters())) == len(followed) + 6  # 3 linears of the projector


# --- configuration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["repa.encoder_weights="], "repa.encoder_weights: is required"),
        (["repa.block=13"], "repa.block: 13 is past the model's depth 12"),
        (["repa.encoder=dinov3_vitb16"], "repa.encoder: 'dinov3_vitb16' is not one of"),
        (["repa.coeff=-0.5"], "repa.coeff: must be >= 0"),
        (["repa.encoder_resolution=100"], "repa.encoder_resolution: must be a multiple of the patch size 14"),
    ],
)
def test_repa_config_errors_name_the_key(overrides, key):
    from ditscale.config import ConfigError, load_config

    base = ["data.root=/d", "model.preset=DiT-B/2", "repa.enabled=true", "repa.encoder_weights=/w.safetensors"]
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        load_config(None, base + overrides)
    assert load_config(None, base).repa.block == 8


def test_repa_needs_a_dataset_with_images():
    from ditscale.config import ConfigError, load_config, resolve_with_dataset

    cfg = load_config(None, ["data.root=/d", "repa.enabled=true", "repa.encoder_weights=/w.pth"])
    meta = {"latent_size": 32, "latent_channels": 4, "classes": ["a"] * 10, "format": "mds"}
    with pytest.raises(ConfigError, match="repa.enabled: the dataset at /d holds no images.*--keep-image"):
        resolve_with_dataset(cfg, meta)
    image = {"codec": "png", "size": 256, "channels": 3, "quality": None}
    assert resolve_with_dataset(cfg, {**meta, "image": image}).repa.enabled


# --- the trainer: refusals before any work, the term through the objective seam ----------------------------


def run_check(*args: str) -> int:
    from ditscale.engine.signals import release_stop_signals
    from ditscale.train import main

    try:
        return main(["--config", "configs/tiny_test.yaml", *args, "--check"])
    finally:
        release_stop_signals()


@pytest.fixture(scope="module")
def kept_images(tmp_path_factory):
    from data_prep import make_dataset
    from data_prep.testing import write_image_folder

    base = tmp_path_factory.mktemp("kept")
    src = write_image_folder(str(base / "images"), classes=2, per_class=4, min_side=16, max_side=24)
    return make_dataset(src, str(base / "mds"), resolution=8, decode_workers=0, keep_image="png")


def test_trainer_refuses_bad_repa_inputs_with_exit_2(kept_images, tiny_vit_file, tmp_path, capsys):
    from data_prep.testing import write_synthetic_latents

    path, _ = tiny_vit_file
    ok = [f"data.root={kept_images}", f"run_dir={tmp_path / 'run'}", "repa.enabled=true", "repa.block=2"]
    ok += ["repa.encoder=vit_tiny_test", f"repa.encoder_weights={path}"]
    assert run_check(*ok) == 0
    no_images = write_synthetic_latents(str(tmp_path / "plain"), 16, latent_channels=3, latent_size=8, num_classes=2)
    for extra, message in [
        ([f"repa.encoder_weights={tmp_path / 'none.pth'}"], f"repa.encoder_weights: {tmp_path / 'none.pth'} does not"),
        (["repa.encoder=dinov2_vits14"], f"repa.encoder_weights: {path} does not fit repa.encoder=dinov2_vits14"),
        (["repa.block=3"], "repa.block: 3 is past the model's depth 2"),
        (["repa.coeff=-1"], "repa.coeff: must be >= 0"),
        ([f"data.root={no_images}"], f"repa.enabled: the dataset at {no_images} holds no images"),
    ]:
        capsys.readouterr()
        assert run_check(*ok, *extra) == 2, extra
        assert message in capsys.readouterr().err, extra


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_alignment_term_goes_through_the_objective_seam(kind, tiny_vit_file):
    """The objective with REPA's model kwargs and term: its own parts as without REPA (same draws, same
    DiT), plus "repa" = λ · alignment loss inside "loss"; gradients reach the projector and the blocks
    up to k, not the frozen encoder."""
    from ditscale.objectives import DDPMObjective, FlowObjective
    from ditscale.repa.term import Repa

    objective = DDPMObjective() if kind == "ddpm" else FlowObjective()
    torch.manual_seed(0)
    model = DiTWithProjector(align_block=2, encoder_dim=32, projector_width=16, **TINY)
    plain = DiT(**TINY)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not is_training_only(k)})
    encoder = load_encoder("vit_tiny_test", tiny_vit_file[0], torch.device("cpu"))
    repa = Repa(encoder, coeff=0.5, encoder_size=56)
    batch = {"image": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)}
    x0, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])

    model_kwargs, aux = repa.for_batch(batch)
    terms = objective.loss(
        model, x0, y, torch.Generator().manual_seed(1), drop_prob=0.5, model_kwargs=model_kwargs, aux=aux
    )
    base = objective.loss(plain, x0, y, torch.Generator().manual_seed(1), drop_prob=0.5)
    assert set(terms) == set(base) | {"repa"}
    for k in base:
        if k != "loss":
            torch.testing.assert_close(terms[k], base[k])
    torch.testing.assert_close(terms["loss"], base["loss"] + terms["repa"])
    assert terms["repa"].shape == (4,) and ((-0.5 <= terms["repa"]) & (terms["repa"] <= 0.5)).all()
    terms["repa"].mean().backward()
    assert model.repa_projector[0].weight.grad.abs().sum() > 0 and model.blocks[1].attn.qkv.weight.grad is not None
    assert model.blocks[2].attn.qkv.weight.grad is None and model.final_layer.linear.weight.grad is None
    assert all(p.grad is None for p in encoder.parameters())
