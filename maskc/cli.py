"""maskc: make diffusion backbones skip blocks at the steps where they barely change.

Commands (``maskc <command> --help`` describes each option and its default):
  demo     a shipped model with and without its learned mask: MACs, PSNR, wall time, a picture
  learn    learn a mask for a diffusers model folder or a diffusers pipeline folder
  compile  compile a model with a mask: the per-step table (runs, reads, writes, MACs), a .pt2
  sample   generate images with a model (and a mask) into a PNG grid
  bench    learned masks against every peer family's best schedule of no more MACs: tables and plots
  viz      the graph diff page of one step against the original model (self-contained HTML)

A model is a shipped name (unet, dit, sd) or a diffusers folder written by save_pretrained.
An error exits with status 2 and one line, ``maskc: error: <what went wrong>``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

from maskc.errors import MaskcError
from maskc.models.shipped import SHIPPED, shipped_dir

MASK_FILE = "mask_ddim20.json"  # the learned mask shipped beside each shipped model
SPREAD_WARNING = 0.10  # warn when a timing's interquartile range exceeds this fraction of its median


# -- shared helpers ----------------------------------------------------------------------------

def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def _load(model_arg: str, mask_arg: str | None, need_mask: bool = False) -> tuple[Any, Any, str]:
    """(model, mask or None, model folder).

    ``mask_arg``: a mask JSON; "shipped" or None: a shipped model's learned mask (None: none for a
    folder); "none": no mask.
    """
    from maskc.mask import Mask
    from maskc.models.shipped import load_pretrained

    model, folder = load_pretrained(model_arg)
    model.float()
    mask = None
    shipped = os.path.join(folder, MASK_FILE) if model_arg in SHIPPED else None
    if mask_arg == "shipped" and (shipped is None or not os.path.exists(shipped)):
        raise MaskcError(f"--mask shipped needs a shipped model ({', '.join(sorted(SHIPPED))}), not {model_arg!r}; "
                         "pass a mask JSON instead")
    if mask_arg not in (None, "none", "shipped"):
        mask = Mask.load(mask_arg)
    elif mask_arg != "none" and shipped is not None and os.path.exists(shipped):
        mask = Mask.load(shipped)
    if need_mask and mask is None:
        raise MaskcError(f"no mask for {model_arg!r}: pass --mask FILE (a mask JSON from `maskc learn`)")
    if mask is not None:
        mask.check(model)
    return model, mask, folder


def _scheduler(name: str, train_steps: int) -> Any:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise MaskcError(f"unknown scheduler {name!r}; use a diffusers scheduler class such as DDIMScheduler, "
                         "DDPMScheduler or DPMSolverMultistepScheduler")
    return cls(num_train_timesteps=train_steps)


def _example(model: Any, batch: int) -> tuple[tuple, dict]:
    """A batch-``batch`` example call for a table backbone (the batch-1 example, repeated)."""
    import torch
    import torch.utils._pytree as pytree

    from maskc.passes.blocks import example_inputs

    ex = example_inputs(model)
    if ex is None:
        raise MaskcError(f"maskc has no example call for {type(model).__name__}; the command line supports the "
                         "backbones of the README's table (UNet2DModel, UNet2DConditionModel, DiT, PixArt)")

    def rep(v: Any) -> Any:
        return v.repeat(batch, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1 else v
    return pytree.tree_map(rep, ex)


def _counting(fn: Callable, bar: Any) -> Callable:
    """``fn`` that advances a progress bar once per call."""
    def call(*a: Any, **k: Any) -> Any:
        out = fn(*a, **k)
        bar.update(1)
        return out
    return call


def _conditioning(model: Any, mask: Any, n: int, class_labels: list[int] | None,
                  guidance_scale: float | None, folder: str | None = None) -> tuple[dict, float | None]:
    """Model kwargs and guidance for a batch of n: class labels cycled, the null label for guidance (DiT);
    a model with a caption table in ``folder`` (the SD-like U-Net) gets the captions of those classes as
    ``encoder_hidden_states`` and the null caption for guidance. Guidance defaults to the mask's, else
    2.0 where the null input is known."""
    import torch

    from maskc.models.shipped import NULL_CAPTION, captions, has_captions
    from maskc.sampling import stack_kwargs

    name = type(model).__name__
    if folder is not None and name == "UNet2DConditionModel" and has_captions(folder):
        table = captions(folder)
        classes, what, null_known = NULL_CAPTION, "captions", True  # rows 0..9 classes, row 10 the null caption
        embed: Callable = lambda y: {"encoder_hidden_states": table[y]}  # noqa: E731
    else:
        c = model.config
        classes = c.get("num_embeds_ada_norm") if name == "DiTTransformer2DModel" else c.get("num_class_embeds")
        what, null_known = "classes", name == "DiTTransformer2DModel"  # DiT's null label is its class count
        embed = lambda y: {"class_labels": y}  # noqa: E731
        if not classes:
            if class_labels or guidance_scale is not None:
                raise MaskcError(f"{name} is not class-conditional; drop --class-labels and --guidance-scale")
            return {}, None
    labels = class_labels if class_labels else list(range(classes))
    bad = [y for y in labels if not 0 <= y < classes]
    if bad:
        raise MaskcError(f"class labels {bad} are outside 0..{classes - 1}, the {what} this model knows")
    y = torch.tensor(labels)[torch.arange(n) % len(labels)]
    if guidance_scale is None and mask is not None:
        guidance_scale = mask.meta.get("provenance", {}).get("guidance_scale")
    if guidance_scale is None and null_known:
        guidance_scale = 2.0
    if guidance_scale is None or guidance_scale <= 1.0:
        return embed(y), None
    if not null_known:
        raise MaskcError("classifier-free guidance needs a null class; maskc knows it for DiT (label = number of "
                         "classes) and for a model with a caption table (the null caption). Drop --guidance-scale "
                         "for this model")
    return stack_kwargs(embed(y), embed(torch.full_like(y, classes))), guidance_scale


def _grid(rows: list[Any], scale: int, nrow: int) -> Any:
    """A PIL image of image batches in [0, 1] ([N, C, H, W]), ``nrow`` per line, batches one under another."""
    import numpy as np
    from PIL import Image

    lines = []
    for imgs in rows:
        a = imgs.detach().float().clamp(0, 1).cpu().numpy()
        n, c, h, w = a.shape
        cols = min(nrow, n)
        k = -(-n // cols)
        g = np.ones((k * (h + 2), cols * (w + 2), c), dtype=np.float32)
        for j in range(n):
            r, q = divmod(j, cols)
            g[r * (h + 2) + 1:r * (h + 2) + 1 + h, q * (w + 2) + 1:q * (w + 2) + 1 + w] = a[j].transpose(1, 2, 0)
        lines.append(g)
    width = max(g.shape[1] for g in lines)
    lines = [np.pad(g, ((0, 0), (0, width - g.shape[1]), (0, 0)), constant_values=1.0) for g in lines]
    img = (np.concatenate(lines, axis=0) * 255).round().astype(np.uint8)
    img = img[..., 0] if img.shape[2] == 1 else img[..., :3]
    pil = Image.fromarray(img)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def timing_report(times: dict[str, list[float]], n: int, threads: int) -> tuple[list[str], bool]:
    """Lines that give each variant's median with its quartiles and the speed-up with its spread.

    Returns (lines, wide): ``wide`` when a variant's interquartile range exceeds
    ``SPREAD_WARNING`` of its median, which means the machine was busy and the
    speed-up is not to be trusted; the last line then says so.
    """
    from maskc.eval import summarize_times

    s = {k: summarize_times(v) for k, v in times.items()}
    o, m = s["original"], s["maskc"]
    ratios = sorted(a / b for a, b in zip(times["original"], times["maskc"]))
    r = summarize_times(ratios)
    lines = [
        f"wall time per generation of {n} ({threads} threads, {o['n']} interleaved rounds, median [quartiles]): "
        f"original {o['median']:.2f} s [{o['q1']:.2f}-{o['q3']:.2f}], maskc {m['median']:.2f} s "
        f"[{m['q1']:.2f}-{m['q3']:.2f}]",
        f"speed-up {o['median'] / m['median']:.2f}x (per-round ratios: quartiles {r['q1']:.2f}-{r['q3']:.2f}, "
        f"min-max {r['min']:.2f}-{r['max']:.2f})",
    ]
    spread = {k: (v["q3"] - v["q1"]) / v["median"] for k, v in s.items() if v["median"] > 0}
    wide = any(x > SPREAD_WARNING for x in spread.values())
    if wide:
        worst = max(spread, key=spread.__getitem__)
        lines.append(f"warning: the {worst} times spread by {100 * spread[worst]:.0f}% of their median (IQR) across "
                     f"rounds: the machine is busy and the speed-up above is unreliable. Rerun on an idle machine "
                     f"or with more --reps.")
    return lines, wide


# -- demo ----------------------------------------------------------------------------------------

def demo(args: argparse.Namespace) -> int:
    """A shipped Fashion-MNIST model with its learned mask: samples, PSNR, MACs, wall time, a picture."""
    t_start = time.perf_counter()
    if args.random_ddpm or shipped_dir(args.model) is None:
        return demo_random(args)
    import torch
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    import maskc
    from maskc.eval import fidelity, generation_macs, interleaved_times
    from maskc.sampling import generate

    _threads(args.threads)
    model, mask, d = _load(args.model, None, need_mask=True)
    T = mask.steps
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(T)
    mask.check(model, sched)
    print(f"shipped model: {d} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters); mask: {mask}")
    tm = maskc.compile(model, mask)
    ts = [t.reshape(1) for t in sched.timesteps]
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    kwargs, guidance, ex_kw = {}, None, {}
    if args.model in ("dit", "sd"):  # labels (DiT) or class captions (sd) 0..9 in turn, guidance with the null one
        kwargs, guidance = _conditioning(model, mask, args.n, None, None, d)
        ex_kw = {k: v[:1] for k, v in kwargs.items()}
    ex = (torch.zeros(1, *shape),)
    frac = generation_macs(model, mask, ex, {**ex_kw, "timestep": ts[0]}, "timestep", ts) / generation_macs(
        model, None, ex, {**ex_kw, "timestep": ts[0]}, "timestep", ts)
    x0 = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed))
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(total=2 * (args.reps + 1), desc="generations (original and maskc interleaved)", unit="gen")

    def run(name: str) -> None:
        fn = model if name == "original" else tm
        out[name] = generate(fn, sched, x0, T, kwargs, guidance, reset=None if name == "original" else tm.reset)
        bar.update(1)

    # one untimed round first: the first maskc call traces the model
    times = interleaved_times({"original": lambda: run("original"), "maskc": lambda: run("maskc")}, args.reps, warmup=1)
    bar.close()
    ref, got = out["original"], out["maskc"]
    f = fidelity(got, ref)
    print(f"MACs: {frac:.3f} of the original ({1 / frac:.2f}x fewer); vs the original's samples: "
          f"PSNR {f['psnr']:.2f} dB, SSIM {f['ssim']:.3f}")
    lines, _ = timing_report(times, args.n, args.threads)
    print("\n".join(lines))
    path = args.out or f"maskc_demo_{args.model}.png"
    _grid([ref, got], 3, args.n).save(path)
    print(f"wrote {path}: top row original, bottom row maskc, same initial noise")
    print(f"demo took {time.perf_counter() - t_start:.0f} s")
    return 0


def demo_random(args: argparse.Namespace) -> int:
    """Compile a DeepCache-like mask for the DDPM-CIFAR10 U-Net and show what it buys."""
    import torch
    from diffusers import DDIMScheduler, UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode
    from tqdm.auto import tqdm

    import maskc
    from maskc.eval import interleaved_times
    from maskc.models.configs import DDPM_CIFAR10

    _threads(args.threads)
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

    def run(fn: Callable, count_flops: bool = False) -> tuple[Any, int]:
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
    _, f_mask = run(tm, True)
    full = maskc.compile(model, maskc.Mask.full(T, names))
    same, _ = run(full)
    print(f"all-ones mask reproduces the model bit for bit: {torch.equal(same, ref)}")
    print(f"masked generation uses {f_mask / f_full:.3f} of the FLOPs")
    bar = tqdm(total=2 * args.reps, desc="generations (original and maskc interleaved)", unit="gen")

    def timed(fn: Callable) -> Callable[[], None]:
        def go() -> None:
            tm.reset()
            run(fn)
            bar.update(1)
        return go

    times = interleaved_times({"original": timed(model), "maskc": timed(tm)}, args.reps, warmup=0)
    bar.close()
    print("\n".join(timing_report(times, 1, args.threads)[0]))
    return 0


# -- learn -----------------------------------------------------------------------------------------

def learn_cmd(args: argparse.Namespace) -> int:
    """Learn a mask for a diffusers model folder (or pipeline folder) and write it as JSON."""
    import torch

    _threads(args.threads)
    overrides = dict(batch=args.batch, iters=args.iters, sampling=args.sampling, cache=args.cache, refine=args.refine,
                     search_evals=args.search_evals, search_batch=args.search_batch,
                     search_restarts=args.search_restarts, select_batch=args.select_batch,
                     loss_scaling=not args.no_loss_scaling, rectify=not args.no_rectify)
    if args.pipeline:
        return _learn_pipeline(args, overrides)
    if args.prompt:
        raise MaskcError("--prompt needs --pipeline (a bare model folder has no text encoder)")
    # torchrun: one seed is learned by all processes together (phase 2 splits the steps, phase 4 the
    # calibration noises); several seeds are split over the processes (maskc.pick.learn_best)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 and len(args.seed) == 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    from maskc.models.shipped import NULL_CAPTION, captions, has_captions, load_pretrained

    model, folder = load_pretrained(args.model)
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    cond = uncond = None
    if has_captions(folder) and type(model).__name__ == "UNet2DConditionModel":  # the SD-like U-Net
        table = captions(folder)
        cond = lambda n, g: {"encoder_hidden_states": table[torch.randint(0, NULL_CAPTION, (n,), generator=g)]}  # noqa: E731
        uncond = lambda n, g: {"encoder_hidden_states": table[torch.full((n,), NULL_CAPTION)]}  # noqa: E731
    elif args.num_classes:
        cond = lambda n, g: {"class_labels": torch.randint(0, args.num_classes, (n,), generator=g)}  # noqa: E731
        uncond = lambda n, g: {"class_labels": torch.full((n,), args.num_classes)}  # noqa: E731 - the null label
    if args.guidance_scale is not None and cond is None:
        raise MaskcError("--guidance-scale with --model needs --num-classes (the null label is class N) or a model "
                         "with a caption table (sd); or learn from a pipeline folder with --pipeline")
    mask = _learner(args)(model, _scheduler(args.scheduler, args.train_steps), steps=args.steps, sample_shape=shape,
                          target=args.target, cond=cond, uncond=uncond, guidance_scale=args.guidance_scale,
                          checkpoint_dir=args.checkpoint_dir, **overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        mask.save(args.out)
        print(f"wrote {args.out}: {mask}, MACs fraction {mask.meta['provenance']['macs_fraction']:.3f}")
    if distributed:
        dist.destroy_process_group()
    return 0


def _learner(args: argparse.Namespace) -> Any:
    """``maskc.learn`` with the one ``--seed``, or ``maskc.pick.learn_best`` over several."""
    import functools

    import maskc
    from maskc.pick import learn_best

    if len(args.seed) == 1:
        return functools.partial(maskc.learn, seed=args.seed[0])
    return functools.partial(learn_best, seeds=args.seed, n_select=args.n_select, select_seed=args.select_seed)


def _learn_pipeline(args: argparse.Namespace, overrides: dict) -> int:
    import diffusers

    if args.num_classes:
        raise MaskcError("--num-classes is for --model; with --pipeline pass --class-labels (the pipeline knows its "
                         "null label)")
    if not os.path.isdir(args.pipeline):
        raise MaskcError(f"pipeline folder {args.pipeline!r} not found; expected a folder written by "
                         "pipe.save_pretrained (with model_index.json)")
    pipe = diffusers.DiffusionPipeline.from_pretrained(args.pipeline)
    cond: dict[str, Any] = {}
    if args.prompt:
        cond["prompt"] = args.prompt
    if args.class_labels:
        cond["class_labels"] = args.class_labels
    mask = _learner(args)(pipe, target=args.target, num_inference_steps=args.steps,
                          guidance_scale=args.guidance_scale, checkpoint_dir=args.checkpoint_dir, **cond, **overrides)
    mask.save(args.out)
    print(f"wrote {args.out}: {mask} for {type(pipe).__name__}, MACs fraction "
          f"{mask.meta['provenance']['macs_fraction']:.3f}")
    return 0


# -- compile ---------------------------------------------------------------------------------------

def step_table(an: Any) -> list[str]:
    """The per-step table of an ``maskc.diff.Analysis``: runs, reads, writes, MACs, cache bytes."""
    B = len(an.mask.names)
    lines = [f"{'step':>4} {'timestep':>8} {'runs':>7} {'reads':>5} {'writes':>6} {'MACs':>10} {'x orig':>6} "
             f"{'cache KiB':>9}  module"]
    for r in an.rows:
        ts = f"{r.timestep:g}" if r.timestep is not None else "-"
        frac = r.macs / an.original_macs if an.original_macs else 0.0
        same = "" if r.same_as == r.step else f"same as step {r.same_as}"
        lines.append(f"{r.step:>4} {ts:>8} {len(r.runs):>3}/{B:<3} {len(r.reads):>5} {len(r.writes):>6} "
                     f"{r.macs / 1e6:>9.2f}M {frac:>6.3f} {r.cache_bytes / 1024:>9.1f}  {same}")
    total = sum(r.macs for r in an.rows)
    n_mod = len({r.same_as for r in an.rows})
    lines.append(f"generation: {total / 1e6:.1f}M MACs, {total / (an.original_macs * len(an.rows)):.3f} of the "
                 f"original; {n_mod} distinct step modules; peak cache "
                 f"{max(r.cache_bytes for r in an.rows) / 1024:.1f} KiB (every block cached: "
                 f"{an.all_blocks_bytes / 1024:.1f} KiB); example: {an.example_desc}")
    return lines


def compile_cmd(args: argparse.Namespace) -> int:
    """Compile a model with a mask: print the step table; with --out, write the .pt2 artifact."""
    import maskc
    from maskc.diff import analyze

    _threads(args.threads)
    export = None
    if args.out:
        if not args.out.endswith(".pt2"):
            raise MaskcError(f"--out {args.out!r} must end in .pt2 (torch's archive format); choose a name like model.pt2")
        try:
            from maskc.export import export
        except ImportError as e:
            raise MaskcError(f"export is not available in this maskc ({e}); run without --out for the step table") from None
    model, mask, _ = _load(args.model, args.mask, need_mask=True)
    ex = _example(model, args.batch)
    an = analyze(model, mask, ex, progress=True)
    print(f"{type(model).__name__} with {mask}:")
    print("\n".join(step_table(an)))
    if export is not None:
        tm = maskc.compile(model, mask, backend=args.backend, example_args=ex[0], example_kwargs=ex[1])
        path = export(tm, args.out)
        print(f"wrote {path} (specialized to the example's shapes: {an.example_desc})")
    return 0


# -- sample ----------------------------------------------------------------------------------------

def sample_cmd(args: argparse.Namespace) -> int:
    """Generate images with a model and, optionally, a mask, into a PNG grid."""
    import torch
    from tqdm.auto import tqdm

    import maskc
    from maskc.sampling import generate

    _threads(args.threads)
    model, mask, folder = _load(args.model, args.mask or "none")
    steps = args.steps or (mask.steps if mask is not None else 20)
    if mask is not None and steps != mask.steps:
        raise MaskcError(f"--steps {steps} differs from the mask's {mask.steps} steps; drop --steps or use a mask "
                         f"with {steps} rows")
    name = args.scheduler or (mask.meta.get("scheduler") if mask is not None else None) or "DDIMScheduler"
    sched = _scheduler(name, args.train_steps)
    sched.set_timesteps(steps)
    if mask is not None:
        mask.check(model, sched)
    kwargs, guidance = _conditioning(model, mask, args.n, args.class_labels, args.guidance_scale, folder)
    c = model.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    x0 = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed))
    variants: list[tuple[str, Any]] = []
    if mask is None or args.compare:
        variants.append(("original", model))
    if mask is not None:
        variants.append(("maskc", maskc.compile(model, mask)))
    rows = []
    for label, fn in variants:
        with tqdm(total=steps, desc=f"sampling ({label})", unit="step") as bar:
            t0 = time.perf_counter()
            reset = fn.reset if label == "maskc" else None
            rows.append(generate(_counting(fn, bar), sched, x0, steps, kwargs, guidance, reset=reset))
            dt = time.perf_counter() - t0
        print(f"{label}: {args.n} samples, {steps} steps of {name}"
              + (f", guidance {guidance:g}" if guidance else "") + f", {dt:.1f} s")
    _grid(rows, args.scale, args.nrow).save(args.out)
    what = " (top: original, bottom: maskc, same noise)" if len(rows) == 2 else ""
    print(f"wrote {args.out}{what}")
    return 0


# -- viz -------------------------------------------------------------------------------------------

def viz_cmd(args: argparse.Namespace) -> int:
    """Write the graph diff page of one step (self-contained HTML)."""
    from maskc.diff import analyze, pick_step, render

    _threads(args.threads)
    model, mask, _ = _load(args.model, args.mask, need_mask=True)
    step = pick_step(mask) if args.step is None else args.step
    if not 0 <= step < mask.steps:
        raise MaskcError(f"--step {step} is outside the mask's steps 0..{mask.steps - 1}")
    an = analyze(model, mask, _example(model, 1), progress=True)
    page = render(an, step)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(page)
    st = an.status(step)
    print(f"wrote {args.out}: step {step} of {mask.steps}, {sum(v == 'runs' for v in st.values())} blocks run, "
          f"{sum(v == 'cached' for v in st.values())} cached, {sum(v == 'dead' for v in st.values())} dead; "
          f"open it in a browser (it loads nothing from the network)")
    return 0


# -- bench -----------------------------------------------------------------------------------------

def _shard(text: str) -> tuple[int, int]:
    """``K/N`` as (K, N); run_bench checks 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 0/2, got {text!r}") from None
    return k, n


