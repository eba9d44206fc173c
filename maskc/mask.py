"""Mask: which block runs at which step, and its text file format.

``bits[i, b]`` is True when block ``names[b]`` runs at step ``i`` (the i-th model
evaluation of a generation) and False when the rest of the network sees the
output it produced at the latest earlier step where it ran.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np
import torch

from maskc.errors import MaskFileError, MaskMismatchError, MaskShapeError

__all__ = ["Mask", "fingerprint"]

FORMAT = "maskc.mask"
VERSION = 1


def block_signature(model: torch.nn.Module, name: str) -> str:
    """A block's type and parameter shapes, as text."""
    m = dict(model.named_modules()).get(name)
    if m is None:
        return "missing"
    return type(m).__name__ + "(" + ",".join(f"{pn}{tuple(p.shape)}" for pn, p in m.named_parameters()) + ")"


def fingerprint(model: torch.nn.Module, names: Sequence[str]) -> str:
    """Hash of the backbone class and each block's type and parameter shapes."""
    modules = dict(model.named_modules())
    h = hashlib.sha256(type(model).__name__.encode())
    for n in names:  # format v1: keep byte-for-byte, saved masks depend on it
        m = modules.get(n)
        h.update(f"|{n}:{type(m).__name__}".encode())
        if m is not None:
            for pn, p in m.named_parameters():
                h.update(f"{pn}{tuple(p.shape)}".encode())
    return h.hexdigest()[:16]


