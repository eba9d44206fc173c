"""FD against the data is not a fidelity measure: schedules equally far from the original, opposite FD.

On the shipped U-Net (DDIM 20 steps) at 0.50 of the MACs, samples from the same noises
(seed 1234, the first ``--n`` of ``maskc bench``'s) for:
- the original model;
- maskc's learned mask at target 0.5 (the stored bench mask, ``benchmarks/results/masks``);
- step-level reuse every 2 steps in its usual phase (full steps 0, 2, ..., 18);
- the same schedule one step later (full steps 0, 3, 5, ..., 19);
- the two mixed (even full steps before step 10, odd ones after).
For each: FD-FMNIST against the test set and its ratio to the original's, FD to the
original's own samples, mean PSNR against them, each with a 95% paired-bootstrap interval
(1000 resamples of the noises, seed 0), and the feature variance (trace). The question it
answers: does a mask's FD against the data follow its distance to the original (what
mask learning minimizes), or can a schedule move FD the other way at equal distance?
Usage: python benchmarks/bench_fd_direction.py [--n 2000] [--threads 1] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import torch

import maskc
from maskc import schedules
from maskc.bench import SAMPLERS, code_version
from maskc.eval import (FMNISTFeatures, bootstrap_counts, fd_terms, generation_macs, interval, paired_bootstrap_fd,
                        paired_bootstrap_fd_to, psnr_per_sample)
from maskc.models.shipped import load_pretrained
from maskc.sampling import generate

HERE = os.path.dirname(os.path.abspath(__file__))


def masks(names: list[str], T: int, learned: str) -> dict[str, maskc.Mask | None]:
    """The compared methods (None: the original model)."""
    def full(steps: list[int], label: str) -> maskc.Mask:
        return schedules._with_full_steps(names, T, steps, [], {"method": label, "full_steps": steps})

    return {
        "original (full model)": None,
        "maskc learned, target 0.5": maskc.Mask.load(learned),
        "step-level reuse every 2, full steps 0, 2, ..., 18": schedules.step_reuse(names, T, 2),
        "step-level reuse every 2 one step later, full steps 0, 3, 5, ..., 19": full([0] + list(range(3, T, 2)), "odd"),
        "mixed: full steps 0, 2, ..., 8, then 11, 13, ..., 19": full(list(range(0, 10, 2)) + list(range(11, T, 2)),
                                                                     "mixed"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "maskc_fd_direction"),
                    help="per-method samples' features and PSNR, so an interrupted run resumes")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    T = 20
    model, path = load_pretrained("unet")
    model.float()
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    names = maskc.blocks(model)
    sched = SAMPLERS["ddim"]()
    noise = torch.randn(a.n, *shape, generator=torch.Generator().manual_seed(1234))
    s0 = SAMPLERS["ddim"]()
    s0.set_timesteps(T)
    ts = [t.reshape(1) for t in s0.timesteps]
    ex, kw = (torch.zeros(1, *shape),), {"timestep": ts[0]}
    full_macs = generation_macs(model, None, ex, kw, "timestep", ts)
    learned = os.path.join(HERE, "results", "masks", "bench_unet_ddim20_learned_0.5.json")
    methods = masks(names, T, learned)
    feats = FMNISTFeatures(seed=0)
    os.makedirs(a.work, exist_ok=True)
    ref_path = os.path.join(a.work, f"original-n{a.n}.pt")  # samples, for PSNR (git-ignored size)
    rows, F, P = [], [], []
    ref = torch.load(ref_path) if os.path.exists(ref_path) else None
    for k, (label, m) in enumerate(methods.items()):
        store = os.path.join(a.work, f"method{k}-n{a.n}.pt")
        saved = torch.load(store) if os.path.exists(store) and ref is not None else None
        if saved is not None and saved["label"] == label:
            print(f"{label}: reused {store}", flush=True)
        else:
            t0 = time.perf_counter()
            fn, reset = (model, None) if m is None else (lambda tm: (tm, tm.reset))(maskc.compile(model, m))
            x = torch.cat([generate(fn, sched, noise[i:i + a.batch], T, None, None, reset=reset)
                           for i in range(0, a.n, a.batch)])
            secs = time.perf_counter() - t0
            if m is None:
                ref = x
                torch.save(x, ref_path)
            saved = {"label": label, "features": feats.features(x), "psnr": None if m is None else psnr_per_sample(x, ref),
                     "seconds": secs}
            torch.save(saved, store)
            print(f"{label}: {a.n} samples in {secs:.0f} s", flush=True)
        rows.append({"method": label, "sampling_s": saved["seconds"]})
        F.append(saved["features"])
        P.append(saved["psnr"])
    R = feats.reference
    counts = bootstrap_counts(a.n, 1000, 0)
    fd = paired_bootstrap_fd(dict(enumerate(F)), R.test_mu, R.test_sigma, counts)
    to_orig = paired_bootstrap_fd_to(dict(enumerate(F[1:], 1)), F[0], counts)
    point_to = paired_bootstrap_fd_to(dict(enumerate(F[1:], 1)), F[0])
    for k, (r, m) in enumerate(zip(rows, methods.values())):
        r["macs_fraction"] = 1.0 if m is None else generation_macs(model, m, ex, kw, "timestep", ts) / full_macs
        r["fd"] = feats.score_features(F[k])["fd"]
        r["fd_ci"] = interval(fd[k])
        r["fd_terms"] = fd_terms(F[k], R.test_mu, R.test_sigma)
        if k:
            r["fd_ratio"] = r["fd"] / rows[0]["fd"]
            r["fd_ratio_ci"] = interval(fd[k] / fd[0])
            r["fd_to_original"] = float(point_to[k][0])
            r["fd_to_original_ci"] = interval(to_orig[k])
            r["psnr"] = float(P[k].mean())
            r["psnr_ci"] = interval(counts @ P[k].double() / a.n)
            r["full_steps"] = [i for i in range(T) if bool(m.bits[i].all())]
        if k > 1:  # paired against the learned mask (row 1): a negative FD difference means this row is lower
            r["fd_minus_learned_ci"] = interval(fd[k] - fd[1])
            r["fd_to_original_minus_learned_ci"] = interval(to_orig[k] - to_orig[1])
            r["psnr_minus_learned_ci"] = interval(counts @ (P[k] - P[1]).double() / a.n)
    res = {"benchmark": "fd_direction", "command": "python benchmarks/bench_fd_direction.py "
           + f"--n {a.n} --threads {a.threads}", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": {"cpu_count": os.cpu_count(), "threads": a.threads,
                       "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
           "model": path, "sampler": "ddim", "steps": T, "n": a.n, "noise_seed": 1234, "bootstrap": {"rounds": 1000, "seed": 0},
           "learned_mask": os.path.relpath(learned, HERE), "test_trace": float(R.test_sigma.trace()), "code_version": code_version(), "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fd_direction.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    with open(os.path.join(a.out, "fd_direction.md"), "w") as fh:
        fh.write(markdown(res))
    print(markdown(res))


def _ci(v: list[float], fmt: str) -> str:
    return f"({fmt.format(v[0])} to {fmt.format(v[1])})"


def markdown(res: dict) -> str:
    """The result table, every figure from ``res``."""
    m = res["machine"]
    out = [f"# FD against the data is not a fidelity measure (shipped U-Net, DDIM {res['steps']})", "",
           f"Made by `{res['command']}` on {res['date']}: {m['processor']}, {m['cpu_count']} cores, {m['threads']} "
           f"thread(s), torch {m['torch']}. {res['n']} samples per method from the same noises (seed "
           f"{res['noise_seed']}, the first {res['n']} of `maskc bench`'s). In brackets: 95% intervals over "
           f"{res['bootstrap']['rounds']} paired bootstrap resamples of the noises (seed {res['bootstrap']['seed']}), "
           "the same resamples for every method. FD: FD-FMNIST against the 10,000 test images. FD to original: "
           "against the original's samples from the same noises. PSNR: each sample against the original's from "
           "the same noise. Trace: the samples' feature variance. The last three columns: the row minus the "
           f"learned mask, paired interval only (negative FD: lower than the learned mask's). Learned mask: `{res['learned_mask']}` (code "
           f"{res['code_version']}).", "",
           "| method | MACs | FD | FD / original | FD to original | PSNR dB | trace | FD − learned | FD to orig. − learned "
           "| PSNR − learned |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        if "psnr" not in r:
            out.append(f"| {r['method']} | {r['macs_fraction']:.3f} | {r['fd']:.2f} {_ci(r['fd_ci'], '{:.2f}')} | 1.00 "
                       f"| 0 | - | {r['fd_terms']['trace']:.2f} | | | |")
            continue
        out.append(f"| {r['method']} | {r['macs_fraction']:.3f} | {r['fd']:.2f} {_ci(r['fd_ci'], '{:.2f}')} | "
                   f"{r['fd_ratio']:.3f} {_ci(r['fd_ratio_ci'], '{:.3f}')} | {r['fd_to_original']:.3f} "
                   f"{_ci(r['fd_to_original_ci'], '{:.3f}')} | {r['psnr']:.2f} {_ci(r['psnr_ci'], '{:.2f}')} | "
                   f"{r['fd_terms']['trace']:.2f} | " + (" | ".join(
                       _ci(r[c], f) for c, f in (("fd_minus_learned_ci", "{:+.2f}"), ("fd_to_original_minus_learned_ci",
                                                                                        "{:+.3f}"),
                                                 ("psnr_minus_learned_ci", "{:+.2f}"))) if "fd_minus_learned_ci" in r
                                                         else " |  | ") + " |")
    rs = res["rows"][1:]
    best_fd = min(rs, key=lambda r: r["fd"])
    best_psnr = max(rs, key=lambda r: r["psnr"])
    closest = min(rs, key=lambda r: r["fd_to_original"])
    out += ["", f"Lowest FD against the data: {best_fd['method']} ({best_fd['fd_ratio']:.3f} of the original's, "
            f"PSNR {best_fd['psnr']:.2f} dB, FD to original {best_fd['fd_to_original']:.3f}). Highest PSNR: "
            f"{best_psnr['method']} ({best_psnr['psnr']:.2f} dB, FD {best_psnr['fd_ratio']:.3f} of the original's). "
            f"Closest to the original's distribution: {closest['method']} (FD to original "
            f"{closest['fd_to_original']:.3f}, FD {closest['fd_ratio']:.3f} of the original's).", "",
            f"The test images' feature variance (trace) is {res['test_trace']:.2f}, the original's samples' "
            f"{res['rows'][0]['fd_terms']['trace']:.2f}: the model is under-dispersed, so FD's covariance term "
            "rewards an error that widens the spread and punishes one that narrows it, whatever its distance to "
            "the original.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
