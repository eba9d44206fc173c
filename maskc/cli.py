"""The ``maskc`` command line. Subcommands wrap the public API.

Only ``demo`` exists so far; ``learn``, ``compile``, ``sample``, ``bench`` and
``viz`` come with the issues that build them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def demo(args: argparse.Namespace) -> int:
    """Compile a DeepCache-like mask for the DDPM-CIFAR10 U-Net and show what it buys."""
    import torch
    from diffusers import DDIMScheduler, UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    import maskc
    from maskc.models.configs import DDPM_CIFAR10

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("building the google/ddpm-cifar10-32 U-Net topology (random weights: no hub here) ...")
    model = UNet2DModel(**DDPM_CIFAR10).eval()
    names = maskc.blocks(model)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(names)} blocks")
    T = args.steps
    # DeepCache-like: at odd steps skip every block but the outermost down and up blocks.
    bits = torch.ones(T, len(names), dtype=torch.bool)
    deep = [j for j, n in enumerate(names) if not n.startswith(("down_blocks.0.", "up_blocks.3."))]
    bits[1::2, deep] = False
    mask = maskc.Mask(bits, names)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(T)
    x0 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    tm = maskc.compile(model, mask, example_args=(x0, sched.timesteps[0]))
    print(f"capture + rewrite of {T} step modules: {time.perf_counter() - t0:.2f} s "
          f"({len({id(tm[i]) for i in range(T)})} distinct)")

    def run(fn, count_flops=False):
        x = x0.clone()
        flops = 0
        with torch.no_grad():
            for t in sched.timesteps:
                if count_flops:
                    with FlopCounterMode(display=False) as fc:
                        eps = fn(x, t).sample
                    flops += fc.get_total_flops()
                else:
                    eps = fn(x, t).sample
                x = sched.step(eps, t, x).prev_sample
        return x, flops

    ref, f_full = run(model, True)
    tm.reset()
    out, f_mask = run(tm, True)
    full = maskc.compile(model, maskc.Mask.full(T, names))
    same, _ = run(full)
    print(f"all-ones mask reproduces the model bit for bit: {torch.equal(same, ref)}")
    print(f"masked generation uses {f_mask / f_full:.3f} of the FLOPs")
    times = {"original": [], "maskc": []}
    for _ in range(args.reps):
        for k, fn in (("original", model), ("maskc", tm)):
            tm.reset()
            t0 = time.perf_counter()
            run(fn)
            times[k].append(time.perf_counter() - t0)
    o, m = statistics.median(times["original"]), statistics.median(times["maskc"])
    print(f"generation wall time (median of {args.reps}, {args.threads} threads): original {o:.2f} s, "
          f"maskc {m:.2f} s, speed-up {o / m:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="maskc", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile a mask for the DDPM-CIFAR10 U-Net and measure it")
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--reps", type=int, default=3)
    d.add_argument("--threads", type=int, default=2)
    d.set_defaults(fn=demo)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
