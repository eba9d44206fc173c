"""Mask learning in four phases, each a function of its own.

1. ``reference_trajectory``: the original sampler from Gaussian noise (no data set
   needed): every step's input and output, and delta[i], the relative change of the
   output from step i-1 to i.
2. ``optimize_steps``: the paper's per-timestep optimization. For each step i >= 1,
   a score s[i, b] in [0, 1] per block; the masked forward mixes each block's fresh
   output with its cached output using a binary mask sampled from s (Gumbel-Softmax
   or Bernoulli, straight-through gradient). The loss is

       w[i] * fidelity(masked output, original output)
       + lam * sum_b macs_b * s_b / sum_b macs_b     (L1 sparsity, MACs-weighted)
       + beta * mean_b s_b (1 - s_b)                 (bimodal: pushes s to 0 or 1)

   where w[i] is the timestep-aware scaling from delta[i]. Only one step's graph is
   back-propagated, so memory is flat in T. ``LearnConfig.cache``: "original" (the
   paper's setting, the default: steps independent, the cache is the original model's
   block outputs at step i-1, lam by dual ascent per round of steps, parallel over
   processes under torchrun) or "masked" (steps in order, step i sees the cache the
   hard rows already learned leave; an ablation: it is myopic, a fresh cache invites
   skipping everything and a stale one forces running everything, so it learns
   alternating whole steps).
3. ``project_budget``: the runs are ranked by score and the number kept is chosen so
   that the rectified mask's MACs are closest to the target.
4. ``refine_trajectory`` (``LearnConfig.refine="search"``, the default): a search over
   whole masks scored by the PSNR of the final samples of a whole generation from
   calibration noises (saturating at 50 dB, so that samples bit-identical to the
   original's cannot decide alone: ``LearnConfig.search_score``), seeded with the
   projected mask and with the best schedules of every peer family
   (``maskc.schedules.peer_library``) fitted into the budget; see ``maskc.refine``.
   ``refine="none"`` returns phase 3's mask (the ablation). With
   ``LearnConfig.search_restarts`` = R > 1 (default 3) the search runs R times from the same
   seeds, restart r on its own calibration noises and random stream (those of seed + r;
   restart 0 is the single search), and ``select_restart`` keeps the result whose
   final samples score best on ``select_batch`` selection noises that no restart saw
   (a single search lands in one of many local optima, and its own calibration score
   overrates the one it found: ``benchmarks/results/search_restarts.md``).

Budget: the returned mask's MACs, counted by FlopCounterMode over a whole generation
of the compiled mask (``maskc.rollout.GenerationCost`` counts exactly that), lie in
[target - 0.03, target + 0.01] whenever phase 3's mask or a peer can be fitted into it;
on coarse masks (few steps or blocks) where none can, the window is widened to phase
3's MACs. ``provenance["budget_window"]`` records the window used.

Invariants: deterministic for a given seed, whatever the number of torchrun
processes; scores are finite (a non-finite loss raises); a run with
``checkpoint_dir`` saves each finished step of phase 2 atomically and a rerun resumes
with the same result.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from maskc.errors import MaskcError
from maskc.mask import Mask
from maskc.refine import RefineResult, refine
from maskc.rollout import GenerationCost, Rollout
from maskc.sampling import denoise, stack_kwargs

__all__ = ["LearnConfig", "learn", "reference_trajectory", "optimize_steps", "project_budget", "refine_trajectory",
           "select_restart", "calibration_seed", "selection_seed", "noise_rollout", "learned_rows"]


@dataclass
class LearnConfig:
    """Settings of ``maskc.learn`` (defaults follow the paper where it says)."""

    target: float = 0.6  # fraction of the full model's MACs to keep over a generation
    batch: int = 8  # samples in the trajectory of phase 2
    iters: int = 20  # optimizer iterations per step
    lr: float = 0.2  # Adam on the score logits
    init_logit: float = 3.0  # s starts near 1 (everything runs)
    beta: float = 0.05  # bimodal regularizer weight
    lam: float = 0.5  # initial sparsity weight
    lam_lr: float = 2.0  # dual ascent rate on (expected MACs fraction - target)
    # "gumbel" (Gumbel-Softmax, straight-through) or "stochastic" (Bernoulli from s, the
    # paper's choice); compared in benchmarks/results/bench_unet_ddim20_ablations.md.
    sampling: str = "gumbel"
    gumbel_tau: float = 0.5
    loss_scaling: bool = True  # timestep-aware fidelity weights from delta
    cache: str = "original"  # phase 2's cache: "original" (the paper) or "masked" (ablation), module docstring
    rectify: bool = True
    round_size: int = 4  # steps per dual-ascent round (and per torchrun work split)
    # Phase 4: "search" (whole-trajectory search, maskc.refine) or "none".
    refine: str = "search"
    search_batch: int = 8  # calibration noises of the search (split over torchrun processes)
    search_evals: int = 150  # masks the local search scores after the seeds
    # The search's objective: "saturating" (PSNR with an MSE floor, 50 dB at most: Rollout.score) or "psnr"
    # (plain PSNR, whose 120 dB for a bit-identical sample can decide alone; the ablation).
    search_score: str = "saturating"
    # Phase 4 restarts: searches on their own calibration noises and random streams (seed + r), the best on
    # select_batch other noises kept (benchmarks/results/search_restarts.md); 1: the single search.
    search_restarts: int = 3
    select_batch: int = 32  # selection noises of the restarts (unused with one search)
    # dB that the search and the restarts' selection subtract from a mask's score per unit of the unbiased squared
    # shift of its final samples' mean feature (``learn(features=...)``) from the original's on the same noises:
    # FD's mean term between the two (``maskc.rollout.feature_shift2``); 0: PSNR alone
    # (benchmarks/results/fd_learn.md)
    shift_weight: float = 0.0
    below: float = 0.03  # the budget window is [target - below, target + above]
    above: float = 0.01

    def validate(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise MaskcError(f"target must be in (0, 1], the fraction of MACs to keep; got {self.target}")
        if self.cache not in ("masked", "original"):
            raise MaskcError(f"cache must be 'masked' or 'original', got {self.cache!r}")
        if self.sampling not in ("stochastic", "gumbel"):
            raise MaskcError(f"sampling must be 'stochastic' or 'gumbel', got {self.sampling!r}")
        if self.refine not in ("search", "none"):
            raise MaskcError(f"refine must be 'search' or 'none', got {self.refine!r}")
        if self.search_score not in ("saturating", "psnr"):
            raise MaskcError(f"search_score must be 'saturating' or 'psnr', got {self.search_score!r}")
        if self.batch < 1 or self.iters < 1 or self.round_size < 1 or self.search_batch < 1 or self.search_evals < 0:
            raise MaskcError("batch, iters, round_size and search_batch must be positive, search_evals >= 0")
        if self.search_restarts < 1 or self.select_batch < 1:
            raise MaskcError(f"search_restarts and select_batch must be at least 1, got {self.search_restarts} and "
                             f"{self.select_batch}: search_restarts=1 is the single search")
        if self.shift_weight < 0:
            raise MaskcError(f"shift_weight must be >= 0 (dB per unit of feature shift), got {self.shift_weight}")
        if self.shift_weight and (self.refine != "search" or self.search_score != "saturating"):
            raise MaskcError("shift_weight charges the trajectory search's score: it needs refine='search' and "
                             f"search_score='saturating', got {self.refine!r} and {self.search_score!r}")
        if self.shift_weight and min(self.search_batch, self.select_batch) < 2:
            raise MaskcError("shift_weight needs search_batch and select_batch of at least 2 (the feature shift "
                             f"is estimated over the noises); got {self.search_batch} and {self.select_batch}")
        if self.below < 0 or self.above < 0:
            raise MaskcError(f"the budget window must contain the target; got below={self.below}, above={self.above}")


def _timestep_kw(model: torch.nn.Module) -> str:
    params = inspect.signature(type(model).forward).parameters
    for k in ("timestep", "timesteps", "t"):
        if k in params:
            return k
    raise MaskcError(
        f"cannot tell which argument of {type(model).__name__}.forward is the timestep "
        "(expected one named timestep, timesteps or t)"
    )


def _detached(out: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)


class _Mixer:
    """Forward hooks, owned and removed by learn(): record block outputs, or mix them with a cache."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        mods = dict(model.named_modules())
        self.names = list(names)
        self.mode = "off"
        self.record: dict[str, Any] = {}
        self.cache: dict[str, Any] = {}
        self.m: torch.Tensor | None = None
        self.handles = [mods[n].register_forward_hook(self._hook(j, n)) for j, n in enumerate(self.names)]

    def _hook(self, j: int, name: str) -> Callable:
        def hook(_mod: Any, _a: Any, out: Any) -> Any:
            if self.mode == "record":
                self.record[name] = _detached(out)
                return None
            if self.mode == "advance":  # a hard row: run blocks refresh the cache, skipped ones read it
                assert self.m is not None
                if bool(self.m[j] > 0.5):
                    self.cache[name] = _detached(out)
                    return None
                return self.cache[name]
            if self.mode == "mix":
                assert self.m is not None
                mj = self.m[j]
                return pytree.tree_map(
                    lambda o, c: mj * o + (1 - mj) * c if isinstance(o, torch.Tensor) else o, out, self.cache[name]
                )
            return None

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _atomic_json(path: str, obj: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Problem:
    """What every phase needs: the model call on the learning batch, blocks, MACs, timesteps."""

    model: torch.nn.Module
    scheduler: Any
    timesteps: torch.Tensor
    names: list[str]
    graph: Any  # networkx block graph (maskc.block_graph)
    macs: torch.Tensor  # per block, float64
    total: float  # MACs of one full forward
    tkw: str  # the timestep argument's name
    guidance_scale: float | None
    ex_args: tuple  # batch-1 example (the MACs are counted on it)
    ex_kwargs: dict
    features: Callable[[torch.Tensor], torch.Tensor] | None = None  # learn(features=...): (n, d) of n samples

    @property
    def T(self) -> int:
        return len(self.timesteps)

    @property
    def glue(self) -> float:
        return self.total - float(self.macs.sum())

    def hard_frac(self, row: torch.Tensor) -> float:
        """MACs fraction of one step by the block table (phase 2's running estimate, not the exact count)."""
        return (float((self.macs * row.double()).sum()) + self.glue) / self.total


@dataclass
class Trajectory:
    """The original sampler's trajectory on one batch: inputs and outputs of every step."""

    xs: list[torch.Tensor]
    outs: list[torch.Tensor]
    delta: torch.Tensor  # delta[i]: relative change of the output from step i-1 to i (delta[0] = 0)
    weights: torch.Tensor  # phase 2's per-step fidelity weights


def _conditioning(n: int, g: torch.Generator, cond: Callable | None, uncond: Callable | None,
                  guidance_scale: float | None) -> tuple[dict, dict]:
    """(model kwargs of the batch, the conditional part alone) for n samples."""
    extra = dict(cond(n, g)) if cond is not None else {}
    if guidance_scale is not None:
        if uncond is None:
            raise MaskcError("guidance_scale needs uncond: a callable (n, generator) -> the unconditional model kwargs")
        return stack_kwargs(extra, dict(uncond(n, g))), extra
    return extra, extra


def reference_trajectory(prob: Problem, x: torch.Tensor, call_kw: dict, loss_scaling: bool,
                         g: torch.Generator) -> Trajectory:
    """Phase 1: run the original sampler from ``x``; delta and the fidelity weights from its outputs."""
    scheduler = copy.deepcopy(prob.scheduler)  # multistep schedulers keep state
    xs: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    step_kw = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    with torch.no_grad():
        for t in prob.timesteps:
            xs.append(x)
            eps = denoise(prob.model, x, t.to(x.device), call_kw, prob.guidance_scale, timestep_kw=prob.tkw)
            outs.append(eps)
            x = scheduler.step(eps, t, x, **step_kw).prev_sample
    T = prob.T
    delta = torch.zeros(T)
    for i in range(1, T):
        delta[i] = ((outs[i] - outs[i - 1]).norm() / outs[i - 1].norm().clamp_min(1e-12)).item()
    if loss_scaling and T > 1:
        w = (delta[1:] / delta[1:].mean().clamp_min(1e-12)).clamp(0.25, 4.0)
        weights = torch.cat([torch.ones(1), w / w.mean()])
    else:
        weights = torch.ones(T)
    return Trajectory(xs, outs, delta, weights)


def optimize_steps(prob: Problem, traj: Trajectory, cfg: LearnConfig, call_kw: dict, seed: int,
                   checkpoint: tuple[str, dict] | None = None, progress: bool = True) -> torch.Tensor:
    """Phase 2: per-step scores s[T, B] in [0, 1] (row 0 is all ones), see the module docstring."""
    names, T = prob.names, prob.T
    p0 = next(prob.model.parameters())
    device, dtype = p0.device, p0.dtype
    w_macs = (prob.macs / prob.macs.sum()).to(torch.float32)
    state: dict[str, Any] = {"scores": [[1.0] * len(names)], "lam": cfg.lam, "partial": {}}
    ckpt, key = checkpoint if checkpoint is not None else (None, None)
    if ckpt is not None and os.path.exists(ckpt):
        with open(ckpt) as f:
            saved = json.load(f)
        if saved.get("key") != key:
            raise MaskcError(
                f"checkpoint {ckpt} was made with other settings (model blocks, timesteps, seed or config); "
                "use another checkpoint_dir or delete it"
            )
        state = saved["state"]
    if len(state["scores"]) >= T:
        return torch.tensor(state["scores"], dtype=torch.float64)

    def call(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoise(prob.model, xx, t.to(device), call_kw, prob.guidance_scale, timestep_kw=prob.tkw)

    mixer = _Mixer(prob.model, names)
    rank, world = _dist_rank_world()
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=T, initial=len(state["scores"]), desc="maskc learn: per-step scores", unit="step")
        except ImportError:
            bar = None

    def advance(i: int, row: torch.Tensor) -> None:
        """Masked mode: run step i with a hard row, so the cache holds what it will at inference."""
        mixer.m, mixer.mode = row.to(device, dtype), "advance"
        with torch.no_grad():
            call(traj.xs[i], prob.timesteps[i])
        mixer.mode = "off"

    def train_step(i: int, lam: float) -> tuple[list[float], float]:
        """Scores of step i, learned with sparsity weight ``lam``, and their expected MACs fraction."""
        if cfg.cache == "original":
            mixer.mode = "record"  # the cache: the original model's block outputs at step i-1
            with torch.no_grad():
                call(traj.xs[i - 1], prob.timesteps[i - 1])
            mixer.cache = dict(mixer.record)
            mixer.record = {}
        saved_cache = mixer.cache
        target_out = traj.outs[i]
        scale = target_out.pow(2).mean().clamp_min(1e-12)
        gi = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i)
        logits = torch.full((len(names),), cfg.init_logit, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=cfg.lr)
        mixer.mode = "mix"
        for _ in range(cfg.iters):
            s = torch.sigmoid(logits)
            u = torch.rand(len(names), generator=gi)
            if cfg.sampling == "stochastic":
                hard = (u < s).float()
                m = hard + s - s.detach()
            else:
                # Binary Gumbel-Softmax: the difference of two Gumbel variables is logistic noise.
                uc = u.clamp(1e-6, 1 - 1e-6)
                soft = torch.sigmoid((logits + torch.log(uc) - torch.log1p(-uc)) / cfg.gumbel_tau)
                m = (soft > 0.5).float() + soft - soft.detach()
            mixer.m = m.to(device, dtype)
            out = call(traj.xs[i], prob.timesteps[i])
            fid = (out - target_out).pow(2).mean() / scale
            loss = traj.weights[i] * fid + lam * (w_macs * s).sum() + cfg.beta * (s * (1 - s)).mean()
            if not torch.isfinite(loss):
                raise MaskcError(
                    f"mask learning diverged at step {i}: the loss is {float(loss)} (fidelity {float(fid)}); "
                    "check that the model's output is finite for the sampler's inputs, or lower lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mixer.mode = "off"
        mixer.cache = saved_cache
        s = torch.sigmoid(logits.detach())
        expected = (float((w_macs.double() * s.double()).sum() * prob.macs.sum()) + prob.glue) / prob.total
        return [float(v) for v in s], expected

    def save() -> None:
        if ckpt is not None and rank == 0:
            _atomic_json(ckpt, {"key": key, "state": state})

    try:
        if cfg.cache == "masked":
            # Steps in order; every process computes every step (the cache makes them sequential).
            def hard(k: int) -> torch.Tensor:  # row 0's stored scores are all 1.0
                return torch.tensor(state["scores"][k]) > 0.5

            for k in range(len(state["scores"])):  # replay the hard rows learned so far (resume)
                advance(k, hard(k))
            while len(state["scores"]) < T:
                i = len(state["scores"])
                lam = float(state["lam"])
                # dual ascent toward the per-step fraction the remaining steps may still use
                need = (cfg.target * T - sum(prob.hard_frac(hard(k)) for k in range(i))) / (T - i)
                sc, _ = train_step(i, lam)
                state["scores"].append(sc)
                row = hard(i)
                advance(i, row)
                state["lam"] = max(0.0, lam + cfg.lam_lr * (prob.hard_frac(row) - min(max(need, 0.0), 1.0)))
                save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(lam=f"{state['lam']:.3f}", kept=f"{prob.hard_frac(row):.2f}")
        # Rounds of ``round_size`` steps share one sparsity weight; lam is updated by dual
        # ascent after each round. The rounds do not depend on the number of processes, so
        # torchrun with any --nproc-per-node gives the scores one process gives.
        while len(state["scores"]) < T:
            start = len(state["scores"])
            round_steps = list(range(start, min(start + cfg.round_size, T)))
            lam = float(state["lam"])
            partial = {int(k): v for k, v in state.get("partial", {}).items()}
            for k, i in enumerate(round_steps):
                if i in partial or k % world != rank:
                    continue
                partial[i] = list(train_step(i, lam))
                state["partial"] = {str(j): v for j, v in partial.items()}
                if world == 1:
                    save()
                if bar is not None:
                    bar.update(1)
            if world > 1:
                import torch.distributed as dist

                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, partial)
                for part in gathered:
                    partial.update({int(k): v for k, v in part.items()})
                if bar is not None:
                    bar.update(len(round_steps) - sum(1 for k in range(len(round_steps)) if k % world == rank))
            for i in round_steps:
                state["scores"].append(partial[i][0])
            mean_expected = sum(partial[i][1] for i in round_steps) / len(round_steps)
            state["lam"] = max(0.0, lam + cfg.lam_lr * (mean_expected - cfg.target))
            state["partial"] = {}
            save()
            if bar is not None:
                bar.set_postfix(lam=f"{state['lam']:.3f}", kept=f"{mean_expected:.2f}")
    finally:
        mixer.close()
        if bar is not None:
            bar.close()
    return torch.tensor(state["scores"], dtype=torch.float64)


