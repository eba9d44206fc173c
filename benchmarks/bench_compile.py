"""Compile-time and runtime overhead of maskc on the DDPM-CIFAR10 U-Net (35.7M parameters).

Measures, on this machine:
- capture + rewrite time of ``maskc.compile`` (full mask and random masks, T = 20 and 100);
- wall time of whole DDIM generations, original model and ``maskc.compile`` with an
  all-ones mask interleaved, median and spread, and their ratio. Pairs alternate their
  order (A B, B A, ...): on this machine a fixed A-then-B order gave maskc, always
  second, a ~3% penalty that a B-then-A check did not show;
- the same for random masks, with the MACs fraction from FlopCounterMode.

Weights are random (seed 0): timing and FLOPs do not depend on them.
Usage: python benchmarks/bench_compile.py [--reps 7] [--threads 2] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

import maskc
from maskc.models.configs import DDPM_CIFAR10


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(threads: int) -> dict:
    """The machine line every compile benchmark records."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__}


def run_cold(script: str, args: list[str]) -> dict:
    """``python script --child *args`` in a fresh process with inductor's FX graph and autograd caches off and an
    empty inductor cache folder (a cold compile); its last stdout line, parsed as JSON."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0",
                   TORCHINDUCTOR_CACHE_DIR=cache, PYTHONWARNINGS="ignore")
        out = subprocess.run([sys.executable, script, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(args)}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold_record(fn, generation) -> dict:
    """What a cold-compile child prints: the first ``generation()`` (which compiles whatever it runs) against the
    median of the next two, dynamo's graph and graph-break counts, and maskc's block and glue programs."""
    from torch._dynamo.utils import counters

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        generation()
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times[1:])
    rep = fn.compile_report() if hasattr(fn, "compile_report") else {}
    return {"first_s": times[0], "steady_s": steady, "compile_s": times[0] - steady,
            "unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "block_programs": rep.get("block_programs"), "glue_programs": rep.get("glue_programs")}


def generation(fn, x0: torch.Tensor, sched: DDIMScheduler, reset=None) -> float:
    if reset:
        reset()
    x = x0.clone()
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = fn(x, t).sample
            x = sched.step(eps, t, x).prev_sample
    return time.perf_counter() - t0


def step_pairs(model, tm, x0, sched, n: int) -> tuple[list[float], list[float]]:
    """Single steps, original and maskc alternating, cycling through the DDIM timesteps."""
    ts = list(sched.timesteps)
    orig, comp = [], []
    tm.reset()
    with torch.no_grad():
        for k in range(n):
            t = ts[k % len(ts)]
            if tm.step == len(tm):
                tm.reset()
            for which in ((0, 1) if k % 2 == 0 else (1, 0)):  # A B, then B A: no order bias
                t0 = time.perf_counter()
                (model if which == 0 else tm)(x0, t)
                (orig if which == 0 else comp).append(time.perf_counter() - t0)
    tm.reset()
    return orig, comp


def flops_fraction(model, tm, x0, sched) -> float:
    tot_full = tot_masked = 0
    tm.reset()
    with torch.no_grad():
        for t in sched.timesteps:
            with FlopCounterMode(display=False) as fc:
                model(x0, t)
            tot_full += fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                tm(x0, t)
            tot_masked += fc.get_total_flops()
    tm.reset()
    return tot_masked / tot_full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--step-pairs", type=int, default=60)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = UNet2DModel(**DDPM_CIFAR10).eval()
    params = sum(p.numel() for p in model.parameters())
    names = maskc.blocks(model)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(a.steps)
    res: dict = {
        "benchmark": "bench_compile",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(a.threads),
        "model": {"config": "google/ddpm-cifar10-32 topology, random weights (seed 0)", "params": params, "blocks": len(names)},
        "seeds": {"weights": 0, "noise": 1, "masks": 2},
        "steps": a.steps,
        "compile_seconds": {},
        "generations": [],
    }
    g = torch.Generator().manual_seed(2)
    masks = {
        "full": maskc.Mask.full(a.steps, names),
        "random50": None,
    }
    bits = torch.rand(a.steps, len(names), generator=g) < 0.5
    bits[0] = True
    masks["random50"] = maskc.Mask(bits, names)
    x_ex = torch.randn(1, 3, 32, 32)
    t_ex = sched.timesteps[0]
    # capture + rewrite time
    for label, T in (("full T=20", 20), ("random50 T=20", 20), ("random50 T=100", 100)):
        b = torch.ones(T, len(names), dtype=torch.bool) if label.startswith("full") else (torch.rand(T, len(names), generator=g) < 0.5)
        b[0] = True
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            maskc.compile(model, maskc.Mask(b, names), example_args=(x_ex, t_ex))
            times.append(time.perf_counter() - t0)
        res["compile_seconds"][label] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
        print(f"compile {label}: median {statistics.median(times):.3f} s")
    # interleaved generations
    for batch in a.batches:
        x0 = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        for label, mask in masks.items():
            tm = maskc.compile(model, mask, example_args=(x0, t_ex))
            frac = flops_fraction(model, tm, x0, sched)
            generation(model, x0, sched)  # warm-up both
            generation(tm, x0, sched, tm.reset)
            orig, comp = [], []
            for k in range(a.reps):
                for which in ((0, 1) if k % 2 == 0 else (1, 0)):  # A B, then B A: no order bias
                    if which == 0:
                        orig.append(generation(model, x0, sched))
                    else:
                        comp.append(generation(tm, x0, sched, tm.reset))
            so, sc = step_pairs(model, tm, x0, sched, a.step_pairs)
            row = {
                "step_pairs": {
                    "n": a.step_pairs,
                    "original_ms_median": 1e3 * statistics.median(so),
                    "maskc_ms_median": 1e3 * statistics.median(sc),
                    "ratio_of_medians": statistics.median(sc) / statistics.median(so),
                    "median_pair_ratio": statistics.median([c / o for c, o in zip(sc, so)]),
                },
                "batch": batch,
                "mask": label,
                "flops_fraction": frac,
                "original_s": {"median": statistics.median(orig), "min": min(orig), "max": max(orig)},
                "maskc_s": {"median": statistics.median(comp), "min": min(comp), "max": max(comp)},
                "ratio_maskc_over_original": statistics.median(comp) / statistics.median(orig),
                "ratios_per_pair": [c / o for c, o in zip(comp, orig)],
            }
            res["generations"].append(row)
            print(f"batch {batch} {label}: original {row['original_s']['median']:.3f} s, maskc {row['maskc_s']['median']:.3f} s, "
                  f"ratio {row['ratio_maskc_over_original']:.4f}, FLOPs {frac:.3f}; per step "
                  f"{row['step_pairs']['original_ms_median']:.1f} ms vs {row['step_pairs']['maskc_ms_median']:.1f} ms")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "compile_overhead.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [
        "# maskc compile and runtime overhead: DDPM-CIFAR10 U-Net",
        "",
        f"Made by `python benchmarks/bench_compile.py --reps {a.reps} --threads {a.threads}` on {res['date']}.",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, torch {torch.__version__}, "
        f"`torch.set_num_threads({a.threads})`. Model: {params / 1e6:.1f}M parameters, {len(names)} blocks, "
        "random weights (seed 0); noise seed 1, mask seed 2. DDIM, "
        f"{a.steps} steps; eager float32 on CPU.",
        "",
        "## Capture + rewrite (`maskc.compile` with example inputs), 3 runs",
        "",
        "| mask | median s | min s | max s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, v in res["compile_seconds"].items():
        lines.append(f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} |")
    lines += [
        "",
        f"## Whole generations, original and maskc interleaved (A B B A ...), {a.reps} pairs",
        "",
        "| batch | mask | FLOPs vs original | original median s (min-max) | maskc median s (min-max) | maskc / original |",
        "| ---: | --- | ---: | --- | --- | ---: |",
    ]
    for r in res["generations"]:
        o, c = r["original_s"], r["maskc_s"]
        lines.append(
            f"| {r['batch']} | {r['mask']} | {r['flops_fraction']:.3f} | {o['median']:.3f} ({o['min']:.3f}-{o['max']:.3f}) | "
            f"{c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f}) | {r['ratio_maskc_over_original']:.4f} |"
        )
    lines += [
        "",
        f"## Single steps, original and maskc interleaved (A B B A ...), {a.step_pairs} pairs",
        "",
        "| batch | mask | original median ms | maskc median ms | ratio of medians | median of pair ratios |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in res["generations"]:
        s = r["step_pairs"]
        lines.append(
            f"| {r['batch']} | {r['mask']} | {s['original_ms_median']:.1f} | {s['maskc_ms_median']:.1f} | "
            f"{s['ratio_of_medians']:.4f} | {s['median_pair_ratio']:.4f} |"
        )
    lines += ["", "`full` runs every block at every step: its ratio is maskc's runtime overhead. "
              "`random50` keeps each block with probability 0.5 (row 0 all ones): a sanity check that skipped "
              "blocks cost nothing, not a quality claim."]
    with open(os.path.join(a.out, "compile_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
