"""Mask learning: the paper's per-timestep optimization, with a MACs budget.

For a frozen backbone and a scheduler, run the original sampler from Gaussian noise
once (no data set needed). Then, for each step i >= 1, learn a score s[i, b] in
[0, 1] per block: the masked forward mixes each block's fresh output with its cached
output using a binary mask sampled from s (Gumbel-Softmax or Bernoulli, straight-
through gradient). The loss is

    w[i] * fidelity(masked output, original output)
    + lam * sum_b macs_b * s_b / sum_b macs_b     (L1 sparsity, MACs-weighted)
    + beta * mean_b s_b (1 - s_b)                 (bimodal: pushes s to 0 or 1)

where w[i] is the timestep-aware scaling from delta[i], the change of the original
output between consecutive steps (sensitive steps keep fidelity). Only one step's
graph is back-propagated, so memory is flat in T. Row 0 always runs every block.

The cache (``LearnConfig.cache``): "masked" (default) learns the steps in order and
gives step i the cache the rows already learned would leave, stale entries included;
lam is a dual variable on the remaining MACs budget, updated after each step.
"original" is the paper's setting: steps independent, the cache is the original
model's block outputs at step i-1, lam updated by dual ascent per round of steps.

Afterwards the runs are ranked and the number kept is chosen so that the rectified
mask's MACs, counted by FlopCounterMode on the compiled mask, are closest to the
budget.

Invariants: deterministic for a given seed; scores are finite (a non-finite loss
raises); a run with ``checkpoint_dir`` saves each finished step atomically and a
rerun resumes with the same result.
"""
from __future__ import annotations

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
from maskc.sampling import denoise, stack_kwargs

__all__ = ["LearnConfig", "learn"]