def project_budget(prob: Problem, scores: torch.Tensor, weights: torch.Tensor, cost: GenerationCost, target: float,
                   learned_first: bool, rectify: bool = True) -> tuple[torch.Tensor, float]:
    """Phase 3: (bits, exact MACs fraction) keeping the top-k runs of steps >= 1, k closest to ``target``.

    Runs are ranked by score (ties: the step's fidelity weight, then cheaper blocks
    first); with ``learned_first`` the runs phase 2 chose (score > 0.5) come first. Every k
    is counted (``cost`` memoizes rows): rectification makes the fraction not quite monotone in k.
    """
    T, B = scores.shape
    first = (scores > 0.5) if learned_first else torch.zeros_like(scores, dtype=torch.bool)
    order = sorted(
        ((i, j) for i in range(1, T) for j in range(B)),
        key=lambda ij: (not bool(first[ij[0], ij[1]]), -float(scores[ij[0], ij[1]]), -float(weights[ij[0]]),
                        float(prob.macs[ij[1]])),
    )
    measured: dict[int, tuple[torch.Tensor, float]] = {}
    b = torch.zeros(T, B, dtype=torch.bool)
    b[0] = True
    prefix = [b.clone()]
    for i, j in order:
        b[i, j] = True
        prefix.append(b.clone())

    def keep(k: int) -> tuple[torch.Tensor, float]:
        if k not in measured:
            bk = cost.rectify(prefix[k]) if rectify else prefix[k]
            measured[k] = (bk, cost.fraction(bk, rectified=True) if rectify else _unrectified(cost, bk))
        return measured[k]

    # Rectification makes the fraction only roughly monotone in k: scan every k (exact counts are memoized per row).
    best = min(range(len(order) + 1), key=lambda k: (abs(keep(k)[1] - target), k))
    return keep(best)


