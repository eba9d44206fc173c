"""The phases of maskc.learn one at a time: whole-generation rollouts, exact MACs, projection, search.

Each is checked against an independent oracle: the runtime (maskc.compile) driven by
a plain sampler loop, FlopCounterMode on the compiled mask, a brute-force scan.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import maskc
from archs import random_bits, randomize, small_unet
from maskc.learn import measured_flops, project_budget
from maskc.refine import fit_to_window, refine, row_vocabulary
from maskc.rollout import GenerationCost, Rollout
from maskc.sampling import denoise, stack_kwargs
from maskc.schedules import peer_library

STEPS = 6


def _unet():
    return small_unet(sample_size=8, channels=2)


def _dit():
    return randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=3,
                                           sample_size=8, patch_size=2, num_embeds_ada_norm=10), 1)


def _setup(kind: str, sched_name: str, n: int = 2):
    model = _unet() if kind == "unet" else _dit()
    sched = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}[sched_name](
        num_train_timesteps=1000)
    sched.set_timesteps(STEPS)
    c = model.config
    noise = torch.randn((n, c.in_channels, c.sample_size, c.sample_size), generator=torch.Generator().manual_seed(3))
    if kind == "dit":
        kw = stack_kwargs({"class_labels": torch.arange(n) % 10}, {"class_labels": torch.full((n,), 10)})
        return model, sched, noise, kw, 2.5
    return model, sched, noise, {}, None


def _runtime_final(model, mask, sched, noise, kw, guidance, seed=0) -> torch.Tensor:
    """The oracle: maskc.compile (eager) in a plain sampler loop, per-step generators as Rollout documents."""
    tm = maskc.compile(model, mask)
    s = copy.deepcopy(sched)
    x = noise
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            eps = denoise(tm, x, t, kw, guidance, timestep_kw="timestep")
            extra = {"generator": torch.Generator().manual_seed(seed * 1_000_003 + i)} if isinstance(s, DDPMScheduler) else {}
            x = s.step(eps, t, x, **extra).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


@settings(max_examples=max(3, settings.default.max_examples // 4))  # whole generations: a quarter of the profile's
@given(kind=st.sampled_from(["unet", "dit"]), sched_name=st.sampled_from(["ddim", "dpm", "ddpm"]), data=st.data())
def test_rollout_is_the_runtime_bit_for_bit(kind: str, sched_name: str, data) -> None:
    """Candidates scored one after another, some accepted: each final sample equals a fresh runtime
    generation, so prefix reuse never leaks a rejected candidate's or a stale step's state."""
    model, sched, noise, kw, guidance = _setup(kind, sched_name)
    names = maskc.blocks(model) if kind == "unet" else [f"transformer_blocks.{k}" for k in range(3)]
    ro = Rollout(model, names, sched, noise, kw, guidance, "timestep")
    full = maskc.Mask(torch.ones(STEPS, len(names), dtype=torch.bool), names)
    assert torch.equal(ro.reference, _runtime_final(model, full, sched, noise, kw, guidance))
    for _ in range(3):
        bits = random_bits(data.draw, STEPS, len(names))
        got = ro.final(bits)
        assert torch.equal(got, _runtime_final(model, maskc.Mask(bits, names), sched, noise, kw, guidance))
        if data.draw(st.booleans()):
            ro.accept()


@settings(max_examples=max(3, settings.default.max_examples // 3))  # FlopCounterMode generations: a third
@given(kind=st.sampled_from(["unet", "dit"]), data=st.data())
def test_cost_is_what_flopcounter_counts(kind: str, data) -> None:
    """GenerationCost.fraction equals FlopCounterMode over a whole generation of the compiled mask,
    rectified or not (exact rectification removes nothing DCE would not)."""
    model = _unet() if kind == "unet" else _dit()
    c = model.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size)
    s = DDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(STEPS)
    ts = [t.reshape(1) for t in s.timesteps]
    kw = {} if kind == "unet" else {"class_labels": torch.tensor([1])}
    names = maskc.blocks(model) if kind == "unet" else [f"transformer_blocks.{k}" for k in range(3)]
    graph = maskc.block_graph(model, x, ts[0], blocks=names, **kw)
    cost = GenerationCost(model, names, graph, (x,), {"timestep": ts[0], **kw})
    full = measured_flops(model, None, (x,), {"timestep": ts[0], **kw}, "timestep", ts)
    bits = random_bits(data.draw, STEPS, len(names))
    rect = cost.rectify(bits)
    want = measured_flops(model, maskc.Mask(rect, names), (x,), {"timestep": ts[0], **kw}, "timestep", ts) / full
    assert cost.fraction(bits) == pytest.approx(want, rel=1e-12)
    assert cost.fraction(rect, rectified=True) == pytest.approx(want, rel=1e-12)
    raw = measured_flops(model, maskc.Mask(bits, names), (x,), {"timestep": ts[0], **kw}, "timestep", ts) / full
    assert raw == pytest.approx(want, rel=1e-12)


def test_scores_are_the_plain_and_the_saturating_psnr_of_runtime_samples() -> None:
    """Rollout.psnr and Rollout.score are the mean plain PSNR and the mean PSNR with 1e-5 added to each
    MSE of the runtime's final samples; an unmasked generation scores the 50 dB ceiling, not 120 dB."""
    model, sched, noise, kw, guidance = _setup("unet", "ddim", 3)
    names = maskc.blocks(model)
    ro = Rollout(model, names, sched, noise, kw, guidance, "timestep")
    full = torch.ones(STEPS, len(names), dtype=torch.bool)
    assert ro.score(full) == pytest.approx(50.0, abs=1e-9) and ro.psnr(full) == pytest.approx(120.0, abs=1e-9)
    bits = torch.rand(STEPS, len(names), generator=torch.Generator().manual_seed(5)) < 0.5
    bits[0] = True
    ref = _runtime_final(model, maskc.Mask(full, names), sched, noise, kw, guidance).double()
    mse = (_runtime_final(model, maskc.Mask(bits, names), sched, noise, kw, guidance).double() - ref).pow(2)
    mse = mse.flatten(1).mean(1)
    assert bool((mse > 1e-6).all()), "a sample is (nearly) unchanged: the floor would not be tested"
    assert ro.score(bits) == pytest.approx(float((10 * torch.log10(1 / (mse + 1e-5))).mean()), rel=1e-12)
    assert ro.psnr(bits) == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-12)


