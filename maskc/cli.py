"""The ``maskc`` command line. Subcommands wrap the public API.

``demo`` and ``learn`` exist so far; ``compile``, ``sample``, ``bench`` and ``viz``
come with the issues that build them.
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


def _load_model(path: str):
    """A diffusers model folder (config.json + weights), by the class its config names."""
    import json
    import os

    import diffusers

    with open(os.path.join(path, "config.json")) as f:
        cls_name = json.load(f).get("_class_name")
    cls = getattr(diffusers, cls_name or "", None)
    if cls is None:
        raise SystemExit(f"{path}/config.json names no diffusers model class ({cls_name!r})")
    return cls.from_pretrained(path).eval()


def _scheduler(name: str, train_steps: int):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise SystemExit(f"unknown scheduler {name!r}; use e.g. DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler")
    return cls(num_train_timesteps=train_steps)


def learn_cmd(args: argparse.Namespace) -> int:
    """Learn a mask for a diffusers model folder and write it as JSON."""
    import torch

    import maskc

    torch.set_num_threads(args.threads)
    model = _load_model(args.model)
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    cond = None
    if args.num_classes:
        cond = lambda n, g: {"class_labels": torch.randint(0, args.num_classes, (n,), generator=g)}  # noqa: E731
    mask = maskc.learn(model, _scheduler(args.scheduler, args.train_steps), steps=args.steps, sample_shape=shape,
                       target=args.target, seed=args.seed, cond=cond, checkpoint_dir=args.checkpoint_dir,
                       batch=args.batch, iters=args.iters, sampling=args.sampling,
                       loss_scaling=not args.no_loss_scaling, rectify=not args.no_rectify)
    mask.save(args.out)
    print(f"wrote {args.out}: {mask}, MACs fraction {mask.meta['provenance']['macs_fraction']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="maskc", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile a mask for the DDPM-CIFAR10 U-Net and measure it")
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--reps", type=int, default=3)
    d.add_argument("--threads", type=int, default=2)
    d.set_defaults(fn=demo)
    ln = sub.add_parser("learn", help="learn a mask for a diffusers model folder")
    ln.add_argument("--model", required=True, help="diffusers model folder (save_pretrained)")
    ln.add_argument("--out", required=True, help="mask JSON to write")
    ln.add_argument("--steps", type=int, default=20)
    ln.add_argument("--target", type=float, default=0.6, help="fraction of MACs to keep")
    ln.add_argument("--scheduler", default="DDIMScheduler")
    ln.add_argument("--train-steps", type=int, default=1000)
    ln.add_argument("--seed", type=int, default=0)
    ln.add_argument("--batch", type=int, default=8)
    ln.add_argument("--iters", type=int, default=40)
    ln.add_argument("--sampling", choices=["stochastic", "gumbel"], default="stochastic")
    ln.add_argument("--no-loss-scaling", action="store_true")
    ln.add_argument("--no-rectify", action="store_true")
    ln.add_argument("--num-classes", type=int, default=0, help="class-conditional: draw labels in [0, N)")
    ln.add_argument("--checkpoint-dir", default=None, help="resume from / save per-step progress here")
    ln.add_argument("--threads", type=int, default=2)
    ln.set_defaults(fn=learn_cmd)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