def _unrectified(cost: GenerationCost, b: torch.Tensor) -> float:
    """MACs of a mask run as it is (the runtime's dead-code elimination only; rectify=False ablation)."""
    return cost.fraction(b)  # exact rectification changes no measured MACs (benchmarks/results/rectify.md)


def calibration_seed(seed: int, restart: int = 0) -> int:
    """Seed of the generator that draws the search's calibration batch for learning ``seed``, restart ``restart``
    (its conditioning first, then its noise: ``noise_rollout``)."""
    return (seed + restart) * 7919 + 17


def selection_seed(seed: int) -> int:
    """Seed of the generator that draws the restarts' selection batch: no restart's calibration seed."""
    return seed * 7919 + 29


def noise_rollout(prob: Problem, shape: Sequence[int], n: int, generator_seed: int, cond: Callable | None,
                  uncond: Callable | None, seed: int, keep_states: bool = True, shift_weight: float = 0.0) -> Rollout:
    """A ``Rollout`` of n noises drawn (conditioning first, then noise) from ``generator_seed``, split over
    torchrun processes: each holds its share, and the PSNRs are summed over processes. Its score charges
    ``shift_weight`` per unit of ``prob.features``' shift (none when 0)."""
    rank, world = _dist_rank_world()
    g = torch.Generator(device="cpu").manual_seed(generator_seed)
    call_kw, _ = _conditioning(n, g, cond, uncond, prob.guidance_scale)
    p0 = next(prob.model.parameters())
    noise = torch.randn((n, *shape), generator=g).to(p0.device, p0.dtype)
    if world > 1:
        idx = torch.tensor([k for k in range(n) if k % world == rank])
        noise = noise[idx]
        call_kw = _take(call_kw, idx, n, prob.guidance_scale is not None)
    return Rollout(prob.model, prob.names, prob.scheduler, noise, call_kw, prob.guidance_scale, prob.tkw,
                   seed=seed, world=(world, n), keep_states=keep_states,
                   features=prob.features if shift_weight else None, shift_weight=shift_weight)


