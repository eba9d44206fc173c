"""The models shipped inside the package, and loading any diffusers model folder."""
from __future__ import annotations

import json
import os

import torch

from maskc.errors import MaskcError

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SHIPPED = {"unet": "fmnist-unet", "dit": "fmnist-dit"}  # name -> folder under weights/


def shipped_dir(name: str = "unet") -> str | None:
    """The folder of shipped model ``name`` ("unet" or "dit"), or None if it is missing."""
    d = os.path.join(WEIGHTS, SHIPPED[name])
    return d if os.path.exists(os.path.join(d, "config.json")) else None


def load_pretrained(name_or_path: str) -> tuple[torch.nn.Module, str]:
    """(model in eval mode, its folder) for a shipped name or a diffusers ``save_pretrained`` folder.

    The class is the one ``config.json`` names; weights keep their stored dtype.
    """
    import diffusers

    path = os.path.join(WEIGHTS, SHIPPED[name_or_path]) if name_or_path in SHIPPED else name_or_path
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        raise MaskcError(f"{cfg} not found: expected a diffusers model folder (save_pretrained) or one of {sorted(SHIPPED)}")
    with open(cfg) as f:
        cls_name = json.load(f).get("_class_name")
    cls = getattr(diffusers, cls_name or "", None)
    if cls is None:
        raise MaskcError(f"{cfg} names no diffusers model class ({cls_name!r}); expected e.g. UNet2DModel")
    return cls.from_pretrained(path).eval(), path
