"""benchmarks/summarize_peers.py: the README's learned-vs-peer table is filled from the bench JSONs, not typed."""
from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def sp():
    spec = importlib.util.spec_from_file_location("summarize_peers",
                                                  os.path.join(HERE, "..", "benchmarks", "summarize_peers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _item(**kw):
    base = {"model": "fmnist-unet", "sampler": "ddim 20", "n": 2000, "target": 0.5, "macs": 0.507, "psnr": 30.7,
            "fd": 28.5, "fd_ratio": 1.18, "peer": "step-level reuse uniform: interval 2", "peer_macs": 0.5,
            "peer_psnr": 30.2, "margin_db": 0.48, "fd_margin": -0.01, "fd_ratio_ci": [1.17, 1.19],
            "psnr_margin_ci": [0.39, 0.58], "fd_margin_ci": [-0.09, 0.07]}
    return {**base, **kw}


def test_short_peer_names(sp) -> None:
    assert sp.short_peer("step-level reuse uniform: interval 2") == "step reuse, every 2"
    assert sp.short_peer("step-level reuse non-uniform: n_full 13, center 10, power 2") == \
        "step reuse non-uniform, 13 full steps"
    assert sp.short_peer("δ-threshold (TeaCache-like, static): threshold 0.02984") == "δ-threshold, static"
    assert sp.short_peer("DeepCache uniform: interval 3, depth 1") == "DeepCache uniform, every 3"
    assert sp.short_peer("DeepCache non-uniform: interval 4, depth 2, center 10, power 2") == \
        "DeepCache non-uniform, every 4, depth 2"
    assert sp.short_peer("FORA: interval 2") == "FORA: interval 2"  # unknown: kept whole


def test_readme_table_order_intervals_and_markers(sp, tmp_path) -> None:
    items = [_item(model="fmnist-sd", target=0.7, fd_ratio_ci=None, psnr_margin_ci=None, fd_margin_ci=None),
             _item(sampler="dpm++ 10"), _item(), _item(target=0.7)]
    lines = sp.readme_table(items)
    assert [ln.split(" | ")[:4] for ln in lines[2:]] == [
        ["| U-Net", "DDIM 20", "2000", "0.7"], ["| U-Net", "DDIM 20", "2000", "0.5"],
        ["| U-Net", "DPM++ 10", "2000", "0.5"], ["| SD-like", "DDIM 20", "2000", "0.7"]]
    assert "| 1.18 [1.17, 1.19] | step reuse, every 2 (0.500) | 30.20 | +0.48 [+0.39, +0.58] | -0.01 [-0.09, +0.07] |" \
        in lines[2]
    assert lines[-1].endswith("| +0.48 | -0.01 | - |")  # no intervals: bare figures; no FD to the original: "-"
    with_o = sp.readme_table([_item(fd_to_original_margin=1.5, fd_to_original_margin_ci=[1.25, 1.75])])
    assert with_o[-1].endswith("| -0.01 [-0.09, +0.07] | +1.50 [+1.25, +1.75] |")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{sp.BEGIN}\nold table\n{sp.END}\noutro\n")
    sp.write_readme(str(readme), items)
    once = readme.read_text()
    sp.write_readme(str(readme), items)
    assert readme.read_text() == once and "old table" not in once
    assert once.startswith("intro\n") and once.endswith("\noutro\n") and "\n".join(lines) in once
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- peers_summary.py: begin -->"):
        sp.write_readme(str(readme), items)


def test_summarize_picks_each_margins_own_best_peer(sp) -> None:
    """PSNR margin against the highest-PSNR peer, FD margin against the lowest-FD one, FD-to-original margin
    against the lowest FD-to-original one, each with that pair's own interval."""
    def row(method, psnr, fd, fo, **kw):
        return {"method": method, "family": method.split(":")[0], "macs_fraction": 0.5, "psnr": psnr, "fd": fd,
                "fd_to_original": fo, "best_for": [0.5], **kw}

    versus = {m: {"psnr_margin_ci": [i, i], "fd_margin_ci": [10 + i, 10 + i], "fd_to_original_margin_ci": [20 + i, 20 + i]}
              for i, m in enumerate(("a: 1", "b: 1", "c: 1"))}
    rows = [{"method": "original (full model)", "family": "original", "macs_fraction": 1.0, "fd": 20.0},
            {"method": "maskc learned, target 0.5", "family": "maskc", "target": 0.5, "macs_fraction": 0.5,
             "psnr": 31.0, "fd": 25.0, "fd_to_original": 3.0, "versus": versus},
            row("a: 1", 30.0, 27.0, 2.5), row("b: 1", 29.0, 24.0, 4.0), row("c: 1", 28.0, 26.0, 2.0)]
    res = {"rows": rows, "model": {"path": "x/fmnist-unet", "class": "UNet2DModel"}, "n": 100, "date": "d",
           "sampler": {"name": "ddim", "steps": 20}}
    (s,) = sp.summarize(res)
    assert (s["peer"], s["margin_db"], s["psnr_margin_ci"]) == ("a: 1", 1.0, [0, 0])
    assert (s["best_fd_peer"], s["fd_margin"], s["fd_margin_ci"]) == ("b: 1", -1.0, [11, 11])
    assert (s["best_fd_to_original_peer"], s["fd_to_original_margin"], s["fd_to_original_margin_ci"]) == \
        ("c: 1", -1.0, [22, 22])
    del rows[1]["fd_to_original"]
    assert sp.summarize(res)[0]["fd_to_original_margin"] is None