def learned_rows(scores: torch.Tensor) -> list[list[torch.Tensor]]:
    """For each step i, the rows that keep its m highest-scored blocks (phase 2's scores), m = 1 .. B - 1:
    the moves only step i may take in the search."""
    B = scores.shape[1]
    out = []
    for i in range(scores.shape[0]):
        order = torch.argsort(-scores[i], stable=True)
        rows = []
        for m in range(1, B):
            r = torch.zeros(B, dtype=torch.bool)
            r[order[:m]] = True
            rows.append(r)
        out.append(rows)
    return out


def refine_trajectory(prob: Problem, cfg: LearnConfig, bits: torch.Tensor, scores: torch.Tensor,
                      traj: Trajectory, cost: GenerationCost, cond: Callable | None, uncond: Callable | None,
                      seed: int, lo: float, hi: float, progress: bool = True, restart: int = 0) -> RefineResult | None:
    """Phase 4: whole-trajectory search from the projected mask and the peers (``maskc.refine``).

    The calibration noises are ``search_batch`` fresh draws from ``calibration_seed(seed, restart)``, and the
    search's random stream is seed + restart (restart 0: the single search).
    """
    from maskc.schedules import peer_library

    rank, _ = _dist_rank_world()
    rollout = noise_rollout(prob, traj.xs[0].shape[1:], cfg.search_batch, calibration_seed(seed, restart), cond,
                            uncond, seed + restart, shift_weight=cfg.shift_weight)
    step_rows = learned_rows(scores)
    peers = peer_library(prob.names, prob.T, delta=traj.delta.tolist())
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm

            desc = "maskc learn: trajectory search" + (f" {restart + 1}/{cfg.search_restarts}"
                                                         if cfg.search_restarts > 1 else "")
            bar = tqdm(total=cfg.search_evals, desc=desc, unit="mask")
        except ImportError:
            bar = None

    def tick(done: int, p: float, f: float) -> None:
        if bar is not None:
            bar.update(done - bar.n)
            bar.set_postfix(psnr=f"{p:.2f}", macs=f"{f:.3f}")

    try:
        return refine(rollout, cost, [("learned (phase 3)", bits)], peers, lo, hi, priority=traj.delta.tolist(),
                      step_rows=step_rows, evaluations=cfg.search_evals, seed=seed + restart, progress=tick,
                      score=cfg.search_score)
    finally:
        if bar is not None:
            bar.close()


