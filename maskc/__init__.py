"""maskc: timestep-aware block masking for diffusion backbones, compiled with torch.fx.

The public names of SPEC.md; everything else lives in submodules.
"""
from __future__ import annotations

from typing import Iterable

import torch

from maskc.errors import (
    BlockError,
    CaptureError,
    EmptyCacheError,
    InputChangedError,
    MaskcError,
    MaskFileError,
    MaskMismatchError,
    MaskShapeError,
    StepOverflowError,
)
from maskc.diff import diff
from maskc.export import export, load_exported
from maskc.graphs import RULES, block_graph, rectify
from maskc.learn import LearnConfig, learn
from maskc.mask import Mask
from maskc.models.shipped import pretrained
from maskc.pipelines import apply, remove
from maskc.runtime import TimestepModules, compile
from maskc.backend import MaskBackend, backend, reset

__version__ = "0.1.0"


def blocks(
    model: torch.nn.Module,
    types: Iterable[type] | None = None,
    names: Iterable[str] | None = None,
    example: tuple[tuple, dict] | None = None,
) -> list[str]:
    """Qualified names of the model's blocks, in forward execution order.

    Defaults come from the backbone table (see the README's support matrix);
    ``types`` or ``names`` override it. Execution order is observed by running
    ``model(*example[0], **example[1])`` (a batch-1 example is built for table
    backbones); without an example, ``named_modules`` order is returned.
    """
    from maskc.passes.blocks import example_inputs, execution_order, select_blocks

    chosen = select_blocks(model, types=types, names=names)
    if example is not None:
        return execution_order(model, chosen, *example)
    try:
        example = example_inputs(model)
        if example is None:
            return chosen
        return execution_order(model, chosen, *example)
    except Exception as e:  # noqa: BLE001 - the built example may not fit an unusual config
        import warnings

        warnings.warn(
            f"maskc.blocks: could not run a built example through {type(model).__name__} ({type(e).__name__}: {e}); "
            "returning blocks in named_modules order. Pass example=(args, kwargs) for execution order.",
            stacklevel=2,
        )
        return chosen


__all__ = [
    "BlockError",
    "CaptureError",
    "EmptyCacheError",
    "InputChangedError",
    "LearnConfig",
    "Mask",
    "RULES",
    "block_graph",
    "rectify",
    "MaskFileError",
    "MaskMismatchError",
    "MaskShapeError",
    "MaskcError",
    "StepOverflowError",
    "TimestepModules",
    "apply",
    "blocks",
    "compile",
    "backend",
    "reset",
    "MaskBackend",
    "diff",
    "export",
    "learn",
    "load_exported",
    "pretrained",
    "remove",
]
