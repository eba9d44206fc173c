"""maskc bench end to end on the shipped U-Net, tiny settings: quality pass, timing pass, tables, plots."""
from __future__ import annotations

import json

import pytest

from maskc.bench import BenchConfig, run_bench


@pytest.mark.slow
def test_bench_quality_then_time(tmp_path) -> None:
    cfg = BenchConfig(model="unet", steps=3, n=12, batch=6, targets=(0.6,), main_target=0.6, deepcache=(2,),
                      deepcache_nonuniform=(), time_batch=2, time_reps=2, threads=2, out=str(tmp_path), phase="quality",
                      learn_kwargs={"iters": 2, "batch": 2})
    q = run_bench(cfg, log=lambda s: None)
    methods = [r["method"] for r in q["rows"]]
    assert methods == ["original (full model)", "maskc learned, target 0.6", "DeepCache uniform N=2",
                       "random, equal MACs (0.6)"]
    assert not (tmp_path / "bench_unet_ddim3.md").exists()
    cfg.phase = "time"
    res = run_bench(cfg, log=lambda s: None)
    saved = json.loads((tmp_path / "bench_unet_ddim3.json").read_text())
    assert [r["method"] for r in saved["rows"]] == methods and saved["quality_date"] == q["date"]
    for r, r0 in zip(res["rows"], q["rows"]):
        assert r["fd"] == r0["fd"] and r["speedup_wall"] > 0 and r["peak_memory_bytes"] > 0
        assert 0 < r["macs_fraction"] <= 1
    md = (tmp_path / "bench_unet_ddim3.md").read_text()
    assert all(f"| {m} |" in md for m in methods) and "real-vs-real floor" in md
    assert (tmp_path / "bench_unet_ddim3_pareto.png").exists() and (tmp_path / "bench_unet_ddim3_mask.png").exists()
    # the learned mask is reused by a second run with the same settings
    cfg.phase, cfg.name = "quality", "again"
    again = run_bench(cfg, log=lambda s: None)
    assert again["rows"][1]["learning_s"] == q["rows"][1]["learning_s"]