def bench_cmd(args: argparse.Namespace) -> int:
    """Run ``maskc.bench.run_bench`` with the command line's settings."""
    from maskc.bench import BenchConfig, run_bench

    run_bench(BenchConfig(
        model=args.model, steps=args.steps, sampler=args.sampler, peers=args.peers, select_n=args.select_n, bootstrap=args.bootstrap,
        step_reuse=tuple(args.step_reuse), delta_threshold=tuple(args.delta_threshold), n=args.n, batch=args.batch, targets=tuple(args.targets),
        main_target=args.main_target, deepcache=tuple(args.deepcache), deepcache_nonuniform=tuple(args.deepcache_nonuniform),
        fora=tuple(args.fora), random=not args.no_random, ablations=args.ablations, guidance_scale=args.guidance_scale,
        time_batch=args.time_batch, time_reps=args.time_reps, memory=not args.no_memory, threads=args.threads,
        time_threads=args.time_threads, phase=args.phase,
        seed=args.seed, out=args.out, name=args.name, reuse_masks=not args.relearn, row_store=not args.no_row_store,
        shard=args.shard[0], shards=args.shard[1], help_shards=not args.own_shard_only))
    return 0


# -- the parser ------------------------------------------------------------------------------------

MODEL_HELP = "a shipped model (unet, dit, sd) or a diffusers model folder written by save_pretrained"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help already says what the default means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per verb, every option described with its default."""
    fmt = _Help
    ap = argparse.ArgumentParser(prog="maskc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="command")

    def add(name: str, fn: Callable, help_: str, desc: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=desc, formatter_class=fmt)
        p.set_defaults(fn=fn)
        return p

    d = add("demo", demo, "a shipped model with and without its learned mask: MACs, PSNR, time, a picture",
            "Sample a shipped Fashion-MNIST model with and without its learned mask from the same noise; print the "
            "MACs fraction, PSNR and SSIM against the original's samples, and wall times measured in interleaved "
            "rounds (median, quartiles, a warning when the machine is too busy to trust them); write a picture "
            "(top row original, bottom row maskc). Takes 2 to 3 minutes on 2 CPU threads.")
    d.add_argument("--model", choices=sorted(SHIPPED), default="unet",
                   help="the shipped U-Net, the class-conditional DiT, or the caption-conditioned SD-like U-Net "
                        "(dit, sd: classes 0..9 in turn, classifier-free guidance)")
    d.add_argument("--n", type=int, default=8, help="samples per generation")
    d.add_argument("--reps", type=int, default=5, help="timed rounds (each: one original and one maskc generation)")
    d.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    d.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    d.add_argument("--out", default=None, help="picture to write (default: maskc_demo_<model>.png)")
    d.add_argument("--random-ddpm", action="store_true",
                   help="the 35.7M DDPM-CIFAR10 topology with random weights and a DeepCache-like mask instead")
    d.add_argument("--steps", type=int, default=10, help="DDIM steps of the --random-ddpm demo")

    from maskc.learn import LearnConfig

    LC = LearnConfig()
    ln = add("learn", learn_cmd, "learn a mask for a diffusers model folder or pipeline folder",
             "Learn a T x B mask that keeps about --target of the model's MACs (He & Gao 2026, with maskc's cache "
             "model) and write it as JSON. Give a model folder (--model) with a scheduler, or a diffusers pipeline "
             "folder (--pipeline), whose scheduler and conditioning are used. Runs under torchrun too (--model): "
             "one --seed is learned by all processes together, several are split over them.")
    src = ln.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help=MODEL_HELP)
    src.add_argument("--pipeline", help="a diffusers pipeline folder (DiffusionPipeline.from_pretrained)")
    ln.add_argument("--out", required=True, help="mask JSON to write")
    ln.add_argument("--steps", type=int, default=20, help="denoising steps T (the pipeline's num_inference_steps)")
    ln.add_argument("--target", type=float, default=0.6, help="fraction of the original's MACs to keep")
    ln.add_argument("--prompt", nargs="+", default=None, help="(--pipeline) prompts to learn on, cycled over the batch (default: none)")
    ln.add_argument("--class-labels", type=int, nargs="+", default=None,
                    help="(--pipeline) class labels to learn on, cycled over the batch (default: none)")
    ln.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance scale (default: the pipeline's own, none for --model; "
                         "with --model it needs --num-classes or a caption table: sd learns on random class "
                         "captions, the null caption unconditional)")
    ln.add_argument("--num-classes", type=int, default=0,
                    help="(--model) class-conditional: labels drawn in [0, N), label N is the null label")
    ln.add_argument("--scheduler", default="DDIMScheduler", help="(--model) diffusers scheduler class")
    ln.add_argument("--train-steps", type=int, default=1000, help="(--model) the scheduler's training timesteps")
    ln.add_argument("--seed", type=int, nargs="+", default=[0],
                    help="seed of the learning trajectory; several: learn with each and keep the mask with the best "
                         "PSNR on --n-select noises none of them saw (maskc.pick.learn_best)")
    ln.add_argument("--n-select", type=int, default=32, help="(several seeds) selection noises of the pick")
    ln.add_argument("--select-seed", type=int, default=998, help="(several seeds) seed of the selection noises")
    ln.add_argument("--batch", type=int, default=LC.batch, help="samples in the learning trajectory (phase 2)")
    ln.add_argument("--iters", type=int, default=LC.iters, help="optimizer iterations per step")
    ln.add_argument("--cache", choices=["original", "masked"], default=LC.cache,
                    help="phase 2's cache: the original's outputs of step i-1 (the paper) or the masked run's (ablation)")
    ln.add_argument("--refine", choices=["search", "none"], default=LC.refine,
                    help="phase 4: search whole masks by the final samples' PSNR (none: the per-step mask, ablation)")
    ln.add_argument("--search-evals", type=int, default=LC.search_evals, help="masks the trajectory search scores")
    ln.add_argument("--search-batch", type=int, default=LC.search_batch,
                    help="calibration noises of the trajectory search (split over torchrun processes)")
    ln.add_argument("--search-restarts", type=int, default=LC.search_restarts,
                    help="searches, each on its own calibration noises; the best on --select-batch other noises is "
                         "kept (cheaper than several --seed: phases 1 to 3 run once)")
    ln.add_argument("--select-batch", type=int, default=LC.select_batch,
                    help="(--search-restarts above 1) noises that choose among the restarts")
    ln.add_argument("--sampling", choices=["stochastic", "gumbel"], default="gumbel",
                    help="how masks are sampled during learning (gumbel: Gumbel-Softmax; stochastic: Bernoulli)")
    ln.add_argument("--no-loss-scaling", action="store_true", help="turn off timestep-aware loss scaling")
    ln.add_argument("--no-rectify", action="store_true", help="do not rectify the learned mask")
    ln.add_argument("--checkpoint-dir", default=None, help="resume from / save per-step progress here (default: no checkpoints)")
    ln.add_argument("--threads", type=int, default=2, help="torch CPU threads")

    cp = add("compile", compile_cmd, "compile a model with a mask: the per-step table, optionally a .pt2 artifact",
             "Trace the model on a batch-N example, rewrite it into one module per step, and print what each step "
             "does: blocks run (of all), cached values read, values written for later steps, MACs (FlopCounterMode) "
             "and cache bytes held. With --out, write the step modules as a .pt2 artifact (maskc.export).")
    cp.add_argument("--model", default="unet", help=MODEL_HELP)
    cp.add_argument("--mask", default=None, help="mask JSON (default: a shipped model's learned mask)")
    cp.add_argument("--out", default=None, help="write a .pt2 artifact here (maskc.export; runs with torch alone; default: no artifact)")
    cp.add_argument("--backend", default="eager", help="maskc.compile backend for the artifact (eager, inductor)")
    cp.add_argument("--batch", type=int, default=1, help="batch size of the example the trace is specialized to")
    cp.add_argument("--threads", type=int, default=1, help="torch CPU threads")

    sp = add("sample", sample_cmd, "generate images with a model (and a mask) into a PNG grid",
             "Generate --n samples from the same seeded noise with the model, compiled with --mask if given, and "
             "write them as a PNG grid. The scheduler runs the mask's step count; class-conditional models get "
             "--class-labels (cycled) and classifier-free guidance as the DiT demo does; the SD-like U-Net (sd) gets the "
             "captions of those classes and the null caption.")
    sp.add_argument("--model", default="unet", help=MODEL_HELP)
    sp.add_argument("--mask", default=None,
                    help="mask JSON to sample with, or 'shipped' for a shipped model's learned mask (default: no mask, "
                         "the original model)")
    sp.add_argument("--compare", action="store_true", help="also sample the original model (top row) from the same noise")
    sp.add_argument("--n", type=int, default=8, help="number of samples")
    sp.add_argument("--steps", type=int, default=None, help="denoising steps (default: the mask's, else 20)")
    sp.add_argument("--scheduler", default=None, help="diffusers scheduler class (default: the mask's, else DDIMScheduler)")
    sp.add_argument("--train-steps", type=int, default=1000, help="the scheduler's training timesteps")
    sp.add_argument("--class-labels", type=int, nargs="+", default=None,
                    help="class labels, cycled over the samples (class-conditional and caption models; default 0, 1, 2, ...)")
    sp.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance (DiT, sd; default: the mask's, else 2.0; <= 1 turns it off)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    sp.add_argument("--out", default="maskc_sample.png", help="PNG grid to write")
    sp.add_argument("--nrow", type=int, default=8, help="images per line of the grid")
    sp.add_argument("--scale", type=int, default=3, help="pixel upscaling of the grid")
    sp.add_argument("--threads", type=int, default=2, help="torch CPU threads")

    b = add("bench", bench_cmd, "learned masks vs every peer family's best schedule: tables and plots",
            "Learn masks at several MACs targets, write peers' schedules as masks, sample each from the same noise, "
            "and score FD-FMNIST, KID, PSNR, SSIM, MACs, interleaved wall time and peak memory into <out>/<name>.md.")
    b.add_argument("--model", default="unet", help=MODEL_HELP)
    b.add_argument("--steps", type=int, default=20, help="sampler steps per generation")
    b.add_argument("--sampler", choices=["ddim", "dpm++"], default="ddim",
                   help="DDIM (eta 0) or DPM-Solver++ (multistep, 2nd order)")
    b.add_argument("--peers", choices=["best", "fixed"], default="best",
                   help="best: per peer family, its best member of no more MACs than each learned mask (chosen on "
                        "--select-n other noises); fixed: the intervals given below")
    b.add_argument("--select-n", type=int, default=16, help="noises that choose each family's best member")
    b.add_argument("--bootstrap", type=int, default=1000,
                   help="paired bootstrap resamples of the noises for the 95%% intervals of FD ratios and margins")
    b.add_argument("--n", type=int, default=2000, help="samples per method")
    b.add_argument("--batch", type=int, default=250, help="generation batch of the quality phase")
    b.add_argument("--targets", type=float, nargs="+", default=[0.65, 0.55, 0.45], help="MACs targets to learn")
    b.add_argument("--main-target", type=float, default=0.55, help="the target whose mask is the headline row")
    b.add_argument("--deepcache", type=int, nargs="*", default=[3, 5, 10], help="DeepCache uniform intervals (U-Net)")
    b.add_argument("--deepcache-nonuniform", type=int, nargs="*", default=[5],
                   help="DeepCache non-uniform intervals (U-Net)")
    b.add_argument("--fora", type=int, nargs="*", default=[2, 3], help="FORA intervals (DiT; --peers fixed)")
    b.add_argument("--step-reuse", type=int, nargs="*", default=[2, 3],
                   help="step-level reuse intervals (--peers fixed)")
    b.add_argument("--delta-threshold", type=int, nargs="*", default=[10],
                   help="static δ-threshold schedules with this many full steps (--peers fixed)")
    b.add_argument("--no-random", action="store_true", help="skip the random equal-MACs baseline")
    b.add_argument("--ablations", action="store_true", help="also learn without loss scaling, rectification, Gumbel")
    b.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance (DiT)")
    b.add_argument("--time-batch", type=int, default=64, help="generation batch of the timing phase")
    b.add_argument("--time-reps", type=int, default=5, help="interleaved timing rounds")
    b.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    b.add_argument("--time-threads", type=int, default=None, help="threads for the timing phase (default: --threads)")
    b.add_argument("--phase", choices=["all", "quality", "time"], default="all",
                   help="quality: samples and scores only; time: wall time, memory, tables and plots from a quality run")
    b.add_argument("--seed", type=int, default=0, help="seed of noise and learning")
    b.add_argument("--out", default="benchmarks/results", help="folder of the result tables, plots and masks")
    b.add_argument("--name", default="", help="result file name (default: derived from the model and steps)")
    b.add_argument("--relearn", action="store_true", help="learn again even if a matching mask is in <out>/masks")
    b.add_argument("--no-row-store", action="store_true",
                   help="sample every row again, even one that <out>/rows holds for a mask of the same bits, weights, "
                        "settings and sampling code (and keep none)")
    b.add_argument("--shard", type=_shard, default=(0, 1), metavar="K/N",
                   help="sample methods K, K+N, ... first (the original is method 0), then help with the other "
                        "shards' unfinished methods from the last backwards; finished rows and batches are kept under "
                        "<out>/partial/<name>, so N processes split the quality phase and an interrupted run "
                        "resumes; one of the runs that find every row done writes the table "
                        "(default: 0/1, all methods)")
    b.add_argument("--own-shard-only", action="store_true",
                   help="with --shard K/N, sample only methods K, K+N, ... and stop (no help with other shards')")

    v = add("viz", viz_cmd, "the graph diff page of one step against the original (self-contained HTML)",
            "Write one HTML page (inline SVG and CSS, nothing loaded from the network) for step --step: the block "
            "graph in execution order with blocks that run, blocks read from the cache and glue removed as dead "
            "code; the fx node-level diff of the step's GraphModule against the capture; the T x B mask as a "
            "heatmap with MACs and cache bytes per step.")
    v.add_argument("--model", default="unet", help=MODEL_HELP)
    v.add_argument("--mask", default=None, help="mask JSON (default: a shipped model's learned mask)")
    v.add_argument("--step", type=int, default=None,
                   help="the step to show (default: the one that splits running and skipped blocks most evenly)")
    v.add_argument("--out", default="maskc_diff.html", help="HTML page to write")
    v.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; a maskc error (or a file that cannot be read or written) exits 2 with one line."""
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (MaskcError, OSError) as e:
        msg = " ".join(str(e).split())
        print(f"maskc: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
