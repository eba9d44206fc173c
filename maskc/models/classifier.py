"""The Fashion-MNIST classifier whose features define FD-FMNIST and KID.

Inception features mean nothing for 32x32 grey clothing, and hubs are unreachable
here, so maskc ships its own small CNN (trained by ``examples/train_classifier.py``
with a fixed seed). ``forward`` returns the 128-d penultimate features, the
interface torchmetrics expects of a custom feature extractor; ``classify`` returns
logits. Input: [N, 1, 32, 32] images in [0, 1] (samples mapped from [-1, 1]).
"""
from __future__ import annotations

import os

import torch
from torch import nn

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "fmnist-classifier")


class FMNISTClassifier(nn.Module):
    """Four 3x3 conv layers (32-64-128-128), max-pooling, global average pool, linear head."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()

        def conv(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.body = nn.Sequential(
            conv(1, 32), nn.MaxPool2d(2),  # 16x16
            conv(32, 64), nn.MaxPool2d(2),  # 8x8
            conv(64, 128), nn.MaxPool2d(2),  # 4x4
            conv(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [N, 128] of images in [0, 1]."""
        return self.body((x.float() - 0.5) / 0.5)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self(x))


def load_classifier(path: str = WEIGHTS) -> FMNISTClassifier:
    """The shipped classifier in eval mode (weights from ``path``/model.safetensors)."""
    from safetensors.torch import load_file

    from maskc.errors import MaskcError

    f = os.path.join(path, "model.safetensors")
    if not os.path.exists(f):
        raise MaskcError(f"classifier weights not found at {f}; train them with examples/train_classifier.py --out {path}")
    m = FMNISTClassifier()
    m.load_state_dict(load_file(f))
    return m.eval().requires_grad_(False)
