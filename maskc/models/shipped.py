"""The models shipped inside the package, and loading any diffusers model folder."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from maskc.errors import MaskcError
from maskc.mask import Mask

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


def pretrained(name: str = "fmnist-unet") -> tuple[torch.nn.Module, Mask, Any]:
    """(model in eval mode, its shipped learned mask, a scheduler set to the mask's step count).

    ``name``: ``"fmnist-unet"`` or ``"fmnist-dit"`` (``"unet"``, ``"dit"`` also work).
    The scheduler is the mask's class with the training noise schedule (1000 steps,
    linear betas), ``set_timesteps(mask.steps)`` already called; the mask is checked
    against both, so the three fit together.
    """
    import diffusers

    short = {v: k for k, v in SHIPPED.items()}.get(name, name)
    if short not in SHIPPED:
        raise MaskcError(f"no shipped model {name!r}; choose one of {sorted(SHIPPED.values())}")
    d = shipped_dir(short)
    mask_file = os.path.join(d, "mask_ddim20.json") if d is not None else None
    if d is None or not os.path.exists(mask_file or ""):
        raise MaskcError(f"the shipped model {SHIPPED[short]!r} is missing from {WEIGHTS}; reinstall maskc")
    model, _ = load_pretrained(short)
    mask = Mask.load(mask_file)
    cls = getattr(diffusers, mask.meta.get("scheduler", "DDIMScheduler"), None)
    if cls is None:
        raise MaskcError(f"{mask_file} names the scheduler {mask.meta.get('scheduler')!r}, which diffusers lacks")
    scheduler = cls(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(mask.steps)
    mask.check(model, scheduler)
    return model, mask, scheduler
