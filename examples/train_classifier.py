"""Train the Fashion-MNIST classifier used as the feature extractor of FD-FMNIST and KID.

Fixed seed, deterministic data order; images padded to 32x32 and scaled to [0, 1]
like the diffusion models' samples. Writes ``model.safetensors``, ``training.json``
(test accuracy, epochs, seed) and ``MODEL_CARD.md``.

Usage: python examples/train_classifier.py --out maskc/models/weights/fmnist-classifier --epochs 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from maskc.data import load_images, load_labels
from maskc.models.classifier import FMNISTClassifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    x = (load_images("train") + 1) / 2
    y = load_labels("train")
    xt, yt = (load_images("test") + 1) / 2, load_labels("test")
    model = FMNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(a.seed)
    n_steps = a.epochs * (len(x) // a.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=n_steps)
    start, step = time.time(), 0
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for k in range(len(x) // a.batch):
            idx = perm[k * a.batch:(k + 1) * a.batch]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model.classify(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(json.dumps({"epoch": epoch, "step": step, "loss": loss.item(),
                                  "minutes": (time.time() - start) / 60}), flush=True)
    model.eval()
    with torch.no_grad():
        acc = float(torch.cat([model.classify(xt[i:i + 1000]).argmax(1) for i in range(0, len(xt), 1000)]).eq(yt).float().mean())
    os.makedirs(a.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.out, "model.safetensors"))
    info = {"model": "FMNISTClassifier (maskc.models.classifier)", "parameters": sum(p.numel() for p in model.parameters()),
            "data": "Fashion-MNIST train (60,000), padded to 32x32, [0, 1], random h-flip", "epochs": a.epochs,
            "batch": a.batch, "optimizer": f"AdamW one-cycle max lr {a.lr}, weight decay 1e-4", "seed": a.seed,
            "threads": a.threads, "steps": step, "minutes": (time.time() - start) / 60, "test_accuracy": acc,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(os.path.join(a.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(a.out, "MODEL_CARD.md"), "w") as f:
        f.write(f"# Fashion-MNIST classifier (maskc's FD-FMNIST / KID feature extractor)\n\n"
                f"- {info['model']}, {info['parameters'] / 1e3:.0f}k parameters; features: the 128-d global-average-pooled "
                f"last conv layer.\n- Data: {info['data']}.\n- {a.epochs} epochs, batch {a.batch}, {info['optimizer']}, "
                f"seed {a.seed}, {a.threads} CPU thread(s), {info['minutes']:.1f} min.\n"
                f"- Test accuracy (10,000 test images): {acc:.4f}.\n\n"
                f"Made by `python examples/train_classifier.py --out {a.out} --epochs {a.epochs}` on {info['date']}.\n")
    print(f"saved to {a.out}: test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
