"""maskc bench end to end on the shipped U-Net, tiny settings: quality pass, timing pass, tables, plots."""
from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch

import maskc
import maskc.bench
from maskc.bench import BenchConfig, run_bench
from maskc.errors import MaskcError

# paired-bootstrap resamples in these end-to-end runs: enough for intervals to exist and be compared across runs
# (their values are checked in test_eval.py and by test_paired_intervals_compare_the_right_rows)
BOOT = 100
# learning in these runs: every phase, on the fewest noises and iterations
LEARN = {"iters": 2, "batch": 2, "search_evals": 4, "search_batch": 2, "select_batch": 2}


@pytest.mark.slow
def test_bench_quality_then_time(tmp_path, monkeypatch) -> None:
    cfg = BenchConfig(model="unet", steps=3, n=12, batch=6, targets=(0.6,), main_target=0.6, deepcache=(2,),
                      deepcache_nonuniform=(), step_reuse=(), delta_threshold=(), peers="fixed", time_batch=2,
                      time_reps=2, threads=1, bootstrap=BOOT, out=str(tmp_path), phase="quality",
                      learn_kwargs=LEARN)
    q = run_bench(cfg, log=lambda s: None)
    methods = [r["method"] for r in q["rows"]]
    assert methods == ["original (full model)", "maskc learned, target 0.6", "DeepCache uniform N=2",
                       "random, equal MACs (0.6)"]
    assert "not measured in this run" in (tmp_path / "bench_unet_ddim3.md").read_text()
    assert q["command"].endswith("--phase quality") and "then" not in q["command"]
    cfg.phase = "time"
    res = run_bench(cfg, log=lambda s: None)
    saved = json.loads((tmp_path / "bench_unet_ddim3.json").read_text())
    assert [r["method"] for r in saved["rows"]] == methods and saved["quality_date"] == q["date"]
    assert saved["command"].endswith("--phase time") and "then" in saved["command"]
    for r in res["rows"]:
        assert r["speedup_wall"] > 0 and r["peak_memory_bytes"] > 0 and 0 < r["macs_fraction"] <= 1
    # the table's MACs are measured: count the saved learned mask's generation here, independently
    learned = res["rows"][1]
    assert abs(learned["macs_fraction"] - _measured_fraction(tmp_path / learned["mask_file"], 3)) < 1e-9
    assert q["rows"][1]["learned_afresh"] is True
    md = (tmp_path / "bench_unet_ddim3.md").read_text()
    assert "not measured in this run" not in md
    assert all(f"| {m} |" in md for m in methods) and "real-vs-real floor" in md
    assert (tmp_path / "bench_unet_ddim3_pareto.png").exists() and (tmp_path / "bench_unet_ddim3_mask.png").exists()
    # the learned mask is reused by a second run with the same settings and code ...
    cfg.phase, cfg.name = "quality", "again"
    logs: list[str] = []
    again = run_bench(cfg, log=logs.append)
    assert again["rows"][1]["learned_afresh"] is False and any("reusing" in s for s in logs)
    # ... and learned afresh once the code changed; timing refuses quality figures of other code
    monkeypatch.setattr(maskc.bench, "code_version", lambda: "edited-code")
    logs.clear()
    cfg.name = "changed"
    changed = run_bench(cfg, log=logs.append)
    assert changed["rows"][1]["learned_afresh"] is True and any("code changed" in s for s in logs)
    monkeypatch.undo()
    cfg.phase = "time"
    with pytest.raises(MaskcError, match="code"):
        run_bench(cfg, log=lambda s: None)


@pytest.mark.slow
def test_bench_best_peers(tmp_path) -> None:
    """Each family's chosen member has MACs at most the learned mask's and the best PSNR among those,
    checked against generations through maskc.compile (not the Rollout the selection uses)."""
    import torch
    from diffusers import DDIMScheduler

    from maskc.eval import fidelity, generation_macs
    from maskc.models.shipped import load_pretrained
    from maskc.sampling import generate
    from maskc.schedules import peer_library

    steps, n_sel = 4, 3
    cfg = BenchConfig(model="unet", steps=steps, n=4, batch=4, targets=(0.6,), main_target=0.6, select_n=n_sel,
                      random=False, threads=1, bootstrap=BOOT, out=str(tmp_path), phase="quality",
                      learn_kwargs=LEARN)
    res = run_bench(cfg, log=lambda s: None)
    learned = next(r for r in res["rows"] if r["family"] == "maskc")
    chosen = [r for r in res["rows"] if r.get("best_for")]
    fams = {r["family"] for r in chosen}
    assert len(chosen) == len(fams) >= 2 and all(r["best_for"] == [0.6] for r in chosen)
    assert all(r["macs_fraction"] <= learned["macs_fraction"] + 1e-9 for r in chosen)
    md = (tmp_path / "bench_unet_ddim4.md").read_text()
    assert "best member of no more MACs" in md and all(f"| 0.6 | {r['method']} |" in md for r in chosen)

    model, _ = load_pretrained("unet")
    model.float()
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    ts = [t.reshape(1) for t in sched.timesteps]
    x1 = torch.zeros(1, 1, 32, 32)
    full = generation_macs(model, None, (x1,), {"timestep": ts[0]}, "timestep", ts)
    noise = torch.randn(n_sel, 1, 32, 32, generator=torch.Generator().manual_seed(4321))
    ref = generate(model, sched, noise, steps, {}, None)
    cap = generation_macs(model, maskc.Mask.load(str(tmp_path / learned["mask_file"])), (x1,), {"timestep": ts[0]},
                          "timestep", ts) / full
    best: dict[str, float] = {}
    records = {(d["family"], d["settings"]) for d in res["peer_selection"]}
    n_fit = 0
    for m in peer_library(maskc.blocks(model), steps):
        f = generation_macs(model, m, (x1,), {"timestep": ts[0]}, "timestep", ts) / full
        if f <= cap + 1e-9:
            n_fit += 1
            tm = maskc.compile(model, m)
            p = fidelity(generate(tm, sched, noise, steps, {}, None, reset=tm.reset), ref)["psnr"]
            fam = m.meta["provenance"]["method"]
            best[fam] = max(best.get(fam, -1e9), p)
    for r in chosen:
        if r["family"] in best:
            assert abs(r["selection_psnr"] - best[r["family"]]) < 1e-3, r["family"]
    assert len(records) >= n_fit  # every fitting member was scored (plus the δ schedules, from measured δ)


