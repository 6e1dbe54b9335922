"""Labelled PNG grids and the trainer's EMA grid (fixed noise and labels, PNG + TensorBoard)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditscale.models import build_dit
from ditscale.sampling import GridConfig, ema_grid, save_grid

torch.set_num_threads(1)


def pixel_model(**kw):
    model = build_dit(
        "DiT-S/2",
        **{"depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 8, "in_channels": 3, "num_classes": 5, **kw},
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_one_row_per_class_in_order_with_labels(tmp_path):
    images = np.zeros((5, 8, 8, 3), np.uint8)
    images[:, :, :, 0] = np.arange(5)[:, None, None] * 50  # red level = position
    grid = save_grid(
        images, [7, 7, 2, 7, 2], tmp_path / "g.png", class_names=[f"name{i}" for i in range(10)], min_cell=16
    )
    loaded = np.asarray(Image.open(tmp_path / "g.png"))
    assert loaded.shape == (2 + 2 * (16 + 2), grid.width, 3)
    label_w = grid.width - 3 * (16 + 2) - 2  # 3 columns: class 7 has 3
    tile = lambda r, c: loaded[2 + r * 18 : 2 + r * 18 + 16, label_w + 2 + c * 18 : label_w + 2 + c * 18 + 16]
    assert [tile(0, c)[0, 0, 0] for c in range(3)] == [0, 50, 150]  # class 7 first, its images in order
    assert [tile(1, c)[0, 0, 0] for c in range(2)] == [100, 200]
    assert (tile(1, 2) == 255).all()  # short row padded white
    assert (loaded[:, :label_w] < 128).any()  # text drawn in the label column
    unlabelled = save_grid(images, [7, 7, 2, 7, 2], tmp_path / "u.png", min_cell=16)
    assert unlabelled.width < grid.width  # ids only: narrower column


def test_float_images_and_bad_inputs(tmp_path):
    grid = save_grid(torch.zeros(2, 3, 4, 4), [0, 1], tmp_path / "f.png", min_cell=4)
    assert np.asarray(grid)[2, -3].tolist() == [128, 128, 128]  # 0.0 → 128
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        save_grid(np.zeros((2, 4, 4, 3), np.uint8), [0, 1, 2], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"expected images \(N, H, W, 3\) uint8"):
        save_grid(np.zeros((2, 4, 4), np.uint8), [0, 1], tmp_path / "x.png")


def test_ema_grid_is_fixed_across_calls_and_logs_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = pixel_model().train()
    cfg = {"classes": [4, 1], "num_per_class": 3, "steps": 4, "seed": 3, "class_names": list("abcde")}
    writer = SummaryWriter(str(tmp_path / "tb"))
    first = ema_grid(model, cfg, 100, tmp_path / "grids", tb_writer=writer)
    second = ema_grid(model, GridConfig(**cfg), 200, tmp_path / "grids", tb_writer=writer)
    writer.close()
    assert model.training  # mode restored
    assert first.name == "grid_00000100.png" and second.name == "grid_00000200.png"
    a, b = np.asarray(Image.open(first)), np.asarray(Image.open(second))
    assert np.array_equal(a, b) and a.std() > 0
    with torch.no_grad():
        model.final_layer.linear.bias.add_(0.5)  # new weights → new grid
    assert not np.array_equal(a, np.asarray(Image.open(ema_grid(model, cfg, 300, tmp_path / "grids"))))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("samples/ema")
    assert [e.step for e in logged] == [100, 200] and (logged[0].height, logged[0].width) == a.shape[:2]


def test_grid_config_validation_and_defaults():
    assert GridConfig().class_ids(1000) == [207, 360, 387, 974, 88, 979, 417, 279]
    assert GridConfig().class_ids(3) == [0, 1, 2]
    cfg = GridConfig.from_dataset({"vae": "vae_dir", "scale_factor": [1.0, 2.0], "classes": ["x", "y"]}, steps=9)
    assert (cfg.vae, cfg.scale_factor, cfg.class_names, cfg.steps) == ("vae_dir", [1.0, 2.0], ["x", "y"], 9)
    with pytest.raises(ValueError, match=r"unknown grid setting\(s\) \['step'\]"):
        GridConfig.from_dict({"step": 3})
    with pytest.raises(ValueError, match="GridConfig.sampler: sampler 'euler' samples flow models"):
        GridConfig(sampler="euler")
    with pytest.raises(ValueError, match="GridConfig.sampler: unknown sampler 'plms'"):
        GridConfig(sampler="plms")
    GridConfig(sampler="euler", objective={"kind": "flow", "prediction": "velocity", "path": "linear"})
    with pytest.raises(ValueError, match="num_per_class must be a positive int"):
        GridConfig(num_per_class=0)
    with pytest.raises(ValueError, match=r"classes \[12\] out of range"):
        GridConfig(classes=[1, 12]).class_ids(10)
