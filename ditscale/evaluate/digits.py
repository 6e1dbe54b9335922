"""A feature network for scikit-learn's digits, standing in for the Inception where the data are 8×8 digits
(the quickstart, the miniature scaling study in the tests): a small classifier (MLP) trained on the real
digits in a few seconds on a CPU, with the FID Inception's output contract.

    python -m ditscale.evaluate.digits --out digits_net.safetensors      # train once (~5 s), then
    python -m ditscale.evaluate.digits --reference digits_ref.npz        # the real digits as an ADM batch

Its FID measures distance to the digits in the features of a digit classifier; like the Inception's, the
numbers compare models evaluated with the same weights file only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DIGIT_MAX = 16.0  # scikit-learn's digits hold integer intensities 0..16


def load_real_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float in [0, 16], labels (N,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


class DigitsFeatureNet(nn.Module):
    """uint8 images (N, 3, H, W) → {"pool" (N, 64), "spatial" (N, 32), "logits" (N, 10)}: an MLP over the
    64 pixels (images are made grey and area-resized to 8×8 first)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, images):
        x = images.float().mean(1, keepdim=True) / 127.5 - 1  # (N, 1, H, W) in [-1, 1]
        if x.shape[-2:] != (8, 8):
            x = F.adaptive_avg_pool2d(x, 8)
        hidden = F.relu(self.fc1(x.flatten(1)))  # (N, 128)
        pool = F.relu(self.fc2(hidden))  # (N, 64)
        return {"pool": pool, "spatial": hidden[:, :32], "logits": self.fc3(pool)}


def real_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The real digits as the data_prep'd quickstart sees them: (N, 8, 8, 3) uint8 grey, labels (N,)."""
    images, labels = load_real_digits()
    grey = np.round(images / DIGIT_MAX * 255.0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), labels


def train_digits_net(steps: int = 300, seed: int = 0) -> tuple[DigitsFeatureNet, float]:
    """(network in eval mode, accuracy on a held-out fifth of the digits); full-batch Adam on the rest."""
    images, labels = real_digit_images()
    x, y = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)
    held = torch.arange(len(y)) % 5 == 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsFeatureNet()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = F.cross_entropy(net(x[~held])["logits"], y[~held])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (net(x[held])["logits"].argmax(1) == y[held]).double().mean().item()
    return net, accuracy


def save_digits_net(net: DigitsFeatureNet, path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def load_digits_net(path, device="cpu") -> DigitsFeatureNet:
    """The network from a safetensors file written by save_digits_net (ValueError naming the file)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits feature network weights not found: {path} "
            f"(write them with: python -m ditscale.evaluate.digits --out {path})"
        )
    net = DigitsFeatureNet()
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as e:
        raise ValueError(f"{path}: not the digits feature network's weights ({e})") from None
    return net.eval().requires_grad_(False).to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditscale.evaluate.digits", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="train the network and write its weights here (.safetensors)")
    p.add_argument("--reference", help="write the real digits as an ADM reference .npz (arr_0) here")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    if not (args.out or args.reference):
        p.error("give --out and/or --reference")
    if args.out:
        net, accuracy = train_digits_net(args.steps)
        save_digits_net(net, args.out)
        print(f"wrote {args.out} (held-out accuracy {accuracy:.1%})")
    if args.reference:
        np.savez(args.reference, arr_0=real_digit_images()[0])
        print(f"wrote {args.reference}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
