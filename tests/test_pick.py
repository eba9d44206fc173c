"""maskc.pick.learn_best: the kept mask is one seed's learned mask, the best on noises no search saw."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline

import archs
import maskc
from maskc.pick import learn_best
from reference import HookReference

SHAPE = (1, 16, 16)
# one search per seed: the pick among seeds is the subject here, the restarts within a seed's learning are
# test_learn.py's (its test_search_restarts_keep_the_best_on_selection_noises)
KW = {"iters": 10, "batch": 2, **archs.SMALL_SEARCH, "search_restarts": 1}


def _sched() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000)


def _reference_psnr(model: torch.nn.Module, mask: maskc.Mask, steps: int, n: int, seed: int) -> float:
    """Mean PSNR of the final samples under ``mask`` (forward hooks) against the unmasked ones, from n noises."""
    x0 = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))

    def sample(fn) -> torch.Tensor:
        sched = _sched()
        sched.set_timesteps(steps)
        x = x0
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(fn(x, t).sample, t, x).prev_sample
        return ((x + 1) / 2).clamp(0, 1).double()

    ref = HookReference(model, mask.bits, list(mask.names))
    masked, full = sample(ref), sample(model)
    ref.close()
    mse = (masked - full).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def test_keeps_the_seed_with_the_best_selection_psnr() -> None:
    model = archs.small_unet(sample_size=16, channels=1)
    seeds, steps = [0, 1], 6  # the pick itself among more seeds: test_pick_keeps_the_best_of_the_seeds_masks_...
    best = learn_best(model, _sched(), steps, SHAPE, target=0.5, seeds=seeds, n_select=4, select_seed=77,
                      progress=False, **KW)
    masks = [maskc.learn(model, _sched(), steps=steps, sample_shape=SHAPE, target=0.5, seed=s, progress=False, **KW)
             for s in seeds]
    ref = [_reference_psnr(model, m, steps, 4, 77) for m in masks]
    pick = best.meta["provenance"]["pick"]
    assert pick["seeds"] == seeds and pick["select_seed"] == 77 and pick["n_select"] == 4
    # every seed scored on the selection noises, as an independent sampler with forward hooks scores it
    assert pick["selection_psnr"] == pytest.approx(ref, abs=1e-3)
    assert len({round(v, 3) for v in ref}) > 1, "the seeds' masks score alike: the pick would not be tested"
    k = max(range(len(seeds)), key=lambda i: ref[i])
    assert pick["picked"] == seeds[k]
    assert best == masks[k] and best.meta["provenance"]["seed"] == seeds[k]
    assert best.meta["provenance"]["macs_fraction"] == pick["macs_fraction"][k]


def _fixed_masks(model: torch.nn.Module, steps: int, seeds: list[int]) -> dict[int, maskc.Mask]:
    """A distinct random mask per seed (keep probability varying with the seed), standing in for learned ones."""
    names = maskc.blocks(model)
    out = {}
    for s in seeds:
        bits = torch.rand(steps, len(names), generator=torch.Generator().manual_seed(100 + s)) < 0.3 + 0.15 * (s % 4)
        bits[0] = True
        out[s] = maskc.Mask(bits, names, {"provenance": {"seed": s, "macs_fraction": float(bits.float().mean())}})
    return out


def _stub_learn(masks: dict[int, maskc.Mask], calls: list[int]):
    def learn(*a, seed: int, **k) -> maskc.Mask:
        calls.append(seed)
        return maskc.Mask.from_dict(masks[seed].to_dict())  # a copy: the pick writes into its mask's meta
    return learn


def test_pick_keeps_the_best_of_the_seeds_masks_on_the_selection_noises(monkeypatch) -> None:
    """The pick alone, in seconds (learning stubbed by fixed masks): every mask scored on the selection noises
    as an independent sampler with forward hooks scores it, and the best kept (not the first seed's)."""
    import maskc.pick

    model = archs.small_unet(sample_size=16, channels=1)
    seeds, steps = [0, 1, 2, 3], 6
    masks, calls = _fixed_masks(model, steps, seeds), []
    monkeypatch.setattr(maskc.pick, "learn", _stub_learn(masks, calls))
    best = learn_best(model, _sched(), steps, SHAPE, seeds=seeds, n_select=4, select_seed=77, progress=False)
    ref = [_reference_psnr(model, masks[s], steps, 4, 77) for s in seeds]
    pick = best.meta["provenance"]["pick"]
    assert calls == seeds and pick["selection_psnr"] == pytest.approx(ref, abs=1e-3)
    k = max(range(len(seeds)), key=lambda i: ref[i])
    assert k != 0 and len({round(v, 2) for v in ref}) == len(seeds), "the pick would not be tested: " + str(ref)
    assert pick["picked"] == seeds[k] and torch.equal(best.bits, masks[seeds[k]].bits)


def test_under_torchrun_each_process_learns_only_its_share_of_the_seeds(monkeypatch) -> None:
    """Process r of N learns seeds r, r + N, ... and no other, and scores the masks of all processes (the
    process split and the gather stubbed; the real two-process run is the torchrun test below)."""
    import maskc.pick

    model = archs.small_unet(sample_size=16, channels=1)
    seeds, steps = [3, 4, 5, 6, 7], 4
    masks, calls, sent = _fixed_masks(model, steps, seeds), [], []

    def gather(items: list, world: int) -> list:
        assert world == 2
        sent.extend(items)  # process 0's share first, as all_gather_object orders them
        return [(s, masks[s].to_dict(), 0.0, 0) for s in seeds[0::2]] + items

    monkeypatch.setattr(maskc.pick, "learn", _stub_learn(masks, calls))
    monkeypatch.setattr(maskc.pick, "_seed_split", lambda: (1, 2))
    monkeypatch.setattr(maskc.pick, "_gather", gather)
    best = learn_best(model, _sched(), steps, SHAPE, seeds=seeds, n_select=2, select_seed=77, progress=False)
    assert calls == seeds[1::2] and [s for s, *_ in sent] == seeds[1::2]
    pick = best.meta["provenance"]["pick"]
    assert pick["processes"] == 2 and pick["learned_by"] == [0, 1, 0, 1, 0] and len(pick["selection_psnr"]) == 5


def test_pipeline_and_one_seed_is_learn() -> None:
    model = archs.small_unet(sample_size=16, channels=1)
    pipe = DDPMPipeline(unet=model, scheduler=_sched())
    best = learn_best(pipe, target=0.6, seeds=[3], n_select=2, num_inference_steps=4, progress=False, **KW)
    plain = maskc.learn(pipe, target=0.6, seed=3, num_inference_steps=4, progress=False, **KW)
    assert best == plain
    assert best.meta["provenance"]["pipeline"] == "DDPMPipeline" and best.meta["provenance"]["pick"]["picked"] == 3


@pytest.mark.parametrize("kw, match", [
    ({"seeds": [0, 998]}, "select_seed 998 is also a learning seed"),
    ({"seeds": [1, 1]}, "distinct seeds"),
    ({"seeds": []}, "distinct seeds"),
    ({"n_select": 0}, "n_select must be at least 1"),
    ({"features": lambda img: img.flatten(1), "shift_weight": 1.0, "seeds": [0], "iters": 1, "search_restarts": 1,
      "search_evals": 0, "search_batch": 2, "n_select": 2}, "PSNR alone"),
])
def test_refuses_a_pick_it_cannot_make_fairly(kw: dict, match: str) -> None:
    with pytest.raises(maskc.MaskcError, match=match):
        learn_best(archs.small_unet(sample_size=16, channels=1), _sched(), 4, SHAPE, progress=False, **kw)


def test_checkpoints_one_folder_per_seed(tmp_path) -> None:
    model = archs.small_unet(sample_size=16, channels=1)
    run = lambda: learn_best(model, _sched(), 4, SHAPE, target=0.6, seeds=[0, 1], n_select=2,  # noqa: E731
                             checkpoint_dir=str(tmp_path), progress=False, **KW)
    first = run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed-0", "seed-1"]
    assert all((tmp_path / d / "learn_state.json").exists() for d in ("seed-0", "seed-1"))
    again = run()  # both seeds resume from their finished checkpoints
    assert again == first and again.meta["provenance"]["pick"]["picked"] == first.meta["provenance"]["pick"]["picked"]


@pytest.mark.slow
def test_torchrun_splits_the_seeds_over_the_processes(tmp_path) -> None:
    import os
    import subprocess
    import sys

    model_dir = str(tmp_path / "model")
    archs.small_unet(sample_size=16, channels=1).save_pretrained(model_dir)
    common = ["learn", "--model", model_dir, "--steps", "5", "--target", "0.6", "--batch", "2", "--iters", "4",
              "--search-evals", "6", "--search-batch", "2", "--select-batch", "3", "--seed", "3", "4", "5",
              "--n-select", "2", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "maskc", *common, "--out", str(tmp_path / "one.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29534", "-m", "maskc", *common, "--out", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (maskc.Mask.load(tmp_path / f) for f in ("one.json", "two.json"))
    pa, pb = a.meta["provenance"]["pick"], b.meta["provenance"]["pick"]
    assert a == b and pa["picked"] == pb["picked"] and pa["selection_psnr"] == pb["selection_psnr"]
    assert pa["processes"] == 1 and pa["learned_by"] == [0, 0, 0]
    assert pb["processes"] == 2 and pb["learned_by"] == [0, 1, 0]  # seed k on process k % 2, each learned once