def _missing_message(missing: list[str], modules: list[str], model: str, total: int) -> str:
    """Say which mask blocks the model lacks; suggest the closest module names when a few are misspelled."""
    import difflib

    close = {n: difflib.get_close_matches(n, modules, n=3, cutoff=0.8) for n in missing[:3]}
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    if any(close.values()) and len(missing) <= max(1, total // 2):
        named = "; ".join(
            f"{n!r}" + (f" (did you mean {' or '.join(repr(c) for c in cs)}?)" if cs else "") for n, cs in close.items()
        )
        return (f"mask block{'s' if len(missing) > 1 else ''} {named}{more} "
                f"{'are not submodules' if len(missing) > 1 else 'is not a submodule'} of {model}. "
                "Expected qualified names from model.named_modules(); fix the misspelled name in the mask "
                "(maskc.blocks(model) lists the default blocks)")
    return (f"mask block {missing[0]!r}{more} {'is not a submodule' if len(missing) == 1 else 'are not submodules'} "
            f"of {model}; "
            "the mask was made for another model. Learn or build a mask for this one.")


def _short(sig: str) -> str:
    return hashlib.sha256(sig.encode()).hexdigest()[:8]


def _to_bits(bits: Any) -> torch.Tensor:
    if isinstance(bits, np.ndarray):
        bits = torch.from_numpy(bits)
    elif not isinstance(bits, torch.Tensor):
        try:
            bits = torch.as_tensor(np.asarray(bits))
        except (TypeError, ValueError) as e:
            raise MaskShapeError(f"mask bits must be a [T, B] array of 0/1 or bools; got {type(bits).__name__}: {e}") from None
    if bits.dtype != torch.bool:
        if bits.dtype.is_complex or not bool(((bits == 0) | (bits == 1)).all()):
            raise MaskShapeError(
                f"mask bits must be bool or 0/1; got dtype {bits.dtype} with other values. Threshold them first."
            )
        bits = bits != 0
    if bits.dim() != 2:
        raise MaskShapeError(f"mask bits must have shape [T, B]; got shape {tuple(bits.shape)}")
    return bits.detach().to("cpu").clone()


class Mask:
    """A T x B boolean mask over named blocks, with metadata recorded in its file."""

    def __init__(self, bits: Any, names: Sequence[str], meta: dict[str, Any] | None = None) -> None:
        self.bits = _to_bits(bits)
        self.names = [str(n) for n in names]
        if len(self.names) != self.bits.shape[1]:
            raise MaskShapeError(
                f"mask has {self.bits.shape[1]} columns but {len(self.names)} block names; expected one column per block"
            )
        if len(set(self.names)) != len(self.names):
            raise MaskShapeError("block names must be unique")
        if self.bits.shape[0] < 1:
            raise MaskShapeError("a mask needs at least one step (T >= 1)")
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def full(cls, steps: int, names: Sequence[str], meta: dict[str, Any] | None = None) -> "Mask":
        """Every block runs at every step."""
        return cls(torch.ones(int(steps), len(names), dtype=torch.bool), names, meta)

    @property
    def steps(self) -> int:
        return int(self.bits.shape[0])

    def __repr__(self) -> str:
        return f"Mask(steps={self.steps}, blocks={len(self.names)}, kept={self.bits.float().mean():.3f})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mask) and self.names == other.names and torch.equal(self.bits, other.bits)

    # -- file format ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "names": self.names,
            "bits": ["".join("1" if v else "0" for v in row) for row in self.bits.tolist()],
        }
        for k in ("backbone", "fingerprint", "block_hashes", "scheduler", "timesteps", "provenance"):
            if k in self.meta:
                d[k] = self.meta[k]
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temp file in the same folder, then rename)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".mask-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def from_dict(cls, d: Any, source: str = "mask") -> "Mask":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise MaskFileError(f"{source} is not a maskc mask file (expected a JSON object with format={FORMAT!r})")
        if d.get("version") != VERSION:
            raise MaskFileError(f"{source} has format version {d.get('version')!r}; this maskc reads version {VERSION}")
        names, rows = d.get("names"), d.get("bits")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MaskFileError(f"{source}: 'names' must be a list of block names")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, str) and set(r) <= {"0", "1"} for r in rows):
            raise MaskFileError(f"{source}: 'bits' must be a non-empty list of strings of 0 and 1")
        if any(len(r) != len(names) for r in rows):
            raise MaskFileError(f"{source}: every row of 'bits' must have {len(names)} characters, one per block")
        bits = torch.tensor([[c == "1" for c in r] for r in rows], dtype=torch.bool).reshape(len(rows), len(names))
        meta = {k: d[k] for k in ("backbone", "fingerprint", "block_hashes", "scheduler", "timesteps", "provenance") if k in d}
        bh = meta.get("block_hashes")
        if bh is not None and (not isinstance(bh, list) or len(bh) != len(names) or not all(isinstance(h, str) for h in bh)):
            raise MaskFileError(f"{source}: 'block_hashes' must be a list of strings, one per block")
        for k in ("backbone", "fingerprint", "scheduler"):
            if k in meta and not isinstance(meta[k], str):
                raise MaskFileError(f"{source}: {k!r} must be a string, got {type(meta[k]).__name__}")
        ts = meta.get("timesteps")
        if ts is not None and (
            not isinstance(ts, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in ts)
        ):
            raise MaskFileError(f"{source}: 'timesteps' must be a list of numbers")
        if "provenance" in meta and not isinstance(meta["provenance"], dict):
            raise MaskFileError(f"{source}: 'provenance' must be a JSON object")
        try:
            return cls(bits, names, meta)
        except MaskShapeError as e:
            raise MaskFileError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mask":
        """Read a mask file; a corrupt or truncated file raises MaskFileError."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise MaskFileError(f"{path} is not valid JSON ({type(e).__name__}: {e}); the file is corrupt or truncated") from None
        except OSError as e:
            raise MaskFileError(f"cannot read mask file {path}: {e}") from None
        return cls.from_dict(d, source=str(path))

    def for_model(self, model: torch.nn.Module) -> "Mask":
        """A copy that records ``model``'s class and block fingerprint."""
        m = Mask(self.bits, self.names, self.meta)
        m.meta["backbone"] = type(model).__name__
        m.meta["fingerprint"] = fingerprint(model, self.names)
        m.meta["block_hashes"] = [_short(block_signature(model, n)) for n in self.names]
        return m

    def check_scheduler(self, scheduler: Any) -> None:
        """Refuse a mask learned for another scheduler or step count (call after set_timesteps)."""
        name = self.meta.get("scheduler")
        if name is not None and name != type(scheduler).__name__:
            raise MaskMismatchError(
                f"mask was made for a {name}, not a {type(scheduler).__name__}; use the scheduler it was made for "
                "or make a mask for this one"
            )
        ts = getattr(scheduler, "timesteps", None)
        if ts is None:
            return
        ts = [float(t) for t in ts]
        if len(ts) != self.steps:
            raise MaskMismatchError(
                f"scheduler has {len(ts)} steps but the mask has T={self.steps}; call "
                f"scheduler.set_timesteps({self.steps}) or use a mask with {len(ts)} rows"
            )
        want = self.meta.get("timesteps")
        if want is not None:
            for i, (a, b) in enumerate(zip(want, ts)):
                if abs(float(a) - b) > 1e-6:
                    raise MaskMismatchError(
                        f"timestep {i} of the scheduler is {b:g}, the mask was made for {float(a):g}; "
                        "the schedules differ (spacing or step count)"
                    )

    def check(self, model: torch.nn.Module, scheduler: Any = None) -> None:
        """Refuse a mask made for another model (or scheduler), naming the first difference."""
        if scheduler is not None:
            self.check_scheduler(scheduler)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise MaskMismatchError(_missing_message(missing, list(modules), type(model).__name__, len(self.names)))
        bb = self.meta.get("backbone")
        if bb is not None and bb != type(model).__name__:
            raise MaskMismatchError(f"mask was made for a {bb}, not a {type(model).__name__}")
        bh = self.meta.get("block_hashes")
        if bh is not None:
            for n, h in zip(self.names, bh):
                if h != _short(block_signature(model, n)):
                    raise MaskMismatchError(
                        f"block {n!r} differs from the one the mask was made for: this model has "
                        f"{block_signature(model, n)[:200]}. The mask was made for another model; make one for this model"
                    )
        fp = self.meta.get("fingerprint")
        if fp is not None and fp != fingerprint(model, self.names):
            raise MaskMismatchError(
                f"mask fingerprint {fp} does not match this {type(model).__name__}'s blocks "
                f"({fingerprint(model, self.names)}): same names, other block types or shapes"
            )
