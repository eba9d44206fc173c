"""Do the bench tables' learned masks still come out of today's code?

Every learned row of a ``maskc bench`` table names its mask file (``results/masks/<table>_learned_<t>.json``)
and the code version that learned it. For each such mask, this script learns it again exactly as
``maskc bench`` learns a level (``maskc.bench.BenchModel.learn``: same model, sampler, steps, target, seed,
guidance and settings; one thread, as the tables were made) and compares the bits. Where they differ,
it learns once more with ``search_score="psnr"`` (the search's objective before 1fb066369f07) to see
whether that objective gives the stored bits back (then the change of score is the cause), and both
masks are scored on ``--n`` fresh noises (seed ``--noise-seed``, which neither learning nor the tables
use) by the statistics of ``bench_search_score.py`` (mean plain PSNR of the final samples against the
original's, mean PSNR saturating at 50 dB, pooled-MSE PSNR, bit-identical count), with the new-minus-stored
margin and its 95% paired-bootstrap interval (1000 resamples, seed 0), and on the search's own 8
calibration noises by the search's score (did it miss a mask its own score prefers?). Generations by
``maskc.rollout.Rollout``, bit for bit the runtime's.

Jobs are split between ``--shard K/N`` processes by stored learning time (the same split in every
process); each job's result is kept under ``results/relearn/`` so an interrupted run resumes, and
``--report`` writes ``results/relearn.md`` and ``.json`` from whatever jobs are done.

Usage: python benchmarks/bench_relearn.py --tables bench_unet_dpmpp10 bench_dit_ddim20 --shard 0/2
       python benchmarks/bench_relearn.py --report
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import maskc
from maskc.bench import bench_model, code_version
from maskc.eval import bootstrap_counts, interval
from maskc.learn import LearnConfig, _conditioning, _slice1, _take, _timestep_kw, calibration_seed
from maskc.rollout import GenerationCost, Rollout

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PARTS = os.path.join(RESULTS, "relearn")
sys.path.insert(0, HERE)
from bench_learn import scheduler  # noqa: E402
from bench_search_score import plain_psnr, statistics  # noqa: E402

TABLES = ["bench_unet_dpmpp10", "bench_dit_dpmpp10", "bench_sd_dpmpp10", "bench_unet_ddim20", "bench_dit_ddim20",
          "bench_sd_ddim20", "bench_unet_ddim50", "bench_dit_ddim50", "bench_sd_ddim50"]


def jobs(tables: list[str]) -> list[dict]:
    """One job per learned row of each table (ablations excluded), with what ``maskc bench`` learned it from."""
    out = []
    for t in tables:
        with open(os.path.join(RESULTS, t + ".json")) as f:
            res = json.load(f)
        cfg = res["config"]
        for r in res["rows"]:
            if r["family"] != "maskc":
                continue
            target = float(r["method"].rsplit(" ", 1)[1])
            out.append({"table": t, "model": cfg["model"], "sampler": cfg["sampler"], "steps": cfg["steps"],
                        "seed": cfg["seed"], "guidance_scale": cfg["guidance_scale"],
                        "learn_kwargs": cfg["learn_kwargs"],
                        "target": target, "stored_seconds": r["learning_s"], "table_code": res["code_version"],
                        "mask": os.path.join(RESULTS, "masks", f"{t}_learned_{target:g}.json")})
    return out


def split(js: list[dict], k: int, n: int) -> list[dict]:
    """Shard k of n: longest stored learning time first, each job to the least loaded shard; run in table order."""
    load = [0.0] * n
    mine = []
    for j in sorted(js, key=lambda j: (-j["stored_seconds"], j["table"], j["target"])):
        s = load.index(min(load))
        load[s] += j["stored_seconds"]
        if s == k:
            mine.append(j)
    return sorted(mine, key=lambda j: (TABLES.index(j["table"]), -j["target"]))


def part_path(j: dict) -> str:
    return os.path.join(PARTS, f"{j['table']}_{j['target']:g}.json")


def write_part(path: str, r: dict) -> None:
    """A finished job's JSON, written whole or not at all (a killed job leaves no part to trust)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(r, f, indent=1)
    os.replace(tmp, path)


