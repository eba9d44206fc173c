"""Does the trajectory search choose better with more calibration noises or more evaluations?

The search scores candidate masks on ``search_batch`` = 8 noises and stops after
``search_evals`` = 150 masks. Where the bench tables miss the +0.5 dB goal over the best
peer, this script relearns the level with larger settings (every other setting as the
bench learns it: its model, sampler, steps, seed, guidance and budget) and scores the
stored default mask, each relearned mask and every peer the bench kept at that level on
noises neither learning nor the tables use (seed 999, ``--n``, labels i % 10, guidance
as in the bench). Each sample's PSNR is against the original's from the same noise;
margins carry 95% paired-bootstrap intervals over those noises.

Usage: python benchmarks/bench_search_batch.py [--cases unet_ddim20:0.5 dit_dpmpp10:0.5]
           [--settings 16,150 32,150 8,300] [--n 64] [--threads 1]
       python benchmarks/bench_search_batch.py --render   (search_batch.md again from search_batch.json)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

import maskc
from maskc.bench import code_version
from maskc.eval import bootstrap_counts, interval, psnr_per_sample
from maskc.rollout import Rollout

from bench_monotone import generation_cost, table_context  # noqa: E402  (benchmarks/ is the script's folder, first on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))


def _interval(diff: torch.Tensor, resamples: int = 1000) -> list[float]:
    """95% paired-bootstrap interval of the mean of ``diff`` (one entry per noise), as the bench draws them."""
    return interval(bootstrap_counts(len(diff), resamples) @ diff.double() / len(diff))


def relearn(ctx: dict, cfg: dict, target: float, **kw) -> maskc.Mask:
    """``maskc.learn`` at ``target`` as the bench of ``cfg`` learns it (``ctx = table_context(cfg, ...)``), with
    ``kw`` overriding its seed or learning settings."""
    kw = {"seed": cfg["seed"], **cfg.get("learn_kwargs", {}), **kw}
    return ctx["bench_model"].learn(cfg["sampler"], cfg["steps"], target, **kw)


def stored_level(res: dict, target: float, results: str) -> tuple[maskc.Mask, dict[str, torch.Tensor]]:
    """The bench's learned mask at ``target`` (refused unless today's code learned it) and the bits of every
    peer the bench kept at that level, by method."""
    learned_row = next(r for r in res["rows"] if r["family"] == "maskc" and r["target"] == target)
    stored = maskc.Mask.load(os.path.join(results, learned_row["mask_file"]))
    key = stored.meta["provenance"].get("bench_key", {})
    if key.get("code") != code_version():
        raise SystemExit(f"{learned_row['mask_file']} was learned by code {key.get('code')}, not today's "
                         f"{code_version()}: rerun the bench first")
    peers = {r["method"]: maskc.Mask.load(os.path.join(results, r["mask_file"])).bits
             for r in res["rows"] if target in (r.get("best_for") or [])}
    return stored, peers


def run_meta(threads: int) -> dict:
    """Where and with what a run was made (its JSON's meta)."""
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": threads,
            "torch": torch.__version__, "code_version": code_version()}


def check_case(stem: str, target: float, settings: list[tuple[int, int]], results: str, n: int,
               log=print) -> dict:
    """The stored mask, the masks relearned under ``settings`` and the bench's peers at ``target``, scored on n noises."""
    res = json.load(open(os.path.join(results, f"bench_{stem}.json")))
    cfg = res["config"]
    ctx = table_context(cfg, n, 999)
    model, guidance = ctx["model"], ctx["guidance"]
    T = cfg["steps"]

    stored, peers = stored_level(res, target, results)
    learned_with = stored.meta["provenance"]["config"]
    base_label = f"stored (search_batch {learned_with['search_batch']}, search_evals {learned_with['search_evals']})"
    masks = {base_label: stored.bits}
    seconds = {base_label: stored.meta["provenance"].get("learning_seconds")}
    same: dict[str, bool] = {}  # relearned bits equal to the stored mask's (with the stored settings: a control)
    for sb, ev in settings:
        label = f"relearned (search_batch {sb}, search_evals {ev})"
        t0 = time.perf_counter()
        m = relearn(ctx, cfg, target, search_batch=sb, search_evals=ev)
        seconds[label] = time.perf_counter() - t0
        masks[label] = m.bits
        same[label] = bool(torch.equal(m.bits, stored.bits))
        log(f"bench_{stem} {target:g}: {label} in {seconds[label]:.0f} s")

    sched, noise, call_kw = (ctx[k] for k in ("sched", "noise", "call_kw"))
    names = list(stored.names)
    cost = generation_cost(ctx, names)
    roll = Rollout(model, names, sched, noise, call_kw, guidance, "timestep")

    scored = {k: (psnr_per_sample(roll.final(cost.rectify(b)), roll.reference), cost.fraction(b))
              for k, b in {**masks, **peers}.items()}
    best_peer = max(peers, key=lambda k: float(scored[k][0].mean()))
    base = scored[base_label][0]
    rows = []
    for k, (p, f) in scored.items():
        rows.append({"method": k, "kind": "learned" if k in masks else "peer", "macs": f, "psnr": float(p.mean()),
                     "learning_s": seconds.get(k), "same_bits_as_stored": same.get(k),
                     "over_stored": None if k not in masks or p is base else float((p - base).mean()),
                     "over_stored_ci": None if k not in masks or p is base else _interval(p - base),
                     "over_best_peer": float((p - scored[best_peer][0]).mean()) if k in masks else None,
                     "over_best_peer_ci": _interval(p - scored[best_peer][0]) if k in masks else None})
    return {"table": f"bench_{stem}", "model": cfg["model"], "sampler": f"{cfg['sampler']} {T}", "target": target,
            "best_peer": best_peer, "rows": rows}