def test_peer_selection_respects_each_level_cap() -> None:
    """With several MACs levels, each level gets, per family, the best-scoring member of no more MACs than
    that level's mask (a cheaper level never inherits a member chosen under a dearer level's cap)."""
    from diffusers import DDIMScheduler

    from archs import small_unet
    from maskc.bench import select_best_peers
    from maskc.rollout import GenerationCost
    from maskc.schedules import step_reuse

    model = small_unet()
    names = maskc.blocks(model)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(8)
    x = torch.zeros(1, 2, 8, 8)
    ex_kwargs = {"timestep": sched.timesteps[0].reshape(1)}
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    levels = [(0.7, step_reuse(names, 8, 2)), (0.4, step_reuse(names, 8, 4))]
    delta = [0.0, 0.3, 0.1, 0.2, 0.1, 0.4, 0.1, 0.2]
    chosen, records = select_best_peers(model, names, sched, noise, {}, None, (x,), ex_kwargs, levels, delta)
    cost = GenerationCost(model, names, maskc.block_graph(model, x, **ex_kwargs, blocks=names), (x,), ex_kwargs)
    for t, m in levels:
        cap = cost.fraction(m.bits)
        mine = [c for c in chosen if t in c["best_for"]]
        fams = {r["family"] for r in records if r["macs_fraction"] <= cap + 1e-9}
        assert {c["family"] for c in mine} == fams and len(mine) == len(fams) >= 2, t
        for c in mine:
            assert cost.fraction(c["mask"].bits) <= cap + 1e-9, (t, c["method"])
            best = max(r["psnr"] for r in records if r["family"] == c["family"] and r["macs_fraction"] <= cap + 1e-9)
            assert c["selection_psnr"] == best
    assert {c["family"] for c in chosen if 0.7 in c["best_for"]} != set() and any(
        r["macs_fraction"] > cost.fraction(levels[1][1].bits) + 1e-9 for r in records), "one cap would do"


def _measured_fraction(mask_file, steps: int) -> float:
    """FlopCounterMode over a DDIM generation of the shipped U-Net with and without the mask."""
    import torch
    from diffusers import DDIMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    from maskc.models.shipped import load_pretrained

    model, _ = load_pretrained("unet")
    model.float()
    tm = maskc.compile(model, maskc.Mask.load(str(mask_file)))
    s = DDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(steps)
    x = torch.zeros(1, 1, 32, 32)
    flops = []
    for fn in (model, tm):
        with torch.no_grad():
            for t in s.timesteps:  # the tracing generation, not counted
                fn(x, t.reshape(1))
        if fn is tm:
            tm.reset()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            for t in s.timesteps:
                fn(x, t.reshape(1))
        flops.append(fc.get_total_flops())
    return flops[1] / flops[0]