@dataclass
class LearnConfig:
    """Settings of ``maskc.learn`` (defaults follow the paper where it says)."""

    target: float = 0.6  # fraction of the full model's MACs to keep over a generation
    batch: int = 8  # samples in the trajectory used for learning
    iters: int = 40  # optimizer iterations per step
    lr: float = 0.1  # Adam on the score logits
    init_logit: float = 3.0  # s starts near 1 (everything runs)
    beta: float = 0.05  # bimodal regularizer weight
    lam: float = 0.5  # initial sparsity weight
    lam_lr: float = 2.0  # dual ascent rate on (expected MACs fraction - target)
    # "gumbel" (Gumbel-Softmax, straight-through) or "stochastic" (Bernoulli from s, the
    # paper's choice); compared in benchmarks/results/bench_unet_ddim20_ablations.md.
    sampling: str = "gumbel"
    gumbel_tau: float = 0.5
    loss_scaling: bool = True  # timestep-aware fidelity weights from delta
    # "masked": steps are learned in order, and step i's cache holds what the masks
    # already learned for steps < i would leave in it (stale outputs included), and the
    # sparsity weight follows the remaining MACs budget step by step. "original": the
    # paper's setting, each step independent with the original model's outputs of step
    # i-1 as the cache (parallel over timesteps; blind to entries that go stale over
    # several skipped steps, see benchmarks/results/bench_unet_ddim20_ablations.md).
    cache: str = "masked"
    rectify: bool = True
    tolerance: float = 0.03  # final MACs within target +- tolerance
    round_size: int = 4  # steps per dual-ascent round (and per torchrun work split)

    def validate(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise MaskcError(f"target must be in (0, 1], the fraction of MACs to keep; got {self.target}")
        if self.cache not in ("masked", "original"):
            raise MaskcError(f"cache must be 'masked' or 'original', got {self.cache!r}")
        if self.sampling not in ("stochastic", "gumbel"):
            raise MaskcError(f"sampling must be 'stochastic' or 'gumbel', got {self.sampling!r}")
        if self.batch < 1 or self.iters < 1 or self.round_size < 1:
            raise MaskcError("batch and iters must be positive")


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
    **overrides: Any,
) -> Mask:
    """Learn a T x B mask keeping about ``target`` of the model's MACs (see the module docstring).

    ``cond(n, generator)`` gives the model kwargs of a batch of n (class labels,
    ``encoder_hidden_states``...). With ``guidance_scale``, ``uncond(n, generator)``
    gives the unconditional kwargs and every evaluation is classifier-free guided as
    in diffusers pipelines: one model call on the stacked [cond; uncond] batch, and
    fidelity is measured on the guided noise, the quantity the sampler uses.

    ``model`` may also be a diffusers pipeline: ``learn(pipe, target=..., prompt=... |
    prompt_embeds=... | class_labels=..., num_inference_steps=T, guidance_scale=...)``
    learns for its backbone, a copy of its scheduler, its step count and its
    conditioning (see ``maskc.pipelines.learn_inputs``).
    """
    import maskc
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
                     checkpoint_dir=checkpoint_dir, progress=progress, **overrides)
        mask.meta["provenance"]["pipeline"] = type(model).__name__
        return mask
    if scheduler is None or steps is None or sample_shape is None:
        raise MaskcError("learn(model, scheduler, steps, sample_shape, ...) needs all four for a bare backbone; "
                         "or pass a diffusers pipeline: learn(pipe, target=..., num_inference_steps=...)")

    cfg = config or LearnConfig()
    cfg = LearnConfig(**{**asdict(cfg), "target": target, **overrides})
    cfg.validate()
    model.eval()
    was_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    N = cfg.batch
    g = torch.Generator(device="cpu").manual_seed(seed)
    extra = dict(cond(N, g)) if cond is not None else {}
    if guidance_scale is not None:
        if uncond is None:
            raise MaskcError("guidance_scale needs uncond: a callable (n, generator) -> the unconditional model kwargs")
        call_kw = stack_kwargs(extra, dict(uncond(N, g)))
    else:
        call_kw = extra
    tkw = _timestep_kw(model)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    T = len(timesteps)
    x = torch.randn((N, *sample_shape), generator=g).to(device, dtype)

    def call(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoise(model, xx, t.to(device), call_kw, guidance_scale, timestep_kw=tkw)

    # Block set, MACs per block and the block graph (for rectification) from one example.
    ex_args, ex_kwargs = (x[:1],), {tkw: timesteps[0].reshape(1).to(device), **{k: _slice1(v) for k, v in extra.items()}}
    names = list(blocks) if blocks is not None else maskc.blocks(model, example=(ex_args, ex_kwargs))
    graph = maskc.block_graph(model, *ex_args, blocks=names, **ex_kwargs)
    macs = torch.tensor([float(graph.nodes[n]["macs"]) for n in names], dtype=torch.float64)
    total = float(graph.graph["total_macs"])
    glue = total - float(macs.sum())
    if macs.sum() <= 0:
        raise MaskcError("the blocks have no MACs to save (FlopCounterMode counted none)")
    w_macs = (macs / macs.sum()).to(torch.float32)

    # The original trajectory: inputs and outputs of every step.
    xs: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    with torch.no_grad():
        for t in timesteps:
            xs.append(x)
            eps = call(x, t)
            outs.append(eps)
            step_kw = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
            x = scheduler.step(eps, t, x, **step_kw).prev_sample
    delta = torch.zeros(T)
    for i in range(1, T):
        delta[i] = ((outs[i] - outs[i - 1]).norm() / outs[i - 1].norm().clamp_min(1e-12)).item()
    if cfg.loss_scaling and T > 1:
        w = (delta[1:] / delta[1:].mean().clamp_min(1e-12)).clamp(0.25, 4.0)
        weights = torch.cat([torch.ones(1), w / w.mean()])
    else:
        weights = torch.ones(T)

    # Resume.
    state: dict[str, Any] = {"scores": [[1.0] * len(names)], "lam": cfg.lam, "partial": {}}
    ckpt = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        ckpt = os.path.join(checkpoint_dir, "learn_state.json")
        key = {"names": names, "timesteps": [float(t) for t in timesteps], "seed": seed, "config": asdict(cfg)}
        if os.path.exists(ckpt):
            with open(ckpt) as f:
                saved = json.load(f)
            if saved.get("key") != key:
                raise MaskcError(
                    f"checkpoint {ckpt} was made with other settings (model blocks, timesteps, seed or config); "
                    "use another checkpoint_dir or delete it"
                )
            state = saved["state"]
    mixer = _Mixer(model, names)
    rank, world = _dist_rank_world()
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=T, initial=len(state["scores"]), desc="maskc learn", unit="step")
        except ImportError:
            bar = None
    def hard_frac(row: torch.Tensor) -> float:
        return (float((macs * row.double()).sum()) + glue) / total

    def advance(i: int, row: torch.Tensor) -> None:
        """Masked mode: run step i with a hard row, so the cache holds what it will at inference."""
        mixer.m, mixer.mode = row.to(device, dtype), "advance"
        with torch.no_grad():
            call(xs[i], timesteps[i])
        mixer.mode = "off"

    def train_step(i: int, lam: float) -> tuple[list[float], float]:
        """Scores of step i, learned with sparsity weight ``lam``, and their expected MACs fraction."""
        if cfg.cache == "original":
            mixer.mode = "record"  # the cache: the original model's block outputs at step i-1
            with torch.no_grad():
                call(xs[i - 1], timesteps[i - 1])
            mixer.cache = dict(mixer.record)
            mixer.record = {}
        saved_cache = mixer.cache
        target_out = outs[i]
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
            out = call(xs[i], timesteps[i])
            fid = (out - target_out).pow(2).mean() / scale
            loss = weights[i] * fid + lam * (w_macs * s).sum() + cfg.beta * (s * (1 - s)).mean()
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
        expected = (float((w_macs.double() * s.double()).sum() * macs.sum()) + glue) / total
        return [float(v) for v in s], expected

    try:
        if cfg.cache == "masked":
            # Steps in order; every process computes every step (the cache makes them
            # sequential), so torchrun gives the same mask, without the speed-up.
            def hard(k: int) -> torch.Tensor:  # row 0's stored scores are all 1.0
                return torch.tensor(state["scores"][k]) > 0.5

            for k in range(len(state["scores"])):  # replay the hard rows learned so far (resume)
                advance(k, hard(k))
            while len(state["scores"]) < T:
                i = len(state["scores"])
                lam = float(state["lam"])
                # dual ascent toward the per-step fraction the remaining steps may still use
                need = (cfg.target * T - sum(hard_frac(hard(k)) for k in range(i))) / (T - i)
                sc, _ = train_step(i, lam)
                state["scores"].append(sc)
                row = hard(i)
                advance(i, row)
                state["lam"] = max(0.0, lam + cfg.lam_lr * (hard_frac(row) - min(max(need, 0.0), 1.0)))
                if ckpt is not None and rank == 0:
                    _atomic_json(ckpt, {"key": key, "state": state})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(lam=f"{state['lam']:.3f}", kept=f"{hard_frac(row):.2f}")
        # Rounds of ``round_size`` steps share one sparsity weight; lam is updated by dual
        # ascent after each round. The rounds do not depend on the number of processes, so
        # torchrun with any --nproc-per-node gives the mask one process gives.
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
                if ckpt is not None and world == 1:
                    _atomic_json(ckpt, {"key": key, "state": state})
                if bar is not None:
                    bar.update(1)
            if world > 1:
                import torch.distributed as dist

                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, partial)
                for part in gathered:
                    partial.update({int(k): v for k, v in part.items()})
            for i in round_steps:
                state["scores"].append(partial[i][0])
            mean_expected = sum(partial[i][1] for i in round_steps) / len(round_steps)
            state["lam"] = max(0.0, lam + cfg.lam_lr * (mean_expected - cfg.target))
            state["partial"] = {}
            if ckpt is not None and rank == 0:
                _atomic_json(ckpt, {"key": key, "state": state})
            if bar is not None:
                bar.set_postfix(lam=f"{state['lam']:.3f}", kept=f"{mean_expected:.2f}")
    finally:
        mixer.close()
        if bar is not None:
            bar.close()
        for n, p in model.named_parameters():
            p.requires_grad_(was_grad[n])
    scores = torch.tensor(state["scores"], dtype=torch.float64)
    ex_t = [t.reshape(1).to(device) for t in timesteps]

    # Budget: rank the runs of steps >= 1 by learned score (ties: the step's fidelity
    # weight, then cheaper blocks first), keep the top k, rectify; the generation's MACs,
    # counted by FlopCounterMode on the compiled mask (so glue that dies with the blocks
    # it fed is counted), grow with k: binary-search the k closest to the target.
    full_flops = measured_flops(model, None, ex_args, ex_kwargs, tkw, ex_t)
    # In masked mode the runs the steps chose (score > 0.5) come first, so k near their
    # count reproduces the learned rows and the search only trims or adds marginal runs.
    first = (scores > 0.5) if cfg.cache == "masked" else torch.zeros_like(scores, dtype=torch.bool)
    order = sorted(
        ((i, j) for i in range(1, T) for j in range(len(names))),
        key=lambda ij: (not bool(first[ij[0], ij[1]]), -float(scores[ij[0], ij[1]]), -float(weights[ij[0]]),
                        float(macs[ij[1]])),
    )
    measured: dict[int, tuple[torch.Tensor, float]] = {}

    def keep(k: int) -> tuple[torch.Tensor, float]:
        if k not in measured:
            b = torch.zeros(T, len(names), dtype=torch.bool)
            b[0] = True
            for i, j in order[:k]:
                b[i, j] = True
            if cfg.rectify:
                from maskc.passes.rectify import rectify_bits

                b = rectify_bits(b, names, graph)[0]
            f = measured_flops(model, Mask(b, names), ex_args, ex_kwargs, tkw, ex_t) / full_flops
            measured[k] = (b, f)
        return measured[k]

    lo_k, hi_k = 0, len(order)
    while lo_k < hi_k:
        mid = (lo_k + hi_k) // 2
        if keep(mid)[1] >= cfg.target:
            hi_k = mid
        else:
            lo_k = mid + 1
    best = min({max(lo_k - 1, 0), lo_k}, key=lambda k: abs(keep(k)[1] - cfg.target))
    bits, frac = keep(best)
    mask = Mask(
        bits,
        names,
        {
            "scheduler": type(scheduler).__name__,
            "timesteps": [float(t) for t in timesteps],
            "provenance": {
                "method": "learned (He & Gao 2026, per-timestep)",
                "seed": seed,
                "config": asdict(cfg),
                "delta": [float(v) for v in delta],
                "loss_weights": [float(v) for v in weights],
                "macs_fraction": frac,
                "guidance_scale": guidance_scale,
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