def stored_mask(j: dict, rev: str | None) -> maskc.Mask:
    """j's stored mask: the file, or as committed at git revision ``rev`` (a bench run rewrites the file)."""
    if rev is None:
        return maskc.Mask.load(j["mask"])
    text = subprocess.check_output(["git", "show", f"{rev}:{os.path.relpath(j['mask'], os.path.dirname(HERE))}"],
                                   cwd=os.path.dirname(HERE))
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "mask.json"), "wb") as f:
            f.write(text)
        return maskc.Mask.load(os.path.join(d, "mask.json"))


def eval_cost(bm, sched, names: list[str]) -> GenerationCost:
    """MACs and rectification of masks over ``names`` on bench model ``bm`` (``sched`` set to its steps), traced on
    a batch-1 example of the bench's conditioning."""
    model = bm.model.eval()
    cond, uncond = bm.conditioning()
    tkw = _timestep_kw(model)
    ex = torch.zeros(1, *bm.shape)
    extra = _conditioning(1, torch.Generator().manual_seed(0), cond, uncond, bm.guidance)[1]
    ex_kwargs = {tkw: sched.timesteps[0].reshape(1), **{k: _slice1(v) for k, v in extra.items()}}
    graph = maskc.block_graph(model, ex, blocks=names, **ex_kwargs)
    return GenerationCost(model, names, graph, (ex,), ex_kwargs)


def fresh_mse(bm, sched, cost: GenerationCost, masks: dict, n: int, noise_seed: int) -> dict:
    """Per-sample MSE of each mask's final samples against the original's on n noises of ``noise_seed`` (the
    bench's conditioning drawn first), by ``Rollout`` in chunks of 32: it keeps every step's states, and 256
    samples x 50 steps at once ran out of 24 GiB."""
    model = bm.model.eval()
    cond, uncond = bm.conditioning()
    g = torch.Generator().manual_seed(noise_seed)
    call_kw, _ = _conditioning(n, g, cond, uncond, bm.guidance)
    noise = torch.randn((n, *bm.shape), generator=g)
    parts: dict = {k: [] for k in masks}
    for c in range(0, n, 32):
        idx = torch.arange(c, min(n, c + 32))
        kw = _take(call_kw, idx, n, bm.guidance is not None)
        roll = Rollout(model, cost.names, sched, noise[idx], kw, bm.guidance, _timestep_kw(model))
        for k, b in masks.items():
            parts[k].append(roll.mse(cost.rectify(b)))
        del roll
    return {k: torch.cat(v) for k, v in parts.items()}


