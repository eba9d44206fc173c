"""Evaluation harness: sample quality, fidelity, MACs, wall time and memory of a mask.

- ``FMNISTFeatures``: FD-FMNIST and KID with the shipped Fashion-MNIST classifier
  as the feature extractor (torchmetrics, custom feature module), against the
  10,000 test images; ``floor(n)`` gives the real-vs-real value at the same sample
  count (n training images against the test set), to report beside every FD.
- ``fidelity``: PSNR and SSIM of each masked sample against the original model's
  sample from the same initial noise.
- ``generation_macs``: MACs of one generation (batch 1) by FlopCounterMode, on the
  compiled mask, so glue that dies with skipped blocks is not counted.
- ``interleaved_times``: original and masked generations alternating A B / B A, so
  drift in machine speed falls on both; medians and quartiles.
- ``peak_memory``: peak bytes allocated during one generation (CUDA allocator
  statistics, or the profiler's CPU memory events at operator granularity).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch

__all__ = ["FMNISTFeatures", "fidelity", "generation_macs", "interleaved_times", "peak_memory", "summarize_times"]


class FMNISTFeatures:
    """FD-FMNIST and KID against the Fashion-MNIST test set (features: ``maskc.models.classifier``)."""

    def __init__(self, kid_subset_size: int = 1000, kid_subsets: int = 50, seed: int = 0, batch: int = 500) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        from maskc.data import load_images
        from maskc.models.classifier import load_classifier

        self.clf = load_classifier()
        self.batch, self.seed = batch, seed
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        self.fid = FrechetInceptionDistance(feature=self.clf, reset_real_features=False)
        self.real = (load_images("test") + 1) / 2
        for i in range(0, len(self.real), batch):
            self.fid.update(self.real[i:i + batch], real=True)
        self._make_kid = lambda n: KernelInceptionDistance(
            feature=self.clf, subsets=self.kid_subsets, subset_size=min(self.kid_subset_size, n),
            reset_real_features=False)
        self._kids: dict[int, Any] = {}

    def _kid(self, n: int) -> Any:
        if n not in self._kids:
            kid = self._make_kid(n)
            for i in range(0, len(self.real), self.batch):
                kid.update(self.real[i:i + self.batch], real=True)
            self._kids[n] = kid
        return self._kids[n]

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        """FD and KID (mean, std over subsets) of ``images`` ([N, 1, 32, 32] in [0, 1])."""
        self.fid.reset()
        kid = self._kid(len(images))
        kid.reset()
        with torch.no_grad():
            for i in range(0, len(images), self.batch):
                part = images[i:i + self.batch].float()
                self.fid.update(part, real=False)
                kid.update(part, real=False)
            fd = float(self.fid.compute())
            state = torch.random.get_rng_state()
            torch.manual_seed(self.seed)  # KID draws random subsets
            km, ks = kid.compute()
            torch.random.set_rng_state(state)
        return {"fd": fd, "kid": float(km), "kid_std": float(ks)}

    def floor(self, n: int) -> dict[str, float]:
        """Real vs real: ``n`` training images (fixed seed) scored like samples."""
        from maskc.data import load_images

        x = (load_images("train") + 1) / 2
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))[:n]
        return self(x[idx])

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of class-conditional samples the classifier assigns to their label."""
        with torch.no_grad():
            pred = torch.cat([self.clf.classify(images[i:i + self.batch]).argmax(1) for i in range(0, len(images), self.batch)])
        return float((pred == labels).float().mean())


def fidelity(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of each image against the reference image from the same noise, on [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    psnr = (10 * torch.log10(1 / mse)).mean()
    ssim = structural_similarity_index_measure(images.float(), reference.float(), data_range=1.0)
    return {"psnr": float(psnr), "ssim": float(ssim)}


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