def select_restart(prob: Problem, cfg: LearnConfig, results: Sequence[RefineResult], shape: Sequence[int],
                   cond: Callable | None, uncond: Callable | None, seed: int) -> tuple[int, list[float]]:
    """(index of the kept result, every result's selection score): ``Rollout.score`` of each restart's mask on
    ``select_batch`` noises from ``selection_seed(seed)``; ties go to the earlier restart."""
    # the restarts' masks differ from the first steps on: keeping every step's state would only cost memory
    roll = noise_rollout(prob, shape, cfg.select_batch, selection_seed(seed), cond, uncond, seed, keep_states=False,
                         shift_weight=cfg.shift_weight)
    sel = [roll.score(r.bits) for r in results]
    return max(range(len(sel)), key=lambda k: (sel[k], -k)), sel


def _take(kw: dict, idx: torch.Tensor, n: int, stacked: bool) -> dict:
    """The samples ``idx`` of batch kwargs (of a [cond; uncond] stack of 2n when ``stacked``)."""
    rows = torch.cat([idx, idx + n]) if stacked else idx
    full = 2 * n if stacked else n
    return pytree.tree_map(lambda v: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == full
                           else v, kw)


def learn(
    model: Any,
    scheduler: Any = None,
    steps: int | None = None,
    sample_shape: Sequence[int] | None = None,
    target: float = 0.6,
    seed: int = 0,
    cond: Callable[[int, torch.Generator], dict] | None = None,
    uncond: Callable[[int, torch.Generator], dict] | None = None,
    guidance_scale: float | None = None,
    blocks: Sequence[str] | None = None,
    config: LearnConfig | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **overrides: Any,
) -> Mask:
    """Learn a T x B mask keeping ``target`` of the model's MACs (see the module docstring).

    ``cond(n, generator)`` gives the model kwargs of a batch of n (class labels,
    ``encoder_hidden_states``...). With ``guidance_scale``, ``uncond(n, generator)``
    gives the unconditional kwargs and every evaluation is classifier-free guided as
    in diffusers pipelines: one model call on the stacked [cond; uncond] batch, and
    fidelity is measured on the guided noise, the quantity the sampler uses.

    ``model`` may also be a diffusers pipeline: ``learn(pipe, target=..., prompt=... |
    prompt_embeds=... | class_labels=..., num_inference_steps=T, guidance_scale=...)``
    learns for its backbone, a copy of its scheduler, its step count and its
    conditioning (see ``maskc.pipelines.learn_inputs``).

    ``features`` with ``shift_weight=W`` (a ``LearnConfig`` setting): the trajectory search and the restarts'
    selection also charge W dB per unit of the squared shift of the final samples' mean feature from the
    original's (FD's mean term, estimated without bias over the calibration noises). ``features(images)`` maps
    images in [0, 1] of shape (n, C, H, W) (the sampler's output, rescaled; latents for a latent model) to an
    (n, d) tensor: an image classifier's penultimate layer, Inception for FID. Phases 1 to 3 are unchanged.
    """
    from maskc.pipelines import PIPELINE_LEARN_ARGS, is_pipeline, learn_inputs

    if is_pipeline(model):
        if scheduler is not None or sample_shape is not None or cond is not None or uncond is not None:
            raise MaskcError("learn(pipe, ...) takes scheduler, sample shape and conditioning from the pipeline; "
                             "pass prompt=, prompt_embeds=, class_labels=, num_inference_steps= instead")
        pkw = {k: overrides.pop(k) for k in PIPELINE_LEARN_ARGS if k in overrides}
        if steps is not None:
            pkw.setdefault("num_inference_steps", steps)
        inputs = learn_inputs(model, guidance_scale=guidance_scale, **pkw)
        mask = learn(**inputs, target=target, seed=seed, blocks=blocks, config=config,
                     checkpoint_dir=checkpoint_dir, progress=progress, features=features, **overrides)
        mask.meta["provenance"]["pipeline"] = type(model).__name__
        return mask
    if scheduler is None or steps is None or sample_shape is None:
        raise MaskcError("learn(model, scheduler, steps, sample_shape, ...) needs all four for a bare backbone; "
                         "or pass a diffusers pipeline: learn(pipe, target=..., num_inference_steps=...)")

    cfg = config or LearnConfig()
    unknown = sorted(set(overrides) - set(asdict(cfg)))
    if unknown:
        raise MaskcError(f"unknown learning settings {unknown}; LearnConfig has {sorted(asdict(cfg))}")
    cfg = LearnConfig(**{**asdict(cfg), "target": target, **overrides})
    cfg.validate()
    if (features is None) != (cfg.shift_weight == 0):
        raise MaskcError("features and shift_weight go together: pass learn(..., features=f, shift_weight=W) "
                         f"with W > 0 to charge the samples' feature shift, or neither; got features="
                         f"{'a callable' if features is not None else None} and shift_weight={cfg.shift_weight}")
    model.eval()
    was_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        return _learn(model, scheduler, steps, sample_shape, cfg, seed, cond, uncond, guidance_scale, blocks,
                      checkpoint_dir, progress, features)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was_grad[n])


