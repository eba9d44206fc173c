"""maskc.export / load_exported: a .pt2 that replays a generation with torch alone.

Each test names the planted bug it was seen to catch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

import maskc
from archs import randomize, small_unet

EXPORT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "maskc", "export.py")


def small_dit() -> DiTTransformer2DModel:
    return randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                           num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10), 1).eval()


def three_variant_mask(names: list[str], steps: int = 5) -> maskc.Mask:
    """Row 0 runs all; odd rows skip every other block; even rows >0 skip all but the first and last."""
    bits = torch.ones(steps, len(names), dtype=torch.bool)
    bits[1::2, ::2] = False
    bits[2::2, 1:-1] = False
    bits[0] = True
    return maskc.Mask(bits, names)


def trajectory(fn, x, steps, kwargs=None, cfg=None):
    """Per-step model outputs along a DDIM trajectory driven by ``fn`` itself (x and t as pipelines pass them)."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    outs = []
    with torch.no_grad():
        for t in sched.timesteps:
            xin = torch.cat([x, x]) if cfg is not None else x
            out = fn(xin, t.reshape(1).expand(xin.shape[0]), **(kwargs or {}))
            eps = out.sample[:, : x.shape[1]]
            outs.append(out.sample)
            if cfg is not None:
                c, u = eps.chunk(2)
                eps = u + cfg * (c - u)
            x = sched.step(eps, t, x).prev_sample
    return outs


def distinct(tm) -> int:
    return len({id(tm.step_graph(i)) for i in range(len(tm))})


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory):
    m = small_unet()
    names = maskc.blocks(m)
    tm = maskc.compile(m, three_variant_mask(names), example_args=(torch.randn(1, 2, 8, 8), torch.tensor([3])))
    path = tmp_path_factory.mktemp("export") / "unet.pt2"
    maskc.export(tm, path)
    return m, tm, path


def test_unet_matches_eager_at_every_step_of_ddim(unet_export) -> None:
    """Planted: steps[i] pointing at the next program; reads given in reverse order."""
    m, tm, path = unet_export
    run = maskc.load_exported(path)
    assert distinct(tm) == 3 and len(run.manifest["programs"]) == 3 and len(run) == 5
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    tm.reset()
    want = trajectory(tm, x, 5)
    for _ in range(2):  # twice: reset() starts a new generation with an empty cache
        run.reset()
        got = trajectory(run, x, 5)
        assert run.step == 5
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=f"step {i}")
    run.reset()
    o = run(x, torch.tensor([999]))  # the return type: fields as attributes, keys and positions
    assert torch.equal(o.sample, o[0]) and torch.equal(o["sample"], o[0]) and o.keys() == ["sample"]


def test_dit_guided_matches_eager_with_many_reads(tmp_path) -> None:
    """Class labels as a keyword, CFG batch; a step that reads every block (same-shaped reads: order matters).

    Planted: reads in reverse order.
    """
    m = small_dit()
    names = maskc.blocks(m)
    bits = torch.ones(4, len(names), dtype=torch.bool)
    bits[1, 1] = False
    bits[2:] = False  # reads every block
    tm = maskc.compile(m, maskc.Mask(bits, names))
    kw = {"class_labels": torch.tensor([3, 10])}
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    want = trajectory(tm, x, 4, kw, cfg=2.0)  # traces at the first call
    assert len(tm.step_graph(3).reads) >= 2
    maskc.export(tm, tmp_path / "dit.pt2")
    run = maskc.load_exported(tmp_path / "dit.pt2")
    got = trajectory(run, x, 4, kw, cfg=2.0)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=f"step {i}")


def test_call_convention_overflow_and_refused_inputs(unet_export) -> None:
    m, tm, path = unet_export
    run = maskc.load_exported(path)
    x, t = torch.randn(1, 2, 8, 8), torch.tensor([7])
    with torch.no_grad():
        with pytest.raises(maskc.InputChangedError, match=r"shape \(1, 2, 8, 8\)"):
            run(torch.randn(2, 2, 8, 8), torch.tensor([7, 7]))  # another batch size than the export's
        with pytest.raises(maskc.InputChangedError, match="non-tensor"):
            run(x, t, return_dict=False)  # a non-tensor argument is baked into the programs
        for _ in range(5):
            run(x, t)
        with pytest.raises(maskc.StepOverflowError, match="T=5"):
            run(x, t)
        run.reset()
        assert run.step == 0 and run.cache_entries() == []
        run(sample=x, timestep=t)  # keywords bind as they do for the model
        assert run.cache_entries(), "step 0 caches blocks for later steps"
        run.reset()  # a generation abandoned midway leaves nothing behind (planted: reset() keeping the cache)
        assert run.step == 0 and run.cache_entries() == []


