"""One denoising loop for everything that samples: learning, evaluation, the demo.

``denoise`` is one model evaluation, with classifier-free guidance done the way
diffusers pipelines do it: conditional and unconditional inputs stacked in one
batch (so one compiled step serves both halves), guided noise
``eps_u + s * (eps_c - eps_u)``. Outputs with extra channels (a learned variance)
are cut to the sample's channels.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from maskc.errors import MaskcError

__all__ = ["stack_kwargs", "denoise", "generate", "first_tensor"]


def first_tensor(out: Any) -> torch.Tensor:
    """The model's prediction: its output if a tensor, else the first tensor leaf (``.sample``)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    for leaf in pytree.tree_leaves(out if not hasattr(out, "to_tuple") else out.to_tuple()):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise MaskcError(f"the model returned no tensor (got {type(out).__name__})")


def stack_kwargs(cond: dict, uncond: dict) -> dict:
    """Model kwargs for a [cond; uncond] batch: tensors concatenated on dim 0, the rest taken from cond."""
    if set(cond) != set(uncond):
        raise MaskcError(f"conditional and unconditional kwargs must have the same keys; got {sorted(cond)} and {sorted(uncond)}")
    return {k: pytree.tree_map(lambda a, b: torch.cat([a, b]) if isinstance(a, torch.Tensor) else a, cond[k], uncond[k])
            for k in cond}


def denoise(fn: Callable, x: torch.Tensor, t: torch.Tensor, kwargs: dict | None = None,
            guidance_scale: float | None = None, timestep_kw: str | None = None) -> torch.Tensor:
    """The (guided) noise prediction for ``x`` at ``t``.

    With ``guidance_scale`` set, ``kwargs`` must already be stacked (``stack_kwargs``)
    and the model sees ``[x; x]``. The timestep is passed as a length-batch tensor,
    positionally unless ``timestep_kw`` names it.
    """
    kwargs = kwargs or {}
    xin = torch.cat([x, x]) if guidance_scale is not None else x
    tt = torch.as_tensor(t, device=x.device).reshape(1).expand(xin.shape[0])
    out = first_tensor(fn(xin, **{timestep_kw: tt}, **kwargs) if timestep_kw else fn(xin, tt, **kwargs))
    out = out[:, : x.shape[1]]
    if guidance_scale is None:
        return out
    e_c, e_u = out.chunk(2)
    return e_u + guidance_scale * (e_c - e_u)


def generate(fn: Callable, scheduler: Any, noise: torch.Tensor, steps: int, kwargs: dict | None = None,
             guidance_scale: float | None = None, reset: Callable[[], None] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Final samples in [0, 1] from ``noise`` (the scheduler is copied, never mutated)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    step_kw = {"generator": generator} if generator is not None and "generator" in inspect.signature(sched.step).parameters else {}
    if reset is not None:
        reset()
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = denoise(fn, x, t, kwargs, guidance_scale)
            x = sched.step(eps, t, x, **step_kw).prev_sample
    return ((x + 1) / 2).clamp(0, 1)
