"""Learn with several seeds and keep the mask that does best on noises no search saw.

``maskc.learn`` is deterministic for its seed, and the seed draws its calibration noises and
steers its trajectory search, whose result moves by about a decibel either way
(``benchmarks/results/search_pick.md``). ``learn_best`` runs ``learn`` once per seed, scores
every mask on ``n_select`` selection noises drawn from ``select_seed`` (no seed's calibration
noises), and keeps the one whose final samples are closest to the original's from the same
noises (mean PSNR).

Invariant: the result is, bit for bit, the mask that ``learn`` returns for one of the seeds
(so it keeps ``learn``'s budget window), and no other seed's mask has a higher selection
PSNR; ties go to the earlier seed. ``meta["provenance"]["pick"]`` records every seed's
selection PSNR and learning time.

Under torchrun the seeds are split over the processes when no process group is up yet (as
``maskc learn --seed 0 1 ...`` runs it): process r learns seeds r, r + N, ... alone, then
``learn_best`` joins the processes (gloo, from torchrun's environment) only to gather the masks,
and every process scores the selection alike and returns the same mask. With a process group
already up, every seed is learned by all processes together (``learn`` splits its own work).
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable, Sequence

import torch

from maskc.errors import MaskcError
from maskc.learn import _conditioning, _dist_rank_world, _slice1, _timestep_kw, learn
from maskc.mask import Mask

__all__ = ["learn_best", "selection_psnr"]


def selection_psnr(model: torch.nn.Module, scheduler: Any, steps: int, sample_shape: Sequence[int],
                   masks: Sequence[Mask], n: int, seed: int, cond: Callable | None = None,
                   uncond: Callable | None = None, guidance_scale: float | None = None) -> list[float]:
    """Mean PSNR (dB) of each mask's final samples against the original's, from ``n`` noises of ``seed``.

    The noises and conditioning are drawn as ``learn`` draws its calibration batch for that
    seed; each mask is exactly rectified first, which changes none of its outputs.
    """
    import maskc
    from maskc.passes.rectify import rectify_bits
    from maskc.rollout import Rollout

    names = list(masks[0].names)
    if any(list(m.names) != names for m in masks):
        raise MaskcError("selection_psnr needs masks over the same blocks in the same order; got differing names")
    p0 = next(model.parameters())
    g = torch.Generator(device="cpu").manual_seed(seed)
    call_kw, extra = _conditioning(n, g, cond, uncond, guidance_scale)
    noise = torch.randn((n, *sample_shape), generator=g).to(p0.device, p0.dtype)
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    tkw = _timestep_kw(model)
    if any(m.steps != len(sched.timesteps) for m in masks):
        raise MaskcError(f"the masks must have one row per step ({len(sched.timesteps)}); got "
                         f"{sorted({m.steps for m in masks})}")
    ex_kwargs = {tkw: sched.timesteps[0].reshape(1).to(p0.device), **{k: _slice1(v) for k, v in extra.items()}}
    graph = maskc.block_graph(model, noise[:1], blocks=names, **ex_kwargs)
    roll = Rollout(model, names, sched, noise, call_kw, guidance_scale, tkw)
    return [roll.psnr(rectify_bits(m.bits, names, graph)[0]) for m in masks]


def _seed_split() -> tuple[int, int]:
    """(this process, processes) over which the seeds are split: torchrun's, when it started this process and
    no process group is up yet; else (0, 1)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        return int(os.environ.get("RANK", "0")), world
    return 0, 1


