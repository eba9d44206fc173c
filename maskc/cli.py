"""The ``maskc`` command line. Subcommands wrap the public API.

``demo``, ``learn`` and ``bench`` exist so far; ``compile``, ``sample`` and ``viz``
come with the issues that build them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from maskc.models.shipped import SHIPPED, shipped_dir


def demo(args: argparse.Namespace) -> int:
    """A shipped Fashion-MNIST model with its learned mask: samples, PSNR, MACs, wall time, a picture."""
    if args.random_ddpm or shipped_dir(args.model) is None:
        return demo_random(args)
    import os

    import numpy as np
    import torch
    from diffusers import DDIMScheduler
    from PIL import Image

    import maskc
    from maskc.eval import fidelity, generation_macs, interleaved_times
    from maskc.models.shipped import load_pretrained
    from maskc.sampling import generate, stack_kwargs

    torch.set_num_threads(args.threads)
    model, d = load_pretrained(args.model)
    model.float()
    T = 20
    mask = maskc.Mask.load(os.path.join(d, "mask_ddim20.json"))
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(T)
    mask.check(model, sched)
    print(f"shipped model: {d} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters); mask: {mask}")
    tm = maskc.compile(model, mask)
    ts = [t.reshape(1) for t in sched.timesteps]
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    kwargs, guidance, ex_kw = {}, None, {}
    if args.model == "dit":  # class-conditional: labels 0..9 in turn, classifier-free guidance
        y = torch.arange(args.n) % c.num_embeds_ada_norm
        kwargs = stack_kwargs({"class_labels": y}, {"class_labels": torch.full_like(y, c.num_embeds_ada_norm)})
        guidance, ex_kw = mask.meta["provenance"].get("guidance_scale") or 2.0, {"class_labels": y[:1]}
    ex = (torch.zeros(1, *shape),)
    frac = generation_macs(model, mask, ex, {**ex_kw, "timestep": ts[0]}, "timestep", ts) / generation_macs(
        model, None, ex, {**ex_kw, "timestep": ts[0]}, "timestep", ts)
    x0 = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed))
    out: dict[str, torch.Tensor] = {}

    def run(name: str) -> None:
        fn = model if name == "original" else tm
        out[name] = generate(fn, sched, x0, T, kwargs, guidance, reset=None if name == "original" else tm.reset)

    # one untimed round first: the first maskc call traces the model
    times = interleaved_times({"original": lambda: run("original"), "maskc": lambda: run("maskc")}, args.reps, warmup=1)
    ref, got = out["original"], out["maskc"]
    f = fidelity(got, ref)
    o, m = statistics.median(times["original"]), statistics.median(times["maskc"])
    print(f"MACs: {frac:.3f} of the original ({1 / frac:.2f}x fewer); vs the original's samples: "
          f"PSNR {f['psnr']:.2f} dB, SSIM {f['ssim']:.3f}")
    print(f"wall time per generation of {args.n} (median of {args.reps}, {args.threads} threads): "
          f"original {o:.2f} s, maskc {m:.2f} s, speed-up {o / m:.2f}x")
    grid = torch.cat([torch.cat(list(ref[:, 0]), dim=1), torch.cat(list(got[:, 0]), dim=1)], dim=0)
    img = Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).resize((grid.shape[1] * 3, grid.shape[0] * 3),
                                                                                 Image.NEAREST)
    img.save(args.out)
    print(f"wrote {args.out}: top row original, bottom row maskc, same initial noise")
    return 0


def demo_random(args: argparse.Namespace) -> int:
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

    import os

    torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # torchrun: timesteps are sharded across the processes
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    from maskc.models.shipped import load_pretrained

    model, _ = load_pretrained(args.model)
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    cond = uncond = None
    if args.num_classes:
        cond = lambda n, g: {"class_labels": torch.randint(0, args.num_classes, (n,), generator=g)}  # noqa: E731
        uncond = lambda n, g: {"class_labels": torch.full((n,), args.num_classes)}  # noqa: E731 - the null label
    if args.guidance_scale is not None and not args.num_classes:
        raise SystemExit("--guidance-scale needs --num-classes (the null label is class N)")
    mask = maskc.learn(model, _scheduler(args.scheduler, args.train_steps), steps=args.steps, sample_shape=shape,
                       target=args.target, seed=args.seed, cond=cond, uncond=uncond,
                       guidance_scale=args.guidance_scale, checkpoint_dir=args.checkpoint_dir,
                       batch=args.batch, iters=args.iters, sampling=args.sampling,
                       loss_scaling=not args.no_loss_scaling, rectify=not args.no_rectify)
    if not distributed or dist.get_rank() == 0:
        mask.save(args.out)
        print(f"wrote {args.out}: {mask}, MACs fraction {mask.meta['provenance']['macs_fraction']:.3f}")
    if distributed:
        dist.destroy_process_group()
    return 0


def bench_cmd(args: argparse.Namespace) -> int:
    """Run ``maskc.bench.run_bench`` with the command line's settings."""
    from maskc.bench import BenchConfig, run_bench

    run_bench(BenchConfig(
        model=args.model, steps=args.steps, n=args.n, batch=args.batch, targets=tuple(args.targets),
        main_target=args.main_target, deepcache=tuple(args.deepcache), deepcache_nonuniform=tuple(args.deepcache_nonuniform),
        fora=tuple(args.fora), random=not args.no_random, ablations=args.ablations, guidance_scale=args.guidance_scale,
        time_batch=args.time_batch, time_reps=args.time_reps, memory=not args.no_memory, threads=args.threads,
        time_threads=args.time_threads, phase=args.phase,
        seed=args.seed, out=args.out, name=args.name, reuse_masks=not args.relearn))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="maskc", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="a shipped model with and without its learned mask: MACs, PSNR, time, a picture")
    d.add_argument("--steps", type=int, default=10, help="(random-weights demo) DDIM steps")
    d.add_argument("--reps", type=int, default=3)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--n", type=int, default=8, help="samples per generation")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="maskc_demo.png")
    d.add_argument("--model", choices=sorted(SHIPPED), default="unet",
                   help="the shipped Fashion-MNIST U-Net, or the class-conditional DiT (labels 0..9, CFG)")
    d.add_argument("--random-ddpm", action="store_true",
                   help="the 35.7M DDPM-CIFAR10 topology with random weights instead of the shipped model")
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
    ln.add_argument("--sampling", choices=["stochastic", "gumbel"], default="gumbel")
    ln.add_argument("--no-loss-scaling", action="store_true")
    ln.add_argument("--no-rectify", action="store_true")
    ln.add_argument("--num-classes", type=int, default=0, help="class-conditional: draw labels in [0, N)")
    ln.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance (with --num-classes; label N is the null label)")
    ln.add_argument("--checkpoint-dir", default=None, help="resume from / save per-step progress here")
    ln.add_argument("--threads", type=int, default=2)
    ln.set_defaults(fn=learn_cmd)
    b = sub.add_parser("bench", help="learned masks vs DeepCache / FORA / random schedules: tables and plots")
    b.add_argument("--model", default="unet", help="unet, dit (the shipped models) or a diffusers folder")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--n", type=int, default=2000, help="samples per method")
    b.add_argument("--batch", type=int, default=250)
    b.add_argument("--targets", type=float, nargs="+", default=[0.65, 0.55, 0.45])
    b.add_argument("--main-target", type=float, default=0.55)
    b.add_argument("--deepcache", type=int, nargs="*", default=[3, 5, 10], help="uniform intervals (U-Net)")
    b.add_argument("--deepcache-nonuniform", type=int, nargs="*", default=[5])
    b.add_argument("--fora", type=int, nargs="*", default=[2, 3], help="intervals (DiT)")
    b.add_argument("--no-random", action="store_true")
    b.add_argument("--ablations", action="store_true", help="also learn without loss scaling, rectification, Gumbel")
    b.add_argument("--guidance-scale", type=float, default=2.0)
    b.add_argument("--time-batch", type=int, default=64)
    b.add_argument("--time-reps", type=int, default=5)
    b.add_argument("--no-memory", action="store_true")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--time-threads", type=int, default=None, help="threads for the timing phase (default --threads)")
    b.add_argument("--phase", choices=["all", "quality", "time"], default="all",
                   help="quality: samples and scores only; time: wall time, memory, tables and plots from a quality run")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--name", default="")
    b.add_argument("--relearn", action="store_true", help="learn again even if a matching mask is in <out>/masks")
    b.set_defaults(fn=bench_cmd)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
