"""The FID Inception: same parameters and outputs as torchvision's Inception3 with pytorch-fid's changes,
loaded from a file with weights_only, and clear errors for files that are not it."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models.inception as tvi
from safetensors.torch import save_file

from ditscale.evaluate.inception import FIDInceptionV3, load_inception, resize_tf1

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_inception():
    """The FID architecture with random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


@pytest.fixture(scope="module")
def images():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))


@pytest.fixture(scope="module")
def outputs(random_inception, images):
    with torch.no_grad():
        return random_inception(images)


@pytest.fixture(scope="module")
def weights_file(random_inception, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_inception.state_dict(), path)
    return path


def test_output_contract(outputs):
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "pool": (2, 2048),
        "spatial": (2, 17 * 17 * 7),
        "logits": (2, 1008),
    }
    assert all(torch.isfinite(v).all() for v in outputs.values())


def test_matches_torchvision_with_pytorch_fid_changes(random_inception, images, outputs):
    """pytorch-fid's network is torchvision's Inception3(1008 classes, no aux) whose A/C/E average pools
    do not count padding and whose last block max-pools; build it that way and compare every output."""
    with torch.device("meta"):
        tv = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False).eval()
    tv.load_state_dict(random_inception.state_dict(), assign=True)  # same names and shapes, strictly
    in_last_block = {"on": False}
    tv.Mixed_7c.register_forward_pre_hook(lambda *_: in_last_block.update(on=True))
    tv.Mixed_7c.register_forward_hook(lambda *_: in_last_block.update(on=False))
    spatial = {}
    tv.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.update(x=o))
    avg_pool2d = F.avg_pool2d

    def fid_pool(x, kernel_size, stride=None, padding=0, **_):
        if in_last_block["on"]:
            return F.max_pool2d(x, kernel_size, stride, padding)
        return avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)

    x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(tvi.F, "avg_pool2d", fid_pool)
        tv.fc = nn.Identity()
        pool = tv(x)
    torch.testing.assert_close(outputs["pool"], pool, rtol=1e-4, atol=1e-5)
    ref_spatial = spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's (h, w, c) order
    torch.testing.assert_close(outputs["spatial"], ref_spatial, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["logits"], pool @ random_inception.fc.weight.T, rtol=1e-4, atol=1e-4)


def test_loads_back_from_pth(weights_file, images, outputs):
    net = load_inception(weights_file, device="cpu")
    assert not net.training
    with torch.no_grad():
        again = net(images)
    for k in outputs:
        torch.testing.assert_close(again[k], outputs[k])


def test_loads_safetensors_and_old_files_without_num_batches_tracked(random_inception, tmp_path):
    state = {k: v for k, v in random_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, tmp_path / "fid.safetensors")
    net = load_inception(tmp_path / "fid.safetensors", device="cpu")
    torch.testing.assert_close(net.fc.weight, random_inception.fc.weight)


def test_missing_file_says_which_file_and_where_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*github.com/mseitzer"):
        load_inception(tmp_path / "nope.pth")


def test_torchvision_imagenet_layout_is_rejected_with_key_names(tmp_path):
    tv = tvi.Inception3(num_classes=1000, aux_logits=True, init_weights=False)
    torch.save(tv.state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(ValueError) as err:
        load_inception(tmp_path / "imagenet.pth")
    msg = str(err.value)
    assert "unexpected keys (e.g. AuxLogits." in msg and "fc.weight: file (1000, 2048) vs network (1008, 2048)" in msg


def test_missing_keys_are_listed(random_inception, tmp_path):
    state = {k: v for k, v in random_inception.state_dict().items() if not k.startswith("Mixed_7c.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \(e.g. Mixed_7c\."):
        load_inception(tmp_path / "partial.pth")


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_never_run(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"fc.weight": Payload()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_inception(tmp_path / "evil.pth")
    assert "code ran" not in capsys.readouterr().out


def test_tf1_resize_uses_asymmetric_source_coordinates():
    x = torch.tensor([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    out = resize_tf1(x, 4)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 5.0, 10.0, 10.0]] * 4))


def test_tf1_input_path(random_inception, images):
    """resize='tf1' feeds the network (TF1-resized x - 128) / 128 and differs only slightly from 'torch'."""
    net = FIDInceptionV3(resize="tf1")
    x = net.preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() < 1
    torch.testing.assert_close(x[..., 0, 0], images[..., 0, 0].float() / 128 - 1)  # corners are not moved
    with pytest.raises(ValueError, match="resize must be one of"):
        FIDInceptionV3(resize="lanczos")