def test_weights_stored_once(tmp_path) -> None:
    """Planted: programs keeping their example inputs (the weights again each); weights baked into each program."""
    from diffusers import UNet2DModel

    m = randomize(UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(32, 64), layers_per_block=1,
                              norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D")), 0)
    names = maskc.blocks(m)
    tm = maskc.compile(m, three_variant_mask(names, 4), example_args=(torch.randn(1, 2, 8, 8), torch.tensor([3])))
    path = tmp_path / "w.pt2"
    maskc.export(tm, path)
    weight_bytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    with zipfile.ZipFile(path) as z:
        stored = sum(i.file_size for i in z.infolist() if "/data/weights/weight_" in i.filename)
        programs = [i.filename for i in z.infolist() if "/models/step_" in i.filename]
    assert len(programs) == 3
    assert weight_bytes <= stored <= 1.01 * weight_bytes  # every weight, once
    assert os.path.getsize(path) < 1.5 * weight_bytes, (os.path.getsize(path), weight_bytes)
    run = maskc.load_exported(path)  # and once in memory: every program is handed the same tensors
    ptrs: dict[str, int] = {}
    for _fn, ws, meta in run._programs:
        for n, w in zip(meta["weights"], ws):
            assert ptrs.setdefault(n, w.data_ptr()) == w.data_ptr()


_CHILD = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("maskc_export", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
run = mod.load_exported(sys.argv[2])
data = torch.load(sys.argv[3])
with torch.no_grad():
    for x, t, want in data:
        got = run(x, t).sample
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    try:
        run(data[0][0], data[0][1])
        raise SystemExit("no error past T")
    except mod.StepOverflowError:
        pass
bad = sorted(m for m in sys.modules if m in ("diffusers", "maskc") or m.startswith(("diffusers.", "maskc.")))
print("IMPORTED", bad)
sys.exit(1 if bad else 0)
"""


def test_loads_and_runs_with_torch_alone(unet_export, tmp_path) -> None:
    """Planted: ``import maskc.errors`` in load_exported (drags in maskc, its tracer and diffusers)."""
    m, tm, path = unet_export
    g = torch.Generator().manual_seed(3)
    data = []
    tm.reset()
    with torch.no_grad():
        for i in range(5):
            x, t = torch.randn(1, 2, 8, 8, generator=g), torch.tensor([900 - 200 * i])
            data.append((x, t, tm(x, t).sample))
    torch.save(data, tmp_path / "data.pt")
    r = subprocess.run([sys.executable, "-c", _CHILD, EXPORT_FILE, str(path), str(tmp_path / "data.pt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "IMPORTED []" in r.stdout


def test_refuses_what_it_cannot_export(tmp_path) -> None:
    """Planted: no check for an untraced TimestepModules (it failed with AttributeError instead)."""
    m = small_unet()
    names = maskc.blocks(m)
    tm = maskc.compile(m, maskc.Mask.full(2, names))  # no example: not traced yet
    with pytest.raises(maskc.MaskcError, match="no trace yet.*call it once"):
        maskc.export(tm, tmp_path / "x.pt2")
    with pytest.raises(maskc.MaskcError, match="expects the TimestepModules"):
        maskc.export(m, tmp_path / "x.pt2")
    with torch.no_grad():
        tm(torch.randn(1, 2, 8, 8), torch.tensor([3]))
    with pytest.raises(maskc.MaskcError, match=r"must end in \.pt2"):
        maskc.export(tm, tmp_path / "x.zip")
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)), tmp_path / "plain.pt2")
    with pytest.raises(maskc.MaskcError, match="not one written by maskc.export"):
        maskc.load_exported(tmp_path / "plain.pt2")
    assert not os.path.exists(tmp_path / "x.pt2")


@pytest.mark.slow
def test_aoti_package_matches_eager(tmp_path) -> None:
    """AOTInductor: one C++ compile per distinct step (two here), weights still stored once and passed in.

    Planted: inputs handed over with their own strides (compiled code then read an expanded timestep wrongly).
    """
    m = randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10), 1).eval()
    names = maskc.blocks(m)
    bits = torch.ones(3, len(names), dtype=torch.bool)
    bits[1:, 1] = False
    tm = maskc.compile(m, maskc.Mask(bits, names))
    kw = {"class_labels": torch.tensor([3, 10])}
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    want = trajectory(tm, x, 3, kw, cfg=2.0)  # the timestep comes expanded (stride 0), as pipelines pass it
    maskc.export(tm, tmp_path / "aoti.pt2", aoti=True)
    run = maskc.load_exported(tmp_path / "aoti.pt2")
    assert run.manifest["backend"] == "aoti" and len(run.manifest["programs"]) == 2
    with zipfile.ZipFile(tmp_path / "aoti.pt2") as z:
        assert not any("/models/step_" in i.filename for i in z.infolist())  # compiled, not exported programs
        assert json.loads(z.read(next(n for n in z.namelist() if n.endswith("maskc.json"))))["backend"] == "aoti"
    got = trajectory(run, x, 3, kw, cfg=2.0)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=f"step {i}")
