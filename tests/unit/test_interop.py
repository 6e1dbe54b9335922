"""Official checkpoints in (shapes → preset, weights only, never code), diffusers DiTPipeline out (loads offline,
agrees with our model and sampler after match_dit_timesteps)."""

import argparse
import os

import numpy as np
import pytest
import torch

from ditscale.interop import main as interop_main
from ditscale.models import DiT, build_dit
from ditscale.sampling import decode, sample_latents, sampling_diffusion
from ditscale.weights import export_diffusers, infer_dit_config, load_dit, load_pipeline, preset_of, read_state_dict

from helpers import randomize

torch.set_num_threads(1)


def release_like():
    """The release's layout (learn_sigma, 1000 classes + null, 4 channels) at DiT-S/2 width, 2 blocks."""
    return randomize(build_dit("DiT-S/2", depth=2, input_size=4)).eval()


def tiny_1000(**kw):
    kw = {"depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 8, **kw}
    return randomize(build_dit("DiT-S/2", **kw)).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()


def inputs(model, n=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g)
    return x, torch.tensor([999, 500, 3])[:n], torch.tensor([1, 7, model.num_classes])[:n]


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("input_size, name", [(32, "256x256"), (64, "512x512")])
def test_release_shapes_give_dit_xl2(input_size, name):
    with torch.device("meta"):
        shapes = DiT(input_size=input_size).state_dict()  # the XL/2 release, no memory
    cfg = infer_dit_config(shapes)
    assert preset_of(cfg) == "DiT-XL/2", name
    assert cfg == DiT(input_size=input_size, depth=1).config | {"depth": 28}


def test_released_layout_loads_with_weights_only_and_matches(tmp_path):
    model = release_like()
    torch.save(model.state_dict(), tmp_path / "DiT-S-2-32x32.pt")
    loaded = load_dit(tmp_path / "DiT-S-2-32x32.pt")
    assert loaded.config == model.config and preset_of(loaded.config) is None  # S/2 width, 2 of 12 blocks
    assert loaded.learn_sigma and loaded.num_classes == 1000 and loaded.in_channels == 4
    with torch.no_grad():
        assert torch.equal(loaded(*inputs(model)), model(*inputs(model)))


def test_training_checkpoint_layout_picks_ema_or_raw(tmp_path):
    ema, raw = release_like(), randomize(build_dit("DiT-S/2", depth=2, input_size=4), seed=1).eval()
    ckpt = {
        "model": {"module." + k: v for k, v in raw.state_dict().items()},
        "ema": ema.state_dict(),
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "args": argparse.Namespace(model="DiT-S/2"),
    }
    torch.save(ckpt, tmp_path / "0400000.pt")
    for weights, want in (("ema", ema), ("raw", raw)):
        sd = read_state_dict(tmp_path / "0400000.pt", weights)
        assert sd.keys() == want.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in want.state_dict().items())
    del ckpt["ema"]
    torch.save(ckpt, tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match=r"no ema weights \(key 'ema'\)"):
        read_state_dict(tmp_path / "no_ema.pt", "ema")


def test_safetensors_and_explicit_heads(tmp_path):
    from safetensors.torch import save_file

    model = tiny_1000()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="hidden size 32 matches no preset.*--num-heads"):
        load_dit(tmp_path / "w.safetensors")
    assert load_dit(tmp_path / "w.safetensors", num_heads=2).config == model.config
    assert load_dit(tmp_path / "w.safetensors", config={"num_heads": 2, "checkpoint_every": 0}).config == model.config
    with pytest.raises(ValueError, match="does not fit DiT"):
        load_dit(tmp_path / "w.safetensors", config={"num_heads": 2, "learn_sigma": False})


