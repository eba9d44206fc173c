"""Train a small DDPM U-Net (the google/ddpm-cifar10-32 topology at reduced width), or a
class-conditional DiT (``--arch dit``, diffusers' DiTTransformer2DModel), on Fashion-MNIST.

Data: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``),
28x28 images scaled to [-1, 1] and padded to 32x32 with the background value.
Training: epsilon prediction (the DiT also gets the class label, dropped to the null
label 10% of the time so that classifier-free guidance works), DDPMScheduler (1000 linear-beta steps), AdamW, EMA of
the weights, time-bounded (``--minutes``). Writes a diffusers folder
(``save_pretrained``: config.json + safetensors, EMA weights, float16 if asked) and a
model card (``MODEL_CARD.md`` + ``training.json``: data, steps, seed, loss).

Usage: python examples/train_fmnist.py --out maskc/models/weights/fmnist-unet --minutes 50
       python examples/train_fmnist.py --arch dit --out maskc/models/weights/fmnist-dit --minutes 65 --threads 1 --lr 3e-4
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
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from maskc.data import load_images, load_labels
from maskc.models.configs import FMNIST_DIT, ddpm_cifar10

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", choices=("unet", "dit"), default="unet")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    images = load_images("train")
    labels = load_labels("train")
    dit = a.arch == "dit"
    model = DiTTransformer2DModel(**FMNIST_DIT) if dit else UNet2DModel(**ddpm_cifar10(width=a.width, in_channels=1))
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
    params = sum(p.numel() for p in model.parameters())
    arch = (f"DiTTransformer2DModel, class-conditional (10 classes + null label), {FMNIST_DIT['num_layers']} layers, "
            f"width {FMNIST_DIT['num_attention_heads'] * FMNIST_DIT['attention_head_dim']}, patch {FMNIST_DIT['patch_size']}"
            if dit else "UNet2DModel, google/ddpm-cifar10-32 topology at width %d" % a.width)
    info = {
        "model": arch,
        "parameters": params,
        "data": "Fashion-MNIST train (60,000 images, Debian dataset-fashion-mnist), padded to 32x32, [-1, 1], random h-flip",
        "objective": "epsilon prediction, DDPMScheduler 1000 steps, linear betas"
        + (", class label dropped to the null label with p=0.1" if dit else ""),
        "optimizer": f"AdamW lr {a.lr} (500-step warm-up), batch {a.batch}, grad clip 1.0",
        "ema": a.ema,
        "steps": step,
        "minutes": (time.time() - start) / 60,
        "seed": a.seed,
        "threads": a.threads,
        "final_loss_last100": float(np.mean(losses[-100:])) if losses else math.nan,
        "dtype": "float16" if a.fp16 else "float32",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "log": log,
    }
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(a.out, "MODEL_CARD.md"), "w") as f:
        f.write(
            f"# Fashion-MNIST {'class-conditional DiT' if dit else 'DDPM U-Net'} (maskc)\n\n"
            f"- Architecture: {info['model']}, {params / 1e6:.2f}M parameters, 1 channel, 32x32.\n"
            f"- Data: {info['data']}.\n- Objective: {info['objective']}.\n- Optimizer: {info['optimizer']}; "
            f"EMA {a.ema} (weights shipped are the EMA).\n- Steps: {step} in {info['minutes']:.1f} min on "
            f"{a.threads} CPU threads; seed {a.seed}.\n- Final training loss (mean of the last 100 steps): "
            f"{info['final_loss_last100']:.4f}.\n- Stored as {info['dtype']} safetensors.\n\n"
            f"Made by `python examples/train_fmnist.py --arch {a.arch} --out {a.out}{'' if dit else f' --width {a.width}'} --minutes {a.minutes:g}"
            f" --batch {a.batch} --lr {a.lr:g} --threads {a.threads}"
            f"{' --fp16' if a.fp16 else ''}` on {info['date']}.\n"
        )
    print(f"saved to {a.out}: {step} steps, loss {info['final_loss_last100']:.4f}")


if __name__ == "__main__":
    main()
