"""Fashion-MNIST: Debian's ``dataset-fashion-mnist`` for training, a shipped sample for evaluation and tests.

- ``load_images`` / ``load_labels`` read the full dataset (gzipped IDX) from
  ``data_root()``: ``$MASKC_FMNIST_ROOT`` if set, else Debian's
  ``/usr/share/datasets/fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``;
  no downloads, hubs are unreachable). Only the training scripts and
  ``examples/make_eval_stats.py`` need it.
- ``load_sample`` reads the few hundred test images shipped in
  ``maskc/models/weights/fmnist-eval/sample.safetensors`` (made by
  ``examples/make_eval_stats.py``), for code and tests that need real pixels
  without the dataset. The classifier features of all 10,000 test images, which
  FD-FMNIST and KID use, ship beside them (``maskc.eval.load_reference``).

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

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
DATA = DEFAULT_ROOT  # kept for callers that named the Debian folder
ROOT_ENV = "MASKC_FMNIST_ROOT"
EVAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "weights", "fmnist-eval")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
COUNTS = {"train": 60000, "test": 10000}
_MAGIC = {"images": 2051, "labels": 2049}


def data_root() -> str:
    """The dataset folder: ``$MASKC_FMNIST_ROOT`` when set and non-empty, else Debian's folder."""
    return os.environ.get(ROOT_ENV) or DEFAULT_ROOT


def _path(split: str, kind: str, root: str) -> str:
    if split not in COUNTS:
        raise MaskcError(f"split must be 'train' or 'test'; got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    return os.path.join(root, f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz")


def available(root: str | None = None) -> bool:
    """True when all four IDX files of the dataset are in ``root`` (default ``data_root()``)."""
    root = root or data_root()
    return all(os.path.exists(_path(s, k, root)) for s in COUNTS for k in _MAGIC)


def _read(split: str, kind: str, root: str | None) -> np.ndarray:
    """The raw uint8 payload of one IDX file, its header checked (magic number and item count)."""
    root = root or data_root()
    path = _path(split, kind, root)
    if not os.path.exists(path):
        raise MaskcError(
            f"{path} not found: the full Fashion-MNIST dataset is needed here (training, or regenerating the "
            f"shipped evaluation statistics). Install Debian's copy with `apt-get install -y dataset-fashion-mnist` "
            f"(files under {DEFAULT_ROOT}), or set {ROOT_ENV} to a folder holding the four gzipped IDX files. "
            f"Evaluation (FD-FMNIST, KID) and the tests do not need it: they use {EVAL_DIR}.")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = 16 if kind == "images" else 8
    magic, count = (int.from_bytes(raw[i:i + 4], "big") for i in (0, 4))
    expected = header + COUNTS[split] * (784 if kind == "images" else 1)
    if magic != _MAGIC[kind] or count != COUNTS[split] or len(raw) != expected:
        raise MaskcError(
            f"{path} is not the Fashion-MNIST {split} {kind} file: magic {magic}, {count} items, {len(raw)} bytes; "
            f"expected magic {_MAGIC[kind]}, {COUNTS[split]} items, {expected} bytes. Reinstall it with "
            f"`apt-get install --reinstall -y dataset-fashion-mnist`.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """Uint8 [N, 28, 28] pixels to float32 [N, 1, 32, 32] in [-1, 1], padded with -1 (the background)."""
    x = pixels.reshape(-1, 1, 28, 28).float() / 127.5 - 1.0
    return F.pad(x, (2, 2, 2, 2), value=-1.0)


def load_pixels(split: str = "train", root: str | None = None) -> torch.Tensor:
    """Uint8 [N, 28, 28], the dataset's pixels as stored."""
    return torch.from_numpy(_read(split, "images", root).copy()).reshape(-1, 28, 28)


def load_images(split: str = "train", root: str | None = None) -> torch.Tensor:
    """Float32 [N, 1, 32, 32] in [-1, 1], padded with -1 (``split`` is "train" or "test")."""
    return to_model_range(load_pixels(split, root))


def load_labels(split: str = "train", root: str | None = None) -> torch.Tensor:
    """Int64 [N] class indices 0..9 (see ``CLASSES``)."""
    return torch.from_numpy(_read(split, "labels", root).copy()).long()


def load_sample(path: str = EVAL_DIR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shipped test-image sample: images [S, 1, 32, 32] in [-1, 1] like ``load_images``, labels [S]
    and their indices [S] into the 10,000 test images (so ``images == load_images("test")[index]``)."""
    from safetensors.torch import load_file

    f = os.path.join(path, "sample.safetensors")
    if not os.path.exists(f):
        raise MaskcError(f"{f} not found: the package ships it; reinstall maskc, or regenerate it with "
                         f"`python examples/make_eval_stats.py` (needs `apt-get install -y dataset-fashion-mnist`)")
    t = load_file(f)
    return to_model_range(t["images"]), t["labels"].long(), t["index"].long()