@pytest.mark.slow
def test_bench_shards_resume(tmp_path, monkeypatch) -> None:
    """Two shards split the quality phase and the one that finishes last writes the same table as one
    process; a shard's stored rows are not sampled again, and rows of other code are not reused."""
    # the best peers (their selection is shared by the shards); no random peer, whose bisection only adds time
    kw = dict(model="unet", steps=3, n=8, batch=4, targets=(0.6,), main_target=0.6, select_n=2, random=False,
              threads=1, bootstrap=BOOT, phase="quality", learn_kwargs=LEARN)
    whole = run_bench(BenchConfig(**kw, out=str(tmp_path / "one")), log=lambda s: None)
    sharded = tmp_path / "two"
    (sharded / "masks").mkdir(parents=True)
    for f in (tmp_path / "one" / "masks").glob("*_learned_*"):  # the same learned mask, not a second learning
        (sharded / "masks" / f.name).write_bytes(f.read_bytes())
    n_rows = len(whole["rows"])
    logs: list[str] = []
    first = run_bench(BenchConfig(**kw, out=str(sharded), shard=0, shards=2, help_shards=False), log=logs.append)
    assert first["incomplete"] and first["done"] == (n_rows + 1) // 2
    assert first["missing"] == [r["method"] for r in whole["rows"][1::2]]
    assert not (sharded / "bench_unet_ddim3.md").exists()
    # another code version keeps its partial folder apart: nothing of shard 0 is reused (it learns its own mask, so
    # the stored one is put back afterwards; without the row store, which would serve shard 0's rows by their bits)
    learned = {f: f.read_bytes() for f in (sharded / "masks").glob("*_learned_*")}
    monkeypatch.setattr(maskc.bench, "code_version", lambda: "edited-code")
    other = run_bench(BenchConfig(**kw, out=str(sharded), shard=1, shards=2, help_shards=False, row_store=False),
                      log=lambda s: None)
    assert other["incomplete"] and other["missing"][0] == "original (full model)"
    monkeypatch.undo()
    for f, b in learned.items():
        f.write_bytes(b)
    logs.clear()
    second = run_bench(BenchConfig(**kw, out=str(sharded), shard=1, shards=2, help_shards=False), log=logs.append)
    assert any("reusing the peer selection" in s for s in logs)
    assert not any(s.startswith("original:") for s in logs)  # the original's samples were stored by shard 0
    assert sum(s.startswith("{'method'") for s in logs) == n_rows // 2  # only its own rows were sampled
    key = ("method", "macs_fraction", "fd", "kid", "psnr", "ssim", "mask_file")
    assert [{k: r.get(k) for k in key} for r in second["rows"]] == [{k: r.get(k) for k in key} for r in whole["rows"]]
    # the paired intervals come from features each shard stored beside its rows: the same as one process's
    ci = ("fd_ci", "fd_ratio_ci", "versus")
    assert all(r.get("fd_ratio_ci") for r in whole["rows"][1:]) and whole["rows"][1]["versus"]
    assert [{k: r.get(k) for k in ci} for r in second["rows"]] == [{k: r.get(k) for k in ci} for r in whole["rows"]]
    assert [r["sampled_by"] for r in second["rows"]] == ["0/2", "1/2"] * (n_rows // 2) + ["0/2"] * (n_rows % 2)
    assert "Samples drawn by 2 processes" in (sharded / "bench_unet_ddim3.md").read_text()
    assert not (sharded / "partial").exists()


@pytest.mark.slow
def test_a_shard_alone_samples_its_own_rows_then_helps_from_the_last(tmp_path) -> None:
    """Shard 0/2 run alone samples its own methods (0, 2, 4), then the other shard's from the last backwards
    (3, then 1), and writes the same table as one process."""
    kw, whole, out = _whole_run_and_a_fresh_folder(tmp_path, deepcache=(2, 3), step_reuse=(2,))
    methods = [r["method"] for r in whole["rows"]]
    assert len(methods) == 5
    logs: list[str] = []
    alone = run_bench(BenchConfig(**kw, out=str(out), shard=0, shards=2), log=logs.append)
    sampled = [m.group(1) for m in (re.match(r"\{'method': '([^']*)'", s) for s in logs) if m]
    assert sampled == [methods[i] for i in (0, 2, 4, 3, 1)]
    key = ("method", "macs_fraction", "fd", "kid", "psnr", "ssim", "fd_ci", "fd_ratio_ci")
    assert [{k: r.get(k) for k in key} for r in alone["rows"]] == [{k: r.get(k) for k in key} for r in whole["rows"]]
    assert not (out / "partial").exists()  # (help_shards=False: test_bench_shards_resume)


@pytest.mark.slow
def test_shards_that_meet_on_a_method_split_it_and_one_writes_the_table(tmp_path) -> None:
    """Two shard processes started together, each helping the other, meet on the learned mask's row (shard
    1's first batch of it waits until shard 0, done with its own rows, has taken the other; shard 0 then
    finishes the row, stores it and drops its batches while shard 1 waits for them). No batch of any
    method is sampled twice (shard 1 moves on instead of sampling shard 0's dropped batch again), exactly
    one shard writes the table, and it equals one process's."""
    import subprocess
    import sys

    kw, whole, out = _whole_run_and_a_fresh_folder(tmp_path)
    made = tmp_path / "made.txt"
    made.touch()
    procs = [subprocess.Popen([sys.executable, "-c", _MEETING_SHARD, json.dumps(kw), str(k), str(out), str(made),
                               str(tmp_path / "one" / whole["rows"][1]["mask_file"]), str(tmp_path / f"res{k}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    res = [json.loads((tmp_path / f"res{k}.json").read_text()) for k in (0, 1)]
    calls = [line.split() for line in made.read_text().splitlines()]
    for what in ("original", "learned", "peer"):
        firsts = [v for _, w, v in calls if w == what]
        assert len(firsts) == 2 and len(set(firsts)) == 2, calls  # each batch once
    assert {k for k, w, _ in calls if w == "learned"} == {"0", "1"}  # they met on the learned mask's row
    done = [k for k in (0, 1) if not res[k].get("incomplete")]
    assert len(done) == 1, logs  # exactly one wrote the table
    assert res[1 - done[0]]["missing"] == [] and "the table is written by" in logs[1 - done[0]]
    key = ("method", "fd", "kid", "psnr", "ssim", "fd_ci")
    assert [{k: x.get(k) for k in key} for x in res[done[0]]["rows"]] == [{k: x.get(k) for k in key}
                                                                         for x in json.loads(json.dumps(whole["rows"]))]
    assert not (out / "partial").exists()


_MEETING_SHARD = """
import json, os, sys, time
import torch
import maskc, maskc.bench, maskc.sampling
from maskc.bench import BenchConfig, run_bench
kw, shard, out, made, learned, res = json.loads(sys.argv[1]), sys.argv[2], *sys.argv[3:]
bits, real, split = maskc.Mask.load(learned).bits, maskc.sampling.generate, maskc.bench._split_work

def calls():
    with open(made) as f:
        return [line.split() for line in f.read().splitlines()]

def generate(*a, **k):  # records (shard, method, first noise value of the batch) before sampling it
    fn, t0 = a[0], time.time()
    what = ("original" if k.get("reset") is None else
            "learned" if getattr(fn, "mask", None) is not None and torch.equal(fn.mask.bits, bits) else "peer")
    with open(made, "a") as f:
        f.write(f"{shard} {what} {a[2][0, 0, 0, 0].item()!r}\\n")
    if what == "original":  # held until both shards sample the original
        while len({s for s, w, _ in calls() if w == "original"}) < 2 and time.time() - t0 < 60:
            time.sleep(0.02)
    elif what == "learned" and shard == "1":  # held until shard 0 has joined the learned mask's row
        while not any(s == "0" and w == "learned" for s, w, _ in calls()) and time.time() - t0 < 60:
            time.sleep(0.02)
    elif what == "learned":  # shard 0 finishes the row last, so it stores the row and drops its batches
        time.sleep(2)
    return real(*a, **k)

maskc.sampling.generate = generate  # this process only runs the test
maskc.bench._split_work = lambda *a, **k: split(*a, **{**k, "poll": 0.05})

class Clock:  # bench's time module, but shard 1 waits 15 s once it has sampled its batch of the learned mask:
    # by then shard 0 has stored the row and dropped both batches, and shard 1 must move on instead of
    # sampling shard 0's batch again
    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, s):
        learned = shard == "1" and any(c[:2] == ["1", "learned"] for c in calls())
        time.sleep(15.0 if learned else s)

maskc.bench.time = Clock()
r = run_bench(BenchConfig(**kw, out=out, shard=int(shard), shards=2), log=print)
with open(res, "w") as f:
    json.dump({k: r.get(k) for k in ("incomplete", "missing", "rows")}, f)
"""


def _whole_run_and_a_fresh_folder(tmp_path, deepcache: tuple[int, ...] = (2,),
                                  step_reuse: tuple[int, ...] = ()) -> tuple[dict, dict, pathlib.Path]:
    """(settings of a bench with rows original, learned mask, DeepCache N for N in ``deepcache``, step reuse ...,
    its uninterrupted result in tmp_path/one, tmp_path/two holding only its learned mask): runs in the fresh
    folder sample every row again, without learning again."""
    kw = dict(model="unet", steps=3, n=8, batch=4, targets=(0.6,), main_target=0.6, peers="fixed", deepcache=deepcache,
              deepcache_nonuniform=(), step_reuse=step_reuse, delta_threshold=(), random=False, threads=1,
              bootstrap=BOOT, phase="quality",
              learn_kwargs=LEARN)
    whole = run_bench(BenchConfig(**kw, out=str(tmp_path / "one")), log=lambda s: None)
    out = tmp_path / "two"
    (out / "masks").mkdir(parents=True)
    for f in (tmp_path / "one" / "masks").glob("*_learned_*"):
        (out / "masks" / f.name).write_bytes(f.read_bytes())
    return kw, whole, out


@pytest.mark.slow
def test_bench_resumes_a_method_at_its_batch(tmp_path, monkeypatch) -> None:
    """A process killed inside a method (or inside the original) resumes at its first missing batch:
    the finished batches are not sampled again, the figures equal an uninterrupted run's, and no batch
    is left behind once the table is written."""
    import maskc.sampling

    kw, whole, out = _whole_run_and_a_fresh_folder(tmp_path)
    assert [r["method"] for r in whole["rows"]] == ["original (full model)", "maskc learned, target 0.6",
                                                    "DeepCache uniform N=2"]
    real, calls = maskc.sampling.generate, []

    class Killed(Exception):
        pass

    def generate(*a, **k):
        if len(calls) == stop_at:
            raise Killed
        calls.append(a[2][0, 0, 0, 0].item())  # which batch: its first noise value
        return real(*a, **k)

    monkeypatch.setattr(maskc.sampling, "generate", generate)
    # killed at the original's 2nd batch; then, resumed, at the learned mask's 2nd batch (after the
    # original's 2nd and the mask's 1st): the finished batches are kept (the original's until the table
    # is written: another shard may be reading them), and no lock is left
    for stop_at, kept in ((1, 1), (2, 3)):
        calls.clear()
        with pytest.raises(Killed):
            run_bench(BenchConfig(**kw, out=str(out)), log=lambda s: None)
        assert len(calls) == stop_at
        assert len(list((out / "partial").rglob("batch-*.safetensors"))) == kept
        assert not list((out / "partial").rglob("*.lock"))
    stop_at = -1
    calls.clear()
    resumed = run_bench(BenchConfig(**kw, out=str(out)), log=lambda s: None)
    assert len(calls) == 1 + 2  # the learned mask's 2nd batch, then DeepCache's two
    key = ("method", "macs_fraction", "fd", "kid", "psnr", "ssim", "fd_ci", "fd_ratio_ci")
    assert [{k: r.get(k) for k in key} for r in resumed["rows"]] == [{k: r.get(k) for k in key} for r in whole["rows"]]
    assert not (out / "partial").exists()


@pytest.mark.slow
def test_shards_started_together_split_the_originals_batches(tmp_path, monkeypatch) -> None:
    """Two shards that start together each sample half of the original's batches (none twice), and the
    table they write equals one process's."""
    import threading
    import time

    import maskc.sampling

    kw, whole, out = _whole_run_and_a_fresh_folder(tmp_path)
    real, made = maskc.sampling.generate, []

    def generate(*a, **k):
        if k.get("reset") is None:  # the original's batch: held until both shards are sampling it
            made.append((threading.current_thread().name, a[2][0, 0, 0, 0].item()))
            t0 = time.time()
            while len({t for t, _ in made}) < 2 and time.time() - t0 < 300:  # a bound, not a timing: under
                # load the other thread may take over 30 s to get here, and then one shard samples every batch
                time.sleep(0.01)
        return real(*a, **k)

    monkeypatch.setattr(maskc.sampling, "generate", generate)
    loading, load = threading.Lock(), maskc.bench.bench_model

    def bench_model(*a):  # diffusers' loading is not thread-safe (it patches torch's module init while it runs)
        with loading:
            return load(*a)

    monkeypatch.setattr(maskc.bench, "bench_model", bench_model)
    res: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda k=k: res.update({k: run_bench(BenchConfig(**kw, out=str(out), shard=k,
                                                                                        shards=2), log=lambda s: None)}),
                                name=f"shard{k}") for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(res) == 2  # neither shard raised
    assert sorted(t for t, _ in made) == ["shard0", "shard1"]  # one batch each
    assert len({v for _, v in made}) == 2  # different batches
    done = [r for r in res.values() if not r.get("incomplete")]
    assert done  # the shard that finished last wrote the table (both, if they finished at once)
    key = ("method", "fd", "kid", "psnr", "ssim", "fd_ci")
    for r in done:
        assert [{k: x.get(k) for k in key} for x in r["rows"]] == [{k: x.get(k) for k in key} for x in whole["rows"]]


def test_a_shard_stops_when_the_table_is_written_under_it(tmp_path, monkeypatch) -> None:
    """A shard whose partial folder goes while it samples (another shard stored the last row, wrote the
    table and removed the folder) stops and says so: no error, and it does not make the folder again."""
    import shutil

    import maskc.sampling

    kw, _, out = _whole_run_and_a_fresh_folder(tmp_path)
    real = maskc.sampling.generate

    def generate(*a, **k):
        x = real(*a, **k)
        if k.get("reset") is None:  # the original's first batch: meanwhile the other shard finishes the table
            for d in (out / "partial").glob("*/*"):
                shutil.rmtree(d)
        return x

    monkeypatch.setattr(maskc.sampling, "generate", generate)
    res = run_bench(BenchConfig(**kw, out=str(out), shard=1, shards=2), log=lambda s: None)
    assert res.get("incomplete") and res["writer"] == "another process (done)" and not res["missing"]
    assert not list((out / "partial").glob("*/*"))


def test_shards_make_a_shared_piece_once(tmp_path) -> None:
    """Processes that need one piece together (the peer selection): one makes it, the others wait and read it;
    a lock left by a killed process (or an empty, old one) is taken over instead of waited on forever."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from maskc.bench import _Partial

    part = _Partial(str(tmp_path), {"k": 1})
    made: list[int] = []

    logs: list[str] = []

    def make() -> list[float]:
        made.append(1)
        t0 = time.time()  # the first maker holds the lock until both others wait (whatever the load)
        while len(made) == 1 and sum("waiting for another process" in m for m in logs) < 2 and time.time() - t0 < 10:
            time.sleep(0.01)
        return [0.0, 1.0, 2.0, 3.0]

    def lock(kind: str) -> str:
        return part._path(kind, 0) + ".lock"

    got: list[list[float]] = []
    threads = [threading.Thread(target=lambda: got.append(part.claimed("selection", 0, make, logs.append, poll=0.05)[0]))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and got == [[0.0, 1.0, 2.0, 3.0]] * 3
    assert sum("waiting for another process" in m for m in logs) == 2
    assert not os.path.exists(lock("selection"))
    # a dead process's lock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(lock("other"), "w") as f:
        f.write(str(dead.pid))

    def within(secs: float, **kw) -> float:
        """Seconds claimed took; fails (instead of hanging) if it waits past ``secs``."""
        t0, done = time.time(), []
        t = threading.Thread(target=lambda: done.append(part.claimed(ident=0, make=make, log=logs.append, poll=0.05, **kw)),
                             daemon=True)
        t.start()
        t.join(secs)
        assert done, f"claimed({kw}) still waiting after {secs} s"
        return time.time() - t0

    within(10, kind="other")
    # an empty lock: waited on while young, taken over once old
    created = time.time()
    open(lock("third"), "w").close()
    within(10, kind="third", stale_s=0.4)
    assert time.time() - created >= 0.35 and len(made) == 3


def test_shards_split_the_learning(tmp_path) -> None:
    """Processes that need the same masks together learn each once and share the work: each goes on to
    the masks no one is learning instead of waiting, and all get every mask, in order."""
    import threading
    import time

    from maskc.bench import _split_work

    store: dict[int, str] = {}
    made: list[tuple[str, int]] = []

    alone: list[int] = []

    def make(item: int) -> str:
        made.append((threading.current_thread().name, item))
        t0 = time.time()  # each learns until the other has started one too (whatever the load), then stores;
        # once one waited 5 s in vain (the other waits for it), none waits again: the turns show already
        while len({n for n, _ in made}) < 2 and not alone and time.time() - t0 < 5:
            time.sleep(0.01)
        if len({n for n, _ in made}) < 2:
            alone.append(item)
        store[item] = f"mask {item}"
        return store[item]

    results: dict[str, list] = {}

    def shard(name: str) -> None:
        results[name] = _split_work([0, 1, 2, 3], store.get, make, lambda i: str(tmp_path / f"{i}.lock"),
                                    lambda msg: None, poll=0.05)

    threads = [threading.Thread(target=shard, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(i for _, i in made) == [0, 1, 2, 3]  # each learned once
    assert {n for n, _ in made} == {"a", "b"}  # by both: nobody waited on a mask another was learning
    for name in ("a", "b"):
        assert [r for r, _ in results[name]] == [f"mask {i}" for i in range(4)]
        assert [afresh for _, afresh in results[name]] == [(name, i) in made for i in range(4)]
    assert not list(tmp_path.glob("*.lock"))


def test_paired_intervals_compare_the_right_rows() -> None:
    """Intervals pair each learned row with its own peer group, resample by resample: a peer with the
    learned row's very samples has a zero-width FD margin, a PSNR offset of 1 dB a [1, 1] interval."""
    from maskc.bench import _versus_peers, paired_intervals
    from maskc.eval import load_reference

    ref = load_reference()
    g = torch.Generator().manual_seed(0)
    base = ref.train_features[:200]
    other = base + 0.3 * torch.randn(base.shape, generator=g)
    rows = [{"method": "original (full model)", "family": "original", "fd": 1.0},
            {"method": "maskc learned, target 0.6", "family": "maskc", "target": 0.6},
            {"method": "maskc learned, target 0.4", "family": "maskc", "target": 0.4},
            {"method": "step: a", "family": "step", "best_for": [0.6]},
            {"method": "step: b", "family": "step", "best_for": [0.4]},
            {"method": "random, equal MACs (0.6)", "family": "random"}]
    features = [base, base, other, base.clone(), other.clone(), other + 0.1]
    psnr = torch.rand(200, generator=g) * 10 + 20
    psnrs = [None, psnr, psnr, psnr - 1, psnr - 2, psnr - 3]
    paired_intervals(rows, features, psnrs, ref, rounds=50, seed=0)
    assert rows[1]["fd_ratio_ci"] == [1.0, 1.0] and rows[2]["fd_ratio_ci"][0] > 1
    assert rows[1]["fd_terms"] == rows[0]["fd_terms"] and rows[2]["fd_terms"]["trace"] > rows[1]["fd_terms"]["trace"]
    a, b = rows[1]["versus"], rows[2]["versus"]
    assert set(a) == {"step: a", "random, equal MACs (0.6)"} and set(b) == {"step: b"}
    assert a["step: a"]["fd_margin_ci"] == [0.0, 0.0]
    assert a["step: a"]["psnr_margin_ci"] == pytest.approx([1.0, 1.0])
    assert a["random, equal MACs (0.6)"]["fd_margin_ci"][0] > 0 and b["step: b"]["fd_margin_ci"] == [0.0, 0.0]
    assert b["step: b"]["psnr_margin_ci"] == pytest.approx([2.0, 2.0])
    # FD to the original's samples: 0 for the original's very samples, on every resample; margins paired
    assert "fd_to_original" not in rows[0] and abs(rows[1]["fd_to_original"]) < 1e-4
    assert max(map(abs, rows[1]["fd_to_original_ci"])) < 2e-3  # float32 second moments and rows[2]["fd_to_original_ci"][0] > 1
    assert rows[2]["fd_to_original"] == pytest.approx(rows[4]["fd_to_original"])
    assert a["step: a"]["fd_to_original_margin_ci"] == [0.0, 0.0] == b["step: b"]["fd_to_original_margin_ci"]
    assert a["random, equal MACs (0.6)"]["fd_to_original_margin_ci"][0] > 1
    for r, p in zip(rows, psnrs):  # what the table prints beside the intervals
        r.update({"macs_fraction": 0.5, "fd": 10.0, "ssim": 0.9, "psnr": None if p is None else float(p.mean())})
    md = "\n".join(_versus_peers({"rows": rows, "n": 200, "config": {"select_n": 2, "bootstrap": 50, "seed": 0}}))
    assert "+1.00 (+1.00 to +1.00)" in md and "95% paired-bootstrap interval" in md
    assert "FD margin over 3 comparisons: learned worse beyond the interval at 0, within the interval" in md
    assert "FD-to-original margin over 3 comparisons: learned worse beyond the interval at 0, within the interval " \
        "(no difference shown) at 2, better beyond it at 1" in md


def _maskc_imports(path: str) -> set[str]:
    """maskc modules a file imports anywhere (module level or in functions): "learn", "passes", "__init__";
    for ``maskc.name`` after ``import maskc``, the module that defines ``name``."""
    import ast

    import maskc

    out: set[str] = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "maskc":
            mod = getattr(getattr(maskc, node.attr), "__module__", "maskc") or "maskc"
            out.add(mod.split(".")[1] if "." in mod else "__init__")
            continue
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for m in mods:
            parts = m.split(".")
            if parts[0] == "maskc":
                out.add(parts[1] if len(parts) > 1 else "__init__")
    return out


def _walk_imports(roots: list[str], covered: set[str], exempt: dict[str, str], hasher: str) -> set[str]:
    """The maskc modules reached from ``roots`` through imports (not walking into the package, passes/,
    models/ or an exempt module); fails on one neither ``covered`` nor ``exempt``."""
    import importlib

    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m in seen or m in ("__init__", "passes", "models") or m in exempt:  # the package: re-exports only
            continue
        seen.add(m)
        reached = _maskc_imports(importlib.import_module(f"maskc.{m}").__file__)
        missing = reached - covered - set(exempt)
        assert not missing, f"maskc.{m} imports {sorted(missing)}, which {hasher} does not hash"
        todo.extend(reached)
    return seen


def test_code_version_covers_what_learning_runs() -> None:
    """Every maskc module that learn.py reaches is hashed into the key of stored masks (or exempt, with a reason):
    a change to one that is not would let `maskc bench` reuse masks the new code would not learn."""
    from maskc.bench import MASK_CODE, MASK_CODE_EXEMPT

    seen = _walk_imports(["learn"], set(MASK_CODE) | {"passes"}, MASK_CODE_EXEMPT, "code_version")
    assert {"refine", "rollout", "schedules", "runtime"} <= seen
    assert not set(MASK_CODE) & set(MASK_CODE_EXEMPT)


def test_row_version_covers_what_sampling_and_scoring_run() -> None:
    """Every maskc module that the compiled runtime, sampling and scoring import is hashed by row_version or
    exempt with a reason: a change to one that is not would let the row store serve rows the new code would not
    sample or score so."""
    from maskc.bench import ROW_CODE, ROW_CODE_EXEMPT

    seen = _walk_imports(["runtime", "sampling", "eval", "data", "mask", "graphs"],
                         set(ROW_CODE) | {"passes", "models"}, ROW_CODE_EXEMPT, "row_version")
    assert {"runtime", "eval", "cudagraphs"} <= seen
    assert not set(ROW_CODE) & set(ROW_CODE_EXEMPT)
    assert "learn" not in ROW_CODE and "refine" not in ROW_CODE  # learning changes keep the rows


def test_row_version_does_not_depend_on_where_the_subpackages_lie(tmp_path, monkeypatch) -> None:
    """The same code hashes to the same row version wherever ``maskc.passes`` and ``maskc.models`` resolve (an
    editable install can map ``maskc.passes`` to another checkout than ``maskc``): the row store is keyed by code,
    not by the order of absolute paths."""
    import shutil

    import maskc.models
    import maskc.passes

    real = maskc.bench.row_version()
    versions = []
    for models_at, passes_at in (("a", "b"), ("b", "a")):  # models' folder first, then passes' first by path
        for mod, at in ((maskc.models, models_at), (maskc.passes, passes_at)):
            src = pathlib.Path(mod.__file__).parent
            dst = tmp_path / f"{models_at}{passes_at}" / at / src.name
            dst.mkdir(parents=True)
            for f in src.glob("*.py"):
                shutil.copy(f, dst / f.name)
            monkeypatch.setattr(mod, "__file__", str(dst / "__init__.py"))
        versions.append(maskc.bench.row_version())
    assert versions == [real, real]


def test_row_version_of_a_source_tree_is_the_imported_codes_and_follows_its_files(tmp_path) -> None:
    """``row_version(root)`` hashes a source tree laid out as the repository (how seed_row_store.py checks an older
    commit's rows): a copy of today's tree hashes to today's version, and one changed row-code file changes it."""
    import shutil

    root = pathlib.Path(maskc.bench.__file__).parent.parent
    for sub in ("maskc", "maskc/models", "passes"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        for f in (root / sub).glob("*.py"):
            shutil.copy(f, tmp_path / sub / f.name)
    assert maskc.bench.row_version(str(tmp_path)) == maskc.bench.row_version()
    for changed in ("maskc/eval.py", "maskc/models/dit.py", "passes/rewrite.py"):
        before = (tmp_path / changed).read_text()
        (tmp_path / changed).write_text(before + "\n# changed\n")
        assert maskc.bench.row_version(str(tmp_path)) != maskc.bench.row_version(), changed
        (tmp_path / changed).write_text(before)


@pytest.mark.slow
def test_row_store_serves_rows_of_the_same_bits_and_sampling_code(tmp_path, monkeypatch) -> None:
    """A run whose learning code changed learns its mask again (the same bits) but samples nothing: every row
    comes from the row store with the first run's figures, intervals included; once the sampling code changes,
    every row is sampled again."""
    import maskc.sampling

    # a learned mask and a peer are enough: the random peer's bisection would only add time
    kw = dict(model="unet", steps=3, n=12, batch=6, targets=(0.6,), main_target=0.6, deepcache=(2,),
              deepcache_nonuniform=(), step_reuse=(), delta_threshold=(), peers="fixed", random=False, threads=1,
              bootstrap=BOOT, out=str(tmp_path), phase="quality", learn_kwargs=LEARN)
    first = run_bench(BenchConfig(**kw), log=lambda s: None)
    assert not any(r["sampled_by"] == "row store" for r in first["rows"])
    calls: list[int] = []
    real = maskc.sampling.generate
    monkeypatch.setattr(maskc.sampling, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(maskc.bench, "code_version", lambda: "edited-learning")
    logs: list[str] = []
    second = run_bench(BenchConfig(**kw, name="second"), log=logs.append)
    assert second["rows"][1]["learned_afresh"] is True and any("code changed" in s for s in logs)
    assert not calls and all(r["sampled_by"] == "row store" for r in second["rows"])
    keys = ("fd", "kid", "psnr", "ssim", "macs_fraction", "fd_ci", "fd_ratio_ci", "fd_to_original",
            "fd_to_original_ci", "versus")
    for a, b in zip(first["rows"], second["rows"]):
        assert a["method"] == b["method"] and {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    assert "come from the row store" in (tmp_path / "second.md").read_text()
    monkeypatch.setattr(maskc.bench, "row_version", lambda: "edited-sampling")
    third = run_bench(BenchConfig(**kw, name="third"), log=lambda s: None)
    assert calls and not any(r["sampled_by"] == "row store" for r in third["rows"])
    for a, b in zip(first["rows"], third["rows"]):  # the code did not really change: the same figures
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


def test_row_store_is_keyed_by_the_sampling_code_and_the_row_settings_not_by_learning(tmp_path) -> None:
    """Rows are served across runs only under the same row code and the same row settings (``ROW_KEY``);
    what only learning depends on (its code version, its settings) leaves the store where it is."""
    from maskc.models.shipped import shipped_dir

    key = maskc.bench.run_key(BenchConfig(model="unet"), shipped_dir("unet"), "learning code", None)
    here = maskc.bench.row_store(str(tmp_path), "t", key, "row code").dir
    assert maskc.bench.row_store(str(tmp_path), "t", key, "row code").dir == here
    assert maskc.bench.row_store(str(tmp_path), "t", key, "other row code").dir != here
    for k in maskc.bench.ROW_KEY:
        assert maskc.bench.row_store(str(tmp_path), "t", {**key, k: "other"}, "row code").dir != here, k
    learning = {**key, "code": "other learning code", "learn_kwargs": {"iters": 1}, "targets": [0.1]}
    assert maskc.bench.row_store(str(tmp_path), "t", learning, "row code").dir == here


def test_a_partial_folder_is_keyed_by_the_models_content_not_its_path(tmp_path) -> None:
    """A partial folder committed from one checkout resumes in another (the model folder at another path), and
    a model whose weights or config changed never resumes one."""
    import shutil

    from maskc.models.shipped import shipped_dir

    here, there = tmp_path / "checkout-a" / "fmnist-unet", tmp_path / "checkout-b" / "fmnist-unet"
    shutil.copytree(shipped_dir("unet"), here)
    shutil.copytree(shipped_dir("unet"), there)
    cfg = BenchConfig(model=str(here))
    key = maskc.bench.run_key(cfg, str(here), "code", None)
    assert maskc.bench.run_key(cfg, str(there), "code", None) == key
    config = json.loads((there / "config.json").read_text())
    (there / "config.json").write_text(json.dumps({**config, "norm_eps": 1e-6}))
    assert maskc.bench.run_key(cfg, str(there), "code", None) != key
    assert maskc.bench.run_key(cfg, str(here), "other code", None) != key