def test_variants_are_inferred():
    for kw in (
        dict(block="adaln"),
        dict(block="cross_attention"),
        dict(block="in_context"),
        dict(qk_norm="rmsnorm", learn_sigma=False),
        dict(qk_norm="layernorm", mlp_ratio=2.0, in_channels=3),
    ):
        model = build_dit("DiT-S/4", depth=2, input_size=8, num_classes=7, **kw)
        assert infer_dit_config(model.state_dict()) == model.config, kw
    no_null = build_dit("DiT-S/4", depth=1, input_size=8, num_classes=7, class_dropout_prob=0.0)
    assert infer_dit_config(no_null.state_dict(), class_dropout_prob=0.0) == no_null.config


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = release_like().state_dict()
    torch.save({**state, "extra": Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be loaded as weights only.*never pickled code"):
        load_dit(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(ValueError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, vae = tiny_1000(), tiny_vae()
    out = tmp_path_factory.mktemp("pipe") / "dit"
    names = [f"class{i}, synonym" for i in range(1000)]
    export_diffusers(model, out, vae=vae, scale_factor=0.5, class_names=names)
    return model, vae, out


def test_pipeline_loads_offline_and_matches_the_model(exported, monkeypatch):
    from diffusers import DiTPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _, out = exported
    assert {"model_index.json", "README.md", "transformer", "vae", "scheduler"} <= set(os.listdir(out))
    raw = DiTPipeline.from_pretrained(str(out))
    pipe = load_pipeline(out)
    assert pipe.get_label_ids(["class7", "synonym"]) == [7, 999] and pipe.vae.config.scaling_factor == 0.5
    args = inputs(model)
    with torch.no_grad():
        ours = model(*args)
        theirs = pipe.transformer(args[0], timestep=args[1], class_labels=args[2]).sample
        unmatched = raw.transformer(args[0], timestep=args[1], class_labels=args[2]).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - unmatched).abs().max() > 1e-4  # why match_dit_timesteps is needed


def test_pipeline_run_equals_our_ddim_sampler(exported):
    model, vae, out = exported
    pipe = load_pipeline(out)
    labels = [1, 999]
    images = pipe(
        class_labels=labels,
        guidance_scale=4.0,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    latents = sample_latents(
        model,
        sampling_diffusion("ddim", 5),
        labels,
        cfg_scale=4.0,
        guide_channels=4,
        sampler="ddim",
        generator=torch.Generator().manual_seed(0),
    )
    ours = (decode(latents, vae, 0.5) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == (2, 16, 16, 3) and np.abs(images - ours).max() < 1e-4 and images.std() > 0


def test_export_refusals(tmp_path):
    with pytest.raises(ValueError, match="pixel-space models cannot be exported"):
        export_diffusers(tiny_1000(in_channels=3), tmp_path / "p", vae="none")
    with pytest.raises(ValueError, match="per-channel scale_factor"):
        export_diffusers(tiny_1000(), tmp_path / "p", vae=tiny_vae(), scale_factor=[0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="not a local directory"):
        export_diffusers(tiny_1000(), tmp_path / "p", vae="stabilityai/sd-vae-ft-ema")
    with pytest.raises(ValueError, match="3 class names for a model of 1000"):
        export_diffusers(tiny_1000(), tmp_path / "p", vae=tiny_vae(), class_names=["a", "b", "c"])
    with pytest.warns(UserWarning, match="10 classes.*guidance_scale=1"):
        export_diffusers(tiny_1000(num_classes=10), tmp_path / "ten", vae=tiny_vae())


def test_cli_inspect_and_export(tmp_path, capsys):
    import json

    torch.save(release_like().state_dict(), tmp_path / "ckpt.pt")
    assert interop_main(["inspect", "--ckpt", str(tmp_path / "ckpt.pt")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["preset"] is None and (shown["hidden_size"], shown["depth"], shown["input_size"]) == (384, 2, 4)
    tiny_vae().save_pretrained(tmp_path / "vae")
    (tmp_path / "dataset.json").write_text(
        json.dumps({"classes": [f"c{i}" for i in range(1000)], "scale_factor": 0.25, "vae": str(tmp_path / "vae")})
    )
    assert (
        interop_main(
            [
                "export",
                "--ckpt",
                str(tmp_path / "ckpt.pt"),
                "--vae",
                str(tmp_path / "vae"),
                "--dataset",
                str(tmp_path),
                "--out",
                str(tmp_path / "pipe"),
            ]
        )
        == 0
    )
    pipe = load_pipeline(tmp_path / "pipe")
    assert pipe.vae.config.scaling_factor == 0.25 and pipe.get_label_ids(["c5"]) == [5]
    recorded = json.loads((tmp_path / "pipe" / "ditscale_objective.json").read_text())  # no record: the paper's
    assert (recorded["kind"], recorded["prediction"], recorded["noise_schedule"]) == ("ddpm", "epsilon", "linear")
    assert interop_main(["inspect", "--ckpt", str(tmp_path / "nope.pt")]) == 2
