"""Other methods' caching schedules written as maskc masks.

Every method then runs through the same compiled path, so comparisons measure the
schedule and nothing else. Each function returns a ``Mask`` whose row 0 runs every
block (the cache starts empty) and whose metadata names the method and its settings.

- DeepCache (Ma et al. 2024), uniform: a full step every ``interval`` steps; in
  between only the shallow branch runs, the outermost ``depth`` down and up stages of
  a U-Net, and the deep features come from the cache.
- DeepCache, non-uniform: the same, with the full steps spaced quadratically around a
  center step (denser there), DeepCache's ``sample_from_quad_center``.
- FORA (Selvaraju et al. 2024): every attention and MLP block of a DiT reuses its
  output, refreshed every ``interval`` steps; the residual glue is recomputed.
- Step-level reuse, uniform: every block reuses its output except at every
  ``interval``-th step (the simplest schedule: reuse the whole model every other step
  at interval 2); only the glue around the blocks runs at the other steps. For a DiT
  whose blocks are its transformer layers this is FORA's schedule.
- Step-level reuse, non-uniform: the same number of full steps, spaced quadratically
  around a center step (``quad_center_steps``).
- δ-threshold, in the manner of TeaCache (Liu et al. 2025), made static: the relative
  change δ of the original model's output between consecutive steps (measured once on
  calibration noise) is accumulated, and a step runs in full when the sum reaches the
  threshold (then the sum restarts); every other step reuses every block.
- Random at equal MACs: each run of steps >= 1 kept independently with a probability
  chosen so that the generation's measured MACs match a target (a sanity floor).

``peer_library`` lists them all over their settings: what a learned mask must beat.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

from maskc.errors import MaskcError
from maskc.mask import Mask

__all__ = ["deepcache_uniform", "deepcache_nonuniform", "fora", "random_equal_macs", "quad_center_steps", "step_reuse",
           "step_reuse_nonuniform", "delta_threshold", "peer_library"]


def _unet_stage_blocks(names: Sequence[str], depth: int) -> list[int]:
    ups = sorted({int(m.group(1)) for n in names if (m := re.match(r"up_blocks\.(\d+)\.", n))})
    downs = {int(m.group(1)) for n in names if (m := re.match(r"down_blocks\.(\d+)\.", n))}
    if not ups or not downs:
        raise MaskcError(
            "DeepCache schedules need U-Net blocks named down_blocks.K.* and up_blocks.K.* "
            f"(diffusers UNet2DModel / UNet2DConditionModel); got {list(names)[:4]}..."
        )
    if not 1 <= depth <= min(len(ups), len(downs)):
        raise MaskcError(f"DeepCache branch depth must be between 1 and {min(len(ups), len(downs))}; got {depth}")
    n_up = max(ups) + 1
    prefixes = tuple(f"down_blocks.{k}." for k in range(depth)) + tuple(f"up_blocks.{n_up - 1 - k}." for k in range(depth))
    return [j for j, n in enumerate(names) if n.startswith(prefixes)]


def _with_full_steps(names: Sequence[str], steps: int, full: Sequence[int], keep: Sequence[int], meta: dict) -> Mask:
    bits = torch.zeros(steps, len(names), dtype=torch.bool)
    bits[:, list(keep)] = True
    bits[sorted(set(full) | {0})] = True
    return Mask(bits, names, {"provenance": meta})


def deepcache_uniform(names: Sequence[str], steps: int, interval: int, depth: int = 1) -> Mask:
    """DeepCache 1:N: full steps 0, N, 2N, ...; otherwise only the outermost ``depth`` stages run."""
    if interval < 1:
        raise MaskcError(f"DeepCache interval must be >= 1; got {interval}")
    keep = _unet_stage_blocks(names, depth)
    return _with_full_steps(names, steps, range(0, steps, interval), keep,
                            {"method": "DeepCache uniform", "interval": interval, "depth": depth})


def quad_center_steps(steps: int, n_full: int, center: int, power: float = 2.0) -> list[int]:
    """``n_full`` distinct steps in [0, steps), step 0 included, spaced as |u|^power around ``center``.

    As DeepCache's non-uniform schedule, the power is lowered in 0.02 decrements
    until the rounded positions are distinct.
    """
    if not 1 <= n_full <= steps:
        raise MaskcError(f"need 1 <= n_full <= steps; got n_full={n_full}, steps={steps}")
    if n_full == steps:
        return list(range(steps))
    center = min(max(center, 0), steps - 1)
    p = power
    while p > 1.0:
        lo, hi = -(center ** (1 / p)), (steps - 1 - center) ** (1 / p)
        us = [lo + (hi - lo) * k / max(n_full - 1, 1) for k in range(n_full)]
        pos = {0} | {min(steps - 1, max(0, round(center + math.copysign(abs(u) ** p, u)))) for u in us}
        if len(pos) == n_full:
            return sorted(pos)
        p -= 0.02
    # power 1: evenly spaced
    return sorted({0} | {round(k * (steps - 1) / max(n_full - 1, 1)) for k in range(n_full)})[:n_full]


def deepcache_nonuniform(names: Sequence[str], steps: int, interval: int, depth: int = 1,
                         center: int | None = None, power: float = 2.0) -> Mask:
    """DeepCache non-uniform: as many full steps as 1:N has, denser around ``center`` (default steps // 2)."""
    n_full = math.ceil(steps / interval)
    c = steps // 2 if center is None else center
    full = quad_center_steps(steps, n_full, c, power)
    return _with_full_steps(names, steps, full, _unet_stage_blocks(names, depth),
                            {"method": "DeepCache non-uniform", "interval": interval, "depth": depth,
                             "center": c, "power": power, "full_steps": full})


def fora(names: Sequence[str], steps: int, interval: int) -> Mask:
    """FORA: every block (a DiT's attention and MLP layers) recomputed every ``interval`` steps, else cached."""
    if interval < 1:
        raise MaskcError(f"FORA interval must be >= 1; got {interval}")
    return _with_full_steps(names, steps, range(0, steps, interval), [],
                            {"method": "FORA", "interval": interval})


def random_equal_macs(names: Sequence[str], steps: int, target: float,
                      macs_fraction: Callable[[Mask], float], seed: int = 0, tolerance: float = 0.01) -> Mask:
    """Independent random runs (row 0 full) whose generation MACs, by ``macs_fraction``, are within
    ``tolerance`` of ``target`` when reachable (bisection on the keep probability, fixed noise)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(steps, len(names), generator=g)

    def make(p: float) -> Mask:
        bits = u < p
        bits[0] = True
        return Mask(bits, names, {"provenance": {"method": "random, equal MACs", "seed": seed, "target": target,
                                                   "keep_probability": p}})

    lo, hi = 0.0, 1.0
    best = make(1.0)
    best_f = macs_fraction(best)
    for _ in range(20):
        mid = (lo + hi) / 2
        m = make(mid)
        f = macs_fraction(m)
        if abs(f - target) < abs(best_f - target):
            best, best_f = m, f
        if abs(f - target) <= tolerance:
            break
        lo, hi = (mid, hi) if f < target else (lo, mid)
    best.meta["provenance"]["macs_fraction"] = best_f
    return best


def step_reuse(names: Sequence[str], steps: int, interval: int) -> Mask:
    """Step-level reuse 1:N: steps 0, N, 2N, ... run every block; all other steps reuse every block."""
    if interval < 1:
        raise MaskcError(f"step-level reuse interval must be >= 1; got {interval}")
    return _with_full_steps(names, steps, range(0, steps, interval), [],
                            {"method": "step-level reuse uniform", "interval": interval})


def step_reuse_nonuniform(names: Sequence[str], steps: int, n_full: int, center: int | None = None,
                          power: float = 2.0) -> Mask:
    """Step-level reuse with ``n_full`` full steps spaced as ``quad_center_steps`` around ``center``."""
    c = steps // 2 if center is None else center
    full = quad_center_steps(steps, n_full, c, power)
    return _with_full_steps(names, steps, full, [], {"method": "step-level reuse non-uniform", "n_full": n_full,
                                                    "center": c, "power": power, "full_steps": full})


def delta_threshold(names: Sequence[str], steps: int, delta: Sequence[float], threshold: float) -> Mask:
    """Static TeaCache-like schedule: a full step whenever the accumulated δ since the last one reaches
    ``threshold`` (``delta[i]``: relative change of the original output from step i-1 to i)."""
    if len(delta) != steps:
        raise MaskcError(f"delta needs one value per step ({steps}); got {len(delta)}")
    full, acc = [0], 0.0
    for i in range(1, steps):
        acc += float(delta[i])
        if acc >= threshold:
            full.append(i)
            acc = 0.0
    return _with_full_steps(names, steps, full, [], {"method": "δ-threshold (TeaCache-like, static)",
                                                    "threshold": threshold, "full_steps": full})


def peer_library(names: Sequence[str], steps: int, delta: Sequence[float] | None = None,
                 max_interval: int | None = None) -> list[Mask]:
    """Every peer schedule over its settings, distinct bits only (first of equals kept).

    DeepCache uniform and non-uniform (every interval 2..``max_interval`` and every branch
    depth, U-Nets only), step-level reuse uniform and FORA (every interval; the same
    bits when every block is a layer, named step-level reuse then), step-level
    reuse non-uniform (every count of full steps), and with ``delta`` the δ-threshold
    schedule at every count of full steps (the largest threshold that gives it). Random masks need a MACs
    measure; make them with ``random_equal_macs``.
    """
    top = max_interval or max(2, steps // 2)
    out: list[Mask] = []
    try:
        _unet_stage_blocks(names, 1)
        ups = {int(m.group(1)) for n in names if (m := re.match(r"up_blocks\.(\d+)\.", n))}
        downs = {int(m.group(1)) for n in names if (m := re.match(r"down_blocks\.(\d+)\.", n))}
        depths = range(1, min(len(ups), len(downs)) + 1)
    except MaskcError:
        depths = range(0)
    for n in range(2, top + 1):
        for d in depths:
            out.append(deepcache_uniform(names, steps, n, d))
            out.append(deepcache_nonuniform(names, steps, n, d))
        out.append(step_reuse(names, steps, n))
        out.append(fora(names, steps, n))
    for k in range(1, steps):
        out.append(step_reuse_nonuniform(names, steps, k))
    if delta is not None and steps > 1:
        d = [float(v) for v in delta]
        by_count: dict[int, Mask] = {}  # per count of full steps, the largest threshold reaching it
        for thr in sorted({sum(d[a:b]) for a in range(1, steps) for b in range(a + 1, steps + 1)}):
            m = delta_threshold(names, steps, d, thr)
            by_count[len(m.meta["provenance"]["full_steps"])] = m
        out.extend(by_count[k] for k in sorted(by_count))
    seen: set[bytes] = set()
    unique = []
    for m in out:
        key = bytes(m.bits.flatten().to(torch.uint8).tolist())
        if key not in seen:
            seen.add(key)
            unique.append(m)
    return unique
