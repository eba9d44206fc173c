"""The shipped Fashion-MNIST U-Net and its learned mask: load, check, exactness, the demo."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

import maskc
from maskc.models.shipped import shipped_dir
from reference import HookReference

D = shipped_dir()


def _flops(fn, calls) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        for x, t in calls:
            fn(x, t)
    return fc.get_total_flops()


def test_shipped_model_and_mask_are_exact() -> None:
    assert D is not None, "the shipped model is missing from maskc/models/weights/fmnist-unet"
    model = UNet2DModel.from_pretrained(D).float().eval()
    mask = maskc.Mask.load(os.path.join(D, "mask_ddim20.json"))
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(20)
    mask.check(model, sched)
    x0 = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = HookReference(model, mask.bits, mask.names)  # on a copy of the model
    xs, want = [], []
    x = x0
    for t in sched.timesteps:
        xs.append(x)
        want.append(ref(x, t).sample)
        x = sched.step(want[-1], t, x).prev_sample
    tm = maskc.compile(model, mask)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            assert torch.equal(tm(xs[i], t).sample, want[i]), f"step {i}"
    # the stored MACs fraction, measured now over a whole generation (after the tracing one)
    tm.reset()
    calls = list(zip(xs, sched.timesteps))
    frac = _flops(tm, calls) / _flops(model, calls)
    prov = mask.meta["provenance"]
    assert abs(frac - prov["macs_fraction"]) < 0.002, (frac, prov["macs_fraction"])
    assert prov["config"]["target"] - 0.03 <= frac <= prov["config"]["target"] + 0.01


def test_demo_runs(tmp_path) -> None:
    out = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "maskc", "demo", "--n", "2", "--reps", "1", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PSNR" in r.stdout and out.exists()
