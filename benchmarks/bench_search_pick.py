"""Does picking the best of several searches, on noises none of them saw, give better masks?

``maskc.learn`` is deterministic for its seed, and the seed draws its calibration noises and
steers its search. search_batch.md found the search's result moves by about a decibel either
way with its settings. This script measures the cheapest remedy: learn a bench level with K
seeds (every other setting as the bench learns it; the bench's own seed is the stored mask),
score each mask on ``--n-select`` selection noises (seed 998), pick the best, and score every
mask, the pick and every peer the bench kept at that level on ``--n`` evaluation noises that
neither learning, the pick nor the tables use (seed 999, as search_batch.md). Each sample's
PSNR is against the original's from the same noise; margins carry 95% paired-bootstrap
intervals over the evaluation noises. Rows "pick of the first k seeds" show what k
searches (k times the learning time) buy. Each relearned mask is kept in
``results/masks/search_pick/`` as soon as it is learned, and a later run under the same code
version, seed and learning settings reuses it, so a run stopped while scoring does not learn again.

Usage: python benchmarks/bench_search_pick.py [--cases unet_ddim20:0.5 dit_dpmpp10:0.5]
           [--seeds 1 2] [--n 128] [--n-select 32] [--threads 1]
       python benchmarks/bench_search_pick.py --render   (search_pick.md again from search_pick.json)
"""
from __future__ import annotations

import datetime
import json
import os
import time

import torch

import maskc
from maskc.bench import code_version
from maskc.eval import psnr_per_sample
from maskc.rollout import Rollout

from bench_monotone import generation_cost, table_context  # noqa: E402  (benchmarks/ is the script's folder, first on sys.path)
from bench_search_batch import _interval, case_parser, relearn, run_meta, stored_level  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def pick_key(cfg: dict, seed: int) -> dict:
    """What a kept relearned mask must match to be reused: the code, the seed and every learning setting."""
    return {"code": code_version(), "seed": seed, "sampler": cfg["sampler"], "steps": cfg["steps"],
            "learn_kwargs": cfg.get("learn_kwargs", {})}


def pick_case(stem: str, target: float, seeds: list[int], results: str, n: int, n_select: int,
              log=print) -> dict:
    """The stored mask and the masks learned with ``seeds``, picked on n_select noises, scored on n others."""
    res = json.load(open(os.path.join(results, f"bench_{stem}.json")))
    cfg = res["config"]
    stored, peers = stored_level(res, target, results)
    ev = table_context(cfg, n, 999)
    sel = table_context(cfg, n_select, 998)
    order = [cfg["seed"]] + [s for s in seeds if s != cfg["seed"]]
    masks = {cfg["seed"]: stored.bits}
    seconds = {cfg["seed"]: stored.meta["provenance"].get("learning_seconds")}
    for s in order[1:]:
        keep = os.path.join(results, "masks", "search_pick", f"bench_{stem}_{target:g}_seed{s}.json")
        kept = maskc.Mask.load(keep) if os.path.exists(keep) else None
        if kept is not None and kept.meta["provenance"].get("pick_key") == pick_key(cfg, s):
            # learned by an earlier run that stopped before scoring (same code, seed and learning settings)
            masks[s], seconds[s] = kept.bits, kept.meta["provenance"]["learning_seconds"]
            log(f"bench_{stem} {target:g}: seed {s} reused from {keep}")
            continue
        t0 = time.perf_counter()
        learned = relearn(ev, cfg, target, seed=s)
        seconds[s] = time.perf_counter() - t0
        masks[s] = learned.bits
        learned.meta.setdefault("provenance", {}).update(pick_key=pick_key(cfg, s), learning_seconds=seconds[s])
        os.makedirs(os.path.dirname(keep), exist_ok=True)
        learned.save(keep)
        log(f"bench_{stem} {target:g}: seed {s} in {seconds[s]:.0f} s")

    names = list(stored.names)
    model = ev["model"]
    cost = generation_cost(ev, names)

    def scores(ctx: dict, bits: dict) -> dict:
        roll = Rollout(model, names, ctx["sched"], ctx["noise"], ctx["call_kw"], ctx["guidance"], "timestep")
        return {k: psnr_per_sample(roll.final(cost.rectify(b)), roll.reference) for k, b in bits.items()}

    on_sel = {s: float(p.mean()) for s, p in scores(sel, masks).items()}
    on_ev = scores(ev, {**{f"seed {s}": b for s, b in masks.items()}, **peers})
    best_peer = max(peers, key=lambda k: float(on_ev[k].mean()))
    base = on_ev[f"seed {cfg['seed']}"]

    def row(method: str, kind: str, p: torch.Tensor, bits: torch.Tensor, **extra) -> dict:
        learned = kind != "peer"
        return {"method": method, "kind": kind, "macs": cost.fraction(bits), "psnr": float(p.mean()), **extra,
                "over_stored": float((p - base).mean()) if learned else None,
                "over_stored_ci": _interval(p - base) if learned else None,
                "over_best_peer": float((p - on_ev[best_peer]).mean()) if learned else None,
                "over_best_peer_ci": _interval(p - on_ev[best_peer]) if learned else None}

    rows = [row(f"seed {s}" + (" (stored)" if s == cfg["seed"] else ""), "seed", on_ev[f"seed {s}"], masks[s],
                psnr_select=on_sel[s], learning_s=seconds[s]) for s in order]
    for k in range(2, len(order) + 1):
        s = max(order[:k], key=lambda s: on_sel[s])
        rows.append(row(f"pick of the first {k} seeds (seed {s})", "pick", on_ev[f"seed {s}"], masks[s],
                        picked=s, learning_s=sum(seconds[t] or 0.0 for t in order[:k])))
    rows += [row(k, "peer", on_ev[k], b) for k, b in peers.items()]
    return {"table": f"bench_{stem}", "model": cfg["model"], "sampler": f"{cfg['sampler']} {cfg['steps']}",
            "target": target, "best_peer": best_peer, "seeds": order, "rows": rows}


def _took(case: dict) -> str:
    if case.get("seconds") is not None:
        return f"{case['seconds']:.0f} s for this case"
    return f"not timed per case: {case['run_seconds']:.0f} s for the run's {case['run_cases']} cases"


def render(meta: dict, cases: list[dict]) -> str:
    """search_pick.md from the JSON's cases."""
    lines = [
        "# The best of several searches, picked on noises none of them saw",
        "",
        f"Made by `python benchmarks/bench_search_pick.py` (each case's command below): {meta['machine']}, "
        f"{meta['threads']} thread(s), torch {meta['torch']}, code version {meta['code_version']}. Each case is a "
        "bench table's level. Seed rows: `maskc.learn` with that seed and every other setting as the bench learns "
        "it (the bench's seed is its stored mask). Picks: of the first k seeds, the mask with the highest mean PSNR "
        "on the selection noises (seed 998, `--n-select`); its learning time is the k searches'. Peers: every "
        "family's best member that the bench kept at this level. PSNR: mean over the evaluation noises (seed 999, "
        "`--n`) that neither learning, the pick nor the tables use, each sample against the original's from "
        "the same noise; margins with 95% paired-bootstrap intervals over those noises.",
        "",
        "| case | best peer | stored over best peer | pick of 2 over stored | pick of all over stored | picked seed "
        "| pick of all over best peer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    fmt = lambda v, ci: "-" if v is None else f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"  # noqa: E731
    for case in cases:
        picks = [r for r in case["rows"] if r["kind"] == "pick"]
        stored = case["rows"][0]
        lines.append(f"| {case['table']} {case['target']:g} | {case['best_peer']} | "
                     f"{fmt(stored['over_best_peer'], stored['over_best_peer_ci'])} | "
                     f"{fmt(picks[0]['over_stored'], picks[0]['over_stored_ci'])} | "
                     f"{fmt(picks[-1]['over_stored'], picks[-1]['over_stored_ci'])} | {picks[-1]['picked']} | "
                     f"{fmt(picks[-1]['over_best_peer'], picks[-1]['over_best_peer_ci'])} |")
    lines.append("")
    for case in cases:
        lines += [f"## {case['table']}, level {case['target']:g} ({case['sampler']})", "",
                  f"`{case['command']}` ({_took(case)}, {case['date']}); "
                  f"{case['n_select']} selection and {case['n']} evaluation noises.", "",
                  "| method | MACs | PSNR dB (selection) | PSNR dB | over stored | over best peer | learning s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in case["rows"]:
            ls = "-" if r.get("learning_s") is None else f"{r['learning_s']:.0f}"
            ps = "-" if r.get("psnr_select") is None else f"{r['psnr_select']:.2f}"
            lines.append(f"| {r['method']} | {r['macs']:.3f} | {ps} | {r['psnr']:.2f} | "
                         f"{fmt(r['over_stored'], r['over_stored_ci'])} | "
                         f"{fmt(r['over_best_peer'], r['over_best_peer_ci'])} | {ls} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = case_parser(__doc__)
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2], help="seeds besides the bench's")
    ap.add_argument("--n-select", type=int, default=32, help="selection noises (seed 998) that pick the mask")
    args = ap.parse_args()
    path = os.path.join(args.out, "search_pick.json")
    if args.render:
        data = json.load(open(path))
    else:
        torch.set_num_threads(args.threads)
        t0 = time.time()
        cmd = (f"python benchmarks/bench_search_pick.py --cases {' '.join(args.cases)} --seeds "
               f"{' '.join(map(str, args.seeds))} --n {args.n} --n-select {args.n_select} --threads {args.threads}")
        data = json.load(open(path)) if os.path.exists(path) else {"meta": {}, "cases": []}
        for spec in args.cases:  # stored as each case finishes, replacing a stored case of the same level
            stem, lvl = spec.split(":")
            case = pick_case(stem, float(lvl), args.seeds, args.results, args.n, args.n_select)
            case.update(command=cmd, seconds=time.time() - t0, n=args.n, n_select=args.n_select,
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            data["cases"] = [c for c in data["cases"] if (c["table"], c["target"]) != (case["table"], case["target"])]
            data["cases"].append(case)
            data["meta"] = run_meta(args.threads)
            with open(path, "w") as f:
                json.dump(data, f, indent=1)
            t0 = time.time()
    md = render(data["meta"], data["cases"])
    with open(os.path.join(args.out, "search_pick.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
