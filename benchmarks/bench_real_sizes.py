"""maskc on backbones of the sizes users bring, on CPU with random weights: capture plus rewrite
time for a 50-step mask, cold inductor compile of every step variant against one plain compile,
and peak memory (resident set) of each phase.

Models (random weights, seed 0; speed and memory do not depend on them):
- SD-1.5-sized ``UNet2DConditionModel`` (diffusers defaults with 768-d text states: 860M), latent 4x64x64,
  text states 77x768;
- DiT-XL/2-sized ``DiTTransformer2DModel`` (28 layers, 16 heads x 72, patch 2: 675M), latent 4x32x32.
Mask: random over 50 steps (each block kept with p = 0.5, row 0 all ones, seed 0), so nearly every
step is a distinct variant: the worst case for rewrite and compile. Batch 1, float32.

Each phase runs in a fresh process (inductor's FX graph and autograd caches off, an empty cache
folder), so compile times are cold and peak memory is the phase's own. Compile seconds are dynamo's
``entire_frame_compile`` total (dynamo plus inductor, every frame compiled), not wall time.

Usage: python benchmarks/bench_real_sizes.py [--models sd15 dit-xl] [--threads 2]
Writes benchmarks/results/real_sizes.md and .json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time

import torch

from bench_compile import machine, run_cold  # benchmarks/ is the script's folder, first on sys.path

STEPS = 50


def build(name: str):
    """(model, example args, example kwargs) with random weights."""
    torch.manual_seed(0)
    if name == "sd15":
        from diffusers import UNet2DConditionModel

        m = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5 (defaults are SD 1.x but 1280-d text)
        return m.eval(), (torch.randn(1, 4, 64, 64), torch.tensor(999)), {"encoder_hidden_states": torch.randn(1, 77, 768)}
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                              sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    return m.eval(), (torch.randn(1, 4, 32, 32), torch.tensor([999])), {"class_labels": torch.tensor([1])}


def random_mask(model):
    import maskc

    names = maskc.blocks(model)
    bits = torch.rand(STEPS, len(names), generator=torch.Generator().manual_seed(0)) < 0.5
    bits[0] = True
    return maskc.Mask(bits, names)


def child(name: str, phase: str, threads: int) -> dict:
    import maskc
    from torch._dynamo.utils import calculate_time_spent

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, args, kwargs = build(name)
    r: dict = {"build_s": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}
    mask = random_mask(model)
    r["blocks"] = len(mask.names)
    ts = torch.linspace(999, 0, STEPS).round()
    with torch.no_grad():
        if phase == "eager":
            model(*args, **kwargs)
            t0 = time.perf_counter()
            model(*args, **kwargs)
            r["forward_s"] = time.perf_counter() - t0
        elif phase == "capture":
            t0 = time.perf_counter()
            tm = maskc.compile(model, mask, example_args=args, example_kwargs=kwargs)
            r["capture_rewrite_s"] = time.perf_counter() - t0
            r["variants"] = len({id(tm.step_graph(i)) for i in range(STEPS)})
        elif phase == "plain inductor":
            fn = torch.compile(model, dynamic=False)
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            r["first_call_s"] = time.perf_counter() - t0
            r["compile_s"] = calculate_time_spent().get("entire_frame_compile", float("nan"))
        else:  # maskc inductor: a whole 50-step generation compiles every variant it runs
            tm = maskc.compile(model, mask, backend="inductor")
            t0 = time.perf_counter()
            for t in ts:
                tm(args[0], t.reshape(args[1].shape), **kwargs)
            r["generation_s"] = time.perf_counter() - t0
            r["compile_s"] = calculate_time_spent().get("entire_frame_compile", float("nan"))
            r["variants"] = len({id(tm.step_graph(i)) for i in range(STEPS)})
            rep = tm.compile_report()
            r["compiled_blocks"] = rep["compiled_blocks"]
            r["glue_programs"] = rep["glue_programs"]
    r["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return r


def run_child(name: str, phase: str, threads: int) -> dict:
    return run_cold(__file__, [name, phase, str(threads)])


PHASES = ("eager", "capture", "plain inductor", "maskc inductor")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["sd15", "dit-xl"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    res: dict = {"benchmark": "bench_real_sizes", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python benchmarks/bench_real_sizes.py " + " ".join(sys.argv[1:]),
                 "machine": machine(a.threads),
                 "steps": STEPS, "seeds": {"weights": 0, "mask": 0}, "models": {}}
    for name in a.models:
        res["models"][name] = {}
        for phase in PHASES:
            res["models"][name][phase] = r = run_child(name, phase, a.threads)
            print(name, phase, {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "real_sizes.json"), "w") as f:
        json.dump(res, f, indent=1)
    m = res["machine"]
    lines = ["# maskc at real sizes (random weights), CPU", "",
             f"Made by `{res['command']}` on {res['date']}: {m['cpu']}, {m['cores']} cores, `torch.set_num_threads({m['threads']})`, "
             f"torch {m['torch']}. Batch 1, float32. Mask: random over {STEPS} steps (p = 0.5 per block, row 0 all ones, "
             "seed 0). Each phase in a fresh process with cold inductor caches; peak memory is the process's maximum resident set.", "",
             "| model | params | blocks | eager forward s | capture + rewrite s | distinct step variants | plain inductor compile s "
             "| maskc inductor compile s (all variants) | block / glue programs | maskc / plain | peak GiB: eager / capture / plain inductor / maskc inductor |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in res["models"].items():
        e, c, p, q = (r[k] for k in PHASES)
        lines.append(f"| {name} | {e['params'] / 1e6:.0f}M | {e['blocks']} | {e['forward_s']:.2f} | {c['capture_rewrite_s']:.2f} | "
                     f"{c['variants']} | {p['compile_s']:.1f} | {q['compile_s']:.1f} | {q['compiled_blocks']} / {q.get('glue_programs', '-')} | "
                     f"{q['compile_s'] / p['compile_s']:.2f}x | "
                     f"{e['peak_rss_gib']:.2f} / {c['peak_rss_gib']:.2f} / {p['peak_rss_gib']:.2f} / {q['peak_rss_gib']:.2f} |")
    lines += ["", "Capture + rewrite: `maskc.compile(model, mask, example_args=...)`, which runs the model once while "
              "tracing and rewrites every distinct step. Compile s: dynamo's `entire_frame_compile` total. "
              f"maskc inductor: one {STEPS}-step call sequence; with `compile_unit=\"block\"` each block is compiled once "
              "and shared by every variant, and each distinct glue run (between blocks) once for all steps and layers."]
    with open(os.path.join(a.out, "real_sizes.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
