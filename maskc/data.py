"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (no downloads: hubs are unreachable).

Images are padded from 28x28 to 32x32 with the background value, the size of the
shipped models' samples.
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F

from maskc.errors import MaskcError

DATA = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _read(split: str, kind: str, root: str) -> np.ndarray:
    prefix = "train" if split == "train" else "t10k"
    path = os.path.join(root, f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz")
    if not os.path.exists(path):
        raise MaskcError(f"{path} not found; Fashion-MNIST comes from Debian: apt-get install -y dataset-fashion-mnist")
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=16 if kind == "images" else 8)


def load_images(split: str = "train", root: str = DATA) -> torch.Tensor:
    """Float32 [N, 1, 32, 32] in [-1, 1], padded with -1 (``split`` is "train" or "test")."""
    x = torch.from_numpy(_read(split, "images", root).copy()).reshape(-1, 1, 28, 28).float() / 127.5 - 1.0
    return F.pad(x, (2, 2, 2, 2), value=-1.0)


def load_labels(split: str = "train", root: str = DATA) -> torch.Tensor:
    """Int64 [N] class indices 0..9 (see ``CLASSES``)."""
    return torch.from_numpy(_read(split, "labels", root).copy()).long()
