"""The shipped caption-conditioned SD-like U-Net (fmnist-sd): its caption table, its learned mask
(exact against the hook reference under classifier-free guidance), the demo and `maskc sample`."""
from __future__ import annotations

import fnmatch
import json
import os

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

import maskc
from maskc.cli import _conditioning, main
from maskc.errors import MaskcError
from maskc.models.configs import FMNIST_SD, FMNIST_SD_CAPTIONS
from maskc.models.shipped import NULL_CAPTION, captions, shipped_dir
from reference import HookReference

D = shipped_dir("sd")


@pytest.fixture(scope="module")
def shipped():
    assert D is not None, "the shipped model is missing from maskc/models/weights/fmnist-sd"
    return maskc.pretrained("fmnist-sd")


def test_pretrained_loads_with_its_mask(shipped) -> None:
    model, mask, sched = shipped
    assert isinstance(model, UNet2DConditionModel) and model.dtype == torch.float32
    for k in ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim", "attention_head_dim"):
        assert tuple(np.atleast_1d(model.config[k])) == tuple(np.atleast_1d(FMNIST_SD[k])), k
    assert mask.steps == 20 and len(sched.timesteps) == 20 and type(sched).__name__ == "DDIMScheduler"
    mask.check(model, sched)
    prov = mask.meta["provenance"]
    assert prov["guidance_scale"] == 2.0
    assert prov["config"]["target"] - 0.03 <= prov["macs_fraction"] <= prov["config"]["target"] + 0.01
    assert 0 < mask.bits.float().mean() < 1  # some blocks skipped at some steps, not all
    assert maskc.pretrained("sd")[1].bits.equal(mask.bits)  # the short name too


def test_caption_table_and_null_row() -> None:
    table = captions("fmnist-sd")
    spec = FMNIST_SD_CAPTIONS
    assert table.dtype == torch.float32
    assert table.shape == (11, spec["tokens"], spec["dim"]) and spec["dim"] == FMNIST_SD["cross_attention_dim"]
    assert NULL_CAPTION == spec["null"] == 10
    # the documented recipe: standard normal from the seeded generator
    want = torch.randn((spec["rows"], spec["tokens"], spec["dim"]), generator=torch.Generator().manual_seed(spec["seed"]))
    assert torch.equal(table, want)
    info = json.load(open(os.path.join(D, "training.json")))
    assert info["captions"]["null"] == NULL_CAPTION and info["captions"]["seed"] == spec["seed"]
    assert "null caption" in open(os.path.join(D, "MODEL_CARD.md")).read()
    # rows for labels; the null row is row 10 and differs from every class caption
    assert torch.equal(captions("sd", [3, NULL_CAPTION, 3]), table[[3, 10, 3]])
    assert torch.equal(captions(D, torch.tensor([NULL_CAPTION]))[0], table[-1])
    assert all(not torch.allclose(table[NULL_CAPTION], table[c]) for c in range(10))
    with pytest.raises(MaskcError, match="outside"):
        captions("sd", [11])
    with pytest.raises(MaskcError, match="no caption table"):
        captions("fmnist-unet")


def test_cli_conditioning_uses_class_captions_and_the_null_caption(shipped) -> None:
    model, mask, _ = shipped
    table = captions("sd")
    kw, guidance = _conditioning(model, mask, 3, [3, 7], None, D)
    assert guidance == 2.0  # the mask's
    assert torch.equal(kw["encoder_hidden_states"], torch.cat([table[[3, 7, 3]], table[[10, 10, 10]]]))
    kw, guidance = _conditioning(model, mask, 2, None, 1.0, D)  # guidance off: class captions 0, 1 only
    assert guidance is None and torch.equal(kw["encoder_hidden_states"], table[[0, 1]])
    with pytest.raises(MaskcError, match="outside 0..9"):
        _conditioning(model, mask, 2, [10], None, D)  # the null row is no class


def test_shipped_mask_is_exact_under_guidance(shipped) -> None:
    """Compiled steps equal the hook reference on guided [cond; null] batches for a whole DDIM-20 generation."""
    model, mask, sched = shipped
    y = torch.tensor([0, 9])
    ehs = torch.cat([captions("sd", y), captions("sd", [NULL_CAPTION] * 2)])
    ref = HookReference(model, mask.bits, mask.names)
    tm = maskc.compile(model, mask)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            want = ref(torch.cat([x, x]), t, encoder_hidden_states=ehs).sample
            got = tm(torch.cat([x, x]), t, encoder_hidden_states=ehs).sample
            assert torch.equal(got, want), f"step {i}"
            c, u = want.chunk(2)
            x = sched.step(u + 2.0 * (c - u), t, x).prev_sample
    assert x.abs().max() < 10 and torch.isfinite(x).all()


def test_demo_sd_runs(tmp_path, capsys) -> None:
    out = tmp_path / "demo.png"
    assert main(["demo", "--model", "sd", "--n", "2", "--reps", "1", "--threads", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fmnist-sd" in text and "PSNR" in text
    assert np.asarray(Image.open(out)).shape == (204, 204)  # 2 rows (original, maskc) of 2 images, 34 px x3


def test_sample_sd_with_class_labels(tmp_path, capsys) -> None:
    out = tmp_path / "sd.png"
    assert main(["sample", "--model", "sd", "--mask", "shipped", "--n", "2", "--class-labels", "1", "8",
                 "--scale", "1", "--threads", "1", "--out", str(out)]) == 0
    assert "guidance 2" in capsys.readouterr().out
    assert np.asarray(Image.open(out)).shape == (34, 68)


def test_shipped_sd_files_are_packaged() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib (Python >= 3.11) reads pyproject.toml")
    names = sorted(os.listdir(D))
    assert names == ["MODEL_CARD.md", "captions.safetensors", "config.json", "diffusion_pytorch_model.safetensors",
                     "mask_ddim20.json", "training.json"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["maskc.models"]
    for n in names:
        assert any(fnmatch.fnmatch(f"weights/fmnist-sd/{n}", p) for p in patterns), n
