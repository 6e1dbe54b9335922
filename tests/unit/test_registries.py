"""Registries keyed by name: data formats (reader, writer, merge, verify) and DiT block types. An unknown
name is an error listing the known ones; a new entry is one registration, and every path that takes a
name (data_prep writers, merge, verify, the reader, the config, the model, the planner) then accepts it."""

import json
import os

import numpy as np
import pytest
import torch

from data_prep.testing import write_synthetic_latents
from data_prep.verify import check_record, verify
from ditscale.config import ConfigError, DataConfig, ModelConfig
from ditscale.data import build_dataset
from ditscale.data.schema import FORMATS, DataFormat, data_format, register_format, validate_metadata
from ditscale.models import BLOCKS, BlockType, DiT, block_type, register_block
from ditscale.models.dit import DiTBlock

TOY_INDEX = "toy_index.json"


# --------------------------------------------------------------------------------------------------
# A third data format: one .npz per slice, a JSON index
# --------------------------------------------------------------------------------------------------


class ToyWriter:
    def __init__(
        self, output, latent_channels, latent_size, shard_size, image=None, record="posterior", compression="auto"
    ):
        self.dir, self.records = output.local, []

    def write(self, arrays, label, key, image=None):
        self.records.append((arrays["mean"], arrays["logvar"], label, key))

    def finish(self):
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, "records.npz")
        mean, logvar, label, key = (np.stack([r[i] for r in self.records]) for i in range(4))
        np.savez(path, mean=mean, logvar=logvar, label=label, key=key.astype(str))
        shards = [{"basename": "records.npz", "samples": len(self.records), "bytes": os.path.getsize(path)}]
        with open(os.path.join(self.dir, TOY_INDEX), "w") as f:
            json.dump({"shards": shards}, f)
        return shards


def toy_merge(root, names):
    shards = [
        {**s, "basename": f"{n}/{s['basename']}"}
        for n in names
        for s in json.load(open(os.path.join(root, n, TOY_INDEX)))["shards"]
    ]
    with open(os.path.join(root, TOY_INDEX), "w") as f:
        json.dump({"shards": shards}, f)


def _load(root, shard):
    return np.load(os.path.join(root, shard["basename"]), allow_pickle=False)


def toy_verify(root, shard, meta, k, rng):
    data = _load(root, shard)
    problems = [] if len(data["label"]) == shard["samples"] else [f"{shard['basename']}: wrong count"]
    for i in range(min(k, len(data["label"]))):
        rec = {c: data[c][i] for c in ("mean", "logvar")} | {"label": int(data["label"][i]), "key": str(data["key"][i])}
        problems += check_record(shard["basename"], rec, meta)
    return problems, min(k, len(data["label"]))


def toy_reader(root, meta, *, batch_size, seed, shuffle, hflip, local, shuffle_buffer, **options):
    items = []
    for shard in json.load(open(os.path.join(root, TOY_INDEX)))["shards"]:
        data = _load(root, shard)
        items += [
            {"mean": torch.from_numpy(data["mean"][i, 0]), "label": int(data["label"][i])}
            for i in range(len(data["label"]))
        ]
    return items


@pytest.fixture
def toy_format():
    fmt = register_format(
        DataFormat(
            "toy",
            TOY_INDEX,
            reader=f"{__name__}:toy_reader",
            writer=f"{__name__}:ToyWriter",
            merge=f"{__name__}:toy_merge",
            verify=f"{__name__}:toy_verify",
        )
    )
    yield fmt
    del FORMATS["toy"]


def test_a_registered_format_goes_through_writer_merge_verify_reader_and_config(toy_format, tmp_path):
    out = write_synthetic_latents(
        str(tmp_path / "ds"), 7, latent_channels=1, latent_size=2, num_classes=3, format="toy", num_slices=2
    )
    meta = json.load(open(tmp_path / "ds" / "dataset.json"))
    assert meta["format"] == "toy" and meta["num_samples"] == 7
    result = verify(out, records_per_shard=2)
    assert result.ok, result.problems
    assert (result.shards, result.samples, result.decoded) == (2, 7, 4)
    items = build_dataset(out, batch_size=2)
    assert len(items) == 7 and items[0]["mean"].shape == (1, 2, 2)
    DataConfig(root=out, format="toy").validate()


def test_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match=r"--format: unknown data format 'parquet'; known: mds, wds"):
        data_format("parquet", "--format")
    meta = {
        "format": "parquet",
        "resolution": 8,
        "latent_channels": 1,
        "latent_size": 1,
        "scale_factor": 1.0,
        "vae": "none",
        "classes": [],
        "num_samples": 0,
        "slices": [],
    }
    with pytest.raises(ValueError, match=r"x/dataset.json: 'format': unknown data format 'parquet'; known: mds, wds"):
        validate_metadata(meta, "x/dataset.json")
    with pytest.raises(ValueError, match="already registered"):
        register_format(FORMATS["mds"])


def test_every_registered_format_role_resolves():
    for fmt in FORMATS.values():
        for role in ("reader", "writer", "merge", "verify"):
            assert callable(fmt.load(role)), (fmt.name, role)


# --------------------------------------------------------------------------------------------------
# Block types
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def wide_mlp_block():
    kind = register_block(
        "adaln_zero_wide", BlockType(lambda d, h, r, q: DiTBlock(d, h, 2 * r, q, gated=True), "adaln", gated=True)
    )
    yield kind
    del BLOCKS["adaln_zero_wide"]


def test_a_registered_block_builds_runs_validates_and_plans(wide_mlp_block):
    from ditscale.plan import activation_memory

    kw = dict(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=2, num_heads=2, num_classes=3)
    model = DiT(**kw, block="adaln_zero_wide")
    assert model.blocks[0].mlp.fc1.out_features == 16 * 8
    out = model(torch.randn(2, 2, 4, 4), torch.tensor([1, 2]), torch.tensor([0, 2]))
    assert out.shape == (2, 4, 4, 4)
    ModelConfig(preset="DiT-S/2", block="adaln_zero_wide").validate()
    plain = activation_memory(model.config | {"block": "adaln_zero"}, 2, 2, 0)
    assert activation_memory(model.config, 2, 2, 0) == plain  # same conditioning, same planned tensors


def test_unknown_block_names_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown block 'unet'; choose one of adaln_zero, adaln, cross_attention, "
        r"in_context",
    ):
        block_type("unet")
    with pytest.raises(ConfigError, match=r"model.block: 'unet' is not one of adaln_zero, adaln"):
        ModelConfig(preset="DiT-S/2", block="unet").validate()
    with pytest.raises(ValueError, match="conditioning 'film'"):
        BlockType(DiTBlock, "film")