def _gather(items: list, world: int) -> list:
    """Every process's ``items``, concatenated in process order, on every process (a gloo group for the call)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, items)
    finally:
        dist.destroy_process_group()
    return [x for part in parts for x in part]


def learn_best(
    model: Any,
    scheduler: Any = None,
    steps: int | None = None,
    sample_shape: Sequence[int] | None = None,
    target: float = 0.6,
    seeds: Sequence[int] = (0, 1),
    n_select: int = 32,
    select_seed: int = 998,
    cond: Callable[[int, torch.Generator], dict] | None = None,
    uncond: Callable[[int, torch.Generator], dict] | None = None,
    guidance_scale: float | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
    **learn_kw: Any,
) -> Mask:
    """``maskc.learn`` once per seed; the mask with the best selection PSNR (see the module docstring).

    Takes everything ``learn`` takes, a diffusers pipeline included. It costs ``len(seeds)``
    learning runs plus one generation of ``n_select`` samples per seed and one original.
    ``checkpoint_dir`` keeps one sub-folder per seed, so a killed run resumes where it stopped.
    """
    from maskc.pipelines import PIPELINE_LEARN_ARGS, is_pipeline, learn_inputs

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise MaskcError(f"learn_best needs one or more distinct seeds; got {seeds}")
    if int(select_seed) in seeds:
        raise MaskcError(f"select_seed {select_seed} is also a learning seed, so the pick would score masks on their "
                         "own calibration noises; choose a select_seed that is not in seeds")
    if learn_kw.get("features") is not None or learn_kw.get("shift_weight"):
        raise MaskcError("learn_best picks among seeds by PSNR alone, so it would drop learn's feature-shift charge "
                         "(features=, shift_weight=); learn with features and search_restarts instead")
    if int(n_select) < 1:
        raise MaskcError(f"n_select must be at least 1; got {n_select}")
    if is_pipeline(model):  # learn takes the pipeline itself; the pick needs what it implies
        pkw = {k: learn_kw[k] for k in PIPELINE_LEARN_ARGS if k in learn_kw}
        if steps is not None:
            pkw.setdefault("num_inference_steps", steps)
        inputs = learn_inputs(model, guidance_scale=guidance_scale, **pkw)
    else:
        inputs = {"model": model, "scheduler": scheduler, "steps": steps, "sample_shape": sample_shape,
                  "cond": cond, "uncond": uncond, "guidance_scale": guidance_scale}

    rank, world = _seed_split()
    learned: list[tuple[int, Any, float, int]] = []  # (seed, mask, learning seconds, process)
    for s in [s for k, s in enumerate(seeds) if k % world == rank]:
        t0 = time.perf_counter()
        ckpt = os.path.join(checkpoint_dir, f"seed-{s}") if checkpoint_dir is not None else None
        m = learn(model, scheduler, steps, sample_shape, target=target, seed=s, cond=cond, uncond=uncond,
                  guidance_scale=guidance_scale, checkpoint_dir=ckpt, progress=progress and rank == 0, **learn_kw)
        learned.append((s, m, time.perf_counter() - t0, rank))
    if world > 1:
        learned = _gather([(s, m.to_dict(), sec, r) for s, m, sec, r in learned], world)
        learned = [(s, Mask.from_dict(d), sec, r) for s, d, sec, r in learned]
    by_seed: dict[int, tuple[Mask, float, int]] = {}
    for s, m, sec, r in learned:
        by_seed.setdefault(s, (m, sec, r))
    masks = [by_seed[s][0] for s in seeds]
    t0 = time.perf_counter()
    with torch.no_grad():
        scores = selection_psnr(inputs["model"], inputs["scheduler"], inputs["steps"], inputs["sample_shape"], masks,
                                int(n_select), int(select_seed), inputs["cond"], inputs["uncond"],
                                inputs["guidance_scale"])
    k = max(range(len(seeds)), key=lambda i: (scores[i], -i))  # ties: the earlier seed
    best = masks[k]
    best.meta["provenance"]["pick"] = {
        "seeds": seeds,
        "picked": seeds[k],
        "selection_psnr": [float(v) for v in scores],
        "macs_fraction": [float(m.meta["provenance"]["macs_fraction"]) for m in masks],
        "learning_seconds": [round(by_seed[s][1], 1) for s in seeds],
        "learned_by": [by_seed[s][2] for s in seeds],
        "processes": world,
        "selection_seconds": round(time.perf_counter() - t0, 1),
        "n_select": int(n_select),
        "select_seed": int(select_seed),
    }
    if progress and max(rank, _dist_rank_world()[0]) == 0:
        print("learn_best: selection PSNR " + ", ".join(f"seed {s} {v:.2f} dB" for s, v in zip(seeds, scores))
              + f"; kept seed {seeds[k]}")
    return best
