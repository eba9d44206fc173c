"""The reference semantics of a mask, written independently of fx: forward hooks.

At step i, a block with m[i, b] = 1 runs and its output is cached; with m[i, b] = 0
the hook replaces its output by the cached one (the block still runs here, which
does not change what the rest of the network sees).

By default the hooks sit on a deep copy of the model, so the reference never sees
the calls that maskc's step graphs make into the original's submodules, and it can
be built before or after ``maskc.compile`` and stay live beside it.

``np_feature_shift2`` is the feature-shift charge's reference, written with numpy.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch


def np_feature_shift2(d: Any) -> float:
    """|mean d|^2 - tr Cov(d) / n of n paired feature differences d [n, k] (numpy's n - 1 covariance): the unbiased
    squared shift of the mean feature, FD's mean term."""
    import numpy as np

    d = np.asarray(d, dtype=np.float64)
    return float((d.mean(0) ** 2).sum() - np.trace(np.atleast_2d(np.cov(d.T, ddof=1))) / len(d))


class ReferenceOverflow(Exception):
    """The reference was called more times than the mask has rows."""


class HookReference:
    def __init__(self, model: torch.nn.Module, bits: torch.Tensor, names: list[str], copy_model: bool = True) -> None:
        self.model = copy.deepcopy(model) if copy_model else model
        self.bits, self.names = bits, names
        self.step = 0
        self.cache: dict[str, Any] = {}
        modules = dict(self.model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(j, n)) for j, n in enumerate(names)]

    def _hook(self, j: int, name: str) -> Callable:
        def hook(_m: Any, _a: Any, out: Any) -> Any:
            if bool(self.bits[self.step, j]):
                self.cache[name] = out
                return None
            return self.cache[name]

        return hook

    def reset(self) -> None:
        self.step = 0
        self.cache.clear()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.step >= self.bits.shape[0]:
            raise ReferenceOverflow(f"step {self.step} of a {self.bits.shape[0]}-row mask")
        before = dict(self.cache)
        try:
            with torch.no_grad():
                out = self.model(*args, **kwargs)
        except Exception:
            self.cache = before  # a refused call leaves the cache as it was (hooks may have written)
            raise
        self.step += 1
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
