"""Trajectory refinement: a search over whole masks, scored by the final samples.

The per-step objective (``maskc.learn``'s first phase) sees one step's output error;
what users see is the final sample. This phase scores a mask by the mean PSNR of the
final samples of a whole generation from the calibration noises against the
unmasked generation, saturating at 50 dB (``maskc.rollout.Rollout.score``; every
"psnr" below is that score), within the MACs window
[lo, hi] (``maskc.rollout.GenerationCost``, exact FlopCounterMode counts).

1. Peers: every schedule of ``maskc.schedules.peer_library`` whose MACs are at most
   ``hi`` (and not far below ``lo``) is scored as it is.
2. Seeds: the learned mask projected to the budget, and the best peers, fitted into
   the window (rows upgraded at the steps whose output changes most, or downgraded
   where it changes least).
3. Local search from the best seed, first improvement: a move replaces one step's row
   by a row of the vocabulary (every block, none, the k outermost blocks at each end,
   the rows peers use, the step's learned top-m blocks) or flips one block at one
   step; a move that leaves the window is repaired at another step, or dropped.

Invariants: every mask scored has its exact MACs in [lo, hi] except the peers of
step 1; the result is never worse on the calibration noises than the best seed, and
so than the best fitted peer; the search is deterministic for a seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from maskc.errors import MaskcError
from maskc.mask import Mask
from maskc.rollout import GenerationCost, Rollout

__all__ = ["RefineResult", "refine", "row_vocabulary", "fit_to_window"]


@dataclass
class RefineResult:
    bits: torch.Tensor  # rectified
    psnr: float  # calibration score, Rollout.score (dB)
    macs_fraction: float
    seed: str  # the seed the search started from
    evaluations: int  # masks scored
    peers: list[dict[str, Any]] = field(default_factory=list)  # every scored peer: method, settings, macs, psnr
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (evaluation, psnr, macs) of improvements


def row_vocabulary(names: Sequence[str], peers: Sequence[Mask] = ()) -> list[torch.Tensor]:
    """Rows any step may take: every block, none, the k outermost blocks at each end (mask order is
    execution order), and every distinct row the peers use. Distinct, cheapest first is not implied."""
    B = len(names)
    rows = [torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)]
    for k in range(1, (B + 1) // 2):
        r = torch.zeros(B, dtype=torch.bool)
        r[:k] = True
        r[B - k:] = True
        rows.append(r)
    for m in peers:
        rows.extend(m.bits[1:].unbind(0))
    seen: set[bytes] = set()
    out = []
    for r in rows:
        key = bytes(r.to(torch.uint8).tolist())
        if key not in seen:
            seen.add(key)
            out.append(r.clone())
    return out


def fit_to_window(bits: torch.Tensor, cost: GenerationCost, lo: float, hi: float, priority: Sequence[float],
                  vocab: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``bits`` moved into [lo, hi] MACs, or None: rows upgraded to supersets (steps of highest
    ``priority`` first) while below, downgraded to subsets (lowest priority first) while above."""
    b = cost.rectify(bits)
    f = cost.fraction(b, rectified=True)
    T = b.shape[0]
    if f < lo:
        for i in sorted(range(1, T), key=lambda k: -priority[k]):
            best = None
            for r in vocab:
                if bool((r >= b[i]).all()) and not torch.equal(r, b[i]):
                    c = b.clone()
                    c[i] = r
                    c = cost.rectify(c)
                    fc = cost.fraction(c, rectified=True)
                    if fc <= hi and (best is None or fc > best[1]):
                        best = (c, fc)
            if best is not None:
                b, f = best
            if f >= lo:
                return b
        return None
    if f > hi:
        for i in sorted(range(1, T), key=lambda k: priority[k]):
            best = None
            for r in vocab:
                if bool((r <= b[i]).all()) and not torch.equal(r, b[i]):
                    c = b.clone()
                    c[i] = r
                    c = cost.rectify(c)
                    fc = cost.fraction(c, rectified=True)
                    if fc >= lo and (best is None or fc < best[1]):
                        best = (c, fc)
            if best is not None:
                b, f = best
            if f <= hi:
                return b
        return None
    return b


def _describe(m: Mask) -> dict[str, Any]:
    prov = dict(m.meta.get("provenance", {}))
    return {"method": prov.pop("method", "?"), "settings": {k: v for k, v in prov.items() if k != "full_steps"}}


