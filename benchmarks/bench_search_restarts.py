"""Does the search's own randomness explain why a pick among seeds gives better masks?

``maskc.learn``'s last phase is a first-improvement local search from a random stream, scored on 8
calibration noises, both drawn from the learning seed. search_pick.md found that learning with seeds
0, 1 and 2 and keeping the best on 32 other noises beats the stored (seed 0) mask at 10 of 15 levels,
for three learnings. Is that the search's path (its random stream), its calibration noises, or the
held-out selection? This script learns a bench level as ``maskc bench`` does, once up to the search
(phases 1 to 3 of ``maskc.learn``, replayed here from its public phase functions), then runs the
search five times from that one starting point:

- ``stream 0``: calibration noises and random stream of the learning seed, i.e. ``maskc.learn`` itself
  (checked: its bits must equal the stored mask's, or the row says so);
- ``stream 1``, ``stream 2``: the same calibration noises, another random stream;
- ``noises 1``, ``noises 2``: the calibration noises (and stream) that seeds 1 and 2 would draw: restarts 1
  and 2 of ``LearnConfig.search_restarts``, which chooses among them by other noises as the last rule here does.

Each mask is scored on ``--n-select`` selection noises (seed 998) and ``--n`` evaluation noises (seed 999,
as search_pick.md), each sample's PSNR against the original's from the same noise. The rules compared,
each against ``stream 0`` with a 95% paired-bootstrap interval over the evaluation noises: the best of
streams 0 and 1 (and 0 to 2) by the search's own calibration score, the same by the selection noises,
and the best of stream 0 and noises 1 (and 2) by the selection noises. Scores use the search's own
statistic (PSNR saturating at 50 dB); margins are in plain PSNR, the tables' statistic, and saturating.

Jobs are bench levels (``TABLE:TARGET``), split by ``--shard K/N``; each job's result is kept under
``results/search_restarts/`` so a stopped run resumes; ``--report`` writes ``results/search_restarts.md``
and ``.json`` from the done jobs.

Usage: python benchmarks/bench_search_restarts.py --jobs bench_dit_dpmpp10:0.5 bench_unet_ddim20:0.5 --shard 0/2
       python benchmarks/bench_search_restarts.py --report
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Callable

import torch

import maskc
from maskc.bench import SAMPLERS, bench_model, code_version
from maskc.eval import bootstrap_counts, interval
from maskc.learn import (LearnConfig, Problem, _conditioning, _slice1, _timestep_kw, calibration_seed,
                         learned_rows, noise_rollout, optimize_steps, project_budget, reference_trajectory)
from maskc.refine import refine
from maskc.rollout import MSE_FLOOR, GenerationCost, Rollout
from maskc.schedules import peer_library

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PARTS = os.path.join(RESULTS, "search_restarts")
sys.path.insert(0, HERE)
from bench_relearn import eval_cost, fresh_mse, jobs, stored_mask, write_part  # noqa: E402
from bench_search_score import plain_psnr  # noqa: E402

VARIANTS = [("stream 0", 0, 0), ("stream 1", 0, 1), ("stream 2", 0, 2), ("noises 1", 1, 1), ("noises 2", 2, 2)]
# (label, calibration-noise seed offset, random-stream seed offset) from the learning seed
RULES = [  # (label, candidates, chosen by)
    ("best of streams 0, 1 by calibration", ["stream 0", "stream 1"], "calibration"),
    ("best of streams 0-2 by calibration", ["stream 0", "stream 1", "stream 2"], "calibration"),
    ("best of streams 0, 1 by selection", ["stream 0", "stream 1"], "selection"),
    ("best of streams 0-2 by selection", ["stream 0", "stream 1", "stream 2"], "selection"),
    ("best of stream 0, noises 1 by selection", ["stream 0", "noises 1"], "selection"),
    ("best of stream 0, noises 1-2 by selection", ["stream 0", "noises 1", "noises 2"], "selection"),
]


def prepare(j: dict) -> dict:
    """``maskc.learn`` of job j as ``BenchModel.learn`` calls it, up to the search: phases 1 to 3 (what
    ``maskc.learn._learn`` runs before ``refine_trajectory``), with everything the search needs."""
    bm = bench_model(j["model"], j["guidance_scale"])
    model = bm.model.eval()
    model.requires_grad_(False)
    cond, uncond = bm.conditioning()
    cfg = LearnConfig(**{**asdict(LearnConfig()), "target": j["target"], **j["learn_kwargs"]})
    cfg.validate()
    seed = j["seed"]
    g = torch.Generator(device="cpu").manual_seed(seed)
    call_kw, extra = _conditioning(cfg.batch, g, cond, uncond, bm.guidance)
    tkw = _timestep_kw(model)
    sched = copy.deepcopy(SAMPLERS[j["sampler"]]())
    sched.set_timesteps(j["steps"])
    timesteps = sched.timesteps
    x = torch.randn((cfg.batch, *bm.shape), generator=g)
    ex_args = (x[:1],)
    ex_kwargs = {tkw: timesteps[0].reshape(1), **{k: _slice1(v) for k, v in extra.items()}}
    names = maskc.blocks(model, example=(ex_args, ex_kwargs))
    graph = maskc.block_graph(model, *ex_args, blocks=names, **ex_kwargs)
    macs = torch.tensor([float(graph.nodes[n]["macs"]) for n in names], dtype=torch.float64)
    prob = Problem(model, sched, timesteps, names, graph, macs, float(graph.graph["total_macs"]), tkw,
                   bm.guidance, ex_args, ex_kwargs)
    traj = reference_trajectory(prob, x, call_kw, cfg.loss_scaling, g)
    scores = optimize_steps(prob, traj, cfg, call_kw, seed, None, False)
    cost = GenerationCost(model, names, graph, ex_args, ex_kwargs)
    bits, frac = project_budget(prob, scores, traj.weights, cost, cfg.target, cfg.cache == "masked", cfg.rectify)
    return {"bm": bm, "cfg": cfg, "prob": prob, "traj": traj, "scores": scores, "cost": cost, "bits": bits,
            "frac": frac, "cond": cond, "uncond": uncond}


def search(p: dict, noise_seed: int, stream_seed: int, n: int | None = None, hi: float | None = None,
           wrap: Callable[[Rollout], Rollout] | None = None) -> tuple[torch.Tensor, float, float, str]:
    """(bits, calibration score, seconds, the seed it started from) of the search from p's projected mask, as
    ``maskc.learn.refine_trajectory`` runs it on one process, with its calibration noises drawn from
    ``calibration_seed(noise_seed)`` and its random stream from ``stream_seed`` (``refine_trajectory``'s
    restart r: both the learning seed + r). Other experiments: ``n`` calibration noises instead of
    ``search_batch``; ``hi`` a hard upper MACs bound (the window never widens past it); ``wrap`` a
    rollout with another search score (bench_fd_penalty.py)."""
    prob, cfg, traj, cost = p["prob"], p["cfg"], p["traj"], p["cost"]
    t0 = time.perf_counter()
    peers = peer_library(prob.names, prob.T, delta=traj.delta.tolist())
    lo, up = cfg.target - cfg.below, cfg.target + cfg.above if hi is None else hi
    for widen in (False, True):
        if widen:  # as maskc.learn: coarse masks widen the window to the projection's MACs
            lo, up = min(lo, p["frac"]), max(up, p["frac"]) if hi is None else up
        rollout = noise_rollout(prob, traj.xs[0].shape[1:], n or cfg.search_batch, calibration_seed(noise_seed),
                                p["cond"], p["uncond"], noise_seed)
        res = refine(rollout if wrap is None else wrap(rollout), cost, [("learned (phase 3)", p["bits"])], peers,
                     lo, up, priority=traj.delta.tolist(), step_rows=learned_rows(p["scores"]),
                     evaluations=cfg.search_evals, seed=stream_seed, score=cfg.search_score)
        if res is not None:
            return res.bits, res.psnr, time.perf_counter() - t0, res.seed
    raise SystemExit("no seed of the search fits the budget window")


def saturating(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1 / (mse + MSE_FLOOR))


def run_job(j: dict, n: int, n_select: int, rev: str | None) -> dict:
    t0 = time.perf_counter()
    p = prepare(j)
    phases_s = time.perf_counter() - t0
    masks, calib, secs = {}, {}, {}
    for label, dn, ds in VARIANTS:
        masks[label], calib[label], secs[label], _ = search(p, j["seed"] + dn, j["seed"] + ds)
        print(f"  {label}: calibration {calib[label]:.2f} dB, {secs[label]:.0f} s", flush=True)
    stored = stored_mask(j, rev)
    reproduces = stored.names == p["prob"].names and bool(torch.equal(stored.bits, masks["stream 0"]))
    ev = fresh_mse(p["bm"], p["prob"].scheduler, p["cost"], masks, n, 999)
    sel = fresh_mse(p["bm"], p["prob"].scheduler, p["cost"], masks, n_select, 998)
    on_sel = {k: float(saturating(v).mean()) for k, v in sel.items()}
    counts = bootstrap_counts(n, 1000, 0)
    base_plain, base_sat = plain_psnr(ev["stream 0"]), saturating(ev["stream 0"])

    def margins(k: str) -> dict:
        dp, ds = plain_psnr(ev[k]) - base_plain, saturating(ev[k]) - base_sat
        return {"over_stream0": float(dp.mean()), "over_stream0_ci": interval(counts @ dp / n),
                "over_stream0_saturating": float(ds.mean()), "over_stream0_saturating_ci": interval(counts @ ds / n)}

    variants = [{"label": k, "macs": p["cost"].fraction(p["cost"].rectify(b)), "calibration": calib[k],
                 "selection": on_sel[k], "psnr": float(plain_psnr(ev[k]).mean()),
                 "saturating": float(saturating(ev[k]).mean()), "search_s": secs[k],
                 "differing_bits": int((b != masks["stream 0"]).sum()), **margins(k)} for k, b in masks.items()]
    rules = []
    for label, cands, by in RULES:
        chosen = max(cands, key=lambda k: calib[k] if by == "calibration" else on_sel[k])
        rules.append({"rule": label, "chosen": chosen, **margins(chosen),
                      "search_s": sum(secs[k] for k in cands)})
    return {**{k: j[k] for k in ("table", "model", "sampler", "steps", "seed", "target", "learn_kwargs")},
            "code": code_version(), "reproduces_stored": reproduces, "rev": rev, "n": n, "n_select": n_select,
            "phases_s": phases_s, "variants": variants, "rules": rules,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def check_learn(j: dict, restarts: int, n: int, rev: str | None) -> dict:
    """``maskc.learn`` itself with ``search_restarts=restarts``, as ``maskc bench`` learns the level otherwise, against
    the stored mask on the n evaluation noises (seed 999): what a user gets from ``--search-restarts``."""
    t0 = time.perf_counter()
    bm = bench_model(j["model"], j["guidance_scale"])
    mask = bm.learn(j["sampler"], j["steps"], j["target"], j["seed"], **{**j["learn_kwargs"],
                                                                          "search_restarts": restarts})
    secs = time.perf_counter() - t0
    # Kept with the key maskc bench gives its masks, so copied into results/masks/ the table's command reuses it.
    mask.meta["provenance"].update({"learning_seconds": secs, "bench_key": {
        "target": j["target"], "steps": j["steps"], "seed": j["seed"], "guidance_scale": bm.guidance,
        **j["learn_kwargs"], "code": code_version()}})
    os.makedirs(os.path.join(PARTS, "masks"), exist_ok=True)
    mask.save(os.path.join(PARTS, "masks", f"{j['table']}_learned_{j['target']:g}.json"))
    stored = stored_mask(j, rev)
    sched = SAMPLERS[j["sampler"]]()
    sched.set_timesteps(j["steps"])
    ev = fresh_mse(bm, sched, eval_cost(bm, sched, mask.names), {"stored": stored.bits, "restarts": mask.bits}, n,
                   999)
    d = plain_psnr(ev["restarts"]) - plain_psnr(ev["stored"])
    search = mask.meta["provenance"]["search"]
    return {**{k: j[k] for k in ("table", "model", "sampler", "steps", "seed", "target")}, "code": code_version(),
            "restarts": restarts, "learning_s": secs, "kept_restart": search["kept_restart"],
            "per_restart": search["restarts"], "macs": mask.meta["provenance"]["macs_fraction"], "n": n,
            "psnr_stored": float(plain_psnr(ev["stored"]).mean()), "psnr": float(plain_psnr(ev["restarts"]).mean()),
            "over_stored": float(d.mean()), "over_stored_ci": interval(bootstrap_counts(n, 1000, 0) @ d / n),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def part_path(spec: str) -> str:
    table, target = spec.split(":")
    return os.path.join(PARTS, f"{table}_{float(target):g}.json")


def report() -> None:
    files = sorted(f for f in os.listdir(PARTS) if f.endswith(".json"))
    done = [json.load(open(os.path.join(PARTS, f))) for f in files if not f.startswith("learn_")]
    learned = [json.load(open(os.path.join(PARTS, f))) for f in files if f.startswith("learn_")]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": 1, "torch": torch.__version__,
            "codes": sorted({d["code"] for d in done})}
    with open(os.path.join(RESULTS, "search_restarts.json"), "w") as f:
        json.dump({"meta": meta, "jobs": done, "learn_checks": learned}, f, indent=1)
    fmt = lambda v, ci: f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"  # noqa: E731

    def verdict(v: float, ci: list[float]) -> str:
        return "gain" if ci[0] > 0 else "loss" if ci[1] < 0 else "none"

    n_ev = sorted({d["n"] for d in done})
    n_sel = sorted({d["n_select"] for d in done})
    lines = [
        "# The search's random stream, its calibration noises, or the held-out pick?",
        "",
        f"Made by `python benchmarks/bench_search_restarts.py` (module docstring): {meta['machine']}, one thread per "
        f"process, torch {meta['torch']}, code version {', '.join(meta['codes'])}. Each job is a bench level, learned "
        "as `maskc bench` learns it up to the search, then searched five times from that one starting point "
        "(stream k: the learning seed's calibration noises with random stream seed + k; noises k: the calibration "
        f"noises and stream of seed + k). Evaluation: {', '.join(map(str, n_ev))} noises (seed 999); selection: "
        f"{', '.join(map(str, n_sel))} noises (seed 998). Margins: mean plain PSNR of the final samples against "
        "the original's minus stream 0's (the stored mask), with 95% paired-bootstrap intervals (1000 resamples, "
        "seed 0). Search time: the searches a rule runs, one thread.",
        "",
        "| rule | gain | no difference | loss | mean margin dB | mean margin, saturating dB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, _, _ in RULES:
        rs = [next(r for r in d["rules"] if r["rule"] == label) for d in done]
        v = [verdict(r["over_stream0"], r["over_stream0_ci"]) for r in rs]
        mean = sum(r["over_stream0"] for r in rs) / max(1, len(rs))
        mean_s = sum(r["over_stream0_saturating"] for r in rs) / max(1, len(rs))
        lines.append(f"| {label} | {v.count('gain')} | {v.count('none')} | {v.count('loss')} | {mean:+.2f} | "
                     f"{mean_s:+.2f} |")
    lines += ["", f"{len(done)} jobs. Single variants against stream 0:", "",
              "| variant | gain | no difference | loss | mean margin dB |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, _, _ in VARIANTS[1:]:
        vs = [next(v for v in d["variants"] if v["label"] == label) for d in done]
        vv = [verdict(v["over_stream0"], v["over_stream0_ci"]) for v in vs]
        lines.append(f"| {label} | {vv.count('gain')} | {vv.count('none')} | {vv.count('loss')} | "
                     f"{sum(v['over_stream0'] for v in vs) / max(1, len(vs)):+.2f} |")
    if learned:
        lines += ["", "`maskc.learn(..., search_restarts=R)` itself (`--check-learn TABLE:TARGET --restarts R`), every "
                  "other setting as the bench learns the level, against the stored mask on the same evaluation noises; "
                  "learning time of the one-thread process, beside the other jobs:", "",
                  "| level | code | R | kept restart | selection dB per restart | MACs | PSNR dB | stored PSNR dB | "
                  "over stored | learning s |", "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for c in learned:
            sel = ", ".join(f"{r['selection_score']:.2f}" for r in c["per_restart"])
            lines.append(f"| {c['table']} {c['target']:g} | {c['code']} | {c['restarts']} | {c['kept_restart']} | "
                         f"{sel} | {c['macs']:.3f} | {c['psnr']:.2f} | {c['psnr_stored']:.2f} | "
                         f"{fmt(c['over_stored'], c['over_stored_ci'])} | {c['learning_s']:.0f} |")
    for d in done:
        lines += ["", f"## {d['table']}, level {d['target']:g} ({d['sampler']} {d['steps']})", "",
                  f"Stream 0 reproduces the stored mask: {'yes' if d['reproduces_stored'] else 'NO'} "
                  f"(stored mask read {'at git ' + d['rev'] if d['rev'] else 'from its file'}). Phases 1-3: "
                  f"{d['phases_s']:.0f} s; {d['date']}.", "",
                  "| variant | MACs | bits unlike stream 0 | calibration dB | selection dB | PSNR dB | over stream 0 | "
                  "over stream 0, saturating | search s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for v in d["variants"]:
            lines.append(f"| {v['label']} | {v['macs']:.3f} | {v['differing_bits']} | {v['calibration']:.2f} | "
                         f"{v['selection']:.2f} | {v['psnr']:.2f} | {fmt(v['over_stream0'], v['over_stream0_ci'])} | "
                         f"{fmt(v['over_stream0_saturating'], v['over_stream0_saturating_ci'])} | "
                         f"{v['search_s']:.0f} |")
        lines += ["", "| rule | chosen | over stream 0 | search s |", "| --- | --- | ---: | ---: |"]
        for r in d["rules"]:
            lines.append(f"| {r['rule']} | {r['chosen']} | {fmt(r['over_stream0'], r['over_stream0_ci'])} | "
                         f"{r['search_s']:.0f} |")
    with open(os.path.join(RESULTS, "search_restarts.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", nargs="*", default=[], help="TABLE:TARGET bench levels")
    ap.add_argument("--shard", default="0/1", help="K/N: this process runs jobs i with i %% N == K")
    ap.add_argument("--n", type=int, default=128, help="evaluation noises (seed 999)")
    ap.add_argument("--n-select", type=int, default=32, help="selection noises (seed 998)")
    ap.add_argument("--rev", default="HEAD", help="read the stored masks as committed at this git revision "
                    "('' for the files)")
    ap.add_argument("--report", action="store_true", help="only write search_restarts.md and .json")
    ap.add_argument("--check-learn", default=None, help="TABLE:TARGET: maskc.learn with --restarts restarts against "
                    "the stored mask, kept in results/search_restarts/learn_<table>_<target>.json")
    ap.add_argument("--restarts", type=int, default=3)
    a = ap.parse_args()
    if a.report:
        report()
        return
    torch.set_num_threads(1)
    os.makedirs(PARTS, exist_ok=True)
    if a.check_learn:
        table, target = a.check_learn.split(":")
        j = next(j for j in jobs([table]) if j["target"] == float(target))
        r = check_learn(j, a.restarts, a.n, a.rev or None)
        write_part(os.path.join(PARTS, f"learn_{table}_{float(target):g}.json"), r)
        print(f"{a.check_learn}: restarts {a.restarts}, kept {r['kept_restart']}, {r['learning_s']:.0f} s, "
              f"{r['over_stored']:+.2f} {r['over_stored_ci']} over the stored mask", flush=True)
        return
    k, n = (int(x) for x in a.shard.split("/"))
    for i, spec in enumerate(a.jobs):
        if i % n != k or os.path.exists(part_path(spec)):
            continue
        table, target = spec.split(":")
        j = next(j for j in jobs([table]) if j["target"] == float(target))
        print(f"{spec} ...", flush=True)
        r = run_job(j, a.n, a.n_select, a.rev or None)
        write_part(part_path(spec), r)
        print(f"  reproduces stored: {r['reproduces_stored']}; " +
              "; ".join(f"{x['rule']}: {x['over_stream0']:+.2f}" for x in r["rules"]), flush=True)


if __name__ == "__main__":
    main()
