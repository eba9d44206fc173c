"""The compile issue's acceptance case on a trained U-Net this project never shipped.

A ``UNet2DModel`` of a topology the project does not ship (3 levels, 32/64/64 channels, attention
at the two lower levels, 8 norm groups) is trained here, for ``--train-s`` seconds, on the
Fashion-MNIST test images shipped in ``maskc/models/weights/fmnist-eval`` (epsilon prediction, DDPM
noise schedule): weights that moved from their init the way trained ones do, not random ones.
Then, with a random 12-step mask (each block kept with p = 0.5, row 0 all ones, seed 0; DDIM 12):

- ``maskc.compile(model, mask, backend="inductor")`` and
  ``torch.compile(model, backend=maskc.backend(mask, inner="inductor"))`` against the hook reference
  (``tests/reference.py``): max abs difference at every step (asked: within 1e-3);
- cold compile of every variant against one plain ``torch.compile(model)``: each in a fresh process
  with inductor's FX graph and autograd caches off and an empty cache folder; compile s = first
  generation minus the median of the next two.

Usage: python benchmarks/bench_unseen_compile.py [--train-s 240] [--threads 1]
Writes benchmarks/results/compile_unseen.md and .json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from bench_compile import cold_record, machine, run_cold  # benchmarks/ is the script's folder, first on sys.path

STEPS, BATCH = 12, 8
CFG = dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
           down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
           up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)


def train(seconds: float, path: str) -> dict:
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors.torch import save_file

    from maskc.data import load_sample

    torch.manual_seed(0)
    model = UNet2DModel(**CFG)
    images, _, _ = load_sample()
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    steps, t0, losses = 0, time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        x = images[torch.randint(0, len(images), (32,))]
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (len(x),))
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(x, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        steps += 1
    save_file(model.state_dict(), path)
    return {"train_steps": steps, "train_s": time.perf_counter() - t0, "loss_first": losses[0],
            "loss_last_50": statistics.mean(losses[-50:]), "train_images": len(images)}


def setup(path: str):
    from diffusers import DDIMScheduler, UNet2DModel
    from safetensors.torch import load_file

    import maskc

    model = UNet2DModel(**CFG)
    model.load_state_dict(load_file(path))
    model.eval()
    names = maskc.blocks(model)
    bits = torch.rand(STEPS, len(names), generator=torch.Generator().manual_seed(0)) < 0.5
    bits[0] = True
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(STEPS)
    x0 = torch.randn(BATCH, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, maskc.Mask(bits, names), sched, x0


def trajectory(fn, sched, x0) -> list[torch.Tensor]:
    """``fn``'s output at each step of the DDIM trajectory that ``fn`` itself drives from ``x0``."""
    outs = []
    x = x0
    with torch.no_grad():
        for t in sched.timesteps:
            out = fn(x, t).sample
            outs.append(out)
            x = sched.step(out, t, x).prev_sample
    return outs


def child(path: str, config: str, threads: int) -> None:
    """One cold compile, printed as a JSON line."""
    import maskc
    from maskc.sampling import generate

    torch.set_num_threads(threads)
    model, mask, sched, x0 = setup(path)
    if config == "original inductor":
        fn, reset = torch.compile(model, dynamic=False), None
    else:
        fn = maskc.compile(model, mask, backend="inductor")
        reset = fn.reset
    with torch.no_grad():
        print(json.dumps(cold_record(fn, lambda: generate(fn, sched, x0, STEPS, reset=reset))))


def agreement(path: str, threads: int) -> dict:
    import maskc

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from reference import HookReference

    torch.set_num_threads(threads)
    model, mask, sched, x0 = setup(path)
    ref = HookReference(model, mask.bits, mask.names)
    want = trajectory(ref, sched, x0)
    ref.close()
    # every configuration is fed the reference's inputs step by step, so the differences are per step
    res: dict = {"variants": None}
    tm = maskc.compile(model, mask, backend="inductor")
    compiled = torch.compile(model, backend=maskc.backend(mask, inner="inductor"), fullgraph=True, dynamic=False)
    for name, fn in (("maskc.compile(backend='inductor')", tm), ("torch.compile(backend=maskc.backend(mask, inner='inductor'))", compiled)):
        diffs, x = [], x0
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                out = fn(x, t).sample
                diffs.append(float((out - want[i]).abs().max()))
                x = sched.step(want[i], t, x).prev_sample
        res[name] = diffs
    res["variants"] = len({id(tm.step_graph(i)) for i in range(STEPS)})
    res["output_scale"] = float(torch.stack(want).abs().max())
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-s", type=float, default=240)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "unet.safetensors")
        res: dict = {"benchmark": "bench_unseen_compile", "command": "python benchmarks/bench_unseen_compile.py " + " ".join(sys.argv[1:]),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "machine": machine(a.threads), "config": CFG, "steps": STEPS, "batch": BATCH,
                     "seeds": {"weights": 0, "mask": 0, "noise": 1}}
        res["training"] = train(a.train_s, path)
        print("trained", res["training"], flush=True)
        res["agreement"] = agreement(path, a.threads)
        print("agreement", res["agreement"], flush=True)
        res["cold"] = {c: run_cold(__file__, [path, c, str(a.threads)]) for c in ("original inductor", "maskc inductor")}
        print("cold", res["cold"], flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "compile_unseen.json"), "w") as f:
        json.dump(res, f, indent=1)
    m, tr, ag, cold = res["machine"], res["training"], res["agreement"], res["cold"]
    plain = cold["original inductor"]["compile_s"]
    lines = ["# Compile acceptance on a trained U-Net never shipped, CPU", "",
             f"Made by `{res['command']}` on {res['date']}: {m['cpu']}, {m['cores']} cores, `torch.set_num_threads({m['threads']})` "
             f"(training: 2 threads), torch {m['torch']}. `UNet2DModel({', '.join(f'{k}={v}' for k, v in CFG.items())})`, "
             f"trained {tr['train_s']:.0f} s ({tr['train_steps']} steps of batch 32 on the {tr['train_images']} shipped "
             f"Fashion-MNIST test images; loss {tr['loss_first']:.3f} -> {tr['loss_last_50']:.3f}, mean of the last 50). "
             f"Random {STEPS}-step mask (p = 0.5, row 0 all ones, seed 0): {ag['variants']} distinct variants. DDIM {STEPS}, "
             f"batch {BATCH}, noise seed 1.", "",
             "## Agreement with the hook reference (each step fed the reference's input)", "",
             "| configuration | max abs diff over the steps | worst step | output scale |", "| --- | ---: | ---: | ---: |"]
    for name in ("maskc.compile(backend='inductor')", "torch.compile(backend=maskc.backend(mask, inner='inductor'))"):
        d = ag[name]
        lines.append(f"| `{name}` | {max(d):.1e} | {d.index(max(d))} | {ag['output_scale']:.2f} |")
    lines += ["", "## Cold compile, every variant", "",
              "| configuration | graphs compiled | block / glue programs | graph breaks | compile s | vs one plain compile |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c, v in cold.items():
        progs = f"{v['block_programs']} / {v['glue_programs']}" if v.get("block_programs") else "-"
        lines.append(f"| {c} | {v['unique_graphs']} | {progs} | {v['graph_breaks']} | {v['compile_s']:.1f} | {v['compile_s'] / plain:.2f}x |")
    lines += ["", "Each cold compile runs in a fresh process with inductor's FX graph and autograd caches off and an empty "
              "cache folder; compile s = first generation minus the median of the next two."]
    with open(os.path.join(a.out, "compile_unseen.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
