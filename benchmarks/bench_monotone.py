"""Would seeding each level's search with the cheaper levels' masks help? A check on the stored bench masks.

``maskc.learn`` searches each MACs level on its own: the trajectory search starts from
that level's projected mask and the peers fitted into its window, never from a mask
learned at a lower level. So a learned mask can score below a cheaper learned mask
(the bench tables have one such pair: U-Net, DDIM 50, level 0.6 under level 0.5).

For every bench table (``benchmarks/results/bench_<model>_<sampler>.json``) and every pair
of its learned levels a < b, this script fits level a's stored mask into level b's
budget window (``maskc.refine.fit_to_window``, as the search fits its seeds: rows
upgraded at the steps whose output changes most) and scores three masks by mean PSNR
of final samples against the original's, on 16 noises that neither learning nor the
tables use (seed 4321, the bench's peer-selection noises, labels i % 10, guidance 2):
level b's learned mask, level a's mask as it is, and level a's mask fitted. Where the
fitted mask beats level b's, a search seeded with it would have returned something at
least as good, so that gain is a lower bound on what the seeding would buy.

Usage: python benchmarks/bench_monotone.py [--threads 1] [--results benchmarks/results] [--out benchmarks/results]
       python benchmarks/bench_monotone.py --render   (monotone.md again from monotone.json)
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
from maskc.bench import SAMPLERS, bench_model, code_version
from maskc.refine import fit_to_window, row_vocabulary
from maskc.rollout import GenerationCost, Rollout
from maskc.sampling import stack_kwargs
from maskc.schedules import peer_library

HERE = os.path.dirname(os.path.abspath(__file__))
TABLES = ("unet_ddim20", "unet_dpmpp10", "unet_ddim50", "dit_ddim20", "dit_dpmpp10", "dit_ddim50",
          "sd_ddim20", "sd_dpmpp10", "sd_ddim50")


def table_context(cfg: dict, n: int, seed: int) -> dict:
    """A bench table's model, sampler and conditioning as its bench used them, on n noises drawn from ``seed``.

    Keys: bench_model (``maskc.bench.BenchModel``: also learns a level as the bench does), model,
    cond_of (labels -> model kwargs), n_classes (None: unconditional), guidance, shape, sched
    (timesteps set), noise, call_kw (the [cond; uncond] kwargs of the noises), ex_args and
    ex_kwargs (a batch-1 example call for tracing).
    """
    bm = bench_model(cfg["model"], cfg["guidance_scale"])
    sched = SAMPLERS[cfg["sampler"]]()
    sched.set_timesteps(cfg["steps"])
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *bm.shape, generator=g)
    call_kw: dict = {}
    ex_kwargs: dict = {"timestep": sched.timesteps[0].reshape(1)}
    if bm.conditional:
        labels = torch.arange(n) % bm.n_classes
        call_kw = stack_kwargs(bm.cond_of(labels), bm.cond_of(torch.full_like(labels, bm.n_classes)))
        ex_kwargs.update(bm.cond_of(torch.zeros(1, dtype=torch.long)))
    return dict(bench_model=bm, model=bm.model, cond_of=bm.cond_of, n_classes=bm.n_classes, guidance=bm.guidance,
                shape=bm.shape, sched=sched, noise=noise, call_kw=call_kw, ex_args=(torch.zeros(1, *bm.shape),),
                ex_kwargs=ex_kwargs)


def generation_cost(ctx: dict, names: list[str]) -> GenerationCost:
    """MACs and rectification of masks over ``names`` on ``ctx``'s model (``table_context``)."""
    graph = maskc.block_graph(ctx["model"], *ctx["ex_args"], blocks=names, **ctx["ex_kwargs"])
    return GenerationCost(ctx["model"], names, graph, ctx["ex_args"], ctx["ex_kwargs"])


def check_table(stem: str, results: str, n: int = 16) -> list[dict]:
    """One row per pair of learned levels (a < b) of ``bench_<stem>``: the three masks' PSNRs."""
    res = json.load(open(os.path.join(results, f"bench_{stem}.json")))
    cfg = res["config"]
    ctx = table_context(cfg, n, 4321 + cfg["seed"])
    model, sched, guidance, noise, call_kw = (ctx[k] for k in ("model", "sched", "guidance", "noise", "call_kw"))
    learned = sorted((r for r in res["rows"] if r["family"] == "maskc"), key=lambda r: r["target"])
    masks = {r["target"]: maskc.Mask.load(os.path.join(results, r["mask_file"])) for r in learned}
    names = list(next(iter(masks.values())).names)
    cost = generation_cost(ctx, names)
    roll = Rollout(model, names, sched, noise, call_kw, guidance, "timestep")
    T = cfg["steps"]
    out = []
    psnr = {t: roll.psnr(cost.rectify(m.bits)) for t, m in masks.items()}
    # A table's PSNRs are its masks' only while the stored masks are still the ones it sampled (same code).
    # (bench_key_code_was: the key before a re-key that changed no hashed file's content, see git log)
    same = {t: res["code_version"] in (m.meta["provenance"].get("bench_key", {}).get("code"),
                                       m.meta["provenance"].get("bench_key_code_was")) for t, m in masks.items()}
    table_psnr = {r["target"]: r["psnr"] if same[r["target"]] else None for r in learned}
    for i, a in enumerate(sorted(masks)):
        for b in sorted(masks)[i + 1:]:
            prov = masks[b].meta["provenance"]
            lo, hi = prov["budget_window"]
            delta = prov["delta"]
            vocab = row_vocabulary(names, peer_library(names, T, delta=delta))
            fitted = fit_to_window(masks[a].bits, cost, lo, hi, delta, vocab)
            pf = roll.psnr(fitted) if fitted is not None else None
            out.append({"table": f"bench_{stem}", "model": cfg["model"], "sampler": f"{cfg['sampler']} {T}",
                        "lower": a, "higher": b, "window": [lo, hi],
                        "macs_lower": cost.fraction(masks[a].bits), "macs_higher": cost.fraction(masks[b].bits),
                        "macs_fitted": None if fitted is None else cost.fraction(fitted, rectified=True),
                        "psnr_lower": psnr[a], "psnr_higher": psnr[b], "psnr_fitted": pf,
                        "table_psnr_lower": table_psnr[a], "table_psnr_higher": table_psnr[b],
                        "gain": None if pf is None else max(0.0, pf - psnr[b])})
    return out


