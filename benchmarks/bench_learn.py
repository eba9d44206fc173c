"""Does ``maskc.learn`` beat every peer schedule of no more MACs? The check a new user would run.

For one model and sampler: learn a mask at each target (timed), then on held-out
noises (not the ones learning saw) generate with the original model, the learned mask
and every schedule of ``maskc.schedules.peer_library`` (DeepCache uniform and
non-uniform at every interval and depth, FORA, step-level reuse uniform and
non-uniform, the static δ-threshold schedule) plus random at the learned mask's MACs,
all through ``maskc.compile``. PSNR and SSIM of final samples against the original's
from the same noise; MACs by FlopCounterMode over a whole generation (after the
tracing call). For each peer family the table names its best member with MACs at most
the learned mask's, and the margin.

Usage: python benchmarks/bench_learn.py --model unet --targets 0.6 [--sampler ddim --steps 20 --n 16]
       (--model: unet, dit, sd, or a diffusers folder written by save_pretrained)
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
from maskc.eval import bootstrap_counts, fidelity, interval, psnr_per_sample
from maskc.learn import measured_flops
from maskc.models.shipped import load_pretrained
from maskc.rollout import MSE_FLOOR
from maskc.sampling import generate
from maskc.schedules import peer_library, random_equal_macs

HERE = os.path.dirname(os.path.abspath(__file__))


def scheduler(name: str):
    import diffusers

    if name == "ddim":
        return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    if name == "dpm++":
        return diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                     algorithm_type="dpmsolver++")
    raise SystemExit(f"unknown sampler {name!r}: ddim or dpm++")


def conditioning(model, folder: str, guidance: float | None):
    """(cond, uncond, guidance) callables of maskc.learn for the model's kind."""
    from maskc.models import shipped

    cfg = model.config
    if getattr(cfg, "num_embeds_ada_norm", None) and type(model).__name__ == "DiTTransformer2DModel":
        k = cfg.num_embeds_ada_norm
        return (lambda n, g: {"class_labels": torch.randint(0, k, (n,), generator=g)},
                lambda n, g: {"class_labels": torch.full((n,), k)}, guidance or 2.0)
    if type(model).__name__ == "UNet2DConditionModel" and getattr(shipped, "has_captions", lambda f: False)(folder):
        table = shipped.captions(folder)
        null = shipped.NULL_CAPTION
        return (lambda n, g: {"encoder_hidden_states": table[torch.randint(0, null, (n,), generator=g)]},
                lambda n, g: {"encoder_hidden_states": table[torch.full((n,), null)]}, guidance or 2.0)
    return None, None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "dpm++"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.6])
    ap.add_argument("--n", type=int, default=16, help="held-out samples")
    ap.add_argument("--seed", type=int, default=0, help="learning seed; held-out noise is seed 1234 + this")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=1000, help="paired resamples of the held-out noises (seed 0)")
    ap.add_argument("--ablation", action="store_true", help="also learn without the trajectory search, with the original's and with the masked cache")
    ap.add_argument("--learn", nargs="*", default=[], help="LearnConfig overrides, key=value")
    ap.add_argument("--pick-seeds", type=int, nargs="*", default=None,
                    help="learn with maskc.pick.learn_best over these seeds (the opt-in pick) instead of maskc.learn")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default=None)
    ap.add_argument("--report-only", metavar="JSON", default=None,
                    help="rewrite the markdown table of a finished run from its JSON, and exit")
    a = ap.parse_args()
    if a.report_only:
        with open(a.report_only) as f:
            res = json.load(f)
        print(write_markdown(res, os.path.splitext(a.report_only)[0] + ".md"))
        return
    torch.set_num_threads(a.threads)
    model, folder = load_pretrained(a.model)
    model = model.float()
    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    cond, uncond, guidance = conditioning(model, folder, a.guidance)
    overrides = {}
    for kv in a.learn:
        k, v = kv.split("=")
        overrides[k] = type(getattr(maskc.LearnConfig(), k))(v)
    sched = scheduler(a.sampler)
    sched.set_timesteps(a.steps)
    tkw = "timestep"

    g = torch.Generator().manual_seed(1234 + a.seed)
    noise = torch.randn((a.n, *shape), generator=g)
    call_kw = {}
    if cond is not None:
        from maskc.sampling import stack_kwargs

        c = cond(a.n, g)
        call_kw = stack_kwargs(c, uncond(a.n, g)) if guidance else c
    ex_kw = {k: v[:1] for k, v in (cond(1, torch.Generator().manual_seed(0)) if cond else {}).items()}
    ex_args = (noise[:1],)
    ts = [t.reshape(1) for t in sched.timesteps]
    full_flops = measured_flops(model, None, ex_args, {tkw: ts[0], **ex_kw}, tkw, ts)

    def macs(mask) -> float:
        return measured_flops(model, mask, ex_args, {tkw: ts[0], **ex_kw}, tkw, ts) / full_flops

    reference = generate(model, sched, noise, a.steps, call_kw, guidance)

    counts = bootstrap_counts(a.n, a.bootstrap, 0)

    def quality(mask) -> tuple[dict, torch.Tensor]:
        tm = maskc.compile(model, mask)
        img = generate(tm, sched, noise, a.steps, call_kw, guidance, reset=tm.reset)
        return fidelity(img, reference), psnr_per_sample(img, reference)

    def margin_ci(learned_ps: torch.Tensor, peer_ps: torch.Tensor) -> list[float]:
        """95% paired-bootstrap interval of the mean PSNR margin (same resamples of the noises for both)."""
        return interval(counts @ (learned_ps - peer_ps).double() / a.n)

    name = a.name or f"learn_{os.path.basename(folder.rstrip('/'))}_{a.sampler}{a.steps}"
    rows = []
    for target in a.targets:
        kinds = [("learned", {})] + ([("ablation: per-step scores only (the paper's mode, no search)", {"refine": "none"}),
                                      ("ablation: masked cache, no search (maskc before this change)",
                                       {"refine": "none", "cache": "masked"})] if a.ablation else [])
        learned = {}
        for label, extra in kinds:
            t0 = time.perf_counter()
            if a.pick_seeds and not extra:
                from maskc.pick import learn_best

                m = learn_best(model, sched, a.steps, shape, target=target, seeds=a.pick_seeds, cond=cond,
                               uncond=uncond, guidance_scale=guidance, progress=False, **overrides)
            else:
                m = maskc.learn(model, sched, a.steps, shape, target=target, seed=a.seed, cond=cond, uncond=uncond,
                                guidance_scale=guidance, progress=False, **{**overrides, **extra})
            secs = time.perf_counter() - t0
            f = macs(m)
            learned[label] = (m, f)
            kept = m.bits.float().mean(1)
            os.makedirs(os.path.join(a.out, "masks"), exist_ok=True)
            mask_file = os.path.join("masks", f"{name}_{'learned' if not extra else 'ablation'}"
                                     f"{'_' + '-'.join(map(str, extra.values())) if extra else ''}_{target}.json")
            m.save(os.path.join(a.out, mask_file))
            q, ps = quality(m)
            rows.append({"target": target, "method": label, "macs_fraction": f, "learn_seconds": secs,
                         **q, "calibration": m.meta["provenance"].get("search"), "mask_file": mask_file,
                         "kept_per_step": kept.tolist(), "partial_steps": int(((kept > 0) & (kept < 1)).sum()),
                         "psnr_per_sample": [round(float(v), 4) for v in ps]})
            if not extra:
                learned_ps = ps
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("calibration", "kept_per_step")}), flush=True)
        m, f_learned = learned["learned"]
        p_learned = next(r["psnr"] for r in rows if r["target"] == target and r["method"] == "learned")
        peers = peer_library(m.names, a.steps, delta=m.meta["provenance"]["delta"])
        peers.append(random_equal_macs(m.names, a.steps, f_learned, macs, seed=a.seed))
        best: dict[str, dict] = {}
        for p in peers:
            f = macs(p)
            if f > f_learned + 1e-9:
                continue
            fam = p.meta["provenance"]["method"]
            q, ps = quality(p)
            settings = {k: v for k, v in p.meta["provenance"].items() if k not in ("method", "full_steps")}
            if fam not in best or q["psnr"] > best[fam][0]["psnr"]:
                best[fam] = ({"target": target, "method": fam, "settings": settings, "macs_fraction": f, **q}, ps)
        for r, ps in sorted(best.values(), key=lambda rp: -rp[0]["psnr"]):
            rows.append({**r, "psnr_per_sample": [round(float(v), 4) for v in ps], "margin_db": p_learned - r["psnr"],
                         "margin_ci": margin_ci(learned_ps, ps)})
            print(json.dumps(rows[-1]), flush=True)
    res = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": a.threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seeds": {"learn": a.seed, "held_out_noise": 1234 + a.seed, "random_peer": a.seed, "pick_seeds": a.pick_seeds},
        "model": folder, "sampler": a.sampler, "steps": a.steps, "n": a.n, "guidance": guidance,
        "bootstrap": a.bootstrap, "rows": rows,
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, name + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    print(write_markdown(res, os.path.join(a.out, name + ".md")))