def run_job(j: dict, n: int, noise_seed: int, rev: str | None = None) -> dict:
    """Learn j's mask again; if its bits differ from the stored mask's, score both on n fresh noises."""
    bm = bench_model(j["model"], j["guidance_scale"])
    stored = stored_mask(j, rev)
    saved = part_path(j)[:-5] + "_mask.json"
    t0 = time.perf_counter()
    if os.path.exists(saved) and maskc.Mask.load(saved).meta["provenance"].get("relearn_code") == code_version():
        new = maskc.Mask.load(saved)  # learned by an earlier try of this job that stopped while scoring
        secs = new.meta["provenance"]["relearn_seconds"]
    else:
        new = bm.learn(j["sampler"], j["steps"], j["target"], j["seed"], **j["learn_kwargs"])
        secs = time.perf_counter() - t0
        new.meta["provenance"].update({"relearn_code": code_version(), "relearn_seconds": secs})
    same = new.names == stored.names and bool(torch.equal(new.bits, stored.bits))
    out = {**j, "code": code_version(), "stored_code": stored.meta["provenance"].get("bench_key", {}).get("code"),
           "seconds": secs, "same_bits": same, "macs_new": new.meta["provenance"]["macs_fraction"],
           "macs_stored": stored.meta["provenance"]["macs_fraction"],
           "differing_bits": int((new.bits != stored.bits).sum()) if new.bits.shape == stored.bits.shape else None,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rev": rev}
    if same:
        return out
    new.save(saved)
    # Is the score the cause? The old objective must give the stored bits back.
    old = bm.learn(j["sampler"], j["steps"], j["target"], j["seed"], **{**j["learn_kwargs"], "search_score": "psnr"})
    out["psnr_score_gives_stored"] = old.names == stored.names and bool(torch.equal(old.bits, stored.bits))
    sched = scheduler(j["sampler"])
    sched.set_timesteps(j["steps"])
    model = bm.model.eval()
    cond, uncond = bm.conditioning()
    cost = eval_cost(bm, sched, stored.names)
    mses = fresh_mse(bm, sched, cost, {"stored": stored.bits, "new": new.bits}, n, noise_seed)
    for key in ("stored", "new"):
        out[key] = statistics(mses[key])
    # Both on the search's own calibration noises, drawn as maskc.learn.refine_trajectory draws them: did the
    # search miss a mask its own score prefers (the stored one), or prefer one that carries over worse?
    gc = torch.Generator().manual_seed(calibration_seed(j["seed"]))
    nc = j["learn_kwargs"].get("search_batch", LearnConfig.search_batch)
    ckw, _ = _conditioning(nc, gc, cond, uncond, bm.guidance)
    cal = Rollout(model, stored.names, sched, torch.randn((nc, *bm.shape), generator=gc), ckw, bm.guidance,
                  "timestep", seed=j["seed"])
    for key, m in (("stored", stored), ("new", new)):
        b = cost.rectify(m.bits)
        out[key].update({"calibration_score": cal.score(b), "calibration_psnr": cal.psnr(b)})
    # the draw is learning's own iff the new mask scores here what its search recorded
    out["calibration_checked"] = abs(out["new"]["calibration_score"] - new.meta["provenance"]["search"]
                                     ["calibration_psnr"]) < 1e-6
    d = plain_psnr(mses["new"]) - plain_psnr(mses["stored"])
    out.update({"n": n, "noise_seed": noise_seed, "margin": float(d.mean()),
                "margin_ci": interval(bootstrap_counts(n, 1000, 0) @ d / n)})
    return out


def report() -> None:
    done = []
    js = jobs(TABLES)
    for j in js:
        if os.path.exists(part_path(j)):
            with open(part_path(j)) as f:
                done.append(json.load(f))
    res = {"command": "python benchmarks/bench_relearn.py --report", "machine":
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "threads": 1, "rows": done}
    with open(os.path.join(RESULTS, "relearn.json"), "w") as f:
        json.dump(res, f, indent=1)
    same = sum(r["same_bits"] for r in done)
    table_now = {j["table"]: j["table_code"] for j in js}  # the code that made each table as it stands
    now = [r for r in done if r["table_code"] == table_now[r["table"]]]
    codes = sorted({r["code"] for r in done})
    lines = ["# The bench tables' learned masks, learned again by today's code", "",
             f"Made by `python benchmarks/bench_relearn.py --tables ... --shard K/2` (two one-thread processes, "
             f"beside other benchmarks, so the learning times are not comparable), single jobs (`--one`) and "
             f"`--report`; {res['machine']}; code {', '.join(codes)}; dates "
             f"{min((r['date'] for r in done), default='-')} to {max((r['date'] for r in done), default='-')}.  ",
             "Each mask learned again exactly as `maskc bench` learned it (same model, sampler, steps, target, "
             "seed 0, guidance, settings, one thread). Where the bits differ, both masks are scored on fresh "
             "noises (seed 555) by their final samples against the original's: mean plain PSNR (what the tables "
             "report), mean PSNR saturating at 50 dB, and the bit-identical count; margin: new minus stored in "
             "plain PSNR, 95% paired-bootstrap interval.", "",
             "Last column: both masks on the search's own 8 calibration noises, by the search's score (PSNR "
             "saturating at 50 dB); the new mask scores there what its search recorded in every changed row "
             f"({all(r.get('calibration_checked', True) for r in done)}).  ",
             "Read from git (`--rev`, a `maskc bench` rerun had rewritten the file): "
             + (", ".join(f"{r['table']} {r['target']:g} at {r['rev']}" for r in done if r.get("rev")) or "none")
             + ".", "",
             f"**{same} of {len(done)} masks come out bit for bit the same.**", "",
             f"Of the masks the tables hold today (the table's code is that of the table's JSON now), "
             f"{sum(r['same_bits'] for r in now)} of {len(now)}; the other {len(done) - len(now)} rows checked "
             "masks of an earlier version of their table, since made again.", "",
             "| table | target | table's code | learned again by | same bits | old score gives stored "
             "| differing bits | MACs stored | MACs new | learning s (stored / now) | plain stored | plain new "
             "| sat. stored | sat. new | identical (stored / new) | margin | 95% interval "
             "| search's score on its calibration noises (stored / new) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def cal(st: dict) -> str:
        return f"{st['calibration_score']:.2f}" if "calibration_score" in st else "-"

    for r in done:
        head = (f"| {r['table']} | {r['target']:g} | {r['table_code']} | {r['code']} "
                f"| {'yes' if r['same_bits'] else '**no**'} "
                f"| {'' if r['same_bits'] else ('yes' if r['psnr_score_gives_stored'] else 'no')} "
                f"| {r['differing_bits']} | {r['macs_stored']:.3f} | {r['macs_new']:.3f} "
                f"| {r['stored_seconds']:.0f} / {'-' if r['seconds'] is None else format(r['seconds'], '.0f')} |")
        if r["same_bits"]:
            lines.append(head + " | | | | | | | |")
        else:
            s, w = r["stored"], r["new"]
            lines.append(head + f" {s['plain']:.2f} | {w['plain']:.2f} | {s['saturating']:.2f} "
                         f"| {w['saturating']:.2f} | {s['identical']} / {w['identical']} | {r['margin']:+.2f} "
                         f"| [{r['margin_ci'][0]:+.2f}, {r['margin_ci'][1]:+.2f}] "
                         f"| {cal(s)} / {cal(w)} |")
    with open(os.path.join(RESULTS, "relearn.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tables", nargs="+", default=TABLES, choices=TABLES)
    ap.add_argument("--shard", default="0/1", help="K/N: this process's share of the jobs")
    ap.add_argument("--n", type=int, default=256, help="fresh noises that score a mask whose bits changed")
    ap.add_argument("--noise-seed", type=int, default=555)
    ap.add_argument("--rev", default=None, help="read the stored masks as committed at this git revision")
    ap.add_argument("--one", default=None, help="TABLE:TARGET: run this one job in this process")
    ap.add_argument("--report", action="store_true", help="only write relearn.md and .json from the done jobs")
    a = ap.parse_args()
    if a.report:
        report()
        return
    torch.set_num_threads(1)
    os.makedirs(PARTS, exist_ok=True)
    if a.one is None:  # each job in a fresh process: one process for all ran out of 24 GiB at DDIM 50
        k, n = (int(x) for x in a.shard.split("/"))
        for j in split(jobs(a.tables), k, n):
            if not os.path.exists(part_path(j)):
                subprocess.run([sys.executable, __file__, "--one", f"{j['table']}:{j['target']:g}", "--n", str(a.n),
                                "--noise-seed", str(a.noise_seed)] + (["--rev", a.rev] if a.rev else []), check=True)
        return
    table, target = a.one.split(":")
    for j in jobs([table]):
        if j["target"] != float(target):
            continue
        print(f"{j['table']} {j['target']:g} ...", flush=True)
        r = run_job(j, a.n, a.noise_seed, a.rev)
        write_part(part_path(j), r)
        print(f"  same={r['same_bits']} {r['seconds']} s" +
              ("" if r["same_bits"] else f" margin {r['margin']:+.2f} {r['margin_ci']}"), flush=True)


if __name__ == "__main__":
    main()