def _learn(model: torch.nn.Module, scheduler: Any, steps: int, sample_shape: Sequence[int], cfg: LearnConfig,
           seed: int, cond: Callable | None, uncond: Callable | None, guidance_scale: float | None,
           blocks: Sequence[str] | None, checkpoint_dir: str | None, progress: bool,
           features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Mask:
    import maskc

    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    call_kw, extra = _conditioning(cfg.batch, g, cond, uncond, guidance_scale)
    tkw = _timestep_kw(model)
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    x = torch.randn((cfg.batch, *sample_shape), generator=g).to(device, dtype)

    # Block set, MACs per block and the block graph (for rectification) from one example.
    ex_args = (x[:1],)
    ex_kwargs = {tkw: timesteps[0].reshape(1).to(device), **{k: _slice1(v) for k, v in extra.items()}}
    names = list(blocks) if blocks is not None else maskc.blocks(model, example=(ex_args, ex_kwargs))
    graph = maskc.block_graph(model, *ex_args, blocks=names, **ex_kwargs)
    macs = torch.tensor([float(graph.nodes[n]["macs"]) for n in names], dtype=torch.float64)
    if macs.sum() <= 0:
        raise MaskcError("the blocks have no MACs to save (FlopCounterMode counted none)")
    prob = Problem(model, scheduler, timesteps, names, graph, macs, float(graph.graph["total_macs"]), tkw,
                   guidance_scale, ex_args, ex_kwargs, features)

    traj = reference_trajectory(prob, x, call_kw, cfg.loss_scaling, g)
    ckpt = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        key = {"names": names, "timesteps": [float(t) for t in timesteps], "seed": seed, "config": asdict(cfg)}
        ckpt = (os.path.join(checkpoint_dir, "learn_state.json"), key)
    scores = optimize_steps(prob, traj, cfg, call_kw, seed, ckpt, progress)

    cost = GenerationCost(model, names, graph, ex_args, ex_kwargs)
    bits, frac = project_budget(prob, scores, traj.weights, cost, cfg.target, cfg.cache == "masked", cfg.rectify)
    lo, hi = cfg.target - cfg.below, cfg.target + cfg.above
    search: dict[str, Any] = {}
    res = None
    restarts: list[dict[str, Any]] = []
    kept = 0
    if cfg.refine == "search":
        res = refine_trajectory(prob, cfg, bits, scores, traj, cost, cond, uncond, seed, lo, hi, progress)
        if res is None:  # coarse masks (few steps or blocks): widen the window to the projection's MACs
            lo, hi = min(lo, frac), max(hi, frac)
            res = refine_trajectory(prob, cfg, bits, scores, traj, cost, cond, uncond, seed, lo, hi, progress)
        if res is not None and cfg.search_restarts > 1:  # the other restarts search restart 0's window
            runs = [(0, res)] + [(r, refine_trajectory(prob, cfg, bits, scores, traj, cost, cond, uncond, seed, lo,
                                                       hi, progress, restart=r)) for r in range(1, cfg.search_restarts)]
            # a restart ranks the peers it fits on its own noises, so it may find no seed in the window where
            # restart 0 found one (phase 3's mask did not fit): such a restart is left out
            runs = [(r, x) for r, x in runs if x is not None]
            pick, sel = select_restart(prob, cfg, [x for _, x in runs], traj.xs[0].shape[1:], cond, uncond, seed)
            restarts = [{"restart": r, "calibration_psnr": x.psnr, "selection_score": s, "macs_fraction":
                         x.macs_fraction, "started_from": x.seed, "masks_scored": x.evaluations}
                        for (r, x), s in zip(runs, sel)]
            kept, res = runs[pick]
    else:
        lo, hi = min(lo, frac), max(hi, frac)
    if res is not None:
        bits, frac = res.bits, res.macs_fraction
        better = [p for p in res.peers if p["macs_fraction"] <= frac + 1e-12]
        best_peer = max(better, key=lambda p: p["psnr"]) if better else None
        search = {
            "calibration_psnr": res.psnr,
            "started_from": res.seed,
            "masks_scored": res.evaluations,
            "improvements": [list(h) for h in res.history],
            "best_peer_no_more_macs": best_peer,
            "margin_db": res.psnr - best_peer["psnr"] if best_peer else None,
            "peers_scored": len(res.peers),
            **({"restarts": restarts, "kept_restart": kept} if restarts else {}),
        }
    mask = Mask(
        bits,
        names,
        {
            "scheduler": type(scheduler).__name__,
            "timesteps": [float(t) for t in timesteps],
            "provenance": {
                "method": "learned (He & Gao 2026, per-timestep)" + (" + trajectory search" if search else ""),
                "seed": seed,
                "config": asdict(cfg),
                "delta": [float(v) for v in traj.delta],
                "loss_weights": [float(v) for v in traj.weights],
                "scores": [[round(float(v), 4) for v in row] for row in scores],
                "macs_fraction": frac,
                "budget_window": [lo, hi],
                "guidance_scale": guidance_scale,
                **({"features": getattr(features, "__qualname__", type(features).__name__)} if features else {}),
                **({"search": search} if search else {}),
            },
        },
    )
    return mask.for_model(model)  # records backbone, fingerprint and block hashes


def _slice1(v: Any) -> Any:
    return pytree.tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, v)


def measured_flops(model: torch.nn.Module, mask: Mask | None, ex_args: tuple, ex_kwargs: dict, tkw: str,
                   timesteps: list[torch.Tensor]) -> int:
    """FLOPs of one generation on the example (batch 1), compiled with ``mask`` or, if None, original."""
    from torch.utils.flop_counter import FlopCounterMode

    import maskc

    kw0 = {k: v for k, v in ex_kwargs.items() if k != tkw}
    fn: Any = model
    if mask is not None:
        fn = maskc.compile(model, mask, example_args=ex_args, example_kwargs={**kw0, tkw: timesteps[0]})
    total = 0
    with torch.no_grad():
        for t in timesteps:
            with FlopCounterMode(display=False) as fc:
                fn(*ex_args, **kw0, **{tkw: t})
            total += fc.get_total_flops()
    return total
