"""Learned masks against DeepCache-style uniform schedules at equal MACs, on a trained U-Net.

For a diffusers UNet2DModel folder and DDIM with T steps:
- learns masks with ``maskc.learn`` (timed), and the ablations asked for (without
  timestep-aware loss scaling, without rectification, Gumbel-Softmax sampling);
- builds DeepCache-style uniform schedules (full step every N steps; in between only
  the outermost ``depth`` down and up blocks run) for several N and depths;
- compiles each, counts generation MACs with FlopCounterMode (fraction of the
  original), and measures fidelity: PSNR of each final sample against the original
  model's sample from the same initial noise, on [0, 1] images.
Usage: python benchmarks/bench_learn.py --model maskc/models/weights/fmnist-unet [--steps 20] [--n 64]
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

import maskc
from maskc.learn import measured_flops


def deepcache(names: list[str], T: int, interval: int, depth: int, n_up: int) -> torch.Tensor:
    keep = [j for j, n in enumerate(names)
            if any(n.startswith(f"down_blocks.{k}.") for k in range(depth))
            or any(n.startswith(f"up_blocks.{n_up - 1 - k}.") for k in range(depth))]
    bits = torch.zeros(T, len(names), dtype=torch.bool)
    bits[:, keep] = True
    bits[::interval] = True
    return bits


def sample(fn, x0: torch.Tensor, T: int, reset=None) -> torch.Tensor:
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(T)
    if reset:
        reset()
    x = x0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = fn(x, t).sample
            x = sched.step(eps, t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--n", type=int, default=64, help="samples for PSNR")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = UNet2DModel.from_pretrained(a.model).float().eval()
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    names = maskc.blocks(model)
    T = a.steps
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(T)
    ex = (torch.zeros(1, *shape),)
    ts = [t.reshape(1) for t in sched.timesteps]
    full_flops = measured_flops(model, None, ex, {"timestep": ts[0]}, "timestep", ts)
    x0 = torch.randn(a.n, *shape, generator=torch.Generator().manual_seed(1234))
    ref = sample(model, x0, T)
    rows = []

    def evaluate(label: str, mask: maskc.Mask, learn_s: float | None = None, kind: str = "") -> None:
        frac = measured_flops(model, mask, ex, {"timestep": ts[0]}, "timestep", ts) / full_flops
        tm = maskc.compile(model, mask)
        out = sample(tm, x0, T, tm.reset)
        rows.append({"method": label, "kind": kind, "macs_fraction": frac, "speedup_macs": 1 / frac,
                     "psnr": psnr(out, ref), "learning_s": learn_s})
        print(rows[-1], flush=True)
        return mask

    learned = {}
    variants = {"maskc learned": {}}  # defaults: Gumbel-Softmax, loss scaling, rectification
    if a.ablations:
        variants.update({
            "learned, stochastic sampling (paper)": {"sampling": "stochastic"},
            "learned, no loss scaling": {"loss_scaling": False},
            "learned, no rectification": {"rectify": False},
        })
    for label, kw in variants.items():
        t0 = time.perf_counter()
        m = maskc.learn(model, DDIMScheduler(num_train_timesteps=1000), steps=T, sample_shape=shape,
                        target=a.target, seed=0, progress=False, **kw)
        dt = time.perf_counter() - t0
        learned[label] = m
        evaluate(label, m, dt, "learned")
    g = maskc.block_graph(model, *ex, timestep=ts[0], blocks=names)
    base = learned["maskc learned"]
    heur = maskc.rectify(base, g, exact=False)
    evaluate("maskc learned + heuristic rules", heur, None, "learned+rules")
    tm = maskc.compile(model, base, example_args=ex, example_kwargs={"timestep": ts[0]})
    cache = tm.cache_report()
    n_up = len(model.up_blocks)
    for depth in (1, 2):
        for interval in ((2, 3, 4, 5, 7, 10) if depth == 1 else (2, 3, 5)):
            evaluate(f"DeepCache uniform N={interval} depth={depth}", maskc.Mask(deepcache(names, T, interval, depth, n_up), names),
                     kind="deepcache")
    os.makedirs(a.out, exist_ok=True)
    learned["maskc learned"].save(os.path.join(a.out, "learned_mask_fmnist_unet.json"))
    res = {
        "benchmark": "bench_learn",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "threads": a.threads, "python": platform.python_version(),
                    "torch": torch.__version__},
        "model": a.model, "steps": T, "target": a.target, "samples": a.n,
        "seeds": {"noise": 1234, "learn": 0},
        "rows": rows,
        "cache_learned_mask": {"peak_bytes_batch1": cache["peak_bytes"], "all_blocks_bytes_batch1": cache["all_blocks_bytes"],
                               "per_step_bytes_batch1": cache["per_step_bytes"]},
        "heuristic_changes": {r: sum(c.rule == r for c in heur.changes) for r in maskc.RULES},
    }
    with open(os.path.join(a.out, "learn_vs_deepcache.json"), "w") as f:
        json.dump(res, f, indent=1)
    best = rows[0]
    dominated = [r for r in rows if r["kind"] == "deepcache" and r["macs_fraction"] <= best["macs_fraction"] + 1e-9]
    lines = [
        "# Learned masks vs DeepCache-style uniform schedules (Fashion-MNIST U-Net)",
        "",
        f"Made by `python benchmarks/bench_learn.py --model {a.model} --steps {T} --target {a.target} --n {a.n}"
        f"{' --ablations' if a.ablations else ''}` on {res['date']}, {a.threads} threads, torch {torch.__version__}. "
        f"DDIM {T} steps; PSNR of each final sample against the original model's sample from the same noise "
        f"(seed 1234, {a.n} samples), on [0, 1]; MACs by FlopCounterMode over a generation.",
        "",
        "| method | learning time s | MACs (fraction) | speed-up in MACs | PSNR dB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lt = f"{r['learning_s']:.0f}" if r["learning_s"] is not None else "-"
        lines.append(f"| {r['method']} | {lt} | {r['macs_fraction']:.3f} | {r['speedup_macs']:.2f}x | {r['psnr']:.2f} |")
    verdict = "n/a" if not dominated else str(all(best["psnr"] > r["psnr"] for r in dominated))
    lines += ["", f"DeepCache schedules using no more MACs than the learned mask: {len(dominated)}; "
              f"the learned mask has higher PSNR than all of them: {verdict}."]
    lines += ["", f"Cache of the learned mask (batch 1): peak {cache['peak_bytes'] / 1024:.1f} KiB held across steps, "
              f"against {cache['all_blocks_bytes'] / 1024:.1f} KiB for caching every block's output (DeepCache's approach). "
              f"Heuristic rules on the learned mask turned off: {res['heuristic_changes']}."]
    with open(os.path.join(a.out, "learn_vs_deepcache.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
