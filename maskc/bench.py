"""``maskc bench``: learned masks against peers' schedules, every one through the same compiled path.

For a shipped Fashion-MNIST model (``unet``, ``dit`` or ``sd``) or a diffusers folder,
with DDIM or DPM-Solver++ (``sampler``) and T steps:
1. learn masks at several MACs targets (timed), optionally the learning ablations;
2. write peers' schedules as masks (``maskc.schedules``): DeepCache uniform and
   non-uniform for U-Nets, FORA for DiTs, step-level reuse (the whole model reused
   between full steps) and the static δ-threshold schedule for all, random at equal
   MACs; schedules with identical bits are listed once;
3. generate ``n`` samples with the original model and with each mask from the same
   noise (and, for the class-conditional DiT and the caption-conditioned SD-like
   U-Net, the same labels and guidance);
4. score each: FD-FMNIST and KID against the test set (with the real-vs-real floor),
   PSNR and SSIM against the original's samples, class accuracy (DiT), MACs per
   generation by FlopCounterMode, wall time of a ``time_batch`` generation measured
   interleaved with the original, peak memory;
5. write ``<out>/<name>.json`` and ``.md`` (a table in the paper's shape) and plots:
   the quality-vs-MACs Pareto curves and the learned mask as a T x B heatmap.

Steps 2-4 keep what they finish under ``<out>/partial/<name>/`` (the peer selection, the
original's samples, each method's row, and each finished batch of the method being sampled),
keyed by everything that decides it: an interrupted run resumes where it stopped, at the
batch, and ``shards`` processes (``--shard K/N``) split the methods (and the original's batches).
A shard samples its own methods first, then helps with the other shards' unfinished ones from the
last backwards (two processes on one method split its batches), so shards that finish at
different times do not leave a core idle; whichever finds every row done writes the table and
removes the folder.

Nothing in the tables is typed by hand: every figure comes from this run.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

__all__ = ["BenchConfig", "run_bench", "code_version", "row_version"]


SAMPLERS: dict[str, Callable[[], Any]] = {  # the training noise schedule: 1000 steps, linear betas
    "ddim": lambda: DDIMScheduler(num_train_timesteps=1000),
    "dpm++": lambda: DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++"),
}


# Modules whose code decides a learned mask or its cost, besides passes/: learn.py and what
# it runs ("__init__": the package, for ``maskc.blocks``). tests/test_bench.py walks their
# imports and fails on a module neither here nor in MASK_CODE_EXEMPT.
MASK_CODE = ("__init__", "learn", "runtime", "refine", "rollout", "sampling", "schedules", "mask", "graphs")
MASK_CODE_EXEMPT = {
    "errors": "exception classes and their messages",
    "pipelines": "which inputs a diffusers pipeline gives learning; maskc bench learns from bare models",
    "cudagraphs": "CUDA graph capture and replay: no bits, no MACs",
}


# Modules whose code decides a table's row from a mask's bits (its samples and their scores), besides passes/
# and maskc/models/: what the row store keys on. tests/test_bench.py walks their imports.
ROW_CODE = ("__init__", "runtime", "cudagraphs", "sampling", "mask", "graphs", "eval", "data")
ROW_CODE_EXEMPT = {
    "errors": "exception classes and their messages",
    "learn": "eval.generation_macs counts MACs with learn.measured_flops: a row's MACs are counted afresh, never stored",
}


def _hash_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def row_version(root: str | None = None) -> str:
    """A hash of the code that turns a mask's bits into a table's row: ``passes/``, ``maskc/models/`` and
    ``ROW_CODE`` (not learning: a change to learn.py keeps the rows of the masks it learns again bit for bit).
    ``root``: a source tree laid out as the repository (e.g. an older commit's), instead of the imported code."""
    return _hash_files(_code_files(("passes", "models"), ROW_CODE, root))


# where each maskc package lies in a source tree (pyproject.toml's package-dir)
SOURCE_DIRS = {"__init__": "maskc", "passes": "passes", "models": "maskc/models"}


def _code_files(subpackages: tuple[str, ...], modules: tuple[str, ...], root: str | None = None) -> list[str]:
    """The ``.py`` files of the ``maskc`` subpackages, in the order of their package-relative names
    (``models/x.py`` before ``passes/y.py``), not of their absolute paths (an editable install that maps
    ``maskc.passes`` to another checkout than ``maskc`` hashes the same code to the same version), then the
    files of ``modules`` in their given order; from the imported package, or from the source tree ``root``."""
    import importlib

    def where(m: str) -> str:  # import_module: ``maskc.learn`` as an attribute is the function the package re-exports
        if root is not None:
            return os.path.join(root, SOURCE_DIRS[m], "__init__.py") if m in SOURCE_DIRS else \
                os.path.join(root, "maskc", f"{m}.py")
        return importlib.import_module("maskc" if m == "__init__" else f"maskc.{m}").__file__

    dirs = {sub: os.path.dirname(where(sub)) for sub in subpackages}
    named = [(f"{sub}/{f}", os.path.join(d, f)) for sub, d in dirs.items() for f in os.listdir(d) if f.endswith(".py")]
    return [path for _, path in sorted(named)] + [where(m) for m in modules]


def weights_version(folder: str) -> str:
    """A hash of a model folder's weights and config: its ``*.safetensors``, ``config.json`` and ``stats.json``
    (not its masks, model card or training record)."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.endswith(".safetensors") or f == "config.json" or f == "stats.json")
    return _hash_files(files)


# the fields of run_key that decide a sampled row: with the sampling code and the scorer, the row store's key
ROW_KEY = ("model", "sampler", "steps", "n", "batch", "seed", "threads", "guidance_scale")


def run_key(cfg: "BenchConfig", path: str, version: str, guidance: float | None) -> dict[str, Any]:
    """What decides a quality run's pieces under ``<out>/partial/<name>/``: the model folder by content
    (``weights_version``), not by where it lies, so a partial folder committed from one checkout resumes in
    another; the code version; and every setting that changes a sample or a peer."""
    return {"code": version, "model": weights_version(path), "sampler": cfg.sampler, "steps": cfg.steps, "n": cfg.n,
            "batch": cfg.batch, "seed": cfg.seed, "threads": cfg.threads, "guidance_scale": guidance,
            "select_n": cfg.select_n, "targets": list(cfg.targets), "ablations": cfg.ablations,
            "peers": cfg.peers, "random": cfg.random, "learn_kwargs": cfg.learn_kwargs}


def row_store(out: str, stem: str, key: dict[str, Any], row_code: str) -> "_Partial":
    """The row store of table ``stem`` under ``out``: rows by mask bits, kept across runs, under a key of
    everything that decides a row from the bits (``row_code``, ``key``'s ``ROW_KEY`` fields, the scorer's
    weights) and nothing of learning."""
    from maskc.eval import EVAL_DIR
    from maskc.models.classifier import WEIGHTS as classifier_dir

    return _Partial(os.path.join(out, "rows", stem), {"row_code": row_code, **{k: key[k] for k in ROW_KEY},
                                                       "scorer": [weights_version(classifier_dir),
                                                                  weights_version(EVAL_DIR)]})


def code_version() -> str:
    """A hash of the code that decides learned masks and their cost: ``passes/`` and ``MASK_CODE``.

    Part of the key under which learned masks are reused, so that a change to learning or
    to the compiler learns afresh, and recorded in every result so that ``--phase time``
    refuses quality figures made by other code.
    """
    return _hash_files(_code_files(("passes",), MASK_CODE))


@dataclass
class BenchModel:
    """A bench's backbone (float32) and its conditioning, as learning, sampling and scoring all see it.

    ``n_classes`` is the label of the null class or caption (the unconditional half of
    classifier-free guidance) and None for an unconditional model, whose ``guidance`` is None too.
    """
    model: torch.nn.Module
    path: str
    kind: str  # the diffusers class name
    shape: tuple[int, int, int]
    n_classes: int | None
    guidance: float | None
    table: torch.Tensor | None = None  # caption embeddings by label (the SD-like U-Net), else class labels are used

    @property
    def conditional(self) -> bool:
        return self.n_classes is not None

    def cond_of(self, labels: torch.Tensor) -> dict:
        """Model kwargs for class labels (``n_classes``: the null label or caption)."""
        return {"encoder_hidden_states": self.table[labels]} if self.table is not None else {"class_labels": labels}

    def conditioning(self) -> tuple[Callable | None, Callable | None]:
        """``maskc.learn``'s (cond, uncond) as the bench learns: labels i % n_classes, the null label; None, None
        for an unconditional model."""
        if not self.conditional:
            return None, None
        return (lambda k, gen: self.cond_of(torch.arange(k) % self.n_classes),
                lambda k, gen: self.cond_of(torch.full((k,), self.n_classes)))

    def learn(self, sampler: str, steps: int, target: float, seed: int, **kw: Any) -> Any:
        """``maskc.learn`` at ``target`` as ``maskc bench`` learns a level (``conditioning``, guided when
        conditional); ``kw``: learning settings."""
        import maskc

        cond, uncond = self.conditioning()
        return maskc.learn(self.model, SAMPLERS[sampler](), steps=steps, sample_shape=self.shape, target=target,
                           seed=seed, cond=cond, uncond=uncond, guidance_scale=self.guidance, progress=False, **kw)


def bench_model(model: str, guidance_scale: float) -> BenchModel:
    """The shipped model ``model`` (or a diffusers folder) loaded as ``maskc bench`` uses it."""
    from maskc.models.shipped import NULL_CAPTION, captions, has_captions, load_pretrained

    net, path = load_pretrained(model)
    net.float()
    kind = type(net).__name__
    c = net.config
    table = captions(path) if kind == "UNet2DConditionModel" and has_captions(path) else None
    n_classes = NULL_CAPTION if table is not None else (
        getattr(c, "num_embeds_ada_norm", None) if kind == "DiTTransformer2DModel" else None)
    return BenchModel(net, path, kind, (c.in_channels, c.sample_size, c.sample_size), n_classes,
                      guidance_scale if n_classes is not None else None, table)


@dataclass
class BenchConfig:
    model: str = "unet"  # "unet", "dit" (shipped) or a diffusers folder
    steps: int = 20
    sampler: str = "ddim"  # "ddim" or "dpm++" (DPM-Solver++ multistep, 2nd order)
    n: int = 2000  # samples for FD, KID, PSNR, SSIM
    batch: int = 250  # generation batch for the quality pass
    targets: tuple[float, ...] = (0.65, 0.55, 0.45)
    main_target: float = 0.55  # the target that the ablations and the random floor use
    deepcache: tuple[int, ...] = (3, 5, 10)  # uniform intervals, branch depth 1 (this list and the next four: peers="fixed")
    deepcache_nonuniform: tuple[int, ...] = (5,)
    fora: tuple[int, ...] = (2, 3)
    step_reuse: tuple[int, ...] = (2, 3)  # the whole model reused between full steps every N (the simplest peer)
    delta_threshold: tuple[int, ...] = (10,)  # static TeaCache-like schedules with this many full steps
    peers: str = "best"  # "best": per family, its best member of no more MACs than each learned mask; "fixed": the lists above
    select_n: int = 16  # noises (seed 4321 + seed, neither learning's nor the table's) that choose the best members
    bootstrap: int = 1000  # paired bootstrap resamples of the noises for the 95% intervals of FD ratios and margins
    random: bool = True
    ablations: bool = False
    guidance_scale: float = 2.0  # class-conditional models only
    time_batch: int = 64
    time_reps: int = 5
    memory: bool = True
    threads: int = 2
    time_threads: int | None = None  # threads for the timing phase (default: threads)
    phase: str = "all"  # "quality" (samples and scores), "time" (wall time and memory, on a quiet machine), "all"
    seed: int = 0
    out: str = "benchmarks/results"
    name: str = ""  # file stem; default bench_<model>_<sampler><T> (ddim, dpmpp)
    reuse_masks: bool = True  # load learned masks from <out>/masks/ when their settings match
    # keep each sampled row (figures, features, per-sample PSNR) under <out>/rows/ and reuse it in later runs
    # for a mask of the same bits, while row_version(), the weights and the sampling settings are the same
    row_store: bool = True
    shard: int = 0  # this process samples the methods whose index i (the original first) has i % shards == shard
    shards: int = 1
    help_shards: bool = True  # then the other shards' unfinished methods, from the last backwards
    learn_kwargs: dict = field(default_factory=dict)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns the result dict written to JSON.

    Only the process that takes ``table.lock`` (once every row is stored) writes the table; a
    run that fails after taking it lets it go, so a rerun in the same process is not refused."""
    held: list[str] = []
    try:
        return _run_bench(cfg, log, held)
    finally:
        for lock in held:
            try:
                os.remove(lock)
            except FileNotFoundError:  # removed with the partial folder once the table is written
                pass


def _run_bench(cfg: BenchConfig, log: Callable[[str], None], held: list[str]) -> dict[str, Any]:
    import maskc
    from maskc import schedules
    from maskc.eval import (FMNISTFeatures, fidelity, generation_macs, interleaved_times, peak_memory,
                            psnr_per_sample, summarize_times)
    from maskc.models.shipped import SHIPPED
    from maskc.sampling import generate, stack_kwargs

    if cfg.phase not in ("all", "quality", "time"):
        from maskc.errors import MaskcError

        raise MaskcError(f"phase must be 'all', 'quality' or 'time'; got {cfg.phase!r}")
    torch.set_num_threads(cfg.threads)
    bm = bench_model(cfg.model, cfg.guidance_scale)
    model, path, kind, shape, n_classes, guidance, cond_of = (
        bm.model, bm.path, bm.kind, bm.shape, bm.n_classes, bm.guidance, bm.cond_of)
    from maskc.errors import MaskcError

    if kind not in ("UNet2DModel", "DiTTransformer2DModel") and bm.table is None:
        raise MaskcError(f"maskc bench knows UNet2DModel, DiTTransformer2DModel and UNet2DConditionModel folders with "
                         f"a caption table (the shipped sd); {path} holds a {kind}")
    if not 0 <= cfg.shard < cfg.shards:
        raise MaskcError(f"shard must be K/N with 0 <= K < N; got {cfg.shard}/{cfg.shards}: run N processes with "
                         f"--shard 0/N ... --shard N-1/N")
    if cfg.sampler not in SAMPLERS:
        raise MaskcError(f"sampler must be one of {sorted(SAMPLERS)}; got {cfg.sampler!r}")
    T = cfg.steps
    version = code_version()
    sched = SAMPLERS[cfg.sampler]()
    conditional = bm.conditional

    tag = "ddim" if cfg.sampler == "ddim" else cfg.sampler.replace("+", "p")
    stem = f"bench_{cfg.model if cfg.model in SHIPPED else os.path.basename(path.rstrip('/'))}_{tag}{T}"
    name = cfg.name or stem  # masks are stored under the stem, so runs with other names reuse them
    os.makedirs(os.path.join(cfg.out, "masks"), exist_ok=True)
    json_path = os.path.join(cfg.out, f"{name}.json")

    part = _Partial(os.path.join(cfg.out, "partial", name), run_key(cfg, path, version, guidance))
    row_code = row_version()
    store = row_store(cfg.out, stem, part.key, row_code) if cfg.row_store else None

    def kwargs_for(labels: torch.Tensor | None) -> dict:
        if labels is None:
            return {}
        return stack_kwargs(cond_of(labels), cond_of(torch.full_like(labels, n_classes)))

    # Fixed noise and labels for every method.
    g = torch.Generator().manual_seed(1234 + cfg.seed)
    noise = torch.randn(cfg.n, *shape, generator=g)
    labels = torch.arange(cfg.n) % n_classes if conditional else None
    names = maskc.blocks(model)
    s0 = SAMPLERS[cfg.sampler]()
    s0.set_timesteps(T)
    ts = [t.reshape(1) for t in s0.timesteps]
    ex_args = (torch.zeros(1, *shape),)
    ex_kwargs = cond_of(torch.zeros(1, dtype=torch.long)) if conditional else {}
    full_macs = generation_macs(model, None, ex_args, {**ex_kwargs, "timestep": ts[0]}, "timestep", ts)

    fracs: dict[tuple, float] = {}  # a generation's MACs depend on the mask's bits and names alone

    def frac(mask: maskc.Mask) -> float:
        """Measured MACs fraction (FlopCounterMode over a generation), once per distinct bits: the random
        schedule's bisection meets the same bits many times on a small mask."""
        key = (_bits_digest(mask), tuple(mask.names))
        if key not in fracs:
            fracs[key] = generation_macs(model, mask, ex_args, {**ex_kwargs, "timestep": ts[0]}, "timestep",
                                         ts) / full_macs
        return fracs[key]

    def quality_phase() -> tuple[list[dict[str, Any]], dict[str, float], Any, list[dict[str, Any]]]:
        # 1. Learned masks.
        methods: list[dict[str, Any]] = []

        specs: list[tuple[float, str, dict[str, Any]]] = [(t, f"maskc learned, target {t:g}", {}) for t in cfg.targets]
        if cfg.ablations:
            mt = cfg.main_target
            specs += [(mt, f"ablation: stochastic sampling (paper), target {mt:g}", {"sampling": "stochastic"}),
                      (mt, f"ablation: no loss scaling, target {mt:g}", {"loss_scaling": False}),
                      (mt, f"ablation: no rectification, target {mt:g}", {"rectify": False}),
                      (mt, f"ablation: per-step scores only (the paper, no trajectory search), target {mt:g}",
                       {"refine": "none"}),
                      (mt, f"ablation: masked cache, no trajectory search (maskc before), target {mt:g}",
                       {"cache": "masked", "refine": "none"})]

        def where(spec: tuple[float, str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
            """The key a stored mask must carry to be reused, and its file."""
            target, _, kw = spec
            key = {"target": target, "steps": T, "seed": cfg.seed, "guidance_scale": guidance, **cfg.learn_kwargs, **kw,
                   "code": version}
            tag = "_".join(f"{k}-{v}" for k, v in sorted(kw.items()))
            return key, os.path.join(cfg.out, "masks", f"{stem}_learned_{target:g}{'_' + tag if tag else ''}.json")

        def load(spec: tuple[float, str, dict[str, Any]]) -> maskc.Mask | None:
            key, fpath = where(spec)
            if not (cfg.reuse_masks and os.path.exists(fpath)):
                return None
            m = maskc.Mask.load(fpath)
            return m if (m.meta.get("provenance", {}).get("bench_key") or {}) == key else None

        def learn(spec: tuple[float, str, dict[str, Any]]) -> maskc.Mask:
            target, label, kw = spec
            key, fpath = where(spec)
            why = "relearn requested" if not cfg.reuse_masks else "no stored mask"
            if cfg.reuse_masks and os.path.exists(fpath):
                stored = maskc.Mask.load(fpath).meta.get("provenance", {}).get("bench_key") or {}
                diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
                why = (f"the code changed since it was learned ({stored.get('code')} -> {version})"
                       if diff == ["code"] else f"settings differ: {', '.join(diff)}")
            log(f"learning {label} afresh ({why}) ...")
            t0 = time.perf_counter()
            mask = bm.learn(cfg.sampler, T, target, cfg.seed, **{**cfg.learn_kwargs, **kw})
            mask.meta["provenance"].update({"learning_seconds": time.perf_counter() - t0, "bench_key": key})
            mask.save(fpath)
            return mask

        # Shards started together split the learning (each learns the masks no other process is learning).
        for spec, (mask, afresh) in zip(specs, _split_work(specs, load, learn, lambda sp: where(sp)[1] + ".lock", log)):
            target, label, kw = spec
            fpath = where(spec)[1]
            secs = mask.meta["provenance"]["learning_seconds"]
            if not afresh:
                log(f"reusing {fpath} (same settings and code {version}; learned in {secs:.0f} s)")
            methods.append({"method": label, "family": "maskc" if not kw else "maskc ablation", "mask": mask,
                            "learning_s": secs, "learned_afresh": afresh, "target": target,
                            "file": os.path.relpath(fpath, cfg.out)})

        # 2. Peers as masks.
        is_unet = any(n.startswith("up_blocks.") for n in names)
        selection: list[dict[str, Any]] = []
        if cfg.peers == "best":
            levels = [(m["target"], m["mask"]) for m in methods if m["family"] == "maskc"]
            gs = torch.Generator().manual_seed(4321 + cfg.seed)
            sel_noise = torch.randn(cfg.select_n, *shape, generator=gs)
            sel_labels = torch.arange(cfg.select_n) % n_classes if conditional else None
            sel_id = [(t, _bits_digest(m)) for t, m in levels]
            def choose() -> dict[str, Any]:
                log(f"choosing each peer family's best member at {len(levels)} MACs levels on {cfg.select_n} noises ...")
                chosen, selection = select_best_peers(
                    model, names, s0, sel_noise, kwargs_for(sel_labels), guidance, ex_args,
                    {**ex_kwargs, "timestep": ts[0]}, levels,
                    _delta(model, sched, sel_noise[:8], kwargs_for, sel_labels, guidance, T))
                return {"selection": selection, "chosen": [{**e, "mask": e["mask"].to_dict()} for e in chosen]}

            # shards started together: one chooses, the others wait for it
            stored, made = part.claimed("selection", sel_id, choose, log)
            if not made:
                log(f"reusing the peer selection of an earlier run ({part.dir})")
            chosen = [{**e, "mask": maskc.Mask.from_dict(e["mask"])} for e in stored["chosen"]]
            selection = stored["selection"]
            methods.extend(chosen)
        elif is_unet:
            for N in cfg.deepcache:
                methods.append({"method": f"DeepCache uniform N={N}", "family": "DeepCache",
                                "mask": schedules.deepcache_uniform(names, T, N, depth=1)})
            for N in cfg.deepcache_nonuniform:
                methods.append({"method": f"DeepCache non-uniform N={N}", "family": "DeepCache",
                                "mask": schedules.deepcache_nonuniform(names, T, N, depth=1)})
        else:
            for N in cfg.fora:
                methods.append({"method": f"FORA N={N}", "family": "FORA", "mask": schedules.fora(names, T, N)})
        for N in (cfg.step_reuse if cfg.peers != "best" else ()):
            methods.append({"method": f"step-level reuse N={N}", "family": "step-level reuse",
                            "mask": schedules.step_reuse(names, T, N)})
        if cfg.delta_threshold and cfg.peers != "best":
            lib = [m for m in schedules.peer_library(names, T, delta=_delta(model, sched, noise[:8], kwargs_for,
                                                                             labels, guidance, T))
                   if m.meta["provenance"]["method"].startswith("δ-threshold")]
            for k in cfg.delta_threshold:
                m = next((m for m in lib if len(m.meta["provenance"]["full_steps"]) == k), None)
                if m is not None:
                    methods.append({"method": f"δ-threshold (TeaCache-like), {k} full steps", "family": "δ-threshold",
                                    "mask": m})
        seen: set[bytes] = set()  # FORA and step-level reuse are the same bits on a DiT: keep the first
        for m in list(methods):
            if m["family"].startswith("maskc"):
                continue
            key = bytes(m["mask"].bits.flatten().to(torch.uint8).tolist())
            if key in seen:
                methods.remove(m)
            seen.add(key)
        if cfg.random:
            for tgt in (cfg.targets if cfg.peers == "best" else (cfg.main_target,)):
                methods.append({"method": f"random, equal MACs ({tgt:g})", "family": "random",
                                "mask": schedules.random_equal_macs(names, T, tgt, frac, seed=cfg.seed)})

        # 3-4. Quality.
        feats = FMNISTFeatures(seed=cfg.seed)
        floor = feats.floor(cfg.n)
        log(f"real-vs-real floor at n={cfg.n}: {floor}")

        def sample_all(fn: Any, reset: Callable[[], None] | None, ident: Any,
                       done: Callable[[], bool] = lambda: False) -> torch.Tensor:
            """The n samples of ``fn``, batch by batch, each stored as it finishes: a killed process resumes
            the method at its first missing batch (a batch depends on its noises alone), and processes
            sampling the same method together split its batches (``_split_work``: each makes the batches
            no other process is making and reads the others' once stored). ``drop_batches`` removes them
            once the method's row is stored; a batch missing while ``done()`` raises ``_RowStored``."""
            stored_as = batch_names(ident)

            def load(i: int) -> torch.Tensor | None:
                x = part.get_tensor(stored_as[i])
                if x is None and done():  # another process finished the method and dropped its batches
                    raise _RowStored
                return x

            def make(i: int) -> torch.Tensor:
                lab = labels[i:i + cfg.batch] if labels is not None else None
                x = generate(fn, sched, noise[i:i + cfg.batch], T, kwargs_for(lab), guidance, reset=reset)
                part.put_tensor(stored_as[i], x)
                return x

            got = _split_work(list(stored_as), load, make,
                              lambda i: os.path.join(part.dir, stored_as[i] + ".lock"), log)
            return torch.cat([x for x, _ in got])

        def batch_names(ident: Any) -> dict[int, str]:
            """Each batch's first sample index -> the name its samples are stored under."""
            d = _digest(ident)
            return {i: f"batch-{d}-{i}" for i in range(0, cfg.n, cfg.batch)}

        def drop_batches(ident: Any) -> None:
            for batch in batch_names(ident).values():
                part.remove_tensor(batch)

        def score(images: torch.Tensor, ident: Any) -> dict[str, Any]:
            """FD, KID (and class accuracy); stores the features for the paired intervals (before the row)."""
            f = feats.features(images)
            part.put_tensor(f"features-{_digest(ident)}", f)
            r = feats.score_features(f)
            if conditional:
                r["class_accuracy"] = feats.accuracy(images, labels)
            return r

        def method_row(i: int, figures: dict[str, Any]) -> dict[str, Any]:
            """Row i (a mask's): what the method is, its MACs (counted here) and ``figures`` from its samples."""
            m = methods[i - 1]
            return {"method": m["method"], "family": m["family"], "macs_fraction": frac(m["mask"]),
                    "learning_s": m.get("learning_s"), "learned_afresh": m.get("learned_afresh"),
                    "target": m.get("target"), "mask_file": m.get("file"),
                    **{k: m[k] for k in ("best_for", "selection_psnr", "settings") if k in m}, **figures}

        def save_mask(i: int, row: dict[str, Any]) -> None:
            m = methods[i - 1]
            if m.get("file") is None:
                m["mask"].save(os.path.join(cfg.out, "masks", f"{name}_{_slug(m['method'])}.json"))
                row["mask_file"] = f"masks/{name}_{_slug(m['method'])}.json"

        def keep(i: int, row: dict[str, Any]) -> None:
            """Row i's sample figures, features and per-sample PSNR into the row store, by its mask's bits."""
            if store is None:
                return
            sid = ids[i][1] or "original"
            store.put_tensor(f"features-{_digest(sid)}", part.get_tensor(f"features-{_digest(ids[i])}"))
            if i:
                store.put_tensor(f"psnr-{_digest(sid)}", part.get_tensor(f"psnr-{_digest(ids[i])}"))
            store.put("row", sid, {**{k: row[k] for k in ROW_FIGURES if k in row},
                                   "stored": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                       timespec="seconds"), "code_version": version, "row_version": row_code}})

        def from_store(i: int) -> bool:
            """Row i from the row store into this run's partial folder, if a run sampled a mask of its bits."""
            sid = ids[i][1] or "original"
            got = store.get("row", sid) if store is not None else None
            f = store.get_tensor(f"features-{_digest(sid)}") if got is not None else None
            p = store.get_tensor(f"psnr-{_digest(sid)}") if got is not None and i else None
            if f is None or (i and p is None):
                return False
            part.put_tensor(f"features-{_digest(ids[i])}", f)
            if i:
                part.put_tensor(f"psnr-{_digest(ids[i])}", p)
                row = method_row(i, {**got, "sampled_by": "row store"})
                save_mask(i, row)
            else:
                row = {"method": ids[0][0], "family": "original", "macs_fraction": 1.0, "learning_s": None,
                       **got, "psnr": None, "ssim": None, "sampled_by": "row store"}
            part.put("row", ids[i], row)
            return True

        ids = [("original (full model)", None)] + [(m["method"], _bits_digest(m["mask"])) for m in methods]
        reused = [i for i, ident in enumerate(ids) if part.get("row", ident) is None and from_store(i)]
        if reused:
            log(f"{len(reused)} of {len(ids)} rows from the row store ({store.dir}): masks of the same bits, "
                f"sampled and scored by the same code (row version {row_code})")
        todo = [i for i, ident in enumerate(ids) if i % cfg.shards == cfg.shard and part.get("row", ident) is None]
        if cfg.help_shards:  # then the others' from the last backwards: the owners go forwards, so they meet late
            todo += [i for i, ident in reversed(list(enumerate(ids)))
                     if i % cfg.shards != cfg.shard and part.get("row", ident) is None]
        os.makedirs(part.dir, exist_ok=True)
        part.create = False  # from here on, the folder gone means the table's writer removed it

        def gone() -> bool:
            return not os.path.isdir(part.dir)

        try:  # a write into the removed folder raises FileNotFoundError; a batch missing there, _RowStored
            ref = None
            if todo:  # every shard needs the original's samples: those that start together split its batches
                ref = part.get_tensor("original")
                if ref is None and store is not None:
                    ref = store.get_tensor("original")
                    if ref is not None:
                        part.put_tensor("original", ref)
                if ref is None:
                    t0 = time.perf_counter()
                    ref = sample_all(model, None, ids[0], done=gone)
                    log(f"original: {cfg.n} samples in {time.perf_counter() - t0:.0f} s")
                    part.put_tensor("original", ref)  # its batches stay until the table is written: another
                    # shard may still be reading them
                    if store is not None:
                        store.put_tensor("original", ref)
            if 0 in todo and part.get("row", ids[0]) is None:
                row = {"method": ids[0][0], "family": "original", "macs_fraction": 1.0, "learning_s": None,
                       **score(ref, ids[0]), "psnr": None, "ssim": None, "sampled_by": f"{cfg.shard}/{cfg.shards}"}
                keep(0, row)
                part.put("row", ids[0], row)
                log(str(row))
            from tqdm.auto import tqdm

            shard = f" (shard {cfg.shard}/{cfg.shards})" if cfg.shards > 1 else ""
            for i in tqdm([i for i in todo if i > 0], desc=f"sampling {cfg.n} per method{shard}", unit="method"):
                if gone():  # another process stored the last row and wrote the table
                    break
                if part.get("row", ids[i]) is not None:  # another process (its owner, or a helper) finished it
                    continue
                m = methods[i - 1]
                tm = maskc.compile(model, m["mask"])
                t0 = time.perf_counter()
                try:
                    imgs = sample_all(tm, tm.reset, ids[i],
                                      done=lambda i=i: part.get("row", ids[i]) is not None or gone())
                except _RowStored:
                    continue
                row = method_row(i, {**score(imgs, ids[i]), **fidelity(imgs, ref),
                                     "sampled_by": f"{cfg.shard}/{cfg.shards}"})
                part.put_tensor(f"psnr-{_digest(ids[i])}", psnr_per_sample(imgs, ref))
                save_mask(i, row)
                keep(i, row)
                part.put("row", ids[i], row)
                drop_batches(ids[i])
                log(f"{row} ({time.perf_counter() - t0:.0f} s)")
        except (_RowStored, FileNotFoundError):
            if not gone():
                raise
        def written_by(writer: str) -> tuple:
            """What a shard returns when another process writes (or has written) the table."""
            return None, {"missing": [], "done": len(ids), "writer": writer}, None, selection

        if todo and gone():
            return written_by("another process (done)")
        rows = [part.get("row", ident) for ident in ids]
        missing = [ident[0] for ident, r in zip(ids, rows) if r is None]
        if missing:
            return None, {"missing": missing, "done": len(rows) - len(missing)}, None, selection
        table_lock = os.path.join(part.dir, "table.lock")  # shards that finish together: one writes the table
        try:  # (the lock stays until the folder goes; a dead writer's is taken over)
            while not _try_lock(table_lock, stale_s=60.0):
                if os.path.exists(table_lock):
                    return written_by(f"process {_lock_pid(table_lock)}")
        except FileNotFoundError:  # the folder went meanwhile: the writer has finished
            return written_by("another process (done)")
        held.append(table_lock)
        for r, m in zip(rows[1:], methods):  # how this run found each mask, not how the one that sampled it did
            if "learned_afresh" in m:
                r["learned_afresh"], r["learning_s"] = m["learned_afresh"], m["learning_s"]
        stored = [(part.get_tensor(f"features-{_digest(i)}"), part.get_tensor(f"psnr-{_digest(i)}") if k else None)
                  for k, i in enumerate(ids)]
        if any(f is None or (k and p is None) for k, (f, p) in enumerate(stored)):
            log("no paired intervals: some rows were sampled by a maskc that did not store their features")
        else:
            log(f"paired bootstrap intervals ({cfg.bootstrap} resamples of the {cfg.n} noises) ...")
            paired_intervals(rows, [f for f, _ in stored], [p for _, p in stored], feats.reference, cfg.bootstrap,
                             cfg.seed)
        main = next((m['mask'] for m in methods if m['family'] == 'maskc' and m['target'] == cfg.main_target), None)
        return rows, floor, main, selection

    if cfg.phase == "time":
        from maskc.errors import MaskcError

        if not os.path.exists(json_path):
            raise MaskcError(f"{json_path} not found: --phase time times the methods of a quality run; "
                             f"run with --phase quality first")
        with open(json_path) as f:
            prev = json.load(f)
        if prev.get("code_version") != version:
            raise MaskcError(f"{json_path} holds quality figures made by code {prev.get('code_version')}, but this is "
                             f"code {version} (passes/, learn.py or runtime.py changed); run --phase quality again "
                             "before timing, so the table never mixes figures of two code versions")
        rows, floor, quality_date = prev["rows"], prev["real_vs_real_floor"], prev["date"]
        selection = prev.get("peer_selection", [])
        main_row = next((r for r in rows if r["family"] == "maskc" and r.get("target") == cfg.main_target), None)
        main = maskc.Mask.load(os.path.join(cfg.out, main_row["mask_file"])) if main_row else None
    else:
        rows, floor, main, selection = quality_phase()
        quality_date = None
        if rows is None and not floor["missing"]:
            log(f"every row is stored; the table is written by {floor['writer']}")
            return {"incomplete": True, **floor, "partial": part.dir}
        if rows is None:
            log(f"shard {cfg.shard}/{cfg.shards} done; {floor['done']} of {floor['done'] + len(floor['missing'])} "
                f"rows are in {part.dir}, still to sample: {', '.join(floor['missing'])}. The run that finishes the "
                f"last one writes the table (run the other shards, or this command again to resume)")
            return {"incomplete": True, **floor, "partial": part.dir}
    for r in rows:
        r["speedup_macs"] = 1 / r["macs_fraction"]
    timed = cfg.phase != "quality"
    if timed:
        # 5. Wall time (interleaved) and peak memory at time_batch, from the saved masks.
        torch.set_num_threads(cfg.time_threads or cfg.threads)
        tb = cfg.time_batch
        tkw = kwargs_for(labels[:tb] if labels is not None else None)
        runs: dict[str, Callable[[], Any]] = {
            rows[0]["method"]: lambda: generate(model, sched, noise[:tb], T, tkw, guidance)}
        for r in rows[1:]:
            tm = maskc.compile(model, maskc.Mask.load(os.path.join(cfg.out, r["mask_file"])))
            runs[r["method"]] = (lambda tm=tm: generate(tm, sched, noise[:tb], T, tkw, guidance, reset=tm.reset))
        log(f"timing {len(runs)} methods, {cfg.time_reps} interleaved rounds of a batch-{tb} generation, "
            f"{torch.get_num_threads()} threads ...")
        times = interleaved_times(runs, cfg.time_reps)
        base = summarize_times(times[rows[0]["method"]])["median"]
        for r in rows:
            st = summarize_times(times[r["method"]])
            r["time_s"] = st
            r["speedup_wall"] = base / st["median"]
            if cfg.memory:
                r["peak_memory_bytes"] = peak_memory(runs[r["method"]])
    res = {
        "benchmark": "maskc bench",
        "command": _command(cfg),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "phase": "all" if timed else "quality",
        "code_version": version,
        "quality_date": quality_date,
        "machine": {"cpu_count": os.cpu_count(), "threads": cfg.threads, "time_threads": cfg.time_threads or cfg.threads,
                    "device": "cpu",
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "model": {"path": os.path.relpath(path), "class": type(model).__name__,
                  "parameters": sum(p.numel() for p in model.parameters()), "blocks": len(names)},
        "sampler": {"scheduler": type(sched).__name__ + (" (eta 0)" if cfg.sampler == "ddim" else " (dpmsolver++)"),
                    "name": cfg.sampler, "steps": T, "guidance_scale": guidance,
                    "labels": "class i % 10 for sample i" if conditional else None},
        "seeds": {"noise": 1234 + cfg.seed, "learn": cfg.seed, "kid_subsets": cfg.seed, "floor_images": cfg.seed},
        "n": cfg.n, "time_batch": cfg.time_batch, "time_reps": cfg.time_reps,
        "full_macs_per_sample": full_macs,
        "real_vs_real_floor": floor,
        "peer_selection": selection,
        "config": {k: v for k, v in asdict(cfg).items()},
        "rows": rows,
    }
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    if cfg.phase != "time":
        part.remove()
    plots = _plots(res, main, cfg.out, name)
    with open(os.path.join(cfg.out, f"{name}.md"), "w") as f:
        f.write(_markdown(res, plots))
    log(f"wrote {cfg.out}/{name}.md, .json and {len(plots)} plots"
        + ("" if timed else " (quality only; run again with --phase time for wall time and memory)"))
    return res


def _lock_pid(path: str) -> str:
    """The pid written in lock file ``path`` ("?" if it is gone or still empty)."""
    try:
        with open(path) as f:
            return f.read().strip() or "?"
    except FileNotFoundError:
        return "?"


def _lock_alive(path: str, stale_s: float) -> bool:
    """Whether the process named in lock file ``path`` still runs (an empty file: younger than ``stale_s``)."""
    try:
        with open(path) as f:
            text = f.read().strip()
        age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return False
    if not text:
        return age < stale_s  # created, pid not yet written
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except ValueError:  # not a pid: trust it only while young
        return age < stale_s
    return True


def _try_lock(path: str, stale_s: float) -> bool:
    """Take lock file ``path`` (created exclusively, holding this pid): True if taken, False while another
    live process holds it. A lock whose process is gone is removed (and False returned: try again)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if not _lock_alive(path, stale_s):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _split_work(items: list, load: Callable[[Any], Any], make: Callable[[Any], Any], lock_of: Callable[[Any], str],
                log: Callable[[str], None], poll: float = 10.0, stale_s: float = 60.0) -> list[tuple[Any, bool]]:
    """(result, made here) for each of ``items``, in order: ``load(item)`` if stored, else ``make(item)`` (which
    stores it) under the lock ``lock_of(item)``.

    Processes that start together (bench shards) share the work: each makes the items no other
    process is making, skips those locked by a live process, and loads them once stored, so N
    shards learn N masks at a time instead of each learning all of them.
    """
    out: dict[int, tuple[Any, bool]] = {}
    told: set[int] = set()
    while len(out) < len(items):
        progressed = False
        for i, item in enumerate(items):
            if i in out:
                continue
            got = load(item)
            if got is not None:
                out[i], progressed = (got, False), True
                continue
            lock = lock_of(item)
            if _try_lock(lock, stale_s):
                try:
                    got = load(item)  # stored between the check and the lock
                    out[i] = (got, False) if got is not None else (make(item), True)
                finally:
                    os.remove(lock)
                progressed = True
            elif i not in told and os.path.exists(lock):
                log(f"waiting for another process (lock {lock}) to store it; going on with the rest meanwhile")
                told.add(i)
        if not progressed and len(out) < len(items):
            time.sleep(poll)
    return [out[i] for i in range(len(items))]


class _RowStored(Exception):
    """Raised inside a method's sampling when another process has stored its row meanwhile."""


class _Partial:
    """Finished pieces of a quality run, one JSON file each under ``folder``/<digest of the run's key>.

    The key holds everything that decides a piece (code version, model, sampler, steps, n,
    batch, seeds, threads, guidance), and each piece's file name adds the digest of what it
    depends on (a method's label and mask bits), so a stored piece is reused only where a
    fresh run would compute the same figures. Writes are atomic (temp file, then rename), so
    shards that share the folder never read half a file.
    """

    def __init__(self, folder: str, key: dict[str, Any]) -> None:
        self.root = folder
        self.key = key
        self.dir = os.path.join(folder, _digest(key))
        self.create = True  # writes make the folder; False: a write into a removed folder raises FileNotFoundError

    def _path(self, kind: str, ident: Any) -> str:
        return os.path.join(self.dir, f"{kind}-{_digest(ident)}.json")

    def get(self, kind: str, ident: Any) -> Any:
        try:
            with open(self._path(kind, ident)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def put(self, kind: str, ident: Any, value: Any) -> None:
        from maskc.learn import _atomic_json  # the learner's checkpoint writer

        if self.create:
            os.makedirs(self.dir, exist_ok=True)
        _atomic_json(self._path(kind, ident), value)

    def get_tensor(self, kind: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = os.path.join(self.dir, f"{kind}.safetensors")
        return load_file(path)["x"] if os.path.exists(path) else None

    def claimed(self, kind: str, ident: Any, make: Callable[[], Any], log: Callable[[str], None], poll: float = 10.0,
                stale_s: float = 60.0) -> tuple[Any, bool]:
        """(the stored piece, made here): ``get(kind, ident)``, or ``make()`` stored, made by one process at a time.

        Shards that start together would each make the piece (the peer selection). The first takes
        ``<piece>.lock`` (created exclusively, holding its pid); the others wait while that process
        lives, then read what it stored. A lock whose process is gone (killed: nothing stored) is
        removed and the next waiter makes the piece.
        """
        def make_and_store(_: Any) -> Any:
            value = make()
            self.put(kind, ident, value)
            return value

        lock = self._path(kind, ident) + ".lock"
        os.makedirs(self.dir, exist_ok=True)
        return _split_work([lock], lambda _: self.get(kind, ident), make_and_store, lambda _: lock, log, poll,
                           stale_s)[0]

    def put_tensor(self, kind: str, x: torch.Tensor) -> None:
        import tempfile

        from safetensors.torch import save_file

        if self.create:
            os.makedirs(self.dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=self.dir)
        os.close(fd)
        save_file({"x": x.contiguous()}, tmp)
        os.replace(tmp, os.path.join(self.dir, f"{kind}.safetensors"))

    def remove_tensor(self, kind: str) -> None:
        try:
            os.remove(os.path.join(self.dir, f"{kind}.safetensors"))
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.root))  # <out>/partial, once no other run keeps rows there
        except OSError:
            pass


# a row's figures that its samples decide (MACs are counted afresh by every run: ROW_CODE_EXEMPT)
ROW_FIGURES = ("fd", "kid", "kid_std", "class_accuracy", "psnr", "ssim", "sampled_by")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _bits_digest(mask: Any) -> str:
    return hashlib.sha256(mask.bits.to(torch.uint8).numpy().tobytes() + str(tuple(mask.bits.shape)).encode()).hexdigest()[:16]


def _slug(s: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _command(cfg: BenchConfig) -> str:
    """The command line that reproduces ``cfg`` (every setting that differs from the defaults)."""
    d = BenchConfig()
    flags = {"steps": "--steps", "sampler": "--sampler", "peers": "--peers", "select_n": "--select-n", "bootstrap": "--bootstrap",
             "step_reuse": "--step-reuse", "delta_threshold": "--delta-threshold", "n": "--n", "batch": "--batch", "targets": "--targets", "main_target": "--main-target",
             "deepcache": "--deepcache", "deepcache_nonuniform": "--deepcache-nonuniform", "fora": "--fora",
             "guidance_scale": "--guidance-scale", "time_batch": "--time-batch", "time_reps": "--time-reps",
             "threads": "--threads", "time_threads": "--time-threads", "seed": "--seed", "name": "--name"}
    parts = [f"maskc bench --model {cfg.model}"]
    for k, flag in flags.items():
        v, dv = getattr(cfg, k), getattr(d, k)
        same = (tuple(v) == tuple(dv)) if isinstance(v, (list, tuple)) else v == dv
        if not same:
            parts.append(f"{flag} " + (" ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
                                       if isinstance(v, (list, tuple)) else (f"{v:g}" if isinstance(v, float) else str(v))))
    for k, flag in (("random", "--no-random"), ("memory", "--no-memory")):
        if not getattr(cfg, k):
            parts.append(flag)
    if cfg.ablations:
        parts.append("--ablations")
    cmd = " ".join(parts)
    if cfg.phase == "quality":
        return f"{cmd} --phase quality"
    if cfg.phase == "time":
        return f"{cmd} --phase quality`, then `{cmd} --phase time"
    return cmd


def _plots(res: dict, mask: Any, out: str, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = res["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    style = {"maskc": ("o", "C0"), "random": ("x", "C3"), "maskc ablation": ("D", "C4"), "original": ("*", "k")}
    marks = "s^v<>ph+"
    for i, fam in enumerate(sorted({r["family"] for r in rows} - set(style))):  # peer families
        style[fam] = (marks[i % len(marks)], f"C{[1, 2, 5, 6, 7, 8, 9][i % 7]}")
    for ax, key, label in ((axes[0], "fd", "FD-FMNIST (lower is better)"), (axes[1], "psnr", "PSNR vs original, dB")):
        for fam, (mk, col) in style.items():
            pts = sorted((r["macs_fraction"], r[key]) for r in rows if r["family"] == fam and r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], mk, color=col, label=fam,
                        linestyle="-" if fam == "maskc" else "none", markersize=9 if fam == "original" else 6)
        if key == "fd":
            ax.axhline(res["real_vs_real_floor"]["fd"], color="grey", linestyle=":", label="real vs real")
            ax.axhline(1.10 * rows[0]["fd"], color="k", linestyle="--", linewidth=0.8, label="1.10 x original")
        ax.set_xlabel("MACs per generation (fraction of the original)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{res['model']['class']} on Fashion-MNIST, {res['sampler'].get('name', 'ddim')} {res['sampler']['steps']}, n={res['n']}")

    def save(fig: Any, suffix: str) -> None:
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}_{suffix}.png"), dpi=110)
        plt.close(fig)
        files.append(f"{name}_{suffix}.png")

    save(fig, "pareto")
    if mask is not None:
        fig, ax = plt.subplots(figsize=(3 + 0.35 * mask.steps, 1.5 + 0.16 * len(mask.names)))
        ax.imshow(mask.bits.T.float().numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(mask.names)))
        ax.set_yticklabels(mask.names, fontsize=6)
        ax.set_xlabel("denoising step (0 = first, noisiest)")
        ax.set_title(f"learned mask (black: block runs), {mask.meta['provenance'].get('macs_fraction', 0):.3f} of MACs")
        save(fig, "mask")
    return files


def _shards_note(rows: list[dict], threads: int) -> str:
    """How the rows were sampled, when more than one process (``--shard K/N``) drew them."""
    shards = sorted({r["sampled_by"] for r in rows if r.get("sampled_by") and r["sampled_by"] != "row store"})
    note = "" if all(s.endswith("/1") for s in shards) else (
        f"Samples drawn by {len(shards)} processes at {_threads(threads)} each (`--shard` "
        f"{', '.join(shards)}), resumed from their stored rows. ")
    stored = [r for r in rows if r.get("sampled_by") == "row store"]
    if stored:
        codes = sorted({r["stored"]["code_version"] for r in stored})
        dates = sorted(r["stored"]["date"][:10] for r in stored)
        note += (f"{len(stored)} of {len(rows)} rows ({', '.join(r['method'] for r in stored)}) come from the row "
                 f"store (`<out>/rows/`): samples of the same mask bits, weights and settings drawn by an earlier run "
                 f"({dates[0]}{' to ' + dates[-1] if dates[-1] != dates[0] else ''}, code {', '.join(codes)}) "
                 f"whose sampling and scoring code (`maskc.bench.row_version`, "
                 f"{stored[0]['stored']['row_version']}) is this run's; their MACs are counted anew. ")
    return note


def _threads(k: int) -> str:
    return f"{k} thread" + ("" if k == 1 else "s")


def _markdown(res: dict, plots: list[str]) -> str:
    rows = res["rows"]
    fl = res["real_vs_real_floor"]
    orig = rows[0]
    m = res["machine"]
    to_o = "fd_to_original" in rows[-1]
    lines = [
        f"# maskc bench: {res['model']['class']} on Fashion-MNIST, {res['sampler'].get('name', 'ddim')} "
        f"{res['sampler']['steps']} steps",
        "",
        f"Made by `{res['command']}` on {res['date']}: {m['processor']}, {m['cpu_count']} cores, {_threads(m['threads'])} "
        f"(timing: {_threads(m['time_threads'])}), torch {m['torch']}. Model `{res['model']['path']}` ({res['model']['parameters'] / 1e6:.2f}M parameters, "
        f"{res['model']['blocks']} blocks). {res['n']} samples per method from the same noise (seed {res['seeds']['noise']})"
        + (f", labels {res['sampler']['labels']}, classifier-free guidance {res['sampler']['guidance_scale']:g}"
           if res["sampler"]["guidance_scale"] else "")
        + ". FD-FMNIST and KID: features of maskc's Fashion-MNIST classifier, against the 10,000 test images; "
        f"real-vs-real floor ({res['n']} training images): FD {fl['fd']:.3f}, KID {fl['kid']:.4f}. "
        + (f"FD / original in brackets: its 95% interval over {res['config']['bootstrap']} paired bootstrap resamples "
           "of the noises (each resample draws the same noises for the method and the original); the JSON splits each "
           "FD into its mean and covariance terms, with the samples' feature variance (`fd_terms`). "
           if "fd_ratio_ci" in rows[-1] else "")
        + ("FD to original: FD-FMNIST of the method's samples against the original's samples from the same noises "
           "(0 for the original), with its 95% paired-bootstrap interval: how far the method moved the original's "
           "own distribution, which FD-FMNIST against real images mixes with the original's own distance to them. "
           if to_o else "")
        + "PSNR and SSIM: each sample against the original model's sample from the same noise. "
        "MACs: FlopCounterMode over a generation of the compiled mask. Wall time: a batch-"
        f"{res['time_batch']} generation, {res['time_reps']} rounds interleaved with the original; median "
        "(quartiles in the JSON). Every method runs through the same compiled path. "
        + _shards_note(rows, m["threads"]) +
        f"Code version {res.get('code_version')} (a hash of passes/ and the modules learning runs, `maskc.bench.MASK_CODE`); learned masks: "
        + (", ".join(f"{r['method']} {'learned afresh' if r.get('learned_afresh') else 'reused (same code)'}"
                     for r in rows if r.get("learned_afresh") is not None) or "none") + ".",
        "",
        "| method | learning time | MACs | speed-up (MACs) | speed-up (wall) | FD-FMNIST | FD / original |"
        + (" FD to original |" if to_o else "") + " KID | PSNR dB | SSIM |"
        + (" class acc. |" if "class_accuracy" in orig else "") + " peak mem MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if to_o else "") + " ---: | ---: | ---: |"
        + (" ---: |" if "class_accuracy" in orig else "") + " ---: |",
    ]
    for r in rows:
        lt = f"{r['learning_s'] / 60:.1f} min" if r.get("learning_s") else "-"
        ps = f"{r['psnr']:.2f}" if r["psnr"] is not None else "-"
        ss = f"{r['ssim']:.3f}" if r["ssim"] is not None else "-"
        ca = f" {r['class_accuracy']:.3f} |" if "class_accuracy" in r else ""
        pm = f"{r['peak_memory_bytes'] / 2**20:.1f}" if "peak_memory_bytes" in r else "-"
        sw = f"{r['speedup_wall']:.2f}x" if "speedup_wall" in r else "-"
        ratio = f"{r['fd'] / orig['fd']:.2f}" + (" ({:.2f} to {:.2f})".format(*r["fd_ratio_ci"]) if "fd_ratio_ci" in r else "")
        fo = ""
        if to_o:
            fo = (" {:.3f} ({:.3f} to {:.3f}) |".format(r["fd_to_original"], *r["fd_to_original_ci"])
                  if "fd_to_original" in r else " 0 |")
        lines.append(
            f"| {r['method']} | {lt} | {r['macs_fraction']:.3f} | {r['speedup_macs']:.2f}x | {sw} | "
            f"{r['fd']:.3f} | {ratio} |{fo} {r['kid']:.4f} | {ps} | {ss} |{ca} {pm} |")
    if "speedup_wall" not in orig:
        lines += ["", "Wall time and memory: not measured in this run (quality phase only)."]
    lines += _versus_peers(res)
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


def _peer_group(rows: list[dict], lr: dict) -> list[dict]:
    """The rows a learned row ``lr`` is compared with: each family's best of no more MACs, and random at its target."""
    t = lr["target"]
    return ([r for r in rows if t in (r.get("best_for") or [])]
            + [r for r in rows if r["family"] == "random" and r["method"].endswith(f"({t:g})")])


def paired_intervals(rows: list[dict], features: list[torch.Tensor], psnrs: list[torch.Tensor | None],
                     reference: Any, rounds: int, seed: int) -> None:
    """Adds 95% paired-bootstrap intervals to ``rows`` (the original first), in place.

    Every row's samples come from the same noises, so one set of resamples of the noises serves
    all rows: ``fd_ci`` (each FD), ``fd_ratio_ci`` (FD over the original's), ``fd_terms`` (FD's mean
    and covariance terms and the samples' feature variance, ``maskc.eval.fd_terms``); per row but
    the original, ``fd_to_original`` and ``fd_to_original_ci`` (FD to the original's samples from the
    same noises, ``maskc.eval.frechet_distances_between``); and per learned row ``versus[method]``
    with ``fd_margin_ci`` (peer FD minus learned), ``fd_to_original_margin_ci`` (likewise) and
    ``psnr_margin_ci`` (learned mean PSNR minus peer), for the rows of ``_peer_group``.
    """
    from maskc.eval import bootstrap_counts, fd_terms, interval, paired_bootstrap_fd, paired_bootstrap_fd_to

    for r, f in zip(rows, features):
        r["fd_terms"] = fd_terms(f, reference.test_mu, reference.test_sigma)
    counts = bootstrap_counts(len(features[0]), rounds, seed)
    fd = list(paired_bootstrap_fd(dict(enumerate(features)), reference.test_mu, reference.test_sigma, counts).values())
    to_orig = paired_bootstrap_fd_to(dict(enumerate(features[1:], 1)), features[0], counts)
    point = paired_bootstrap_fd_to(dict(enumerate(features[1:], 1)), features[0])
    n = counts.shape[1]
    for k, r in enumerate(rows):
        r["fd_ci"] = interval(fd[k])
        if k:
            r["fd_ratio_ci"] = interval(fd[k] / fd[0])
            r["fd_to_original"] = float(point[k][0])
            r["fd_to_original_ci"] = interval(to_orig[k])
    at = {id(r): k for k, r in enumerate(rows)}
    for lr in (r for r in rows if r["family"] == "maskc"):
        a = at[id(lr)]
        lr["versus"] = {r["method"]: {"fd_margin_ci": interval(fd[at[id(r)]] - fd[a]),
                                      "fd_to_original_margin_ci": interval(to_orig[at[id(r)]] - to_orig[a]),
                                      "psnr_margin_ci": interval(counts @ (psnrs[a] - psnrs[at[id(r)]]).double() / n)}
                        for r in _peer_group(rows, lr)}


def _versus_peers(res: dict) -> list[str]:
    """Per learned MACs level: each peer family's best member of no more MACs, and the learned mask's margins."""
    rows = res["rows"]
    peers = [r for r in rows if r.get("best_for")]
    if not peers:
        return []
    n_sel = res.get("config", {}).get("select_n")
    with_ci = any("versus" in r for r in rows)
    to_o = "fd_to_original" in rows[-1]
    out = ["", "## Against each peer family's best member of no more MACs", "",
           f"For each learned mask, every schedule of `maskc.schedules.peer_library` (every interval, depth and count "
           f"of full steps) with MACs at most the learned mask's was scored by PSNR on {n_sel} other noises "
           "(seed 4321 + seed: neither learning's calibration noises nor this table's); each family's best is "
           f"sampled here with the {res['n']} noises of the table above. Margins: learned minus peer for PSNR "
           "and SSIM (positive: learned better), peer minus learned for FD (positive: learned better). "
           "`random` is at the learned target's MACs, not below it."
           + (f" In brackets: the 95% paired-bootstrap interval of the margin ({res['config']['bootstrap']} resamples "
              f"of the {res['n']} noises, seed {res['config']['seed']}, the same resamples for every method, so the "
              "spread of the noise draw that both methods share cancels)." if with_ci else "")
           + (" FD to orig.: FD-FMNIST against the original's samples from the same noises, margin peer minus "
              "learned (positive: the learned mask keeps the original's distribution better)." if to_o else ""), "",
           "| level | method | MACs | PSNR dB | PSNR margin | SSIM | SSIM margin | FD | FD margin |"
           + (" FD to orig. | FD-to-orig. margin |" if to_o else ""),
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if to_o else "")]
    tally = {"psnr": [0, 0, 0], "fd": [0, 0, 0], "fd_to_original": [0, 0, 0]}  # below zero beyond the CI, within, above

    def margin(value: float, ci: list[float] | None, kind: str, fmt: str) -> str:
        if ci is None:
            return format(value, fmt)
        tally[kind][0 if ci[1] < 0 else 2 if ci[0] > 0 else 1] += 1
        return f"{value:{fmt}} ({ci[0]:{fmt}} to {ci[1]:{fmt}})"

    for lr in (r for r in rows if r["family"] == "maskc"):
        t = lr["target"]
        out.append(f"| {t:g} | **{lr['method']}** | {lr['macs_fraction']:.3f} | {lr['psnr']:.2f} | | {lr['ssim']:.3f} | "
                   f"| {lr['fd']:.3f} | |" + (f" {lr['fd_to_original']:.3f} | |" if to_o else ""))
        for r in sorted(_peer_group(rows, lr), key=lambda r: -r["psnr"]):
            ci = lr.get("versus", {}).get(r["method"], {})
            fo = ""
            if to_o:
                mo = margin(r["fd_to_original"] - lr["fd_to_original"], ci.get("fd_to_original_margin_ci"),
                            "fd_to_original", "+.3f")
                fo = f" {r['fd_to_original']:.3f} | {mo} |"
            out.append(f"| {t:g} | {r['family']}" + (f": {r['settings']}" if r.get("settings") else "")
                       + f" | {r['macs_fraction']:.3f} | {r['psnr']:.2f} | "
                       f"{margin(lr['psnr'] - r['psnr'], ci.get('psnr_margin_ci'), 'psnr', '+.2f')} | "
                       f"{r['ssim']:.3f} | {lr['ssim'] - r['ssim']:+.3f} | {r['fd']:.3f} | "
                       f"{margin(r['fd'] - lr['fd'], ci.get('fd_margin_ci'), 'fd', '+.3f')} |" + fo)
    if with_ci:
        out += [""] + [f"{name} margin over {sum(c)} comparisons: learned worse beyond the interval at {c[0]}, "
                       f"within the interval (no difference shown) at {c[1]}, better beyond it at {c[2]}."
                       for name, c in (("PSNR", tally["psnr"]), ("FD", tally["fd"]),
                                       ("FD-to-original", tally["fd_to_original"])) if sum(c)]
    return out


def select_best_peers(model: torch.nn.Module, names: list[str], scheduler: Any, noise: torch.Tensor, call_kw: dict,
                      guidance: float | None, ex_args: tuple, ex_kwargs: dict, levels: list[tuple[float, Any]],
                      delta: list[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each peer family's best member (PSNR of final samples from ``noise``) with MACs at most each level's mask.

    ``scheduler`` has its timesteps set; ``levels`` are (target, learned mask). MACs are exact
    generation counts (``maskc.rollout.GenerationCost``), the same for peers and learned masks.
    Returns method entries (one per distinct mask, with the targets it is best for) and every
    candidate's record.
    """
    import maskc
    from maskc import schedules
    from maskc.rollout import GenerationCost, Rollout

    graph = maskc.block_graph(model, *ex_args, blocks=names, **ex_kwargs)
    cost = GenerationCost(model, names, graph, ex_args, ex_kwargs)
    roll = Rollout(model, names, scheduler, noise, call_kw, guidance, "timestep")
    T = len(scheduler.timesteps)
    caps = {t: cost.fraction(m.bits) for t, m in levels}
    records, lib = [], schedules.peer_library(names, T, delta=delta)
    for m in lib:
        f = cost.fraction(m.bits)
        if f > max(caps.values(), default=0) + 1e-9:
            records.append(None)
            continue
        prov = m.meta["provenance"]
        settings = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in prov.items()
                             if k not in ("method", "full_steps"))
        records.append({"family": prov["method"], "settings": settings, "macs_fraction": f,
                        "psnr": roll.psnr(cost.rectify(m.bits))})
    chosen: dict[int, dict[str, Any]] = {}
    for t, cap in caps.items():
        best: dict[str, int] = {}
        for i, r in enumerate(records):
            if r is not None and r["macs_fraction"] <= cap + 1e-9:
                j = best.get(r["family"])
                if j is None or r["psnr"] > records[j]["psnr"]:
                    best[r["family"]] = i
        for i in best.values():
            e = chosen.setdefault(i, {"method": f"{records[i]['family']}: {records[i]['settings']}",
                                      "family": records[i]["family"], "mask": lib[i], "best_for": [],
                                      "settings": records[i]["settings"], "selection_psnr": records[i]["psnr"]})
            e["best_for"].append(t)
    return list(chosen.values()), [r for r in records if r is not None]


def _delta(model: Any, sched: Any, noise: torch.Tensor, kwargs_for: Callable, labels: Any, guidance: Any,
           T: int) -> list[float]:
    """δ[i]: relative change of the original model's output from step i-1 to i, on a few noises."""
    from maskc.sampling import denoise

    s = copy.deepcopy(sched)
    s.set_timesteps(T)
    x, prev, out = noise, None, [0.0]
    kw = kwargs_for(labels[: len(noise)] if labels is not None else None)
    with torch.no_grad():
        for t in s.timesteps:
            eps = denoise(model, x, t, kw, guidance)
            if prev is not None:
                out.append(float((eps - prev).norm() / prev.norm().clamp_min(1e-12)))
            prev = eps
            x = s.step(eps, t, x).prev_sample
    return out