@settings(max_examples=max(5, settings.default.max_examples // 2))
@given(n=st.integers(2, 9), d=st.integers(1, 6), split=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_feature_shift_is_unbiased_fds_mean_term_and_adds_over_processes(n: int, d: int, split: int, seed: int) -> None:
    """feature_shift2 = |mean d|^2 - tr Cov(d) / n with the n - 1 covariance (numpy's), from sums that shares
    of the samples (processes) add."""
    from maskc.rollout import feature_shift2
    from reference import np_feature_shift2

    diff = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.3
    want = np_feature_shift2(diff.numpy())
    k = min(split, n - 1)
    sums = [torch.stack([p.sum(0), p.pow(2).sum(0)]) for p in (diff[:k], diff[k:])]
    total = sums[0] + sums[1]
    assert feature_shift2(total[0], total[1], n) == pytest.approx(want, rel=1e-9, abs=1e-12)
    with pytest.raises(maskc.MaskcError, match="at least 2"):
        feature_shift2(diff[0], diff[0] ** 2, 1)


def test_score_charges_the_feature_shift_of_runtime_samples() -> None:
    """With features and shift_weight, Rollout.score is the saturating PSNR of the runtime's final samples less
    the weight times the unbiased squared shift of their mean feature from the unmasked samples' (numpy)."""
    from reference import np_feature_shift2

    model, sched, noise, kw, guidance = _setup("unet", "ddim", 4)
    names = maskc.blocks(model)
    proj = torch.randn(128, 3, generator=torch.Generator().manual_seed(2))
    feats = lambda img: img.float().flatten(1) @ proj  # noqa: E731
    ro = Rollout(model, names, sched, noise, kw, guidance, "timestep", features=feats, shift_weight=7.0)
    plain = Rollout(model, names, sched, noise, kw, guidance, "timestep")
    bits = torch.rand(STEPS, len(names), generator=torch.Generator().manual_seed(5)) < 0.5
    bits[0] = True
    full = torch.ones(STEPS, len(names), dtype=torch.bool)
    ref = _runtime_final(model, maskc.Mask(full, names), sched, noise, kw, guidance).double()
    out = _runtime_final(model, maskc.Mask(bits, names), sched, noise, kw, guidance).double()
    shift = np_feature_shift2((feats(out).double() - feats(ref).double()).numpy())
    assert abs(7.0 * shift) > 1e-3, "the masked samples' features do not move: the charge would not be tested"
    assert plain.score(bits) == pytest.approx(float((10 * torch.log10(1 / ((out - ref).pow(2).flatten(1).mean(1)
                                                                            + 1e-5))).mean()), rel=1e-12)
    assert ro.score(bits) == pytest.approx(plain.score(bits) - 7.0 * shift, rel=1e-9)
    assert ro.psnr(bits) == plain.psnr(bits)  # the reported PSNR is not charged
    with pytest.raises(maskc.MaskcError, match=r"\(n, d\)"):
        Rollout(model, names, sched, noise, kw, guidance, "timestep", features=lambda img: img, shift_weight=1.0)


def _charged_share(rank: int, world: int, store: str) -> tuple[float, float]:
    """(charged, plain) score of one of ``world`` processes holding its share (k % world == rank, as
    noise_rollout splits) of 5 calibration noises; world 1: no process group."""
    import datetime

    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    try:
        model, sched, noise, kw, guidance = _setup("unet", "ddim", 5)
        names = maskc.blocks(model)
        idx = torch.tensor([k for k in range(5) if k % world == rank])
        proj = torch.randn(128, 3, generator=torch.Generator().manual_seed(2))
        ro = Rollout(model, names, sched, noise[idx], kw, guidance, "timestep", world=(world, 5),
                     features=lambda img: img.float().flatten(1) @ proj, shift_weight=7.0)
        plain = Rollout(model, names, sched, noise[idx], kw, guidance, "timestep", world=(world, 5))
        bits = torch.rand(STEPS, len(names), generator=torch.Generator().manual_seed(5)) < 0.5
        bits[0] = True
        return ro.score(bits), plain.score(bits)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _second_process(store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.save(_charged_share(1, 2, store), out)


def test_the_charged_score_is_the_same_over_processes(tmp_path) -> None:
    """Two processes holding 3 and 2 of 5 calibration noises score a mask as one process holding all 5 does (the
    feature sums are reduced over processes before the shift is formed). The second process is forked: it
    inherits the imports, so the test costs seconds, not an interpreter start."""
    import multiprocessing

    store, out = str(tmp_path / "store"), str(tmp_path / "second.pt")
    child = multiprocessing.get_context("fork").Process(target=_second_process, args=(store, out))
    child.start()
    try:
        a = _charged_share(0, 2, store)
    finally:
        child.join(timeout=180)
    assert child.exitcode == 0
    b, one = torch.load(out), _charged_share(0, 1, "")
    assert a == b  # every process takes the same decisions
    # batches of 3 and 2 against 5 round differently in float32 (~1e-5 per pixel): the same score to 2e-3 dB,
    # where the charge itself is several dB
    assert abs(one[1] - one[0]) > 1.0
    assert a[0] == pytest.approx(one[0], abs=2e-3)


def test_an_unknown_search_score_is_refused() -> None:
    """A misspelt objective raises, in the search and in LearnConfig, instead of silently ranking by plain PSNR."""
    _, names, cost, ro = _cost_and_rollout()
    with pytest.raises(maskc.MaskcError, match="saturating"):
        refine(ro, cost, [], [], 0.0, 1.0, priority=list(range(STEPS)), score="saturated")
    with pytest.raises(maskc.MaskcError, match="search_score"):
        maskc.LearnConfig(search_score="saturated").validate()


def _cost_and_rollout(n: int = 2):
    model, sched, noise, kw, guidance = _setup("unet", "ddim", n)
    names = maskc.blocks(model)
    x = noise[:1]
    t0 = sched.timesteps[0].reshape(1)
    graph = maskc.block_graph(model, x, t0, blocks=names)
    cost = GenerationCost(model, names, graph, (x,), {"timestep": t0})
    return model, names, cost, Rollout(model, names, sched, noise, kw, guidance, "timestep")


def test_project_budget_is_the_closest_prefix() -> None:
    """Bisection over the ranked runs finds the k whose exact MACs are closest to the target: a scan agrees."""
    model, names, cost, _ = _cost_and_rollout()
    from maskc.learn import Problem

    macs = torch.tensor([float(cost.graph.nodes[n]["macs"]) for n in names], dtype=torch.float64)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(STEPS)
    prob = Problem(model, sched, sched.timesteps, names, cost.graph, macs, float(cost.graph.graph["total_macs"]),
                   "timestep", None, (), {})
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(STEPS, len(names), generator=g, dtype=torch.float64)
    weights = torch.ones(STEPS)
    for target in (0.35, 0.6, 0.8):
        bits, f = project_budget(prob, scores, weights, cost, target, learned_first=False)
        assert f == pytest.approx(cost.fraction(bits, rectified=True))
        order = sorted(((i, j) for i in range(1, STEPS) for j in range(len(names))),
                       key=lambda ij: (-float(scores[ij]), float(macs[ij[1]])))
        fracs = []
        for k in range(len(order) + 1):
            b = torch.zeros(STEPS, len(names), dtype=torch.bool)
            b[0] = True
            for i, j in order[:k]:
                b[i, j] = True
            fracs.append(cost.fraction(b))
        assert abs(f - target) <= min(abs(v - target) for v in fracs) + 1e-12


def test_fit_to_window_lands_inside() -> None:
    _, names, cost, _ = _cost_and_rollout()
    vocab = row_vocabulary(names)
    prio = list(range(STEPS))
    for m in peer_library(names, STEPS, delta=[0.0] + [0.1] * (STEPS - 1)):
        for lo, hi in ((0.55, 0.6), (0.75, 0.8)):
            b = fit_to_window(m.bits, cost, lo, hi, prio, vocab)
            if b is not None:
                assert lo <= cost.fraction(b) <= hi


def test_search_never_worse_than_its_seeds_and_stays_in_the_window() -> None:
    """Every mask the search scores (but the peers as they are) is in the window; the result is the
    best of them and beats every seed and every fitted peer on the calibration noises, even with no
    local search at all; the run is deterministic."""
    _, names, cost, ro = _cost_and_rollout(n=3)
    lo, hi = 0.57, 0.61
    scored: list[tuple[torch.Tensor, float]] = []
    real_psnr = ro.score

    def spy(bits, commit=False):
        p = real_psnr(bits, commit)
        scored.append((bits.clone(), p))
        return p

    ro.score = spy  # type: ignore[method-assign]
    peers = peer_library(names, STEPS, delta=[0.0] + [0.1] * (STEPS - 1))
    g = torch.Generator().manual_seed(1)
    seed_bits = torch.rand(STEPS, len(names), generator=g) < 0.6
    seed_bits[0] = True
    res = refine(ro, cost, [("random", seed_bits)], peers, lo, hi, priority=list(range(STEPS)), evaluations=15)
    peer_keys = {bytes(cost.rectify(m.bits).flatten().to(torch.uint8).tolist()) for m in peers}
    in_window = []
    for b, p in scored:
        if lo <= cost.fraction(b, rectified=True) <= hi:
            in_window.append(p)
        else:
            assert bytes(b.flatten().to(torch.uint8).tolist()) in peer_keys
    assert lo <= res.macs_fraction <= hi and res.macs_fraction == pytest.approx(cost.fraction(res.bits))
    assert res.psnr == pytest.approx(real_psnr(res.bits)) == max(in_window)  # the best mask it scored
    seed_rect = cost.rectify(seed_bits)
    if lo <= cost.fraction(seed_rect, rectified=True) <= hi:
        assert res.psnr >= real_psnr(seed_rect) - 1e-9
    vocab = row_vocabulary(names, peers)
    by_psnr = sorted(res.peers, key=lambda p: -p["psnr"])[:6]  # the peers refine fits and starts from
    assert by_psnr, "no peer was scored: the test would check nothing"
    fitted: list[float] = []
    for m in peers:
        b = cost.rectify(m.bits)
        f = cost.fraction(b, rectified=True)
        if not any(p["macs_fraction"] == f and p["psnr"] == pytest.approx(real_psnr(b)) for p in by_psnr):
            continue
        fb = fit_to_window(b, cost, lo, hi, list(range(STEPS)), vocab)
        if fb is not None:
            fitted.append(real_psnr(fb))
            assert res.psnr >= fitted[-1] - 1e-9
    assert fitted, "no peer could be fitted into the window: the test would check nothing"
    # With no local search the result is the best seed, and the fitted peers are seeds: given no seed of
    # its own, the search returns the best fitted peer; given one, nothing worse.
    peers_only = refine(ro, cost, [], peers, lo, hi, priority=list(range(STEPS)), evaluations=0)
    assert peers_only is not None and peers_only.psnr == pytest.approx(max(fitted))
    seeds_only = refine(ro, cost, [("random", seed_bits)], peers, lo, hi, priority=list(range(STEPS)), evaluations=0)
    assert seeds_only.psnr >= max(fitted) - 1e-9
    ro.psnr = real_psnr  # type: ignore[method-assign]
    again = refine(ro, cost, [("random", seed_bits)], peers, lo, hi, priority=list(range(STEPS)), evaluations=15)
    assert torch.equal(again.bits, res.bits) and again.psnr == res.psnr


def test_peer_library_families() -> None:
    from test_schedules import DIT, UNET

    lib = peer_library(UNET, 8, delta=[0, 0.3, 0.1, 0.1, 0.2, 0.05, 0.4, 0.1])
    methods = {m.meta["provenance"]["method"] for m in lib}
    assert {"DeepCache uniform", "DeepCache non-uniform", "step-level reuse uniform",
            "step-level reuse non-uniform", "δ-threshold (TeaCache-like, static)"} <= methods
    keys = [bytes(m.bits.flatten().to(torch.uint8).tolist()) for m in lib]
    assert len(keys) == len(set(keys))  # distinct
    every_other = torch.zeros(8, len(UNET), dtype=torch.bool)
    every_other[::2] = True
    assert any(torch.equal(m.bits, every_other) for m in lib)  # the simplest peer: reuse the model every other step
    dit_lib = peer_library(DIT, 8)
    assert not any("DeepCache" in m.meta["provenance"]["method"] for m in dit_lib)
    for m in lib + dit_lib:
        assert bool(m.bits[0].all())


def test_delta_threshold_accumulates() -> None:
    from maskc.schedules import delta_threshold

    m = delta_threshold(["a", "b"], 6, [0, 0.2, 0.2, 0.5, 0.1, 0.1], 0.4)
    assert m.meta["provenance"]["full_steps"] == [0, 2, 3]
    assert m.bits[:, 0].tolist() == [True, False, True, True, False, False]