def refine(
    rollout: Rollout,
    cost: GenerationCost,
    seeds: Sequence[tuple[str, torch.Tensor]],
    peers: Sequence[Mask],
    lo: float,
    hi: float,
    priority: Sequence[float],
    step_rows: Sequence[Sequence[torch.Tensor]] | None = None,
    evaluations: int = 120,
    fitted_peers: int = 6,
    peer_floor: float = 0.15,
    seed: int = 0,
    progress: Callable[[int, float, float], None] | None = None,
    score: str = "saturating",
) -> RefineResult | None:
    """Search masks in the MACs window [lo, hi] for the best final-sample PSNR (module docstring).

    ``seeds``: (label, bits) to start from besides the fitted peers; ``priority[i]``: how
    much step i's output changes (the original's δ), for fitting; ``step_rows[i]``: rows
    only step i may take (its learned top-m blocks); ``evaluations``: masks scored by the
    local search after the seeds; ``score``: "saturating" (``Rollout.score``) or "psnr"
    (``Rollout.psnr``, the ablation). None when no seed can be fitted into the window.
    """
    T = rollout.T
    vocab = row_vocabulary(cost.names, peers)
    n_scored = 0

    if score not in ("saturating", "psnr"):
        raise MaskcError(f"score must be 'saturating' or 'psnr', got {score!r}")
    measure = rollout.score if score == "saturating" else rollout.psnr

    def scored(b: torch.Tensor) -> float:
        nonlocal n_scored
        n_scored += 1
        return measure(b)

    # 1. peers as they are
    scored_peers: list[tuple[float, float, Mask, torch.Tensor]] = []
    report: list[dict[str, Any]] = []
    for m in peers:
        b = cost.rectify(m.bits)
        f = cost.fraction(b, rectified=True)
        if f > hi or f < lo - peer_floor:
            continue
        p = scored(b)
        scored_peers.append((p, f, m, b))
        report.append({**_describe(m), "macs_fraction": f, "psnr": p})
    # 2. seeds: given ones, then the best peers fitted into the window
    cands: list[tuple[str, torch.Tensor]] = []
    for lbl, b in seeds:
        fb = fit_to_window(b, cost, lo, hi, priority, vocab)
        if fb is not None:
            cands.append((lbl, fb))
    for p, f, m, b in sorted(scored_peers, key=lambda z: -z[0])[:fitted_peers]:
        fb = fit_to_window(b, cost, lo, hi, priority, vocab)
        if fb is not None:
            cands.append((f"{_describe(m)['method']} {_describe(m)['settings']} fitted", fb))
    best: tuple[float, torch.Tensor, float, str] | None = None
    for lbl, b in cands:
        f = cost.fraction(b, rectified=True)
        if not lo <= f <= hi:
            continue
        p = scored(b)
        if best is None or p > best[0]:
            best = (p, b, f, lbl)
            rollout.accept()
    if best is None:
        return None
    p_best, b_best, f_best, label = best
    history = [(n_scored, p_best, f_best)]
    # 3. local search
    rng = random.Random(seed)
    seen = {bytes(b_best.flatten().to(torch.uint8).tolist())}
    tries = 0
    done = 0
    def move(b: torch.Tensor, i: int, rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """A copy of ``b`` with step i's row replaced from ``rows`` or one of its blocks flipped, rectified."""
        c = b.clone()
        if rng.random() < 0.5:
            c[i] = rng.choice(rows)
        else:
            j = rng.randrange(len(cost.names))
            c[i, j] = not bool(c[i, j])
        c = cost.rectify(c)
        return c, cost.fraction(c, rectified=True)

    while done < evaluations and tries < evaluations * 20:
        tries += 1
        i = rng.randrange(1, T) if T > 1 else 0
        c, f = move(b_best, i, list(vocab) + list(step_rows[i] if step_rows is not None else []))
        if not lo <= f <= hi:  # repair at another step
            fixed = None
            for _ in range(12):
                k = rng.randrange(1, T) if T > 1 else 0
                if k == i:
                    continue
                d, fd = move(c, k, vocab)
                if lo <= fd <= hi:
                    fixed = (d, fd)
                    break
            if fixed is None:
                continue
            c, f = fixed
        key = bytes(c.flatten().to(torch.uint8).tolist())
        if key in seen:
            continue
        seen.add(key)
        done += 1
        p = scored(c)
        if p > p_best + 1e-9:
            rollout.accept()
            p_best, b_best, f_best = p, c, f
            history.append((n_scored, p_best, f_best))
        if progress is not None:
            progress(done, p_best, f_best)
    return RefineResult(b_best, p_best, f_best, label, n_scored, report, history)
