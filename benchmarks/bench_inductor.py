"""maskc under torch.compile (inductor) on CPU: cold compile time of every step variant, and speed.

For each model (the shipped U-Net and DiT with their learned 20-step masks, and the 35.7M
DDPM-CIFAR10 U-Net with random weights under the shipped U-Net's mask, whose block names
it shares):

- cold compile: each configuration in a fresh process with inductor's FX graph cache and
  autograd cache off and an empty inductor cache folder; compile seconds = first generation
  (which compiles whatever the generation runs: for maskc every step variant) minus the
  median of the next ones. Configurations: one plain ``torch.compile(model)``, maskc with
  ``compile_unit="block"`` (each block once, shared by all variants; the default) and, with
  ``--step-unit``, ``compile_unit="step"`` (each distinct step graph compiled whole);
- per-generation wall time, four configurations interleaved in one process (order reversed
  every other round): original eager, original inductor, maskc eager, maskc inductor; medians
  and quartiles, and maskc inductor's speed-up over original inductor against the MACs ratio
  (FlopCounterMode over a whole generation).

``unet-random12`` is the issue's acceptance case: the shipped U-Net under a random 12-step mask
(12 distinct variants).

Usage: python benchmarks/bench_inductor.py [--models unet dit ddpm-cifar10 unet-random12] [--threads 1] [--reps 7]
       [--tag NAME]
Writes benchmarks/results/compile_inductor.md and .json (compile_inductor_NAME.* with --tag).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from bench_compile import cold_record, machine, run_cold  # benchmarks/ is the script's folder, first on sys.path

BATCH = {"unet": 8, "dit": 8, "ddpm-cifar10": 1, "unet-random12": 8}
ABOUT = {
    "unet": "shipped U-Net, its learned 20-step mask, DDIM 20",
    "dit": "shipped DiT, its learned 20-step mask, DDIM 20, labels i % 10",
    "ddpm-cifar10": "35.7M DDPM-CIFAR10 U-Net, random weights (seed 0), the shipped U-Net's mask (same block names), DDIM 20",
    "unet-random12": "shipped U-Net, a random 12-step mask (each block kept with p = 0.5, row 0 all ones, seed 3: "
                     "12 distinct variants, the issue's acceptance case), DDIM 12",
}


DYNAMO_CALLS = "maskc inductor, calls through dynamo"


def setup(name: str, batch: int):
    """(model, mask, scheduler, x0, kwargs) for one benchmark model; weights and noise fixed by seeds."""
    from diffusers import DDIMScheduler, UNet2DModel

    from maskc.cli import _load

    if name == "unet-random12":
        import maskc

        model, _, _ = _load("unet", None, need_mask=False)
        names = maskc.blocks(model)
        bits = torch.rand(12, len(names), generator=torch.Generator().manual_seed(3)) < 0.5
        bits[0] = True
        mask = maskc.Mask(bits, names)
    elif name == "ddpm-cifar10":
        from maskc.models.configs import DDPM_CIFAR10

        torch.manual_seed(0)
        import maskc

        model = UNet2DModel(**DDPM_CIFAR10).eval()
        _, shipped, _ = _load("unet", None, need_mask=True)
        mask = maskc.Mask(shipped.bits, shipped.names)  # same rows and block names, without the shipped model's signature
    else:
        model, mask, _ = _load(name, None, need_mask=True)
    model.eval()
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(mask.steps)
    c = model.config
    x0 = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(1))
    kwargs = {"class_labels": torch.arange(batch) % 10} if name == "dit" else {}
    return model, mask, sched, x0, kwargs


def make(config: str, model, mask):
    """(callable, reset or None) for one configuration."""
    import maskc

    if config == "original eager":
        return model, None
    if config == "original inductor":
        return torch.compile(model, dynamic=False), None
    if config == "maskc eager":
        tm = maskc.compile(model, mask)
        return tm, tm.reset
    unit = "step" if config.endswith("(step)") else "block"
    tm = maskc.compile(model, mask, backend="inductor", compile_unit=unit)
    if config == DYNAMO_CALLS:  # the ablation: every piece called through dynamo (its guards) at every call
        tm._blocks.direct = False
    return tm, tm.reset


def generation(fn, reset, sched, x0, kwargs) -> torch.Tensor:
    from maskc.sampling import generate

    with torch.no_grad():
        return generate(fn, sched, x0, len(sched.timesteps), kwargs, None, reset=reset)


def child(name: str, config: str, batch: int, threads: int) -> None:
    """One cold compile, printed as a JSON line."""
    torch.set_num_threads(threads)
    model, mask, sched, x0, kwargs = setup(name, batch)
    fn, reset = make(config, model, mask)
    rec = cold_record(fn, lambda: generation(fn, reset, sched, x0, kwargs))
    rec["variants"] = len({id(fn.step_graph(i)) for i in range(len(fn))}) if hasattr(fn, "step_graph") else 1
    print(json.dumps(rec))


def cold(name: str, config: str, batch: int, threads: int) -> dict:
    return run_cold(__file__, [name, config, str(batch), str(threads)])


def macs_fraction(model, mask, sched, x0, kwargs) -> float:
    from maskc.eval import generation_macs

    ts = [t.reshape(1).expand(x0.shape[0]) if kwargs else t.reshape(1) for t in sched.timesteps]
    ex_kw = {**kwargs, "timestep": ts[0]}
    return generation_macs(model, mask, (x0,), ex_kw, "timestep", ts) / generation_macs(model, None, (x0,), ex_kw, "timestep", ts)


def warm(name: str, batch: int, threads: int, reps: int, dynamo_calls: bool = False) -> dict:
    from maskc.eval import interleaved_times, summarize_times

    torch.set_num_threads(threads)
    model, mask, sched, x0, kwargs = setup(name, batch)
    configs = ["original eager", "original inductor", "maskc eager", "maskc inductor"] + ([DYNAMO_CALLS] if dynamo_calls else [])
    fns = {c: make(c, model, mask) for c in configs}
    outs: dict[str, torch.Tensor] = {}

    def run(c):
        outs[c] = generation(*fns[c], sched, x0, kwargs)

    times = interleaved_times({c: (lambda c=c: run(c)) for c in configs}, reps, warmup=1)
    err = {"maskc inductor vs maskc eager": float((outs["maskc inductor"] - outs["maskc eager"]).abs().max()),
           "original inductor vs original eager": float((outs["original inductor"] - outs["original eager"]).abs().max())}
    return {"times": {c: summarize_times(t) for c, t in times.items()},
            "per_round": {c: t for c, t in times.items()},
            "macs_fraction": macs_fraction(model, mask, sched, x0, kwargs), "max_abs_diff": err,
            "params": sum(p.numel() for p in model.parameters()), "blocks": len(mask.names), "steps": mask.steps}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["unet", "dit", "ddpm-cifar10"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--step-unit", nargs="*", default=["unet"], help="models on which to time compile_unit='step' too")
    ap.add_argument("--no-cold", action="store_true", help="time generations only (no cold compiles)")
    ap.add_argument("--dynamo-calls", action="store_true",
                    help="time a fifth configuration: maskc inductor with every piece called through dynamo (the ablation "
                         "of the direct calls)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--tag", default="", help="write compile_inductor_<tag>.md/.json instead of compile_inductor.md/.json")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON of the same --tag")
    a = ap.parse_args()
    stem = os.path.join(a.out, "compile_inductor" + (f"_{a.tag}" if a.tag else ""))
    if a.report_only:
        with open(stem + ".json") as f:
            res = json.load(f)
        with open(stem + ".md", "w") as f:
            f.write(markdown(res))
        return
    res: dict = {"benchmark": "bench_inductor", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python benchmarks/bench_inductor.py " + " ".join(sys.argv[1:]),
                 "machine": machine(a.threads),
                 "seeds": {"weights (ddpm-cifar10)": 0, "noise": 1}, "models": {}}
    for name in a.models:
        b = BATCH[name]
        configs = ["original inductor", "maskc inductor"] + (["maskc inductor (step)"] if name in a.step_unit else [])
        r: dict = {"batch": b, "cold": {}}
        for c in [] if a.no_cold else configs:
            r["cold"][c] = cold(name, c, b, a.threads)
            print(f"{name} cold {c}: {r['cold'][c]['compile_s']:.1f} s ({r['cold'][c]['unique_graphs']} graphs)", flush=True)
        r.update(warm(name, b, a.threads, a.reps, a.dynamo_calls))
        t = r["times"]
        r["speedup_over_original_inductor"] = t["original inductor"]["median"] / t["maskc inductor"]["median"]
        r["speedup_over_original_eager"] = t["original eager"]["median"] / t["maskc inductor"]["median"]
        if r["cold"]:
            r["compile_ratio"] = r["cold"]["maskc inductor"]["compile_s"] / r["cold"]["original inductor"]["compile_s"]
        print(f"{name}: " + ", ".join(f"{c} {v['median']:.3f} s" for c, v in t.items())
              + f"; MACs {r['macs_fraction']:.3f}; maskc inductor {r['speedup_over_original_inductor']:.2f}x over original inductor",
              flush=True)
        res["models"][name] = r
    os.makedirs(a.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))


def _cell(summary: dict, c: str, digits: int = 3) -> str:
    """'median (q1-q3)' of configuration ``c`` in a dict of summarize_times results."""
    t = summary[c]
    return f"{t['median']:.{digits}f} ({t['q1']:.{digits}f}-{t['q3']:.{digits}f})"


def paired_speedup(r: dict) -> dict:
    """Per configuration of maskc inductor: original inductor's time over its time in the same round, summarized."""
    from maskc.eval import summarize_times

    pr = r["per_round"]
    return {c: summarize_times([o / m for o, m in zip(pr["original inductor"], pr[c])])
            for c in ("maskc inductor", DYNAMO_CALLS) if c in pr}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# maskc under torch.compile (inductor), CPU", "",
             f"Made by `{res['command']}` on {res['date']}: {m['cpu']}, {m['cores']} cores, "
             f"`torch.set_num_threads({m['threads']})`, torch {m['torch']}. float32, no guidance, noise seed 1. Models:", "",
             *[f"- {name}: {ABOUT[name]}" for name in res["models"]], ""]
    if any(r["cold"] for r in res["models"].values()):
        lines += ["## Cold compile", "",
             "Each configuration in a fresh process with inductor's FX graph and autograd caches off and an empty cache "
             "folder. Compile s = first generation minus the median of the next two: for maskc it compiles every step "
             "variant the generation runs.", "",
             "| model | batch | configuration | distinct step variants | graphs compiled | block / glue programs | graph breaks "
             "| compile s | vs one plain compile |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in res["models"].items():
        if not r["cold"]:
            continue
        plain = r["cold"]["original inductor"]["compile_s"]
        for c, v in r["cold"].items():
            progs = f"{v['block_programs']} / {v['glue_programs']}" if v.get("block_programs") else "-"
            lines.append(f"| {name} | {r['batch']} | {c} | {v['variants']} | {v['unique_graphs']} | {progs} | {v['graph_breaks']} | "
                         f"{v['compile_s']:.1f} | {v['compile_s'] / plain:.2f}x |")
    lines += ["", "## Per-generation wall time, configurations interleaved", "",
              "| model | params | batch | MACs (maskc) | original eager s | original inductor s | maskc eager s | maskc inductor s "
              "| maskc inductor over original inductor | / MACs ratio | per-round ratio, median (quartiles) "
              "| max abs diff inductor vs eager (maskc) |",
              "| --- | ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: | --- | ---: |"]
    for name, r in res["models"].items():
        t = r["times"]
        pr = f"{_cell(paired_speedup(r), 'maskc inductor', 2)}x"
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['macs_fraction']:.3f} | {_cell(t, 'original eager')} | "
                     f"{_cell(t, 'original inductor')} | {_cell(t, 'maskc eager')} | {_cell(t, 'maskc inductor')} | "
                     f"{r['speedup_over_original_inductor']:.2f}x | {r['speedup_over_original_inductor'] * r['macs_fraction']:.2f} | "
                     f"{pr} | {r['max_abs_diff']['maskc inductor vs maskc eager']:.1e} |")
    ablated = {name: r for name, r in res["models"].items() if DYNAMO_CALLS in r["times"]}
    if ablated:
        lines += ["", "## Direct calls against calls through dynamo", "",
                  "maskc inductor as shipped (each compiled piece, after its first call, calls its graph without dynamo) "
                  f"against '{DYNAMO_CALLS}' (every call checks dynamo's guards), interleaved in the same rounds.", "",
                  "| model | maskc inductor s | through dynamo s | direct over dynamo | over original inductor: direct "
                  "| through dynamo | / MACs ratio: direct | through dynamo |",
                  "| --- | --- | --- | ---: | --- | --- | ---: | ---: |"]
        for name, r in ablated.items():
            t, p = r["times"], paired_speedup(r)
            lines.append(f"| {name} | {_cell(t, 'maskc inductor')} | {_cell(t, DYNAMO_CALLS)} | "
                         f"{t[DYNAMO_CALLS]['median'] / t['maskc inductor']['median']:.2f}x | "
                         f"{_cell(p, 'maskc inductor', 2)}x | {_cell(p, DYNAMO_CALLS, 2)}x | "
                         f"{p['maskc inductor']['median'] * r['macs_fraction']:.2f} | {p[DYNAMO_CALLS]['median'] * r['macs_fraction']:.2f} |")
    spread = {name: paired_speedup(r)["maskc inductor"] for name, r in res["models"].items()}
    wide = [name for name, p in spread.items() if (p["q3"] - p["q1"]) / p["median"] > 0.1]
    if wide:
        lines += ["", f"**Noisy run:** on {', '.join(wide)} the per-round ratio's quartiles lie more than 10% of its "
                  "median apart: the shared machine's load changed during the rounds, so read the paired ratio with its "
                  "quartiles, and the ratio of medians (the column before the MACs ratio) as one draw of it."]
    lines += ["", "Times: median (quartiles) over the rounds in the JSON (`per_round` holds every round). "
              "Per-round ratio: original inductor's time over maskc inductor's in the same round, median and quartiles "
              "over rounds (the pairing removes the drift a shared machine adds to both). "
              "'/ MACs ratio': the speed-up over original inductor divided by the MACs speed-up (1 / MACs fraction); "
              "1.00 means the wall time falls exactly as the MACs do."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
