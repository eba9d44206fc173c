"""The reference semantics of a mask, written independently of fx: forward hooks.

At step i, a block with m[i, b] = 1 runs and its output is cached; with m[i, b] = 0
the hook replaces its output by the cached one (the block still runs here, which
does not change what the rest of the network sees).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class HookReference:
    def __init__(self, model: torch.nn.Module, bits: torch.Tensor, names: list[str]) -> None:
        self.model, self.bits, self.names = model, bits, names
        self.step = 0
        self.cache: dict[str, Any] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(j, n)) for j, n in enumerate(names)]

    def _hook(self, j: int, name: str) -> Callable:
        def hook(_m: Any, _a: Any, out: Any) -> Any:
            if bool(self.bits[self.step, j]):
                self.cache[name] = out
                return None
            return self.cache[name]

        return hook

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            out = self.model(*args, **kwargs)
        self.step += 1
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
