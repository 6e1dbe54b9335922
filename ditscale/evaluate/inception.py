"""The FID Inception-v3: the network every published FID / sFID / IS number is measured with.

This is the TensorFlow Inception graph of 2015-12-05 (the one TTUR's and ADM's evaluators load) in the
PyTorch layout of pytorch-fid's port, `pt_inception-2015-12-05-6726825d.pth`: torchvision's Inception3
parameter names, 1008 logits, and the graph's quirks that differ from torchvision's ImageNet model
(average pools that do not count padding in the A/C/E blocks, a max pool in the last E block).
The weights come only from a file the user supplies; nothing is downloaded.

Outputs, per image (what the metrics consume):
  pool     (N, 2048)  pool_3, the FID features
  spatial  (N, 2023)  first 7 channels of mixed_6/conv (Mixed_6d.branch1x1), 17×17×7 flattened in the
                      TF (h, w, c) order, the sFID features of the ADM evaluator
  logits   (N, 1008)  pool_3 @ W of the softmax layer, without its bias, as the original IS code does
"""

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditscale.weights import read_tensors

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILENAME}"
WEIGHTS_HELP = (
    f"FID Inception-v3 weights, a local file: pytorch-fid's {WEIGHTS_FILENAME} (the TensorFlow Inception "
    f"graph of 2015-12-05 used by the TTUR/ADM evaluators, ported to PyTorch), downloaded once by you from "
    f"{WEIGHTS_URL} ; the same state dict as .safetensors also works. Never downloaded at run time."
)
RESIZE_MODES = ("torch", "tf1")


#################################################################################
#                                  Blocks                                       #
#################################################################################


class BasicConv2d(nn.Module):
    """conv (no bias) → batch norm → ReLU; `conv`/`bn` names match the checkpoint."""

    def __init__(self, in_ch, out_ch, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF's "SAME" average pool


class InceptionA(nn.Module):
    """35×35 block (Mixed_5b/c/d)."""

    def __init__(self, in_ch, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, kernel_size=1)

    def branches(self, x):
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ]

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionB(nn.Module):
    """35×35 → 17×17 reduction (Mixed_6a)."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (Mixed_6b/c/d/e)."""

    def __init__(self, in_ch, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def branches(self, x):
        dbl = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(dbl)))
        return [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ]

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """17×17 → 8×8 reduction (Mixed_7a)."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                self.branch7x7x3_4(self.branch7x7x3_3(b7)),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionE(nn.Module):
    """8×8 block with expanded 3×3 branches (Mixed_7b: average pool, Mixed_7c: max pool, as in the graph)."""

    def __init__(self, in_ch, pool):
        super().__init__()
        assert pool in ("avg", "max"), pool
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(dbl),
                self.branch3x3dbl_3b(dbl),
                self.branch_pool(pooled),
            ],
            1,
        )


#################################################################################
#                                  Network                                      #
#################################################################################


def resize_tf1(x, size):
    """Bilinear resize as TF1's ResizeBilinear (align_corners=False, no half-pixel centres): source
    coordinate = output index × in/out. This is what the TF graph inside the ADM evaluator does."""

    def weights(n_in):  # (size, n_in) interpolation matrix
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (src - lo).unsqueeze(1)
        eye = torch.eye(n_in, dtype=torch.float64)
        return (eye[lo] * (1 - frac) + eye[hi] * frac).to(x)

    h, w = x.shape[-2:]
    return weights(h) @ x @ weights(w).T  # (N, C, size, size)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID graph. forward(images (N, 3, H, W), uint8 or float in [0, 255]) →
    {"pool", "spatial", "logits"}. Images are resized to 299 bilinearly and scaled to [-1, 1]:
    resize="torch" is pytorch-fid's input path (half-pixel bilinear, x/127.5 - 1), resize="tf1" the TF
    graph's own (TF1 bilinear, (x - 128)/128), which ADM's evaluator and published numbers went through."""

    def __init__(self, resize="torch"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def preprocess(self, images):
        x = images.float()
        if self.resize == "tf1":
            x = x if x.shape[-2:] == (299, 299) else resize_tf1(x, 299)
            return (x - 128.0) / 128.0
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return x / 127.5 - 1.0

    def forward(self, images):
        x = self.preprocess(images)  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7) in TF's h, w, c order
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean((2, 3))  # (N, 2048)
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}


#################################################################################
#                                  Loading                                      #
#################################################################################


def check_state_dict(state, model, source="state dict"):
    """Raise a ValueError listing a few missing / unexpected / misshapen keys. BatchNorm's
    num_batches_tracked is optional (older PyTorch versions did not save it)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k])}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k]
    )
    problems = [
        f"{len(v)} {name} (e.g. {', '.join(v[:4])})"
        for name, v in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if v
    ]
    if problems:
        raise ValueError(f"{source} is not the FID Inception ({WEIGHTS_FILENAME} layout): " + "; ".join(problems))


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_inception(path, device=None, resize="torch"):
    """The FID Inception with weights from `path` (.pth via weights_only, or .safetensors), in eval mode
    on `device` (default: CUDA when present)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}. {WEIGHTS_HELP}")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = FIDInceptionV3(resize=resize)
    state = read_tensors(path)
    check_state_dict(state, model, source=str(path))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    counters = {k: torch.zeros((), dtype=torch.long) for k in model.state_dict() if k.endswith("num_batches_tracked")}
    model.load_state_dict({**counters, **state}, assign=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval().requires_grad_(False).to(device)
