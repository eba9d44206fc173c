"""Evaluation harness: sample quality, fidelity, MACs, wall time and memory of a mask.

- ``FMNISTFeatures``: FD-FMNIST and KID with the shipped Fashion-MNIST classifier
  as the feature extractor (torchmetrics, custom feature module), against the
  10,000 test images; ``floor(n)`` gives the real-vs-real value at the same sample
  count (n training images, drawn from the shipped pool of 5,000, against the test
  set), to report beside every FD.
  The real side ships with the package, as FID tools ship their reference
  statistics (``load_reference``, files in ``maskc/models/weights/fmnist-eval``, made
  by ``examples/make_eval_stats.py`` from Debian's dataset): evaluation gives the
  same figures whether or not the dataset is installed, and never reads it.
- ``fidelity``: PSNR and SSIM of each masked sample against the original model's
  sample from the same initial noise.
- ``paired_bootstrap_fd``: FD of several sample sets on the same bootstrap resamples of
  their noises, for confidence intervals of FD differences and ratios between methods
  that sampled the same noises (``interval``).
- ``generation_macs``: MACs of one generation (batch 1) by FlopCounterMode, on the
  compiled mask, so glue that dies with skipped blocks is not counted.
- ``interleaved_times``: original and masked generations alternating A B / B A, so
  drift in machine speed falls on both; medians and quartiles.
- ``peak_memory``: peak bytes allocated during one generation (CUDA allocator
  statistics, or the profiler's CPU memory events at operator granularity).
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from maskc.data import EVAL_DIR
from maskc.errors import MaskcError

__all__ = ["FMNISTFeatures", "Reference", "load_reference", "file_sha256", "fidelity", "psnr_per_sample",
           "frechet_distances", "frechet_distances_between", "paired_bootstrap_fd_to", "fd_terms", "bootstrap_counts", "paired_bootstrap_fd", "interval", "generation_macs",
           "interleaved_times", "peak_memory", "summarize_times"]

STATS_FORMAT = 1
_REGENERATE = ("regenerate them with `python examples/make_eval_stats.py` "
               "(needs Debian's dataset: `apt-get install -y dataset-fashion-mnist`)")


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Reference:
    """The real side of FD-FMNIST and KID, as shipped.

    Invariants: ``test_mu`` and ``test_sigma`` are the float64 mean and unbiased covariance
    of the float32 classifier features of the 10,000 test images, and ``test_features`` is
    those features rounded to float16 (held here as float32); ``train_features[k]`` is the
    feature row of training image ``train_index[k]`` (the pool the real-vs-real floor draws
    from); ``meta`` is ``stats.json`` (how and from what they were made).
    """

    test_features: torch.Tensor  # float32 [10000, 128] (stored float16)
    test_labels: torch.Tensor  # int64 [10000]
    test_mu: torch.Tensor  # float64 [128]
    test_sigma: torch.Tensor  # float64 [128, 128]
    train_features: torch.Tensor  # float32 [M, 128] (stored float16)
    train_index: torch.Tensor  # int64 [M], indices into the 60,000 training images
    meta: dict


def load_reference(path: str = EVAL_DIR, check_classifier: bool = True) -> Reference:
    """The shipped reference features in ``path``; with ``check_classifier``, refuses them when they
    were made with another classifier than the one ``load_classifier`` reads."""
    from safetensors.torch import load_file

    f, j = os.path.join(path, "reference.safetensors"), os.path.join(path, "stats.json")
    for p in (f, j):
        if not os.path.exists(p):
            raise MaskcError(f"{p} not found: FD-FMNIST and KID need the reference features the package ships "
                             f"there; reinstall maskc, or {_REGENERATE}")
    with open(j) as fh:
        meta = json.load(fh)
    if meta.get("format") != STATS_FORMAT:
        raise MaskcError(f"{j} has format {meta.get('format')!r}; this maskc reads format {STATS_FORMAT}: {_REGENERATE}")
    t = load_file(f)
    need = {"test_features", "test_labels", "test_mu", "test_sigma", "train_features", "train_index"}
    if need - set(t):
        raise MaskcError(f"{f} lacks {sorted(need - set(t))}; expected {sorted(need)}: {_REGENERATE}")
    ref = Reference(test_features=t["test_features"].float(), test_labels=t["test_labels"].long(),
                    test_mu=t["test_mu"].double(), test_sigma=t["test_sigma"].double(),
                    train_features=t["train_features"].float(), train_index=t["train_index"].long(), meta=meta)
    d = ref.test_features.shape[1]
    if (ref.test_features.shape[0] != len(ref.test_labels) or ref.test_mu.shape != (d,)
            or ref.test_sigma.shape != (d, d) or ref.train_features.shape != (len(ref.train_index), d)):
        raise MaskcError(f"{f} has inconsistent shapes (test features {tuple(ref.test_features.shape)}, labels "
                         f"{tuple(ref.test_labels.shape)}, mu {tuple(ref.test_mu.shape)}, sigma "
                         f"{tuple(ref.test_sigma.shape)}, train features {tuple(ref.train_features.shape)}, train "
                         f"index {tuple(ref.train_index.shape)}): {_REGENERATE}")
    if check_classifier:
        from maskc.models.classifier import WEIGHTS

        clf_file = os.path.join(WEIGHTS, "model.safetensors")
        made_with = meta.get("classifier", {}).get("sha256")
        if os.path.exists(clf_file) and file_sha256(clf_file) != made_with:
            raise MaskcError(f"the reference features in {path} were made with a classifier of sha256 {made_with}, "
                             f"but {clf_file} has sha256 {file_sha256(clf_file)}: features of different classifiers "
                             f"cannot be compared; {_REGENERATE}")
    return ref


class _Features(torch.nn.Module):
    """Identity on [N, num_features] feature rows: torchmetrics' metrics are fed features, not images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FMNISTFeatures:
    """FD-FMNIST and KID against the Fashion-MNIST test set (features: ``maskc.models.classifier``).

    The real side comes from ``load_reference(stats)``: FD uses the shipped float64 mean and
    covariance, KID the shipped test features; samples are scored on their float32 features.
    """

    def __init__(self, kid_subset_size: int = 1000, kid_subsets: int = 50, seed: int = 0, batch: int = 500,
                 stats: str = EVAL_DIR) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        from maskc.models.classifier import load_classifier

        self.clf = load_classifier()
        self.reference = load_reference(stats)
        self.batch, self.seed = batch, seed
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        d = self.reference.test_features.shape[1]
        self._identity = _Features(d)
        self.fid = FrechetInceptionDistance(feature=self._identity, reset_real_features=False)
        # torchmetrics' real-side state, from the shipped mean and covariance (sums of rows, of outer products)
        n, mu, sigma = len(self.reference.test_features), self.reference.test_mu, self.reference.test_sigma
        self.fid.real_features_sum = mu * n
        self.fid.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
        self.fid.real_features_num_samples = torch.tensor(n, dtype=torch.long)
        self._make_kid = lambda k: KernelInceptionDistance(
            feature=self._identity, subsets=self.kid_subsets, subset_size=min(self.kid_subset_size, k),
            reset_real_features=False)
        self._kids: dict[int, Any] = {}

    def _kid(self, n: int) -> Any:
        if n not in self._kids:
            kid = self._make_kid(n)
            kid.update(self.reference.test_features, real=True)
            self._kids[n] = kid
        return self._kids[n]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 classifier features [N, 128] of ``images`` ([N, 1, 32, 32] in [0, 1])."""
        with torch.no_grad():
            return torch.cat([self.clf(images[i:i + self.batch].float()) for i in range(0, len(images), self.batch)])

    def score_features(self, features: torch.Tensor) -> dict[str, float]:
        """FD and KID (mean, std over subsets) of sample features [N, 128] against the test set."""
        self.fid.reset()
        kid = self._kid(len(features))
        kid.reset()
        features = features.float()
        with torch.no_grad():
            self.fid.update(features, real=False)
            kid.update(features, real=False)
            fd = float(self.fid.compute())
            state = torch.random.get_rng_state()
            torch.manual_seed(self.seed)  # KID draws random subsets
            km, ks = kid.compute()
            torch.random.set_rng_state(state)
        return {"fd": fd, "kid": float(km), "kid_std": float(ks)}

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        """FD and KID (mean, std over subsets) of ``images`` ([N, 1, 32, 32] in [0, 1])."""
        return self.score_features(self.features(images))

    def floor(self, n: int) -> dict[str, float]:
        """Real vs real: ``n`` training images from the shipped pool (drawn with ``seed``) scored like samples."""
        pool = self.reference.train_features
        if not 2 <= n <= len(pool):
            raise MaskcError(f"the real-vs-real floor draws from the {len(pool)} training images whose features "
                             f"ship in the package; got n={n}, expected 2 <= n <= {len(pool)}. Score fewer samples, "
                             f"or regenerate the shipped statistics with a larger pool: `python examples/make_eval_stats.py "
                             f"--train-pool {n}` (needs `apt-get install -y dataset-fashion-mnist`)")
        idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.seed))[:n]
        return self.score_features(pool[idx])

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of class-conditional samples the classifier assigns to their label."""
        with torch.no_grad():
            pred = torch.cat([self.clf.classify(images[i:i + self.batch]).argmax(1) for i in range(0, len(images), self.batch)])
        return float((pred == labels).float().mean())


