"""Which objective should the trajectory search maximize? Plain PSNR against PSNR that saturates at 50 dB.

For one model, sampler and target: ``maskc.learn`` twice with the same seed, once with
``search_score="psnr"`` (mean plain PSNR of the calibration samples; a sample bit-identical to the
original's, such as a blank image that clamps to 0 under both, counts 120 dB) and once with the
default ``"saturating"`` (``maskc.rollout.Rollout.score``: 1e-5 added to each MSE, 50 dB at most).
Both masks and every ``peer_library`` schedule of no more MACs are then scored on ``--n`` fresh
noises (seed ``--noise-seed``, which neither learning nor the other tables use) by four statistics of
the final samples against the original's: mean plain PSNR (what every table reports), mean saturating
PSNR, PSNR of the pooled MSE (torchmetrics' default reduction) and mean PSNR over the samples that are
not bit-identical, with the count of bit-identical ones. Generations by ``maskc.rollout.Rollout``
(bit for bit the runtime's, ``tests/test_learn_phases.py``). Margins carry 95% paired-bootstrap
intervals (1000 resamples of the noises, seed 0). Each peer family's member is its best by mean plain
PSNR on these same noises, which favours the peer.

Usage: python benchmarks/bench_search_score.py --model /tmp/issue/unseen-sd --sampler dpm++ --steps 10 --target 0.5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

import maskc
from maskc.eval import bootstrap_counts, interval
from maskc.learn import _conditioning, _slice1
from maskc.models.shipped import load_pretrained
from maskc.rollout import MSE_FLOOR, GenerationCost, Rollout
from maskc.schedules import peer_library

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_learn import conditioning, scheduler  # noqa: E402

OBJECTIVES = ("psnr", "saturating")
STATS = ("plain", "saturating", "pooled", "not identical")


def plain_psnr(mse: torch.Tensor) -> torch.Tensor:
    """Per-sample plain PSNR (dB) of per-sample MSEs, 120 dB for a bit-identical sample (as maskc.eval clamps)."""
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def statistics(mse: torch.Tensor) -> dict[str, float]:
    """The four statistics of per-sample MSEs (module docstring), and the bit-identical count."""
    plain = plain_psnr(mse)
    moved = mse > 0
    return {"plain": float(plain.mean()), "saturating": float((10 * torch.log10(1 / (mse + MSE_FLOOR))).mean()),
            "pooled": float(10 * torch.log10(1 / mse.mean().clamp_min(1e-12))),
            "not identical": float(plain[moved].mean()) if bool(moved.any()) else float("nan"),
            "identical": int((~moved).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "dpm++"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0, help="learning seed")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--noise-seed", type=int, default=555)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, folder = load_pretrained(a.model)
    model = model.float().eval()
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    cond, uncond, guidance = conditioning(model, folder, None)
    sched = scheduler(a.sampler)
    sched.set_timesteps(a.steps)

    masks, seconds = {}, {}
    for obj in OBJECTIVES:
        t0 = time.perf_counter()
        masks[obj] = maskc.learn(model, sched, a.steps, shape, target=a.target, seed=a.seed, cond=cond, uncond=uncond,
                                 guidance_scale=guidance, progress=False, search_score=obj)
        seconds[obj] = time.perf_counter() - t0
        print(obj, f"{seconds[obj]:.0f} s", masks[obj].meta["provenance"]["macs_fraction"], flush=True)
    names = masks["psnr"].names
    g = torch.Generator().manual_seed(a.noise_seed)
    call_kw, extra = _conditioning(a.n, g, cond, uncond, guidance)
    noise = torch.randn((a.n, *shape), generator=g)
    ex_kwargs = {"timestep": sched.timesteps[0].reshape(1), **{k: _slice1(v) for k, v in extra.items()}}
    graph = maskc.block_graph(model, noise[:1], blocks=names, **ex_kwargs)
    cost = GenerationCost(model, names, graph, (noise[:1],), ex_kwargs)
    roll = Rollout(model, names, sched, noise, call_kw, guidance, "timestep")

    def mse(bits: torch.Tensor) -> torch.Tensor:
        return roll.mse(cost.rectify(bits))

    learned = {}
    for obj, m in masks.items():
        e = mse(m.bits)
        learned[obj] = {"macs_fraction": cost.fraction(m.bits), "mse": e, "psnr": plain_psnr(e)}
    top = max(v["macs_fraction"] for v in learned.values())
    peers = []
    for p in peer_library(names, a.steps, delta=masks["psnr"].meta["provenance"]["delta"]):
        f = cost.fraction(p.bits)
        if top - 0.15 <= f <= top + 1e-9:
            prov = p.meta["provenance"]
            settings = {k: v for k, v in prov.items() if k not in ("method", "full_steps")}
            e = mse(p.bits)
            peers.append({"method": prov["method"], "settings": settings, "macs_fraction": f, "mse": e,
                          "psnr": plain_psnr(e)})
    counts = bootstrap_counts(a.n, 1000, 0)
    rows = []
    for obj, v in learned.items():
        row = {"method": f"learned, search_score={obj}", "macs_fraction": v["macs_fraction"],
               "learn_seconds": seconds[obj], **statistics(v["mse"]), "vs": {}}
        best: dict[str, dict] = {}
        for p in peers:
            if p["macs_fraction"] <= v["macs_fraction"] + 1e-9:
                if p["method"] not in best or p["psnr"].mean() > best[p["method"]]["psnr"].mean():
                    best[p["method"]] = p
        for fam, p in best.items():
            d = v["psnr"] - p["psnr"]
            row["vs"][fam] = {"settings": p["settings"], "macs_fraction": p["macs_fraction"],
                              **statistics(p["mse"]), "margin": float(d.mean()),
                              "margin_ci": interval(counts @ d / a.n)}
        rows.append(row)
    res = {"command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch {torch.__version__}",
           "threads": a.threads, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": folder, "sampler": a.sampler, "steps": a.steps, "target": a.target, "seed": a.seed, "n": a.n,
           "noise_seed": a.noise_seed, "guidance": guidance, "rows": rows}
    name = a.name or f"search_score_{os.path.basename(folder.rstrip('/'))}_{a.sampler}{a.steps}_{a.target}"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, name + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# The search's objective: {os.path.basename(folder.rstrip('/'))}, {a.sampler} {a.steps} steps, "
             f"target {a.target}", "", f"Command: `{res['command']}`  ",
             f"Machine: {res['machine']}, {a.threads} thread(s); date {res['date']}; learning seed {a.seed}; "
             f"{a.n} fresh noises, seed {a.noise_seed}; guidance {guidance}.  ",
             "Statistics of the final samples against the original's from the same noise (dB): mean plain PSNR "
             "(what every table reports; a bit-identical sample counts 120 dB), mean PSNR saturating at 50 dB, "
             "PSNR of the pooled MSE, mean PSNR of the samples that are not bit-identical; and how many are "
             "bit-identical. Margin: learned minus peer in mean plain PSNR, 95% paired-bootstrap interval. Peer: "
             "its family's best member of no more MACs by mean plain PSNR on these noises.", "",
             "| method | MACs | plain | saturating | pooled | not identical | identical | margin (plain) "
             "| 95% interval |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cells(s: dict) -> str:
        return " | ".join(f"{s[k]:.2f}" for k in STATS) + f" | {s['identical']}"

    for r in rows:
        lines.append(f"| **{r['method']}** ({r['learn_seconds']:.0f} s) | {r['macs_fraction']:.3f} | {cells(r)} | | |")
        for fam, p in sorted(r["vs"].items(), key=lambda kv: -kv[1]["plain"])[:5]:
            lines.append(f"| {fam} {json.dumps(p['settings'])[:60]} | {p['macs_fraction']:.3f} | {cells(p)} "
                         f"| {p['margin']:+.2f} | [{p['margin_ci'][0]:+.2f}, {p['margin_ci'][1]:+.2f}] |")
    with open(os.path.join(a.out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
