"""The models shipped inside the package, and loading any diffusers model folder."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from maskc.errors import MaskcError
from maskc.mask import Mask

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SHIPPED = {"unet": "fmnist-unet", "dit": "fmnist-dit", "sd": "fmnist-sd"}  # name -> folder under weights/
CAPTIONS_FILE = "captions.safetensors"  # the caption table beside a caption-conditioned model (key "captions")
NULL_CAPTION = 10  # the caption table's null row (the unconditional input of classifier-free guidance)


def shipped_dir(name: str = "unet") -> str | None:
    """The folder of shipped model ``name`` ("unet", "dit" or "sd"), or None if it is missing."""
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

    ``name``: ``"fmnist-unet"``, ``"fmnist-dit"`` or ``"fmnist-sd"`` (``"unet"``, ``"dit"``, ``"sd"``
    also work). The SD-like U-Net reads ``encoder_hidden_states``: build them with ``captions``.
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


def _folder(name_or_path: str) -> str:
    """A shipped short or full name (``"sd"``, ``"fmnist-sd"``) or a folder, as a folder."""
    if name_or_path in SHIPPED:
        return os.path.join(WEIGHTS, SHIPPED[name_or_path])
    if name_or_path in SHIPPED.values():
        return os.path.join(WEIGHTS, name_or_path)
    return name_or_path


def has_captions(name_or_path: str) -> bool:
    """True when the model folder (or shipped name) has a caption table (``captions.safetensors``)."""
    return os.path.exists(os.path.join(_folder(name_or_path), CAPTIONS_FILE))


def captions(name_or_path: str = "fmnist-sd", labels: Any = None) -> torch.Tensor:
    """The caption table of a caption-conditioned model, or the rows of ``labels``.

    Without ``labels``: float32 [11, L, D]; row c < 10 is the caption of Fashion-MNIST class c
    (``maskc.data.CLASSES``), row ``NULL_CAPTION`` (10) the null caption. With ``labels``
    (ints or a tensor, ``NULL_CAPTION`` for the null caption): ``encoder_hidden_states``
    [len(labels), L, D] for the model. Classifier-free guidance, as the shipped mask was
    learned (guidance 2.0)::

        model, mask, sched = maskc.pretrained("fmnist-sd")
        cond = {"encoder_hidden_states": captions("fmnist-sd", [0, 1, 2])}
        uncond = {"encoder_hidden_states": captions("fmnist-sd", [NULL_CAPTION] * 3)}

    ``name_or_path``: ``"fmnist-sd"`` / ``"sd"`` or a model folder holding ``captions.safetensors``
    (written by ``examples/train_fmnist.py --arch sd``).
    """
    from safetensors.torch import load_file

    f = os.path.join(_folder(name_or_path), CAPTIONS_FILE)
    if not os.path.exists(f):
        raise MaskcError(f"{f} not found: {name_or_path!r} has no caption table (the shipped caption-conditioned "
                         f"model is 'fmnist-sd')")
    table = load_file(f).get("captions")
    if table is None or table.dim() != 3 or table.shape[0] <= NULL_CAPTION:
        raise MaskcError(f"{f} holds no caption table [{NULL_CAPTION + 1}, tokens, dim] under the key 'captions'")
    if labels is None:
        return table
    idx = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    bad = [int(y) for y in idx if not 0 <= int(y) < table.shape[0]]
    if bad:
        raise MaskcError(f"caption labels {bad} are outside 0..{table.shape[0] - 1} (row {NULL_CAPTION} is the null caption)")
    return table[idx]
