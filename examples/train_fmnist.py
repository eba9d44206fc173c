"""Train a small DDPM U-Net (the google/ddpm-cifar10-32 topology at reduced width), a
class-conditional DiT (``--arch dit``, diffusers' DiTTransformer2DModel), or a
caption-conditioned Stable-Diffusion-like U-Net (``--arch sd``, UNet2DConditionModel with
cross-attention on a fixed caption table), on Fashion-MNIST.

Data: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``),
28x28 images scaled to [-1, 1] and padded to 32x32 with the background value.
Training: epsilon prediction (the DiT also gets the class label, dropped to the null
label 10% of the time so that classifier-free guidance works; the SD-like U-Net gets its
class's caption embeddings as ``encoder_hidden_states``, dropped to the null caption 10%
of the time), DDPMScheduler (1000 linear-beta steps), AdamW, EMA of
the weights, time-bounded (``--minutes``). Writes a diffusers folder
(``save_pretrained``: config.json + safetensors, EMA weights, float16 if asked), the
caption table for ``--arch sd`` (``captions.safetensors``, key "captions", [11, L, D]: a
fixed seeded random tensor standing in for a frozen text encoder; row 10 is the null
caption) and a model card (``MODEL_CARD.md`` + ``training.json``: data, steps, seed, loss).

``--mask-only`` trains nothing: it loads the model in ``--out`` and learns its shipped
mask (``mask_ddim20.json``: DDIM 20 steps, 0.6 of the MACs, seed 0; the conditional
models with guidance 2.0 on random labels).

Usage: python examples/train_fmnist.py --out maskc/models/weights/fmnist-unet --minutes 50
       python examples/train_fmnist.py --arch dit --out maskc/models/weights/fmnist-dit --minutes 65 --threads 1 --lr 3e-4
       python examples/train_fmnist.py --arch sd --out maskc/models/weights/fmnist-sd --minutes 40 --threads 1 --batch 32 --lr 3e-4
       python examples/train_fmnist.py --arch sd --out maskc/models/weights/fmnist-sd --mask-only --threads 1
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

from maskc.data import load_images, load_labels
from maskc.models.configs import FMNIST_DIT, FMNIST_SD, FMNIST_SD_CAPTIONS, ddpm_cifar10

CAPTIONS_FILE = "captions.safetensors"


def make_captions(spec: dict = FMNIST_SD_CAPTIONS) -> torch.Tensor:
    """The fixed caption table [rows, tokens, dim] (row ``spec['null']`` is the null caption)."""
    g = torch.Generator().manual_seed(spec["seed"])
    return torch.randn((spec["rows"], spec["tokens"], spec["dim"]), generator=g)


def learn_mask(out: str, arch: str, seed: int = 0) -> None:
    """Learn and save ``out/mask_ddim20.json`` for the model saved in ``out`` (DDIM 20, 0.6 of the MACs)."""
    from diffusers import DDIMScheduler

    import maskc
    from maskc.models.shipped import load_pretrained

    model, _ = load_pretrained(out)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    kw: dict = {}
    if arch == "sd":
        from safetensors.torch import load_file

        table = load_file(os.path.join(out, CAPTIONS_FILE))["captions"]
        null = FMNIST_SD_CAPTIONS["null"]
        kw = dict(cond=lambda n, g: {"encoder_hidden_states": table[torch.randint(0, null, (n,), generator=g)]},
                  uncond=lambda n, g: {"encoder_hidden_states": table[null].expand(n, -1, -1)},
                  guidance_scale=2.0)
    elif arch == "dit":
        kw = dict(cond=lambda n, g: {"class_labels": torch.randint(0, 10, (n,), generator=g)},
                  uncond=lambda n, g: {"class_labels": torch.full((n,), 10, dtype=torch.long)},
                  guidance_scale=2.0)
    mask = maskc.learn(model, sched, steps=20, sample_shape=(1, 32, 32), target=0.6, seed=seed, **kw)
    mask.save(os.path.join(out, "mask_ddim20.json"))
    print(f"saved {os.path.join(out, 'mask_ddim20.json')}: {mask.meta['provenance'].get('macs_fraction')} of the MACs")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", choices=("unet", "dit", "sd"), default="unet")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")
    ap.add_argument("--config", default="{}",
                    help="JSON object of config overrides over the arch's default, e.g. '{\"num_layers\": 8}' "
                         "(a topology we do not ship)")
    ap.add_argument("--mask-only", action="store_true", help="train nothing: learn mask_ddim20.json for the model in --out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.mask_only:
        learn_mask(a.out, a.arch, seed=0)
        return
    torch.manual_seed(a.seed)
    images = load_images("train")
    labels = load_labels("train")
    dit, sd = a.arch == "dit", a.arch == "sd"
    overrides = json.loads(a.config)
    cfg = {**(FMNIST_DIT if dit else FMNIST_SD if sd else ddpm_cifar10(width=a.width, in_channels=1)), **overrides}
    spec = {**FMNIST_SD_CAPTIONS, "dim": cfg.get("cross_attention_dim")}  # the caption table, as wide as cross-attention
    if dit:
        model = DiTTransformer2DModel(**cfg)
    elif sd:
        model = UNet2DConditionModel(**cfg)
        captions = make_captions(spec)
        null = spec["null"]
    else:
        model = UNet2DModel(**cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed)
    start = time.time()
    step, losses = 0, []
    log: list[dict] = []
    while time.time() - start < a.minutes * 60:
        idx = torch.randint(0, images.shape[0], (a.batch,), generator=g)
        x0 = images[idx]
        if torch.rand(1, generator=g).item() < 0.5:
            x0 = x0.flip(-1)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (a.batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        kw = {"class_labels": labels[idx]} if dit else {}  # DiT drops 10% to the null label itself
        if sd:  # the caption of each image's class, the null caption with p=0.1
            drop = torch.rand(a.batch, generator=g) < 0.1
            kw = {"encoder_hidden_states": captions[torch.where(drop, null, labels[idx])]}
        loss = F.mse_loss(model(xt, t, **kw).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / 500)
        opt.step()
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            entry = {"step": step, "loss": float(np.mean(losses[-100:])), "minutes": (time.time() - start) / 60}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    os.makedirs(a.out, exist_ok=True)
    save = ema.half() if a.fp16 else ema
    save.save_pretrained(a.out, safe_serialization=True)
    if sd:
        from safetensors.torch import save_file

        save_file({"captions": captions.contiguous()}, os.path.join(a.out, CAPTIONS_FILE))
    params = sum(p.numel() for p in model.parameters())
    if dit:
        arch = (f"DiTTransformer2DModel, class-conditional (10 classes + null label), {cfg['num_layers']} layers, "
                f"width {cfg['num_attention_heads'] * cfg['attention_head_dim']}, patch {cfg['patch_size']}")
    elif sd:
        arch = (f"UNet2DConditionModel (Stable-Diffusion-like: {', '.join(cfg['down_block_types'])}; "
                f"channels {tuple(cfg['block_out_channels'])}, {cfg['attention_head_dim']} heads), "
                f"cross-attention on caption embeddings [{spec['tokens']}, {spec['dim']}] from {CAPTIONS_FILE} "
                f"({spec['rows']} rows: 10 class captions + the null caption, row {spec['null']})")
    else:
        arch = "UNet2DModel, google/ddpm-cifar10-32 topology at width %d" % a.width
    if overrides:
        arch += f" with overrides {json.dumps(overrides)}"
    dropped = {"dit": ", class label dropped to the null label with p=0.1",
               "sd": ", caption dropped to the null caption with p=0.1"}.get(a.arch, "")
    info = {
        "model": arch,
        "parameters": params,
        "data": "Fashion-MNIST train (60,000 images, Debian dataset-fashion-mnist), padded to 32x32, [-1, 1], random h-flip",
        "objective": "epsilon prediction, DDPMScheduler 1000 steps, linear betas"
        + dropped,
        "optimizer": f"AdamW lr {a.lr} (500-step warm-up), batch {a.batch}, grad clip 1.0",
        "ema": a.ema,
        "steps": step,
        "minutes": (time.time() - start) / 60,
        "seed": a.seed,
        "threads": a.threads,
        "final_loss_last100": float(np.mean(losses[-100:])) if losses else math.nan,
        "dtype": "float16" if a.fp16 else "float32",
        "config_overrides": overrides,
        **({"captions": {**spec, "file": CAPTIONS_FILE, "key": "captions",
                         "made_by": "torch.randn((rows, tokens, dim), generator=torch.Generator().manual_seed(seed))"}}
           if sd else {}),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "log": log,
    }
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    title = {"dit": "class-conditional DiT", "sd": "caption-conditioned SD-like U-Net"}.get(a.arch, "DDPM U-Net")
    conditioning = (
        f"- Conditioning: `encoder_hidden_states` = rows of the caption table `{CAPTIONS_FILE}` (key \"captions\", "
        f"float32 [{spec['rows']}, {spec['tokens']}, {spec['dim']}]): row c "
        f"is the caption of class c (0..9, `maskc.data.CLASSES`), row {spec['null']} the null caption. "
        f"The table is a fixed standard-normal tensor from `torch.Generator().manual_seed({spec['seed']})`, "
        f"a stand-in for a frozen text encoder; `maskc.models.shipped.captions(\"fmnist-sd\", labels)` reads it. "
        f"Sample with classifier-free guidance (null caption as the unconditional input; guidance 2.0 is the "
        f"shipped mask's).\n" if sd else "")
    config_flag = f" --config '{a.config}'" if overrides else ""
    with open(os.path.join(a.out, "MODEL_CARD.md"), "w") as f:
        f.write(
            f"# Fashion-MNIST {title} (maskc)\n\n"
            f"- Architecture: {info['model']}, {params / 1e6:.2f}M parameters, 1 channel, 32x32.\n"
            f"- Data: {info['data']}.\n- Objective: {info['objective']}.\n- Optimizer: {info['optimizer']}; "
            f"EMA {a.ema} (weights shipped are the EMA).\n- Steps: {step} in {info['minutes']:.1f} min on "
            f"{a.threads} CPU threads; seed {a.seed}.\n- Final training loss (mean of the last 100 steps): "
            f"{info['final_loss_last100']:.4f}.\n- Stored as {info['dtype']} safetensors.\n{conditioning}\n"
            f"Made by `python examples/train_fmnist.py --arch {a.arch} --out {a.out}{'' if dit or sd else f' --width {a.width}'} --minutes {a.minutes:g}"
            f" --batch {a.batch} --lr {a.lr:g} --threads {a.threads} --seed {a.seed}"
            f"{config_flag}"
            f"{' --fp16' if a.fp16 else ''}` on {info['date']}.\n"
        )
    print(f"saved to {a.out}: {step} steps, loss {info['final_loss_last100']:.4f}")


if __name__ == "__main__":
    main()
