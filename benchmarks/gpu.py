"""maskc on a GPU (H100/H200): five configurations at batch 1 and 128, one table.

Configurations, each a whole 20-step DDIM generation in float16, timed with CUDA events
after warm-up, rounds interleaved: original eager, ``torch.compile``, ``torch.compile(mode=
"reduce-overhead")``, maskc inductor (``maskc.compile(backend="inductor")``) and maskc inductor
with maskc's own CUDA graphs (``cuda_graphs=True``). Every maskc configuration is also checked
against maskc eager on the same noise (max abs difference over the max abs value of the final samples).

Models (random weights, seed 0: speed does not depend on them): the 35.7M DDPM-CIFAR10 U-Net
(3x32x32) with a DeepCache-like mask (uniform, depth 1, the interval whose MACs are nearest 0.55),
and a DiT-XL/2-sized DiT (4x32x32 latent, labels) with FORA every 2nd step; plus the shipped
U-Net with its learned mask. MACs fractions by FlopCounterMode over a generation at batch 1.

The script keeps to a time budget (--budget, default 420 s): configurations left when it runs
out are listed as skipped, not timed. Writes $OUT/gpu_<card>.md and .json (or --out).

Usage on the device machine: bash benchmarks/gpu.sh   (installs the carried wheels, then this)
CPU check of the code paths: python benchmarks/gpu.py --device cpu --small
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings

import torch

CONFIGS = ("original eager", "torch.compile", "torch.compile reduce-overhead", "maskc inductor", "maskc inductor + CUDA graphs")


def models(small: bool, device: str, dtype: torch.dtype):
    """(name, model, mask, example kwargs maker, sample shape) for each benchmark model."""
    from diffusers import DiTTransformer2DModel, UNet2DModel

    import maskc
    from maskc.models.configs import DDPM_CIFAR10
    from maskc.schedules import deepcache_uniform, fora

    out = []
    torch.manual_seed(0)
    cfg = dict(DDPM_CIFAR10)
    if small:
        cfg.update(block_out_channels=(32, 64, 64, 64))
    unet = UNet2DModel(**cfg).eval().to(device, dtype)
    names = maskc.blocks(unet)
    out.append(("ddpm-cifar10", unet, [deepcache_uniform(names, 20, k) for k in (2, 3, 4, 5, 6)], {}, (3, 32, 32)))
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=4 if small else 16, attention_head_dim=16 if small else 72, in_channels=4,
                                out_channels=8, num_layers=2 if small else 28, sample_size=32, patch_size=2,
                                num_embeds_ada_norm=1000).eval().to(device, dtype)
    out.append(("dit-xl" if not small else "dit-small", dit, [fora(maskc.blocks(dit), 20, 2)], {"class_labels": True}, (4, 32, 32)))
    from maskc.cli import _load

    shipped, mask, _ = _load("unet", None, need_mask=True)
    out.append(("shipped fmnist-unet", shipped.to(device, dtype), [mask], {}, (1, 32, 32)))
    return out


def macs_fraction(model, mask, shape, kw, device, dtype, timesteps) -> float:
    from maskc.eval import generation_macs

    x = torch.zeros(1, *shape, device=device, dtype=dtype)
    ts = [t.reshape(1).to(device) for t in timesteps]
    ex = {**kw(1), "timestep": ts[0]}
    return generation_macs(model, mask, (x,), ex, "timestep", ts) / generation_macs(model, None, (x,), ex, "timestep", ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small models (a CPU check of the code paths)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    a = ap.parse_args()
    t_start = time.perf_counter()
    import maskc
    from diffusers import DDIMScheduler

    from maskc.sampling import generate

    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(20)
    res: dict = {"benchmark": "gpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "card": card, "torch": torch.__version__,
                 "dtype": str(dtype), "steps": 20, "seeds": {"weights": 0, "noise": 1}, "rows": [], "skipped": []}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for name, model, masks, kwspec, shape in models(a.small, a.device, dtype):
        def kw(b, kwspec=kwspec):
            return {"class_labels": torch.arange(b, device=dev) % 1000} if kwspec else {}

        fracs = [macs_fraction(model, m, shape, kw, dev, dtype, sched.timesteps) for m in masks]
        k = min(range(len(masks)), key=lambda j: abs(fracs[j] - 0.55)) if len(masks) > 1 else 0
        mask, frac = masks[k], fracs[k]
        for b in a.batches:
            x0 = torch.randn(b, *shape, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
            fns = {}
            outs = {}
            for c in CONFIGS:
                if time.perf_counter() - t_start > a.budget:
                    res["skipped"].append(f"{name} batch {b} {c}")
                    continue
                if c == "original eager":
                    fns[c] = (model, None)
                elif c == "torch.compile":
                    fns[c] = (torch.compile(model), None)
                elif c == "torch.compile reduce-overhead":
                    fns[c] = (torch.compile(model, mode="reduce-overhead"), None)
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        tm = maskc.compile(model, mask, backend="inductor", cuda_graphs=c.endswith("graphs"))
                    fns[c] = (tm, tm.reset)
                t0 = time.perf_counter()
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for _ in range(2):  # compile, capture, warm up
                        outs[c] = generate(fns[c][0], sched, x0, 20, kw(b), None, reset=fns[c][1]).clone()
                sync()
                fns[c] = fns[c] + (time.perf_counter() - t0,)
            ref_tm = maskc.compile(model, mask)
            with torch.no_grad():
                ref = generate(ref_tm, sched, x0, 20, kw(b), None, reset=ref_tm.reset)
            times: dict[str, list[float]] = {c: [] for c in fns}
            for r in range(a.reps):
                for c in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    fn, reset, _ = fns[c]
                    sync()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        generate(fn, sched, x0, 20, kw(b), None, reset=reset)
                    sync()
                    times[c].append(time.perf_counter() - t0)
            eager = statistics.median(times["original eager"]) if times.get("original eager") else float("nan")
            ro = statistics.median(times["torch.compile reduce-overhead"]) if times.get("torch.compile reduce-overhead") else float("nan")
            for c, ts in times.items():
                med = statistics.median(ts)
                row = {"model": name, "batch": b, "config": c, "macs_fraction": frac if c.startswith("maskc") else 1.0,
                       "mask": mask.meta.get("provenance", {}).get("method", "learned"), "median_s": med,
                       "min_s": min(ts), "max_s": max(ts), "rounds": ts, "first_two_generations_s": fns[c][2],
                       "speedup_vs_eager": eager / med, "speedup_vs_reduce_overhead": ro / med,
                       "max_rel_diff_vs_maskc_eager": float((outs[c].float() - ref.float()).abs().max() / ref.float().abs().max())
                       if c.startswith("maskc") else None}
                if c.endswith("graphs"):
                    row["static"] = fns[c][0].cache_report().get("static")
                res["rows"].append(row)
                print(f"{name} b={b} {c}: {med * 1e3:.1f} ms ({eager / med:.2f}x eager, {ro / med:.2f}x reduce-overhead)", flush=True)
    os.makedirs(a.out, exist_ok=True)
    slug = card.replace("NVIDIA ", "").replace(" ", "_").lower()
    with open(os.path.join(a.out, f"gpu_{slug}.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# maskc on {card}", "", f"Made by `{res['command']}` on {res['date']}, torch {res['torch']}, {res['dtype']}, "
             f"DDIM 20 steps, {a.reps} interleaved rounds, median (min-max) per generation; random weights (seed 0), noise "
             "seed 1. MACs: FlopCounterMode over a generation at batch 1.", "",
             "| model | batch | configuration | mask | MACs | ms per generation | vs eager | vs reduce-overhead | max diff vs maskc eager (relative to max abs) |",
             "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in res["rows"]:
        d = r["max_rel_diff_vs_maskc_eager"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | {r['mask']} | {r['macs_fraction']:.3f} | "
                     f"{r['median_s'] * 1e3:.1f} ({r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}) | {r['speedup_vs_eager']:.2f}x | "
                     f"{r['speedup_vs_reduce_overhead']:.2f}x | {'' if d is None else f'{d:.1e}'} |")
    if res["skipped"]:
        lines += ["", "Skipped (time budget): " + "; ".join(res["skipped"])]
    with open(os.path.join(a.out, f"gpu_{slug}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}/gpu_{slug}.md in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