def render(meta: dict, cases: list[dict]) -> str:
    """search_batch.md from the JSON's cases."""
    lines = [
        "# The trajectory search with more calibration noises or more evaluations",
        "",
        f"Made by `python benchmarks/bench_search_batch.py` (each case's command below), last on {meta['date']}: "
        f"{meta['machine']}, {meta['threads']} thread(s), torch {meta['torch']}, code version "
        f"{meta['code_version']}. Each case is a bench "
        "table's level. Stored: the bench's learned mask (default settings, search_batch 8 and search_evals 150). "
        "Relearned: `maskc.learn` with every other setting as the bench learns it. Peers: every family's best "
        f"member that the bench kept at this level. PSNR: mean over {meta['n']} noises that neither learning nor "
        "the tables use (seed 999), each sample against the original's from the same noise; margins with 95% "
        "paired-bootstrap intervals over those noises.",
        "",
    ]
    fmt = lambda v, ci: "-" if v is None else f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"  # noqa: E731
    for case in cases:
        lines += [f"## {case['table']}, level {case['target']:g} ({case['sampler']})", "",
                  "Made by " + "; ".join(f"`{c['command']}` ({c['seconds']:.0f} s)" for c in case["commands"])
                  + f". Best peer on these noises: {case['best_peer']}.", "",
                  "| method | MACs | PSNR dB | over stored | over best peer | learning s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(case["rows"], key=lambda r: (r["kind"] != "learned", -r["psnr"])):
            ls = "-" if r["learning_s"] is None else f"{r['learning_s']:.0f}"
            name = r["method"] + (" (the stored mask's bits)" if r.get("same_bits_as_stored") else "")
            lines.append(f"| {name} | {r['macs']:.3f} | {r['psnr']:.2f} | "
                         f"{fmt(r['over_stored'], r['over_stored_ci'])} | "
                         f"{fmt(r['over_best_peer'], r['over_best_peer_ci'])} | {ls} |")
        lines.append("")
    return "\n".join(lines)


def case_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a script that relearns bench levels (``--cases stem:level``) and scores them on held-out noises."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=["unet_ddim20:0.5", "dit_dpmpp10:0.5"],
                    help="bench table stem and level, e.g. unet_ddim20:0.5")
    ap.add_argument("--n", type=int, default=128, help="held-out noises (seed 999) that score every mask")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where the bench tables are")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--render", action="store_true", help="only write the markdown again from the JSON")
    return ap


def main() -> None:
    ap = case_parser(__doc__)
    ap.add_argument("--settings", nargs="*", default=["16,150", "32,150", "8,300"],
                    help="search_batch,search_evals pairs to relearn with")
    args = ap.parse_args()
    path = os.path.join(args.out, "search_batch.json")
    if args.render:
        data = json.load(open(path))
    else:
        torch.set_num_threads(args.threads)
        t0 = time.time()
        settings = [tuple(int(v) for v in s.split(",")) for s in args.settings]
        cmd = "python benchmarks/bench_search_batch.py --cases " + " ".join(args.cases) + " --settings " + \
            " ".join(args.settings) + f" --n {args.n} --threads {args.threads}"
        data = {"meta": {}, "cases": []}
        for spec in args.cases:  # each case is stored as it finishes, its rows merged into a stored case's
            stem, lvl = spec.split(":")
            case = check_case(stem, float(lvl), settings, args.results, args.n)
            case.update(commands=[{"command": cmd, "seconds": time.time() - t0}])
            if os.path.exists(path):
                data = json.load(open(path))
            old = next((c for c in data["cases"] if (c["table"], c["target"]) == (case["table"], case["target"])), None)
            if old is not None:  # same noises and stored mask, so the rows compare; this run's rows win
                if old["best_peer"] != case["best_peer"] or old.get("n", args.n) != args.n:
                    raise SystemExit(f"{spec}: the stored case was scored on other noises; remove it first")
                mine = {r["method"] for r in case["rows"]}
                case["rows"] = [r for r in old["rows"] if r["method"] not in mine] + case["rows"]
                case["commands"] = old["commands"] + case["commands"]
                data["cases"].remove(old)
            case["n"] = args.n
            data["cases"].append(case)
            data["meta"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            **run_meta(args.threads), "n": args.n}
            with open(path, "w") as f:
                json.dump(data, f, indent=1)
            t0 = time.time()
    md = render(data["meta"], data["cases"])
    with open(os.path.join(args.out, "search_batch.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
