"""Make the evaluation statistics maskc ships, from Debian's Fashion-MNIST and the shipped classifier.

FD-FMNIST and KID compare samples with the 10,000 test images through the shipped
classifier's features (``maskc.models.classifier``). As FID tools ship their
reference statistics, maskc ships the real side, so that evaluation and the tests
run without the dataset. This script writes, into ``--out``:

- ``reference.safetensors``: ``test_features`` (float16 [10000, 128], the float32
  features rounded), ``test_mu`` and ``test_sigma`` (float64 mean and unbiased
  covariance of the float32 features: what FD uses), ``test_labels`` (uint8),
  ``train_features`` (float16 [M, 128]) of ``train_index`` (int32 [M], the first M of a
  seeded permutation of the 60,000 training images: the real-vs-real floor's pool);
- ``sample.safetensors``: ``images`` (uint8 [S, 28, 28], as in the IDX file), ``labels``
  and ``index`` (into the test set) of ``--per-class`` seeded test images per class;
- ``stats.json`` and ``MODEL_CARD.md``: how they were made (classifier and dataset file
  hashes, counts, seeds, date) and the FD/KID agreement measured here between the shipped
  statistics and freshly computed ones.

Usage (needs ``apt-get install -y dataset-fashion-mnist``, or ``MASKC_FMNIST_ROOT``):
    python examples/make_eval_stats.py [--out maskc/models/weights/fmnist-eval]
Rerun it whenever the classifier changes: ``maskc.eval.load_reference`` refuses
statistics made with another classifier file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time
from typing import Any

import torch
from safetensors.torch import save_file

from maskc.data import COUNTS, EVAL_DIR, _path, available, data_root, load_images, load_labels, load_pixels
from maskc.errors import MaskcError
from maskc.eval import STATS_FORMAT, FMNISTFeatures, file_sha256
from maskc.models.classifier import WEIGHTS, load_classifier


def features(clf: torch.nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Float32 features of images in [-1, 1] (mapped to [0, 1], as samples are before scoring)."""
    x = (images + 1) / 2
    with torch.no_grad():
        return torch.cat([clf(x[i:i + batch]) for i in range(0, len(x), batch)])


def debian_version() -> str | None:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dataset-fashion-mnist"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def fd64(metric: object) -> float:
    """torchmetrics' FD from a FrechetInceptionDistance's states, kept in float64 (``compute`` casts the
    result to the features' float32, which hides differences below float32 resolution)."""
    from torchmetrics.image.fid import _compute_fid

    m: Any = metric
    stats = []
    for side in ("real", "fake"):
        n = getattr(m, f"{side}_features_num_samples")
        mean = getattr(m, f"{side}_features_sum") / n
        cov = (getattr(m, f"{side}_features_cov_sum") - n * torch.outer(mean, mean)) / (n - 1)
        stats += [mean, cov]
    return float(_compute_fid(*stats))


