"""What the opt-in rectification rules buy in MACs and cost in fidelity, on the trained U-Net.

For masks on which the rules act (random masks, seed 2), compares exact rectification
with ``exact=False`` (rules ``isolated-run`` and ``stage-skipped``): generation MACs by
FlopCounterMode and PSNR of final samples against the original model's from the same
noise, DDIM 20 steps. Usage: python benchmarks/bench_rules.py --model maskc/models/weights/fmnist-unet
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
from diffusers import DDIMScheduler, UNet2DModel

import maskc
from maskc.learn import measured_flops



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
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = UNet2DModel.from_pretrained(a.model).float().eval()
    names = maskc.blocks(model)
    T = a.steps
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(T)
    ts = [t.reshape(1) for t in sched.timesteps]
    ex = (torch.zeros(1, 1, 32, 32),)
    g = maskc.block_graph(model, *ex, timestep=ts[0], blocks=names)
    full = measured_flops(model, None, ex, {"timestep": ts[0]}, "timestep", ts)
    x0 = torch.randn(a.n, 1, 32, 32, generator=torch.Generator().manual_seed(1234))
    ref = sample(model, x0, T)
    gen = torch.Generator().manual_seed(2)
    rows = []
    for keep in (0.5, 0.7, 0.85):
        bits = torch.rand(T, len(names), generator=gen) < keep
        bits[0] = True
        base = maskc.Mask(bits, names)
        for label, m in (("exact", maskc.rectify(base, g)), ("rules", maskc.rectify(base, g, exact=False))):
            tm = maskc.compile(model, m)
            frac = measured_flops(model, m, ex, {"timestep": ts[0]}, "timestep", ts) / full
            rows.append({"mask": f"random keep={keep}", "rectify": label, "macs_fraction": frac,
                         "psnr": psnr(sample(tm, x0, T, tm.reset), ref),
                         "changes": {r: sum(c.rule == r for c in m.changes) for r in maskc.RULES}})
            print(rows[-1], flush=True)
    res = {"benchmark": "bench_rules", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": a.model, "steps": T, "samples": a.n, "seeds": {"noise": 1234, "masks": 2}, "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "rules_quality.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [
        "# Heuristic rectification rules: MACs bought, fidelity paid (Fashion-MNIST U-Net)",
        "",
        f"Made by `python benchmarks/bench_rules.py --model {a.model}` on {res['date']} (torch {torch.__version__}, "
        f"{a.threads} threads). DDIM {T} steps, random masks (seed 2, row 0 all ones), PSNR of final samples against "
        f"the original's from the same noise (seed 1234, {a.n} samples); MACs by FlopCounterMode.",
        "",
        "| mask | rectification | MACs (fraction) | PSNR dB | runs turned off by rule |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        ch = ", ".join(f"{k}: {v}" for k, v in r["changes"].items()) if r["rectify"] == "rules" else "-"
        lines.append(f"| {r['mask']} | {r['rectify']} | {r['macs_fraction']:.3f} | {r['psnr']:.2f} | {ch} |")
    with open(os.path.join(a.out, "rules_quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
