"""A tiny random feature network with the FID Inception's output contract, for tests and smoke runs of
the evaluation pipeline (training code, samplers) where the real weights are not at hand. Its numbers
measure nothing and must never be reported as FID."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyFeatureNet(nn.Module):
    """uint8 images (N, 3, H, W) → {"pool" (N, 32), "spatial" (N, 64), "logits" (N, 10)}, seeded."""

    def __init__(self, seed=0, size=32):
        super().__init__()
        self.size = size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.fc = nn.Linear(32, 10)

    def forward(self, images):
        x = F.interpolate(images.float() / 127.5 - 1, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))  # (N, 32, size/4, size/4)
        pool = x.mean((2, 3))  # (N, 32)
        spatial = x[:, :1].flatten(1)  # (N, (size/4)²)
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool) * 10}
