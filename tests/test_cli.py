"""The command line: every verb end to end on a tiny model folder (or the shipped models), help, errors."""
from __future__ import annotations

import importlib.util
import logging
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import maskc
from maskc.cli import main, parser, timing_report

VERBS = ["demo", "learn", "compile", "sample", "bench", "viz"]


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny U-Net written with save_pretrained, a 3-step mask that skips blocks, and an all-ones mask."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("cli")
    model = tiny_unet()
    model.save_pretrained(d / "unet")
    names = maskc.blocks(model)
    bits = torch.ones(3, len(names), dtype=torch.bool)
    bits[1, 1:-1] = False
    bits[2, len(names) // 2:] = False
    maskc.Mask(bits, names).for_model(model).save(d / "mask.json")
    maskc.Mask.full(3, names).save(d / "full.json")
    yield d
    torch.set_num_threads(threads)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("maskc: error: ") and "Traceback" not in err
    return lines[0]


# -- help ------------------------------------------------------------------------------------------

def subparsers() -> dict:
    ap = parser()
    action = next(a for a in ap._actions if a.dest == "cmd")
    return action.choices


def test_every_verb_has_help_with_defaults(capsys) -> None:
    subs = subparsers()
    assert sorted(subs) == sorted(VERBS)
    for verb in VERBS:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: maskc {verb}" in out and "(default: " in out, verb
        for a in subs[verb]._actions:
            if a.option_strings and a.dest != "help":
                assert a.help and len(a.help) >= 10, f"{verb} {a.option_strings[0]} has no description"
                shown = " ".join(out.split())
                assert a.option_strings[0] in shown
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(v in top for v in VERBS)


def test_demo_defaults_name_the_picture_per_model() -> None:
    a = parser().parse_args(["demo", "--model", "dit"])
    assert a.out is None and a.reps >= 5  # demo writes maskc_demo_<model>.png


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    """The shipped U-Net with its mask, one sample and one timed round (about 10 s on an idle CPU)."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--n", "1", "--reps", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"MACs: ([\d.]+) of the original", out)
    assert m and 0.57 <= float(m.group(1)) <= 0.61, out  # the shipped mask was learned with target=0.6
    assert re.search(r"speed-up [\d.]+x \(per-round ratios: quartiles [\d.]+-[\d.]+", out)
    assert np.asarray(Image.open(tmp_path / "maskc_demo_unet.png")).shape == (204, 102)  # 2 rows of 34 px, x3


# -- errors ----------------------------------------------------------------------------------------

class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_error_exits_2_with_one_line_and_no_accelerate_warning(folder, tmp_path, capsys) -> None:
    """The model loads without diffusers' "accelerate was not found" warning; the missing mask is one line."""
    rec = Records()
    diffusers_log = logging.getLogger("diffusers")
    diffusers_log.addHandler(rec)
    try:
        assert main(["viz", "--model", str(folder / "unet"), "--mask", str(tmp_path / "missing.json")]) == 2
    finally:
        diffusers_log.removeHandler(rec)
    assert "missing.json" in one_error_line(capsys.readouterr().err)
    assert not [m for m in rec.messages if "accelerate" in m]


def test_corrupt_mask_file_exits_2(folder, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "maskc.mask", "version": 1, "names": [')
    assert main(["compile", "--model", str(folder / "unet"), "--mask", str(bad)]) == 2
    assert "corrupt or truncated" in one_error_line(capsys.readouterr().err)


def test_misspelled_block_name_suggests_the_closest(folder, tmp_path, capsys) -> None:
    m = maskc.Mask.load(folder / "mask.json")
    names = list(m.names)
    j = next(k for k, n in enumerate(names) if ".attentions." in n)
    right = names[j]
    names[j] = right.replace("attentions", "attention")
    maskc.Mask(m.bits, names).save(tmp_path / "typo.json")
    assert main(["viz", "--model", str(folder / "unet"), "--mask", str(tmp_path / "typo.json"),
                 "--out", str(tmp_path / "x.html")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"did you mean '{right}'" in line and "another model" not in line
    # every name foreign: that is another model, not a typo
    other = maskc.Mask(m.bits, [f"encoder.layer{k}.mlp" for k in range(len(names))])
    with pytest.raises(maskc.MaskMismatchError, match="another model") as e:
        other.check(tiny_unet())
    assert "did you mean" not in str(e.value)


# -- compile ---------------------------------------------------------------------------------------

def expected_rows(folder) -> list[tuple[int, int, int, int]]:
    """(runs, reads, writes, MACs) per step, from the runtime and FlopCounterMode, independent of the CLI."""
    from torch.utils.flop_counter import FlopCounterMode

    from maskc.models.shipped import load_pretrained

    model, _ = load_pretrained(str(folder / "unet"))
    mask = maskc.Mask.load(folder / "mask.json")
    args = (torch.zeros(1, 1, 8, 8), torch.tensor([1]))
    tm = maskc.compile(model, mask, example_args=args)
    rows = []
    for i in range(mask.steps):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            tm(*args)
        sg = tm.step_graph(i)
        rows.append((len(sg.runs), len(sg.reads), len(sg.writes), fc.get_total_flops() // 2))
    return rows


def test_compile_prints_the_step_table(folder, capsys) -> None:
    assert main(["compile", "--model", str(folder / "unet"), "--mask", str(folder / "mask.json")]) == 0
    out = capsys.readouterr().out
    got = []
    for m in re.finditer(r"^\s*(\d+)\s+\S+\s+(\d+)/(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)M", out, re.M):
        got.append((int(m.group(2)), int(m.group(4)), int(m.group(5)), round(float(m.group(6)) * 1e6)))
    want = expected_rows(folder)
    assert len(got) == len(want) == 3
    for (r, rd, w, macs), (r2, rd2, w2, macs2) in zip(got, want):
        assert (r, rd, w) == (r2, rd2, w2)
        assert abs(macs - macs2) <= 5000  # printed with 2 decimals in millions
    assert want[1][0] < want[0][0] and want[0][2] > 0  # the mask skips and writes something
    assert "of the original" in out


@pytest.mark.skipif(importlib.util.find_spec("maskc.export") is None, reason="maskc.export has not landed")
def test_compile_writes_the_artifact(folder, tmp_path, capsys) -> None:
    out = tmp_path / "model.pt2"
    assert main(["compile", "--model", str(folder / "unet"), "--mask", str(folder / "mask.json"), "--out", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 0
    assert str(out) in capsys.readouterr().out


def test_compile_refuses_other_suffixes_before_work(tmp_path, capsys) -> None:
    assert main(["compile", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "m.txt")]) == 2
    assert "must end in .pt2" in one_error_line(capsys.readouterr().err)  # checked before the model is read


def test_compile_without_export_says_so(folder, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "maskc.export", None)  # as if the module were absent: import fails
    assert main(["compile", "--model", str(folder / "unet"), "--mask", str(folder / "mask.json"),
                 "--out", str(tmp_path / "m.pt2")]) == 2
    assert "export is not available" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "m.pt2").exists()


# -- sample ----------------------------------------------------------------------------------------

def rows_of(path, n: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(Image.open(path))
    h = a.shape[0] // 2
    return a[:h], a[h:]


def test_sample_applies_the_mask(folder, tmp_path, capsys) -> None:
    out_full, out_mask = tmp_path / "full.png", tmp_path / "mask.png"
    common = ["sample", "--model", str(folder / "unet"), "--n", "2", "--compare", "--scale", "1"]
    assert main(common + ["--mask", str(folder / "full.json"), "--out", str(out_full)]) == 0
    assert main(common + ["--mask", str(folder / "mask.json"), "--out", str(out_mask)]) == 0
    top, bottom = rows_of(out_full, 2)
    assert top.shape == (10, 20) and np.array_equal(top, bottom)  # all-ones mask: the original, bit for bit
    top2, bottom2 = rows_of(out_mask, 2)
    assert np.array_equal(top, top2) and not np.array_equal(top2, bottom2)  # skipping changes the samples
    assert "wrote" in capsys.readouterr().out


def test_sample_rejects_other_step_counts(folder, tmp_path, capsys) -> None:
    assert main(["sample", "--model", str(folder / "unet"), "--mask", str(folder / "mask.json"), "--steps", "5",
                 "--out", str(tmp_path / "s.png")]) == 2
    assert "--steps 5" in one_error_line(capsys.readouterr().err)


def test_sample_class_conditional_dit(tmp_path, capsys) -> None:
    out = tmp_path / "dit.png"
    assert main(["sample", "--model", "dit", "--mask", "shipped", "--n", "2", "--class-labels", "3", "7",
                 "--scale", "1", "--threads", "1", "--out", str(out)]) == 0
    assert "guidance 2" in capsys.readouterr().out
    assert np.asarray(Image.open(out)).shape == (34, 68)  # 2 images of 32 x 32 with 1-pixel borders


# -- viz -------------------------------------------------------------------------------------------

def test_viz_writes_the_page(folder, tmp_path, capsys) -> None:
    out = tmp_path / "d.html"
    assert main(["viz", "--model", str(folder / "unet"), "--mask", str(folder / "mask.json"), "--step", "1",
                 "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    mask = maskc.Mask.load(folder / "mask.json")
    status = dict(re.findall(r'<tr data-block="([^"]+)" data-status="(\w+)"', page))
    assert {b for b, s in status.items() if s == "cached"} == {
        b for b, on in zip(mask.names, mask.bits[1].tolist()) if not on}
    assert "step 1 of 3" in capsys.readouterr().out
    assert main(["viz", "--model", str(folder / "unet"), "--mask", str(folder / "mask.json"), "--step", "3",
                 "--out", str(out)]) == 2


# -- learn -----------------------------------------------------------------------------------------

LEARN_FAST = ["--steps", "3", "--batch", "2", "--iters", "2", "--search-evals", "4", "--search-batch", "2", "--target", "0.7",
              "--threads", "1"]


def test_learn_from_a_model_folder(folder, tmp_path) -> None:
    out = tmp_path / "learned.json"
    assert main(["learn", "--model", str(folder / "unet"), "--out", str(out), "--seed", "3", *LEARN_FAST]) == 0
    m = maskc.Mask.load(out)
    assert m.steps == 3 and m.names == maskc.Mask.load(folder / "mask.json").names
    m.check(tiny_unet())
    prov = m.meta["provenance"]  # the flags reach learn (planted: --target and --seed dropped on the way)
    assert prov["config"]["target"] == 0.7 and prov["seed"] == 3 and prov["config"]["search_batch"] == 2
    lo, hi = prov["budget_window"]
    assert abs(lo - 0.67) < 1e-9 and abs(hi - 0.71) < 1e-9 and lo <= prov["macs_fraction"] <= hi


def test_learn_with_several_seeds_keeps_the_pick(folder, tmp_path) -> None:
    out = tmp_path / "picked.json"
    assert main(["learn", "--model", str(folder / "unet"), "--out", str(out), "--seed", "3", "4", "--n-select", "2",
                 "--select-seed", "5", *LEARN_FAST]) == 0
    prov = maskc.Mask.load(out).meta["provenance"]
    pick = prov["pick"]  # maskc.pick.learn_best ran, with the flags as given
    assert pick["seeds"] == [3, 4] and pick["n_select"] == 2 and pick["select_seed"] == 5
    assert prov["seed"] == pick["picked"] and prov["config"]["target"] == 0.7


def _pipeline_learn_landed() -> bool:
    import inspect

    from maskc import learn

    return "pipeline" in (inspect.getdoc(learn) or "").lower() and importlib.util.find_spec("maskc.pipelines") is not None


@pytest.mark.skipif(not _pipeline_learn_landed(), reason="maskc.learn(pipe, ...) has not landed yet")
def test_learn_from_a_pipeline_folder(folder, tmp_path) -> None:
    from diffusers import DDIMPipeline, DDIMScheduler
    from diffusers import UNet2DModel

    pf = tmp_path / "pipe"
    DDIMPipeline(unet=UNet2DModel.from_pretrained(folder / "unet"), scheduler=DDIMScheduler()).save_pretrained(pf)
    out = tmp_path / "learned.json"
    assert main(["learn", "--pipeline", str(pf), "--out", str(out), *LEARN_FAST]) == 0
    m = maskc.Mask.load(out)
    assert m.steps == 3 and m.meta["provenance"]["pipeline"] == "DDIMPipeline"
    assert m.meta["scheduler"] == "DDIMScheduler"


def test_learn_pipeline_missing_folder(tmp_path, capsys) -> None:
    assert main(["learn", "--pipeline", str(tmp_path / "nope"), "--out", str(tmp_path / "m.json")]) == 2
    assert "pipeline folder" in one_error_line(capsys.readouterr().err)


# -- demo timing -----------------------------------------------------------------------------------

def test_timing_report_warns_when_the_spread_is_wide() -> None:
    calm = {"original": [2.0, 2.01, 1.99, 2.02, 2.0], "maskc": [1.0, 1.01, 0.99, 1.0, 1.02]}
    lines, wide = timing_report(calm, 8, 2)
    assert not wide and "speed-up 2.00x" in lines[1] and "quartiles" in lines[1]
    assert not any(ln.startswith("warning") for ln in lines)
    busy = {"original": [2.0, 3.1, 1.9, 2.6, 2.0], "maskc": [1.0, 1.6, 0.9, 1.3, 1.1]}
    lines, wide = timing_report(busy, 8, 2)
    assert wide and lines[-1].startswith("warning:") and "unreliable" in lines[-1]


# -- bench -----------------------------------------------------------------------------------------

def test_bench_shard_flags_reach_the_config(monkeypatch) -> None:
    """`--shard K/N` helps the other shards unless `--own-shard-only`; a malformed shard is one error line."""
    import maskc.bench

    got: list = []
    monkeypatch.setattr(maskc.bench, "run_bench", lambda cfg, **kw: got.append(cfg) or {})
    assert main(["bench", "--model", "unet", "--shard", "1/2"]) == 0
    assert main(["bench", "--model", "unet", "--shard", "0/3", "--own-shard-only"]) == 0
    assert [(c.shard, c.shards, c.help_shards) for c in got] == [(1, 2, True), (0, 3, False)]
    with pytest.raises(SystemExit):
        parser().parse_args(["bench", "--shard", "1-2"])