def agreement(out: str, root: str, clf: torch.nn.Module, test_f: torch.Tensor, batch: int, n: int) -> dict:
    """FD and KID from the shipped files (``FMNISTFeatures(stats=out)``) against the same figures from
    freshly computed float32 features, the way maskc scored before it shipped them: torchmetrics fed
    the test images themselves through the classifier. Scored sets: ``n`` training images (seed 1, not
    the floor's pool order), ``n`` shipped-pool images (the floor) and ``n`` uniform-noise images."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    shipped = FMNISTFeatures(stats=out, batch=batch)
    fid = FrechetInceptionDistance(feature=clf, reset_real_features=False)
    kid = KernelInceptionDistance(feature=clf, subsets=shipped.kid_subsets, subset_size=min(shipped.kid_subset_size, n),
                                  reset_real_features=False)
    real = (load_images("test", root) + 1) / 2
    with torch.no_grad():
        for i in range(0, len(real), batch):
            fid.update(real[i:i + batch], real=True)
            kid.update(real[i:i + batch], real=True)
    train = (load_images("train", root) + 1) / 2
    sets = {
        "train_random": train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:n]],
        "floor_pool": train[shipped.reference.train_index[
            torch.randperm(len(shipped.reference.train_index), generator=torch.Generator().manual_seed(0))[:n]]],
        "noise": torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(2)),
    }
    res: dict[str, dict] = {}
    for name, imgs in sets.items():
        fid.reset()
        kid.reset()
        with torch.no_grad():
            for i in range(0, len(imgs), batch):
                fid.update(imgs[i:i + batch], real=False)
                kid.update(imgs[i:i + batch], real=False)
            fresh_fd = float(fid.compute())
            torch.manual_seed(shipped.seed)
            fresh_kid = float(kid.compute()[0])
            fresh64 = fd64(fid)
        s = shipped(imgs)
        shipped64 = fd64(shipped.fid)
        res[name] = {"fd_fresh": fresh_fd, "fd_shipped": s["fd"], "fd_abs_diff": abs(fresh_fd - s["fd"]),
                     "fd64_fresh": fresh64, "fd64_shipped": shipped64, "fd64_abs_diff": abs(fresh64 - shipped64),
                     "fd64_rel_diff": abs(fresh64 - shipped64) / max(abs(fresh64), 1e-300),
                     "kid_fresh": fresh_kid, "kid_shipped": s["kid"], "kid_abs_diff": abs(fresh_kid - s["kid"])}
        if name == "floor_pool":
            f = shipped.floor(n)
            res[name].update(floor_fd=f["fd"], floor_kid=f["kid"])
    same = shipped.score_features(test_f)
    res["test_set_itself"] = {"fd_shipped": same["fd"], "kid_shipped": same["kid"],
                              "note": "float32 test features against the shipped mean/covariance: ideally 0"}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=EVAL_DIR, help="output folder (default: %(default)s)")
    ap.add_argument("--root", default=None, help="dataset folder (default: $MASKC_FMNIST_ROOT or Debian's)")
    ap.add_argument("--train-pool", type=int, default=5000, help="training images in the floor's pool (default: %(default)s)")
    ap.add_argument("--per-class", type=int, default=50, help="shipped test images per class (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pool and sample draws (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=500, help="classifier batch (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--check-n", type=int, default=2000, help="samples per set in the agreement check (default: %(default)s)")
    a = ap.parse_args()
    root = a.root or data_root()
    if not available(root):
        raise MaskcError(f"Fashion-MNIST not found in {root}: install it with `apt-get install -y "
                         f"dataset-fashion-mnist`, or pass --root / set MASKC_FMNIST_ROOT to a folder with the four "
                         f"gzipped IDX files")
    torch.set_num_threads(a.threads)
    start = time.time()
    os.makedirs(a.out, exist_ok=True)
    clf = load_classifier()
    clf_file = os.path.join(WEIGHTS, "model.safetensors")

    test_labels = load_labels("test", root)
    test_f = features(clf, load_images("test", root), a.batch)
    f64 = test_f.double()
    mu, sigma = f64.mean(0), torch.cov(f64.T)  # unbiased (n - 1), as torchmetrics
    pool = torch.randperm(COUNTS["train"], generator=torch.Generator().manual_seed(a.seed))[:a.train_pool]
    train_f = features(clf, load_images("train", root)[pool], a.batch)
    save_file({"test_features": test_f.half().contiguous(), "test_labels": test_labels.to(torch.uint8),
               "test_mu": mu.contiguous(), "test_sigma": sigma.contiguous(),
               "train_features": train_f.half().contiguous(), "train_index": pool.to(torch.int32)},
              os.path.join(a.out, "reference.safetensors"))

    g = torch.Generator().manual_seed(a.seed)
    index = torch.cat([torch.nonzero(test_labels == c).flatten()[torch.randperm(int((test_labels == c).sum()),
                                                                               generator=g)[:a.per_class]]
                       for c in range(10)]).sort().values
    save_file({"images": load_pixels("test", root)[index].contiguous(), "labels": test_labels[index].to(torch.uint8),
               "index": index.to(torch.int32)}, os.path.join(a.out, "sample.safetensors"))

    acc = float((clf.head(test_f).argmax(1) == test_labels).float().mean())
    meta = {
        "format": STATS_FORMAT,
        "made_by": "python examples/make_eval_stats.py" + (f" --out {a.out}" if a.out != EVAL_DIR else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": a.threads,
        "classifier": {"file": "maskc/models/weights/fmnist-classifier/model.safetensors",
                       "sha256": file_sha256(clf_file)},
        "dataset": {"source": "Debian dataset-fashion-mnist", "debian_version": debian_version(),
                    "files": {os.path.basename(_path(s, k, root)): file_sha256(_path(s, k, root))
                              for s in COUNTS for k in ("images", "labels")}},
        "features": "classifier(images in [0, 1], padded 28->32 with 0), float32, batch "
                    f"{a.batch}; 128-d penultimate layer",
        "counts": {"test_features": len(test_f), "train_pool": a.train_pool, "sample": len(index),
                   "sample_per_class": a.per_class},
        "seeds": {"train_pool": a.seed, "sample": a.seed},
        "dtypes": {"test_features": "float16", "train_features": "float16", "test_mu": "float64",
                   "test_sigma": "float64", "sample_images": "uint8 28x28"},
        "test_accuracy_from_shipped_features": float((clf.head(test_f.half().float()).argmax(1) == test_labels)
                                                     .float().mean()),
        "test_accuracy_float32": acc,
        "max_abs_float16_rounding": float((test_f.half().float() - test_f).abs().max()),
    }
    with open(os.path.join(a.out, "stats.json"), "w") as f:  # written before the check, which loads it
        json.dump(meta, f, indent=1)
    meta["agreement"] = agreement(a.out, root, clf, test_f, a.batch, a.check_n)
    meta["agreement"]["n"] = a.check_n
    meta["minutes"] = (time.time() - start) / 60
    with open(os.path.join(a.out, "stats.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    ag = meta["agreement"]
    worst = max(v["fd64_rel_diff"] for k, v in ag.items() if isinstance(v, dict) and "fd64_rel_diff" in v)
    worst_kid = max(v["kid_abs_diff"] for k, v in ag.items() if isinstance(v, dict) and "kid_abs_diff" in v)
    for n in os.listdir(a.out):
        os.chmod(os.path.join(a.out, n), 0o644)  # safetensors writes 0600; shipped files are world-readable
    sizes = {n: os.path.getsize(os.path.join(a.out, n)) for n in ("reference.safetensors", "sample.safetensors")}
    with open(os.path.join(a.out, "MODEL_CARD.md"), "w") as f:
        f.write(
            "# Fashion-MNIST evaluation statistics (the real side of FD-FMNIST and KID)\n\n"
            f"- `reference.safetensors` ({sizes['reference.safetensors'] / 1e6:.2f} MB): classifier features of the "
            f"{len(test_f):,} test images (float16) with their float64 mean and covariance (what FD uses) and labels; "
            f"features of a pool of {a.train_pool:,} training images (seeded permutation, seed {a.seed}) that the "
            "real-vs-real floor draws from.\n"
            f"- `sample.safetensors` ({sizes['sample.safetensors'] / 1e6:.2f} MB): {len(index)} test images "
            f"({a.per_class} per class, seed {a.seed}) as uint8 28x28, with labels and test-set indices.\n"
            f"- Classifier: `fmnist-classifier/model.safetensors`, sha256 {meta['classifier']['sha256']}; test "
            f"accuracy {acc:.4f} (float32 features), "
            f"{meta['test_accuracy_from_shipped_features']:.4f} (shipped float16 features).\n"
            f"- Dataset: Debian `dataset-fashion-mnist` {meta['dataset']['debian_version'] or '(version unknown)'}; "
            "file hashes in `stats.json`.\n"
            f"- Agreement with freshly computed features (n={a.check_n} per set: random training images, the floor's "
            f"pool, noise): FD as reported (float32) identical, in float64 relative difference at most {worst:.1e}, KID absolute difference at most "
            f"{worst_kid:.1e}; the test set against itself scores FD "
            f"{ag['test_set_itself']['fd_shipped']:.1e}.\n\n"
            f"Made by `{meta['made_by']}` on {meta['date']} (torch {torch.__version__}, {a.threads} threads, "
            f"{meta['minutes']:.1f} min). Rerun it when the classifier changes.\n")
    print(json.dumps(ag, indent=1))
    print(f"wrote {a.out}: {sizes}")


if __name__ == "__main__":
    main()
