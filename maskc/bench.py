"""``maskc bench``: learned masks against peers' schedules, every one through the same compiled path.

For a shipped Fashion-MNIST model (``unet`` or ``dit``) or a diffusers folder, with
DDIM and T steps:
1. learn masks at several MACs targets (timed), optionally the learning ablations;
2. write peers' schedules as masks (``maskc.schedules``): DeepCache uniform and
   non-uniform for U-Nets, FORA for DiTs, random at equal MACs for both;
3. generate ``n`` samples with the original model and with each mask from the same
   noise (and, for the class-conditional DiT, the same labels and guidance);
4. score each: FD-FMNIST and KID against the test set (with the real-vs-real floor),
   PSNR and SSIM against the original's samples, class accuracy (DiT), MACs per
   generation by FlopCounterMode, wall time of a ``time_batch`` generation measured
   interleaved with the original, peak memory;
5. write ``<out>/<name>.json`` and ``.md`` (a table in the paper's shape) and plots:
   the quality-vs-MACs Pareto curves and the learned mask as a T x B heatmap.

Nothing in the tables is typed by hand: every figure comes from this run.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

__all__ = ["BenchConfig", "run_bench", "code_version"]


def code_version() -> str:
    """A hash of the code that decides learned masks and their cost: ``passes/``, learn.py, runtime.py.

    Part of the key under which learned masks are reused, so that a change to learning or
    to the compiler learns afresh, and recorded in every result so that ``--phase time``
    refuses quality figures made by other code.
    """
    import hashlib
    import importlib

    # import_module: ``maskc.learn`` as an attribute is the function the package re-exports
    learn_py, runtime_py, passes_init = (importlib.import_module(f"maskc.{m}").__file__
                                         for m in ("learn", "runtime", "passes"))
    h = hashlib.sha256()
    pdir = os.path.dirname(passes_init)
    files = sorted(os.path.join(pdir, f) for f in os.listdir(pdir) if f.endswith(".py"))
    for path in files + [learn_py, runtime_py]:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


@dataclass
class BenchConfig:
    model: str = "unet"  # "unet", "dit" (shipped) or a diffusers folder
    steps: int = 20
    n: int = 2000  # samples for FD, KID, PSNR, SSIM
    batch: int = 250  # generation batch for the quality pass
    targets: tuple[float, ...] = (0.65, 0.55, 0.45)
    main_target: float = 0.55  # the target that the ablations and the random floor use
    deepcache: tuple[int, ...] = (3, 5, 10)  # uniform intervals, branch depth 1
    deepcache_nonuniform: tuple[int, ...] = (5,)
    fora: tuple[int, ...] = (2, 3)
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
    name: str = ""  # file stem; default bench_<model>_ddim<T>
    reuse_masks: bool = True  # load learned masks from <out>/masks/ when their settings match
    learn_kwargs: dict = field(default_factory=dict)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns the result dict written to JSON."""
    from diffusers import DDIMScheduler

    import maskc
    from maskc import schedules
    from maskc.eval import (FMNISTFeatures, fidelity, generation_macs, interleaved_times, peak_memory,
                            summarize_times)
    from maskc.models.shipped import SHIPPED, load_pretrained
    from maskc.sampling import generate, stack_kwargs

    if cfg.phase not in ("all", "quality", "time"):
        from maskc.errors import MaskcError

        raise MaskcError(f"phase must be 'all', 'quality' or 'time'; got {cfg.phase!r}")
    torch.set_num_threads(cfg.threads)
    model, path = load_pretrained(cfg.model)
    model.float()
    if type(model).__name__ not in ("UNet2DModel", "DiTTransformer2DModel"):
        from maskc.errors import MaskcError

        raise MaskcError(f"maskc bench knows UNet2DModel and DiTTransformer2DModel folders; {path} holds a "
                         f"{type(model).__name__}")
    T = cfg.steps
    version = code_version()
    sched = DDIMScheduler(num_train_timesteps=1000)
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    n_classes = getattr(c, "num_embeds_ada_norm", None) if type(model).__name__ == "DiTTransformer2DModel" else None
    conditional = n_classes is not None
    guidance = cfg.guidance_scale if conditional else None
    stem = f"bench_{cfg.model if cfg.model in SHIPPED else os.path.basename(path.rstrip('/'))}_ddim{T}"
    name = cfg.name or stem  # masks are stored under the stem, so runs with other names reuse them
    os.makedirs(os.path.join(cfg.out, "masks"), exist_ok=True)
    json_path = os.path.join(cfg.out, f"{name}.json")

    def kwargs_for(labels: torch.Tensor | None) -> dict:
        if labels is None:
            return {}
        return stack_kwargs({"class_labels": labels}, {"class_labels": torch.full_like(labels, n_classes)})

    # Fixed noise and labels for every method.
    g = torch.Generator().manual_seed(1234 + cfg.seed)
    noise = torch.randn(cfg.n, *shape, generator=g)
    labels = torch.arange(cfg.n) % n_classes if conditional else None
    names = maskc.blocks(model)
    s0 = DDIMScheduler(num_train_timesteps=1000)
    s0.set_timesteps(T)
    ts = [t.reshape(1) for t in s0.timesteps]
    ex_args = (torch.zeros(1, *shape),)
    ex_kwargs = {"class_labels": torch.zeros(1, dtype=torch.long)} if conditional else {}
    full_macs = generation_macs(model, None, ex_args, {**ex_kwargs, "timestep": ts[0]}, "timestep", ts)

    def frac(mask: maskc.Mask) -> float:
        return generation_macs(model, mask, ex_args, {**ex_kwargs, "timestep": ts[0]}, "timestep", ts) / full_macs

    def quality_phase() -> tuple[list[dict[str, Any]], dict[str, float], Any]:
        # 1. Learned masks.
        methods: list[dict[str, Any]] = []

        def learned(target: float, label: str, **kw: Any) -> None:
            key = {"target": target, "steps": T, "seed": cfg.seed, "guidance_scale": guidance, **cfg.learn_kwargs, **kw,
                   "code": version}
            tag = "_".join(f"{k}-{v}" for k, v in sorted(kw.items()))
            fpath = os.path.join(cfg.out, "masks", f"{stem}_learned_{target:g}{'_' + tag if tag else ''}.json")
            mask, why = None, "relearn requested" if not cfg.reuse_masks else "no stored mask"
            if cfg.reuse_masks and os.path.exists(fpath):
                m = maskc.Mask.load(fpath)
                stored = m.meta.get("provenance", {}).get("bench_key") or {}
                if stored == key:
                    mask, secs = m, m.meta["provenance"]["learning_seconds"]
                    log(f"reusing {fpath} (same settings and code {version}; learned in {secs:.0f} s)")
                else:
                    diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
                    why = (f"the code changed since it was learned ({stored.get('code')} -> {version})"
                           if diff == ["code"] else f"settings differ: {', '.join(diff)}")
            afresh = mask is None
            if afresh:
                log(f"learning {label} afresh ({why}) ...")
                cond = (lambda k, gen: {"class_labels": torch.arange(k) % n_classes}) if conditional else None
                uncond = (lambda k, gen: {"class_labels": torch.full((k,), n_classes)}) if conditional else None
                t0 = time.perf_counter()
                mask = maskc.learn(model, DDIMScheduler(num_train_timesteps=1000), steps=T, sample_shape=shape,
                                   target=target, seed=cfg.seed, cond=cond, uncond=uncond, guidance_scale=guidance,
                                   progress=False, **{**cfg.learn_kwargs, **kw})
                secs = time.perf_counter() - t0
                mask.meta["provenance"].update({"learning_seconds": secs, "bench_key": key})
                mask.save(fpath)
            methods.append({"method": label, "family": "maskc" if not kw else "maskc ablation", "mask": mask,
                            "learning_s": secs, "learned_afresh": afresh, "target": target,
                            "file": os.path.relpath(fpath, cfg.out)})

        for tgt in cfg.targets:
            learned(tgt, f"maskc learned, target {tgt:g}")
        if cfg.ablations:
            learned(cfg.main_target, f"ablation: stochastic sampling (paper), target {cfg.main_target:g}", sampling="stochastic")
            learned(cfg.main_target, f"ablation: no loss scaling, target {cfg.main_target:g}", loss_scaling=False)
            learned(cfg.main_target, f"ablation: no rectification, target {cfg.main_target:g}", rectify=False)
            learned(cfg.main_target, f"ablation: paper's cache (original outputs of step i-1), target {cfg.main_target:g}",
                    cache="original")

        # 2. Peers as masks.
        is_unet = any(n.startswith("up_blocks.") for n in names)
        if is_unet:
            for N in cfg.deepcache:
                methods.append({"method": f"DeepCache uniform N={N}", "family": "DeepCache",
                                "mask": schedules.deepcache_uniform(names, T, N, depth=1)})
            for N in cfg.deepcache_nonuniform:
                methods.append({"method": f"DeepCache non-uniform N={N}", "family": "DeepCache",
                                "mask": schedules.deepcache_nonuniform(names, T, N, depth=1)})
        else:
            for N in cfg.fora:
                methods.append({"method": f"FORA N={N}", "family": "FORA", "mask": schedules.fora(names, T, N)})
        if cfg.random:
            methods.append({"method": f"random, equal MACs ({cfg.main_target:g})", "family": "random",
                            "mask": schedules.random_equal_macs(names, T, cfg.main_target, frac, seed=cfg.seed)})

        # 3-4. Quality.
        feats = FMNISTFeatures(seed=cfg.seed)
        floor = feats.floor(cfg.n)
        log(f"real-vs-real floor at n={cfg.n}: {floor}")

        def sample_all(fn: Any, reset: Callable[[], None] | None) -> torch.Tensor:
            out = []
            for i in range(0, cfg.n, cfg.batch):
                lab = labels[i:i + cfg.batch] if labels is not None else None
                out.append(generate(fn, sched, noise[i:i + cfg.batch], T, kwargs_for(lab), guidance, reset=reset))
            return torch.cat(out)

        t0 = time.perf_counter()
        ref = sample_all(model, None)
        log(f"original: {cfg.n} samples in {time.perf_counter() - t0:.0f} s")
        rows: list[dict[str, Any]] = []

        def score(images: torch.Tensor) -> dict[str, Any]:
            r = feats(images)
            if conditional:
                r["class_accuracy"] = feats.accuracy(images, labels)
            return r

        rows.append({"method": "original (full model)", "family": "original", "macs_fraction": 1.0,
                     "learning_s": None, **score(ref), "psnr": None, "ssim": None})
        log(str(rows[-1]))
        from tqdm.auto import tqdm

        for m in tqdm(methods, desc=f"sampling {cfg.n} per method", unit="method"):
            tm = maskc.compile(model, m["mask"])
            t0 = time.perf_counter()
            imgs = sample_all(tm, tm.reset)
            f = frac(m["mask"])
            rows.append({"method": m["method"], "family": m["family"], "macs_fraction": f,
                         "learning_s": m.get("learning_s"), "learned_afresh": m.get("learned_afresh"),
                         "target": m.get("target"), "mask_file": m.get("file"),
                         **score(imgs), **fidelity(imgs, ref)})
            log(f"{rows[-1]} ({time.perf_counter() - t0:.0f} s)")
            if m.get("file") is None:
                m["mask"].save(os.path.join(cfg.out, "masks", f"{name}_{_slug(m['method'])}.json"))
                rows[-1]["mask_file"] = f"masks/{name}_{_slug(m['method'])}.json"

        main = next((m['mask'] for m in methods if m['family'] == 'maskc' and m['target'] == cfg.main_target), None)
        return rows, floor, main

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
        main_row = next((r for r in rows if r["family"] == "maskc" and r.get("target") == cfg.main_target), None)
        main = maskc.Mask.load(os.path.join(cfg.out, main_row["mask_file"])) if main_row else None
    else:
        rows, floor, main = quality_phase()
        quality_date = None
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
        "sampler": {"scheduler": "DDIMScheduler (eta 0)", "steps": T, "guidance_scale": guidance,
                    "labels": "class i % 10 for sample i" if conditional else None},
        "seeds": {"noise": 1234 + cfg.seed, "learn": cfg.seed, "kid_subsets": cfg.seed, "floor_images": cfg.seed},
        "n": cfg.n, "time_batch": cfg.time_batch, "time_reps": cfg.time_reps,
        "full_macs_per_sample": full_macs,
        "real_vs_real_floor": floor,
        "config": {k: v for k, v in asdict(cfg).items()},
        "rows": rows,
    }
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    if not timed:
        log(f"wrote {json_path} (quality only; run again with --phase time for wall time, tables and plots)")
        return res
    plots = _plots(res, main, cfg.out, name)
    with open(os.path.join(cfg.out, f"{name}.md"), "w") as f:
        f.write(_markdown(res, plots))
    log(f"wrote {cfg.out}/{name}.md, .json and {len(plots)} plots")
    return res