def psnr_per_sample(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Float64 PSNR (dB) of each image against the reference image from the same noise, on [0, 1]."""
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1 / mse)


def fidelity(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of each image against the reference image from the same noise, on [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    ssim = structural_similarity_index_measure(images.float(), reference.float(), data_range=1.0)
    return {"psnr": float(psnr_per_sample(images, reference).mean()), "ssim": float(ssim)}


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of symmetric positive semi-definite matrices [..., d, d] (negative eigenvalues clamped)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt().unsqueeze(-2)) @ v.mT


class _Moments:
    """Means and unbiased covariances of feature rows [n, d] under resamples (rows drawn ``counts`` times).

    The second moments are taken in float32 of rows centred on their mean (the costly
    product; error ~1e-6 relative), everything else in float64.
    """

    def __init__(self, features: torch.Tensor) -> None:
        x = features.double()
        self.n = len(x)
        self.centre = x.mean(0)
        self.xc = x - self.centre
        self.x32 = self.xc.float()

    def __call__(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means [r, d] and covariances [r, d, d] of the resamples ``c`` [r, n]."""
        n = self.n
        m = c @ self.xc / n  # mean of the drawn rows minus ``centre``
        second = ((self.x32.T * c.float()[:, None, :]) @ self.x32).double()  # sum over drawn rows of xc xcᵀ
        return m + self.centre, (second - n * m[:, :, None] * m[:, None, :]) / (n - 1)


def _resamples(n: int, counts: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, ...]:
    return (torch.ones(1, n, dtype=torch.float64) if counts is None else counts.double()).split(chunk)


def frechet_distances(features: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                      counts: torch.Tensor | None = None, chunk: int = 32) -> torch.Tensor:
    """Float64 Fréchet distances of feature rows [n, d] to N(``mu``, ``sigma``), one per row of ``counts``.

    ``counts`` [R, n] says how often each row is drawn (a bootstrap resample; None: every row
    once, R = 1). The sample covariance is the unbiased one, as torchmetrics' FID; the trace of
    sqrt(S·sigma) is taken as that of sqrt(sigma½ S sigma½), a symmetric matrix with the same
    eigenvalues, so that a batch of resamples costs one batched ``eigvalsh``.
    """
    mu, sigma = mu.double(), sigma.double()
    root = _sqrt_psd(sigma)
    moments = _Moments(features)
    out = []
    for c in _resamples(moments.n, counts, chunk):
        mean_term, cov_term = _fd_parts(*moments(c), mu, sigma, root)
        out.append(mean_term + cov_term)
    return torch.cat(out)


def frechet_distances_between(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor | None = None,
                              chunk: int = 32) -> torch.Tensor:
    """Float64 Fréchet distances between feature sets ``a`` and ``b`` [n, d], one per row of ``counts``.

    Invariant: row i of both sets comes from noise i, so resample r draws the same rows of
    both (a method's samples against the original's from the same noises: how far the method
    moved the original's own distribution, whatever that distribution's distance to real
    data). Symmetric up to rounding; zero for a set against itself.
    """
    return paired_bootstrap_fd_to({0: a}, b, counts, chunk)[0]


def paired_bootstrap_fd_to(features: dict[Any, torch.Tensor], base: torch.Tensor, counts: torch.Tensor | None = None,
                           chunk: int = 32) -> dict[Any, torch.Tensor]:
    """``frechet_distances_between`` of each named feature set and ``base``, on the same resamples ``counts``.

    ``base``'s moments and their square roots are computed once per chunk of resamples for all sets.
    """
    for k, f in features.items():
        if f.shape != base.shape:
            raise MaskcError(f"paired feature sets must have the same shape, got {tuple(f.shape)} ({k!r}) and "
                             f"{tuple(base.shape)}: sample both from the same noises")
    mb = _Moments(base)
    sets = {k: _Moments(f) for k, f in features.items()}
    out: dict[Any, list[torch.Tensor]] = {k: [] for k in features}
    for c in _resamples(mb.n, counts, chunk):
        mean_b, cov_b = mb(c)
        root = _sqrt_psd(cov_b)
        for k, m in sets.items():
            mean_term, cov_term = _fd_parts(*m(c), mean_b, cov_b, root)
            out[k].append(mean_term + cov_term)
    return {k: torch.cat(v) for k, v in out.items()}


def _fd_parts(m: torch.Tensor, cov: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
              root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FD's mean term |m - mu|² and covariance term tr(S + sigma - 2 sqrt(S sigma)) of means [r, d] and
    covariances [r, d, d]; ``root`` is sigma's symmetric square root, tr sqrt(S sigma) that of
    sqrt(root S root) (the same eigenvalues), one batched ``eigvalsh``. ``mu``, ``sigma`` and
    ``root`` are one [d], [d, d] or one per resample [r, d], [r, d, d]."""
    lam = torch.linalg.eigvalsh(root @ cov @ root).clamp_min(0)
    tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    tr_sigma = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (m - mu).square().sum(-1), tr + tr_sigma - 2 * lam.sqrt().sum(-1)


def fd_terms(features: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> dict[str, float]:
    """FD split into its mean term |m - mu|² and its covariance term tr(S + sigma - 2 sqrt(S sigma)), with tr S.

    Says whether a method moves the features' mean or narrows their spread (tr S, the samples'
    feature variance, against tr sigma, the test set's).
    """
    x, sigma = features.double(), sigma.double()
    cov = torch.cov(x.T)
    mean_term, cov_term = _fd_parts(x.mean(0), cov, mu.double(), sigma, _sqrt_psd(sigma))
    return {"mean_term": float(mean_term), "cov_term": float(cov_term), "trace": float(cov.trace())}


def bootstrap_counts(n: int, rounds: int, seed: int = 0) -> torch.Tensor:
    """[rounds, n] draw counts of ``rounds`` resamples (n draws with replacement each) of n items."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (rounds, n), generator=g)
    return torch.zeros(rounds, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(rounds, n, dtype=torch.float64))


def paired_bootstrap_fd(features: dict[str, torch.Tensor], mu: torch.Tensor, sigma: torch.Tensor,
                        counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """FD of each named feature set on the same resamples ``counts`` [R, n].

    Invariant: row i of every set comes from noise i, so resample r draws the same noises for
    every method, and differences (or ratios) of two methods' FDs, taken resample by resample,
    give their paired spread: most of the spread of one FD is the draw of noises, which such a
    difference cancels.
    """
    n = counts.shape[1]
    for k, f in features.items():
        if len(f) != n:
            raise MaskcError(f"feature set {k!r} has {len(f)} rows, but the resamples draw from {n}: paired "
                             f"resamples need every set sampled from the same {n} noises")
    return {k: frechet_distances(f, mu, sigma, counts) for k, f in features.items()}


def interval(draws: torch.Tensor, level: float = 0.95) -> list[float]:
    """Percentile interval [lo, hi] holding the central ``level`` of bootstrap ``draws``."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return [float(v) for v in torch.quantile(draws.double(), q)]


def generation_macs(model: torch.nn.Module, mask: Any, example_args: tuple, example_kwargs: dict,
                    timestep_kw: str, timesteps: Sequence[torch.Tensor]) -> int:
    """MACs (FLOPs / 2) of one generation on the example, compiled with ``mask`` (None: the original)."""
    from maskc.learn import measured_flops

    return measured_flops(model, mask, example_args, example_kwargs, timestep_kw, list(timesteps)) // 2


def interleaved_times(runs: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each run, calls interleaved, the order reversed every other round."""
    names = list(runs)
    for _ in range(warmup):
        for n in names:
            runs[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for k in range(reps):
        for n in (names if k % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def summarize_times(ts: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median": statistics.median(ts), "q1": q[0], "q3": q[2], "min": min(ts), "max": max(ts), "n": len(ts)}


def peak_memory(run: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by tensors during ``run()`` above what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # Each op's own allocations net of its own frees, in start order (op granularity).
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak
