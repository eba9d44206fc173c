"""Whole generations under hard masks, for learning: their MACs and their final samples.

Two measurements that mask learning needs many times, made cheap:

- ``GenerationCost``: the MACs fraction of a mask, as ``FlopCounterMode`` counts it
  over a whole generation of the compiled mask. The mask is rectified exactly first
  (``passes.rectify``); step i's FLOPs are then those of the step graph of its
  rectified row, which depend on that row alone, so they are counted once per
  distinct row and summed. Invariant: ``fraction(bits)`` equals
  ``measured_flops(model, Mask(rectified bits)) / measured_flops(model, None)``.
- ``Rollout``: the final samples of a generation from fixed calibration noises under
  a mask, by the captured step graphs (skipped blocks are not run; a skipped block
  reads its latest computed output, which is what the runtime's cache holds).
  The state before every step of the last accepted mask (sample, cache, scheduler) is
  kept, so a candidate that first differs from it at step d is run from d only
  (``keep_states=False``: only the first, and every mask runs from step 0).
  Invariant: ``psnr(bits)`` is the mean PSNR, over the calibration samples, of the
  final samples in [0, 1] against the unmasked generation from the same noises;
  ``score(bits)`` is the same mean with ``MSE_FLOOR`` added to each MSE (the search's
  objective, which a bit-identical sample cannot dominate), less ``shift_weight`` times
  ``feature_shift2`` of the final samples' ``features`` against the unmasked samples'
  when a feature map is given (FD's mean term; ``maskc.learn(features=...)``).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Sequence

import networkx as nx
import torch
import torch.utils._pytree as pytree

from maskc.errors import MaskcError
from maskc.passes.capture import capture, flatten_inputs
from maskc.passes.rectify import rectify_bits
from maskc.passes.rewrite import StepGraph, rewrite_step
from maskc.sampling import denoise

__all__ = ["GenerationCost", "Rollout", "MSE_FLOOR", "feature_shift2"]

MSE_FLOOR = 1e-5  # added to each sample's MSE in ``Rollout.score``: PSNR saturates at 50 dB


def _row_key(row: torch.Tensor) -> bytes:
    return bytes(row.to(torch.uint8).tolist())


class _Graphs:
    """Step graphs of one capture, one per distinct row (skipped blocks read, every run block written)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], args: tuple, kwargs: dict) -> None:
        self.names = list(names)
        self.capture = capture(model, self.names, args, kwargs)
        self._memo: dict[bytes, StepGraph] = {}

    def step(self, row: torch.Tensor) -> StepGraph:
        key = _row_key(row)
        sg = self._memo.get(key)
        if sg is None:
            on = row.tolist()
            skip = [b for b, r in zip(self.names, on) if not r]
            runs = [b for b, r in zip(self.names, on) if r]
            sg = rewrite_step(self.capture.gm, self.capture.block_nodes, skip, runs)
            self._memo[key] = sg
        return sg

    def flat(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        leaves, _ = flatten_inputs(self.capture.signature, args, kwargs)
        return [leaves[j] for j in self.capture.tensor_leaf_index]


class GenerationCost:
    """MACs fraction of masks over one generation, counted per distinct rectified row (module docstring)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], graph: nx.DiGraph, ex_args: tuple,
                 ex_kwargs: dict) -> None:
        self.names = list(names)
        self.graph = graph
        self._graphs = _Graphs(model, self.names, ex_args, ex_kwargs)
        self._inputs = self._graphs.flat(ex_args, ex_kwargs)
        self._memo: dict[bytes, int] = {}
        self._full_cache: dict[str, Any] | None = None
        self.full_step = self.row_flops(torch.ones(len(self.names), dtype=torch.bool))

    def row_flops(self, row: torch.Tensor) -> int:
        """FLOPs of one step whose (rectified) row is ``row``."""
        key = _row_key(row)
        f = self._memo.get(key)
        if f is None:
            from torch.utils.flop_counter import FlopCounterMode

            sg = self._graphs.step(row)
            if sg.reads and self._full_cache is None:  # what skipped blocks read: their full-run outputs
                full = self._graphs.step(torch.ones(len(self.names), dtype=torch.bool))
                with torch.no_grad():
                    out = full.gm(*self._inputs)
                self._full_cache = dict(zip(full.writes, out[full.n_outputs:]))
            cache = self._full_cache or {}
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                sg.gm(*self._inputs, *[cache[b] for b in sg.reads])
            f = fc.get_total_flops()
            self._memo[key] = f
        return f

    def rectify(self, bits: torch.Tensor) -> torch.Tensor:
        return rectify_bits(bits, self.names, self.graph)[0]

    def fraction(self, bits: torch.Tensor, rectified: bool = False) -> float:
        """The generation's FLOPs under ``bits`` over the original's (``rectified``: bits already are)."""
        b = bits if rectified else self.rectify(bits)
        return sum(self.row_flops(r) for r in b) / (self.full_step * b.shape[0])


def feature_shift2(d_sum: torch.Tensor, d_sq_sum: torch.Tensor, n: int) -> float:
    """Unbiased estimate of |E d|^2 from n paired feature differences d_i (given as their sum and the sum of
    their squares, per feature, so that processes holding shares can add theirs): |mean|^2 - tr Cov / n. Its
    expectation is the squared distance between the two samples' mean features, the mean term of FD between
    them; it is 0 in expectation, and may be negative, when the means agree. Needs n >= 2."""
    if n < 2:
        raise MaskcError(f"the feature shift needs at least 2 samples to be unbiased, got {n}")
    mean = d_sum.double() / n
    var_sum = float(d_sq_sum.double().sum() - n * mean.pow(2).sum()) / (n - 1)
    return float(mean.pow(2).sum()) - var_sum / n


class Rollout:
    """Final samples of masked generations from fixed noises, rerun from the first changed step."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], scheduler: Any, noise: torch.Tensor,
                 call_kw: dict, guidance_scale: float | None, timestep_kw: str, seed: int = 0,
                 world: tuple[int, int] | None = None, keep_states: bool = True,
                 features: Callable[[torch.Tensor], torch.Tensor] | None = None, shift_weight: float = 0.0) -> None:
        self.names = list(names)
        self.scheduler = copy.deepcopy(scheduler)
        self.timesteps = list(self.scheduler.timesteps)
        self.T = len(self.timesteps)
        self.call_kw = call_kw
        self.guidance = guidance_scale
        self.tkw = timestep_kw
        self.seed = seed
        self.world = world  # (processes, samples in all): this process holds a share; psnr sums over processes
        # False: keep only the first step's state, so every mask runs from step 0 (a state per step holds
        # every block's output: memory that a rollout scoring a few unrelated masks does not need)
        self.keep_states = keep_states
        self._gen_kw = "generator" in inspect.signature(self.scheduler.step).parameters
        xin = torch.cat([noise, noise]) if guidance_scale is not None else noise
        tt = torch.as_tensor(self.timesteps[0], device=noise.device).reshape(1).expand(xin.shape[0])
        self._graphs = _Graphs(model, self.names, (xin,), {timestep_kw: tt, **call_kw})
        self.evaluations = 0  # steps run, for reports
        full = torch.ones(self.T, len(self.names), dtype=torch.bool)
        self._bits: torch.Tensor | None = None
        self._states: list[tuple[torch.Tensor, dict, Any]] = [(noise, {}, copy.deepcopy(self.scheduler))]
        self.reference = self._run(full, commit=True)
        # score() charges shift_weight dB per unit of feature_shift2 of features(final) against these
        self.features, self.shift_weight = features, shift_weight
        self._f_ref = self._features(self.reference) if features is not None and shift_weight else None

    def _model_fn(self, row: torch.Tensor, cache: dict) -> Callable:
        sg = self._graphs.step(row)

        def fn(*args: Any, **kwargs: Any) -> Any:
            out = sg.gm(*self._graphs.flat(args, kwargs), *[cache[b] for b in sg.reads])
            for b, v in zip(sg.writes, out[sg.n_outputs:]):
                cache[b] = v
            return pytree.tree_unflatten(list(out[: sg.n_outputs]), self._graphs.capture.out_spec)

        return fn

    def _run(self, bits: torch.Tensor, commit: bool) -> torch.Tensor:
        d = 0
        if self._bits is not None and self.keep_states:
            diff = (bits != self._bits).any(dim=1).nonzero()
            d = int(diff[0]) if len(diff) else self.T
        x, cache, sched = self._states[d]
        cache, sched = dict(cache), copy.deepcopy(sched)
        states = list(self._states[: d + 1])
        with torch.no_grad():
            for i in range(d, self.T):
                t = self.timesteps[i]
                eps = denoise(self._model_fn(bits[i], cache), x, t, self.call_kw, self.guidance, timestep_kw=self.tkw)
                kw = {"generator": torch.Generator().manual_seed(self.seed * 1_000_003 + i)} if self._gen_kw else {}
                x = sched.step(eps, t, x, **kw).prev_sample
                self.evaluations += 1
                if self.keep_states:
                    states.append((x, dict(cache), copy.deepcopy(sched)))
        self._pending = (bits.clone(), states)
        if commit:
            self.accept()
        return ((x + 1) / 2).clamp(0, 1)

    def accept(self) -> None:
        """Make the mask of the last ``final``/``psnr``/``score`` call the one later candidates are rerun from."""
        self._bits, self._states = self._pending

    def final(self, bits: torch.Tensor, commit: bool = False) -> torch.Tensor:
        """Final samples in [0, 1] under ``bits`` (row 0 must run every block that a later row skips)."""
        return self._run(bits, commit)

    def psnr(self, bits: torch.Tensor, commit: bool = False) -> float:
        """Mean PSNR (dB) of the final samples under ``bits`` against the unmasked ones."""
        return self._mean(10 * torch.log10(1 / self.mse(bits, commit).clamp_min(1e-12)))

    def score(self, bits: torch.Tensor, commit: bool = False) -> float:
        """The search's objective: mean over samples of ``10 log10(1 / (MSE + MSE_FLOOR))`` (dB).

        PSNR that saturates at 50 dB: a sample bit-identical to the original's (a blank image
        that clamps to 0 under both) counts 50 dB, not the 120 dB of ``psnr``'s clamp, so a few
        such samples cannot outweigh the others (``benchmarks/results/search_score_*.md``). With
        ``features`` and a ``shift_weight``, less ``shift_weight * shift2(final samples)``.
        """
        img = self._run(bits, commit)
        sat = self._mean(10 * torch.log10(1 / (self._mse(img) + MSE_FLOOR)))
        return sat if self._f_ref is None else sat - self.shift_weight * self.shift2(img)

    def shift2(self, img: torch.Tensor) -> float:
        """``feature_shift2`` of ``features(img)`` against the unmasked samples' features, over every process's
        calibration samples (img: this process's final samples)."""
        d = self._features(img) - self._f_ref
        sums = torch.stack([d.sum(0), d.pow(2).sum(0)])
        n = len(d)
        if self.world is not None and self.world[0] > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
            n = self.world[1]
        return feature_shift2(sums[0], sums[1], n)

    def _features(self, img: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.features(img)
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or len(f) != len(img):
            raise MaskcError(f"features(images) must return an (n, d) tensor for n images; got "
                             f"{getattr(f, 'shape', type(f).__name__)} for {len(img)} images")
        return f.detach().double()

    def mse(self, bits: torch.Tensor, commit: bool = False) -> torch.Tensor:
        """Per-sample MSE (float64, this process's share) of the final samples in [0, 1] under ``bits`` against
        the unmasked ones: what ``psnr`` and ``score`` average."""
        return self._mse(self._run(bits, commit))

    def _mse(self, img: torch.Tensor) -> torch.Tensor:
        return (img.double() - self.reference.double()).pow(2).flatten(1).mean(1)

    def _mean(self, per_sample: torch.Tensor) -> float:
        """Mean over the calibration samples, those of every process when they are split."""
        if self.world is None or self.world[0] == 1:
            return float(per_sample.mean())
        import torch.distributed as dist

        total = per_sample.sum().reshape(1)
        dist.all_reduce(total)  # the same sum on every process, so every process takes the same decisions
        return float(total) / self.world[1]