def _slug(s: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _command(cfg: BenchConfig) -> str:
    """The command line that reproduces ``cfg`` (every setting that differs from the defaults)."""
    d = BenchConfig()
    flags = {"steps": "--steps", "n": "--n", "batch": "--batch", "targets": "--targets", "main_target": "--main-target",
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
    if cfg.phase != "all":
        return f"{cmd} --phase quality`, then `{cmd} --phase time"
    return cmd


def _plots(res: dict, mask: Any, out: str, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = res["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    style = {"maskc": ("o", "C0"), "DeepCache": ("s", "C1"), "FORA": ("^", "C2"), "random": ("x", "C3"),
             "maskc ablation": ("D", "C4"), "original": ("*", "k")}
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
    fig.suptitle(f"{res['model']['class']} on Fashion-MNIST, DDIM {res['sampler']['steps']}, n={res['n']}")

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


def _markdown(res: dict, plots: list[str]) -> str:
    rows = res["rows"]
    fl = res["real_vs_real_floor"]
    orig = rows[0]
    m = res["machine"]
    lines = [
        f"# maskc bench: {res['model']['class']} on Fashion-MNIST, DDIM {res['sampler']['steps']}",
        "",
        f"Made by `{res['command']}` on {res['date']}: {m['processor']}, {m['cpu_count']} cores, {m['threads']} threads, "
        f"(timing: {m['time_threads']} threads), torch {m['torch']}. Model `{res['model']['path']}` ({res['model']['parameters'] / 1e6:.2f}M parameters, "
        f"{res['model']['blocks']} blocks). {res['n']} samples per method from the same noise (seed {res['seeds']['noise']})"
        + (f", labels {res['sampler']['labels']}, classifier-free guidance {res['sampler']['guidance_scale']:g}"
           if res["sampler"]["guidance_scale"] else "")
        + ". FD-FMNIST and KID: features of maskc's Fashion-MNIST classifier, against the 10,000 test images; "
        f"real-vs-real floor ({res['n']} training images): FD {fl['fd']:.3f}, KID {fl['kid']:.4f}. "
        "PSNR and SSIM: each sample against the original model's sample from the same noise. "
        "MACs: FlopCounterMode over a generation of the compiled mask. Wall time: a batch-"
        f"{res['time_batch']} generation, {res['time_reps']} rounds interleaved with the original; median "
        "(quartiles in the JSON). Every method runs through the same compiled path. "
        f"Code version {res.get('code_version')} (a hash of passes/, learn.py and runtime.py); learned masks: "
        + (", ".join(f"{r['method']} {'learned afresh' if r.get('learned_afresh') else 'reused (same code)'}"
                     for r in rows if r.get("learned_afresh") is not None) or "none") + ".",
        "",
        "| method | learning time | MACs | speed-up (MACs) | speed-up (wall) | FD-FMNIST | FD / original | KID | PSNR dB | SSIM |"
        + (" class acc. |" if "class_accuracy" in orig else "") + " peak mem MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" if "class_accuracy" in orig else "") + " ---: |",
    ]
    for r in rows:
        lt = f"{r['learning_s'] / 60:.1f} min" if r.get("learning_s") else "-"
        ps = f"{r['psnr']:.2f}" if r["psnr"] is not None else "-"
        ss = f"{r['ssim']:.3f}" if r["ssim"] is not None else "-"
        ca = f" {r['class_accuracy']:.3f} |" if "class_accuracy" in r else ""
        pm = f"{r['peak_memory_bytes'] / 2**20:.1f}" if "peak_memory_bytes" in r else "-"
        lines.append(
            f"| {r['method']} | {lt} | {r['macs_fraction']:.3f} | {r['speedup_macs']:.2f}x | {r['speedup_wall']:.2f}x | "
            f"{r['fd']:.3f} | {r['fd'] / orig['fd']:.2f} | {r['kid']:.4f} | {ps} | {ss} |{ca} {pm} |")
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)
