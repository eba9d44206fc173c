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
    assert lines[-1].endswith("| +0.48 | -0.01 |")  # no intervals: bare figures
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
