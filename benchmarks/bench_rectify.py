"""What rectification and the live-set cache buy on the DDPM-CIFAR10 U-Net topology.

For several masks (DeepCache-like uniform schedules, up-blocks skipped at odd
steps, random masks), reports per generation:
- MACs fraction of the mask as given, after exact rectification, and after the
  heuristic rules (``exact=False``), all from FlopCounterMode-derived block MACs;
- peak cache bytes of maskc's live-set cache against caching every block's output
  (DeepCache's approach).
Quality cost of the heuristic rules needs trained models and is not measured here.
Weights are random (seed 0): MACs and bytes do not depend on them.
Usage: python benchmarks/bench_rectify.py [--steps 20] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch
from diffusers import UNet2DModel

import maskc
from maskc.models.configs import DDPM_CIFAR10


def macs_fraction(bits: torch.Tensor, names: list[str], g) -> float:
    """Generation MACs of a mask relative to the full model, counting only runs that are live."""
    total = g.graph["total_macs"]
    blocks = torch.tensor([g.nodes[n]["macs"] for n in names], dtype=torch.float64)
    glue = total - float(blocks.sum())
    T = bits.shape[0]
    return float((bits.to(torch.float64) @ blocks).sum() + T * glue) / (T * total)


def masks(names: list[str], T: int) -> dict[str, torch.Tensor]:
    B = len(names)
    out = {}
    for n_int in (2, 3, 5):
        # DeepCache uniform: full step every n_int steps, else only the outermost down/up blocks run
        bits = torch.ones(T, B, dtype=torch.bool)
        shallow = [j for j, n in enumerate(names) if n.startswith(("down_blocks.0.", "up_blocks.3."))]
        for i in range(T):
            if i % n_int:
                bits[i] = False
                bits[i, shallow] = True
        out[f"deepcache N={n_int}"] = bits
    bits = torch.ones(T, B, dtype=torch.bool)
    up = [j for j, n in enumerate(names) if n.startswith("up_blocks.")]
    bits[1::2, up] = False
    out["up-blocks skipped at odd steps"] = bits
    g = torch.Generator().manual_seed(2)
    for p in (0.3, 0.5, 0.7):
        bits = torch.rand(T, B, generator=g) < p
        bits[0] = True
        out[f"random keep={p}"] = bits
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    torch.manual_seed(0)
    model = UNet2DModel(**DDPM_CIFAR10).eval()
    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor(999)
    names = maskc.blocks(model)
    g = maskc.block_graph(model, x, t)
    rows = []
    for label, bits in masks(names, a.steps).items():
        mask = maskc.Mask(bits, names)
        exact = maskc.rectify(mask, g)
        heur = maskc.rectify(mask, g, exact=False)
        tm = maskc.compile(model, exact, example_args=(x, t))
        rep = tm.cache_report()
        rows.append({
            "mask": label,
            "macs_given": macs_fraction(bits, names, g),
            "macs_exact": macs_fraction(exact.bits, names, g),
            "macs_heuristic": macs_fraction(heur.bits, names, g),
            "turned_off_exact": sum(c.turned == "off" for c in exact.changes),
            "turned_off_heuristic": sum(c.turned == "off" for c in heur.changes),
            "heuristic_by_rule": {r: sum(c.rule == r for c in heur.changes) for r in maskc.RULES},
            "peak_cache_bytes": rep["peak_bytes"],
            "all_blocks_bytes": rep["all_blocks_bytes"],
        })
        print(rows[-1])
    res = {
        "benchmark": "bench_rectify",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "model": "google/ddpm-cifar10-32 topology, random weights (seed 0), batch 1, float32",
        "steps": a.steps,
        "seeds": {"weights": 0, "random masks": 2},
        "rows": rows,
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "rectify.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [
        "# Rectification and the live-set cache: DDPM-CIFAR10 U-Net",
        "",
        f"Made by `python benchmarks/bench_rectify.py --steps {a.steps}` on {res['date']} (torch {torch.__version__}). "
        f"{len(names)} blocks, {a.steps} steps, batch 1 float32; random weights (seed 0), random masks seed 2. "
        "MACs are FlopCounterMode counts per block; a fraction is the generation's MACs over the full model's.",
        "",
        "| mask | MACs as given | after exact rectify | after heuristic rules | runs removed (exact / heuristic) | peak cache MiB | cache-every-block MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['mask']} | {r['macs_given']:.3f} | {r['macs_exact']:.3f} | {r['macs_heuristic']:.3f} | "
            f"{r['turned_off_exact']} / {r['turned_off_heuristic']} | {r['peak_cache_bytes'] / 2**20:.3f} | "
            f"{r['all_blocks_bytes'] / 2**20:.3f} |"
        )
    lines += [
        "",
        "Exact rectification changes no output (property-tested). The heuristic rules "
        f"({', '.join(maskc.RULES)}) change outputs; their quality cost needs trained models and is not measured yet.",
    ]
    with open(os.path.join(a.out, "rectify.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