def render(meta: dict, rows: list[dict]) -> str:
    """The markdown table of ``monotone.json``'s rows, with counts computed from them."""
    inverted = [r for r in rows if r["psnr_lower"] > r["psnr_higher"]]
    helped = [r for r in rows if r["gain"]]
    in_table = [r for r in rows if r["table_psnr_lower"] is not None and r["table_psnr_higher"] is not None]
    inv_table = [r for r in in_table if r["table_psnr_lower"] > r["table_psnr_higher"]]
    lines = [
        "# Seeding a level's search with cheaper levels' masks: what it would buy",
        "",
        f"Made by `python benchmarks/bench_monotone.py` on {meta['date']}: {meta['machine']}, {meta['threads']} "
        f"thread(s), torch {meta['torch']}, code version {meta['code_version']}, {meta['seconds']:.0f} s. For each "
        "bench table and each pair of learned levels a < b: mean PSNR (dB) of final samples against the original's "
        "on 16 noises neither learning nor the tables use (seed 4321) for level b's learned mask, level a's mask as "
        "it is, and level a's mask fitted into level b's budget window by `maskc.refine.fit_to_window` (the way the "
        "search fits its seeds). Gain: how much the fitted mask beats level b's (0 where it does not); a search "
        "seeded with it would return at least that much more on these noises. Table PSNR: the bench table's, 2,000 "
        "or 500 noises; '-' where the stored masks were relearned since the table was sampled.",
        "",
        f"Pairs: {len(rows)}. The cheaper mask scores higher on these 16 noises at {len(inverted)}"
        + "".join(f" ({r['table']} {r['lower']:g} over {r['higher']:g})" for r in inverted)
        + f", and in the bench table at {len(inv_table)} of {len(in_table)}"
        + "".join(f" ({r['table']} {r['lower']:g} over {r['higher']:g}: {r['table_psnr_lower']:.2f} against "
                  f"{r['table_psnr_higher']:.2f})" for r in inv_table)
        + f". The fitted cheaper mask beats the dearer level's learned mask at {len(helped)}"
        + (" (" + "; ".join(f"{r['table']} {r['lower']:g} into {r['higher']:g}: +{r['gain']:.2f} dB" for r in helped)
           + ")" if helped else "") + ".",
        "",
        "| table | a | b | MACs a | MACs b | MACs a fitted | PSNR a | PSNR b | PSNR a fitted | gain | table PSNR a | table PSNR b |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['table']} | {r['lower']:g} | {r['higher']:g} | {r['macs_lower']:.3f} | "
                     f"{r['macs_higher']:.3f} | {fmt(r['macs_fitted'], 3)} | {r['psnr_lower']:.2f} | "
                     f"{r['psnr_higher']:.2f} | {fmt(r['psnr_fitted'], 2)} | {fmt(r['gain'], 2)} | "
                     f"{fmt(r['table_psnr_lower'], 2)} | {fmt(r['table_psnr_higher'], 2)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where the bench tables and masks are")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tables", nargs="*", default=list(TABLES))
    ap.add_argument("--render", action="store_true", help="rewrite monotone.md from <out>/monotone.json, measure nothing")
    args = ap.parse_args()
    if args.render:
        data = json.load(open(os.path.join(args.out, "monotone.json")))
        meta, rows = data["meta"], data["rows"]
    else:
        torch.set_num_threads(args.threads)
        t0 = time.time()
        rows = []
        for stem in args.tables:
            t = time.time()
            rows += check_table(stem, args.results)
            print(f"bench_{stem}: {time.time() - t:.0f} s", flush=True)
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": args.threads,
                "torch": torch.__version__, "code_version": code_version(), "noises": "16, seed 4321",
                "seconds": time.time() - t0}
        with open(os.path.join(args.out, "monotone.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = render(meta, rows)
    with open(os.path.join(args.out, "monotone.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