def saturated(psnr_per_sample: list[float]) -> tuple[int, float]:
    """(bit-identical samples, mean PSNR with MSE_FLOOR added to each MSE, the search's score) from plain PSNRs."""
    p = torch.tensor(psnr_per_sample, dtype=torch.float64)
    mse = torch.pow(10.0, -p / 10)
    return int((p >= 119.99).sum()), float((10 * torch.log10(1 / (mse + MSE_FLOOR))).mean())


def write_markdown(res: dict, path: str) -> str:
    """The table of a run's JSON (what ``--report-only`` rewrites); returns its text."""
    n, guidance, bootstrap = res["n"], res["guidance"], res.get("bootstrap", 1000)
    folder = res["model"]
    lines = [f"# Learned masks against every peer schedule: {os.path.basename(folder)}, {res['sampler']} "
             f"{res['steps']} steps",
             "", f"Command: `{res['command']}`  ",
             f"Machine: {res['machine']}, {res['threads']} thread(s); date {res['date']}; seeds {res['seeds']}.  ",
             f"Held-out: {n} samples from noise seed {res['seeds']['held_out_noise']} (learning used other noises); "
             f"guidance {guidance}. PSNR/SSIM of final samples against the original model's from the same noise; "
             "MACs by FlopCounterMode over a whole generation. Peer rows: each family's best member with MACs at "
             "most the learned mask's; margin = learned PSNR minus the peer's, with its 95% paired-bootstrap interval "
             f"({bootstrap} resamples of the {n} noises, seed 0, the same for both methods). The peer is picked "
             "as its family's best on these same noises, which favours the peer. Identical: samples bit-identical "
             "to the original's, which PSNR counts at 120 dB; PSNR ≤ 50: the mean with 1e-5 added to each MSE "
             "(the learner's search score), from the same samples.", "",
             "| target | method | settings | MACs | PSNR (dB) | SSIM | margin (dB) | 95% interval | identical "
             "| PSNR ≤ 50 | learn (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ident, sat = saturated(r["psnr_per_sample"]) if "psnr_per_sample" in r else ("", float("nan"))
        if "margin_db" in r:
            ci = r.get("margin_ci")
            ci_s = f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
            lines.append(f"| {r['target']} | {r['method']} | {json.dumps(r['settings'])[:70]} "
                         f"| {r['macs_fraction']:.3f} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['margin_db']:+.2f} "
                         f"| {ci_s} | {ident} | {sat:.2f} | |")
        else:
            lines.append(f"| {r['target']} | **{r['method']}** | | {r['macs_fraction']:.3f} | {r['psnr']:.2f} "
                         f"| {r['ssim']:.4f} | | | {ident} | {sat:.2f} | {r['learn_seconds']:.0f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
