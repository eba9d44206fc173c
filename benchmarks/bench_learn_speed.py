"""Wall time of ``maskc.learn`` (default settings, T=20, target 0.6) on a shipped model: one process
against ``torchrun --nproc-per-node 2``, interleaved rounds; and whether the masks are identical.

Configurations: one process with 2 threads, one process with 1 thread, two processes (torchrun)
with 1 thread each. Under torchrun, phase 2's steps and the search's calibration noises are split
over the processes (maskc/learn.py). Each run is a fresh interpreter (imports and model load
included, as a user's ``maskc learn`` would be).

With ``--seeds 0 1`` (several), every configuration runs ``maskc.pick.learn_best`` over those
seeds instead: under torchrun each process learns its own seeds (seed k on process k % N), then
the processes gather the masks and pick alike. Results go to ``learn_speed_<model>_seeds<...>``.

Usage: python benchmarks/bench_learn_speed.py [--model unet] [--rounds 2] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(model_name: str, steps: int, target: float, seeds: list[int]) -> None:
    import torch
    from diffusers import DDIMScheduler

    import maskc
    from maskc.models.shipped import load_pretrained

    model, _ = load_pretrained(model_name)
    c = model.config
    cond = uncond = guidance = None
    if type(model).__name__ == "DiTTransformer2DModel":
        k = c.num_embeds_ada_norm
        cond = lambda n, g: {"class_labels": torch.randint(0, k, (n,), generator=g)}  # noqa: E731
        uncond = lambda n, g: {"class_labels": torch.full((n,), k)}  # noqa: E731
        guidance = 2.0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and len(seeds) == 1:  # several seeds: learn_best splits them
        import torch.distributed as dist

        dist.init_process_group("gloo")
    t0 = time.perf_counter()
    args = (model, DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear"), steps,
            (c.in_channels, c.sample_size, c.sample_size))
    kw = dict(target=target, cond=cond, uncond=uncond, guidance_scale=guidance, progress=False)
    if len(seeds) == 1:
        mask = maskc.learn(*args, seed=seeds[0], **kw)
    else:
        from maskc.pick import learn_best

        mask = learn_best(*args, seeds=seeds, **kw)
    secs = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        digest = hashlib.sha256(bytes(mask.bits.flatten().to(torch.uint8).tolist())).hexdigest()[:16]
        print("RESULT " + json.dumps({"seconds": secs, "bits": digest, "pick": mask.meta["provenance"].get("pick"),
                                      "macs_fraction": mask.meta["provenance"]["macs_fraction"]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="unet")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="several: maskc.pick.learn_best over them")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("MASKC_THREADS", "1")))
        worker(a.model, a.steps, a.target, a.seeds)
        return
    me = [os.path.abspath(__file__), "--worker", "--model", a.model, "--steps", str(a.steps), "--target", str(a.target),
          "--seeds", *map(str, a.seeds)]
    configs = {
        "1 process, 2 threads": ([sys.executable, *me], 2),
        "1 process, 1 thread": ([sys.executable, *me], 1),
        "torchrun 2 processes, 1 thread each": ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                                 "--master-port", "29541", *me], 1),
    }
    results: dict[str, list[dict]] = {k: [] for k in configs}
    for r in range(a.rounds):
        for name, (cmd, threads) in configs.items():
            env = {**os.environ, "MASKC_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
            res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
            res["wall_seconds"] = wall
            results[name].append(res)
            print(f"round {r}: {name}: learn {res['seconds']:.1f} s, process {wall:.1f} s, bits {res['bits']}",
                  flush=True)
    base = statistics.median(x["wall_seconds"] for x in results["1 process, 2 threads"])
    base1 = statistics.median(x["wall_seconds"] for x in results["1 process, 1 thread"])
    rows = []
    for name, rs in results.items():
        w = [x["wall_seconds"] for x in rs]
        med = statistics.median(w)
        rows.append({"config": name, "median_s": med, "min_s": min(w), "max_s": max(w),
                     "speedup_vs_1proc_2threads": base / med, "speedup_vs_1proc_1thread": base1 / med,
                     "bits": sorted({x["bits"] for x in rs}), "macs_fraction": rs[0]["macs_fraction"],
                     "picked": sorted({x["pick"]["picked"] for x in rs if x.get("pick")}),
                     "learning_seconds_per_seed": [x["pick"]["learning_seconds"] for x in rs if x.get("pick")]})
    same = len({b for r_ in rows for b in r_["bits"]}) == 1
    out = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": a.model, "steps": a.steps, "target": a.target, "rounds": a.rounds, "seeds": a.seeds,
        "identical_masks": same, "rows": rows,
    }
    os.makedirs(a.out, exist_ok=True)
    picks = len(a.seeds) > 1
    name = f"learn_speed_{a.model}" + (f"_seeds{'-'.join(map(str, a.seeds))}" if picks else "")
    with open(os.path.join(a.out, name + ".json"), "w") as f:
        json.dump(out, f, indent=1)
    seeds = ", ".join(map(str, a.seeds))
    what = f"maskc.pick.learn_best over seeds {seeds}" if picks else "maskc.learn"
    lines = [f"# {what} wall time: shipped {a.model}, DDIM {a.steps} steps, target {a.target}", "",
             f"Command: `{out['command']}`  ", f"Machine: {out['machine']}; date {out['date']}; seed(s) {seeds}; "
             f"{a.rounds} interleaved rounds, each a fresh process (imports and model load included).  ",
             f"Identical masks across configurations: **{same}**.", "",
             "| configuration | median (s) | min-max (s) | speed-up vs 1 process, 2 threads | vs 1 process, 1 thread |",
             "|---|---|---|---|---|"]
    for r_ in rows:
        lines.append(f"| {r_['config']} | {r_['median_s']:.0f} | {r_['min_s']:.0f}-{r_['max_s']:.0f} | "
                     f"{r_['speedup_vs_1proc_2threads']:.2f}x | {r_['speedup_vs_1proc_1thread']:.2f}x |")
    if picks:
        lines += ["", "Each run's learning seconds per seed (on the process that learned it) and the seed it kept:", ""]
        lines += [f"- {r_['config']}: {r_['learning_seconds_per_seed']}, kept seed {r_['picked']}" for r_ in rows]
    with open(os.path.join(a.out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
