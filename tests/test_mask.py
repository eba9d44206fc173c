"""Mask construction and its JSON file format."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskc
from maskc.models.dit import DiT


@given(st.integers(1, 12), st.integers(1, 9), st.data())
def test_roundtrip(tmp_path_factory, steps, blocks, data) -> None:
    bits = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=blocks, max_size=blocks), min_size=steps, max_size=steps)))
    names = [f"b.{i}" for i in range(blocks)]
    m = maskc.Mask(bits, names, meta={"provenance": {"made_by": "test"}, "timesteps": list(range(steps))})
    p = tmp_path_factory.mktemp("m") / "mask.json"
    m.save(p)
    back = maskc.Mask.load(p)
    assert back == m and back.meta == m.meta and back.steps == steps


def test_numpy_and_ints_accepted() -> None:
    m = maskc.Mask(np.array([[1, 0], [1, 1]]), ["a", "b"])
    assert m.bits.dtype == torch.bool and m.bits.tolist() == [[True, False], [True, True]]


@pytest.mark.parametrize(
    "bits, names, match",
    [
        (torch.ones(2, 3), ["a", "b"], "3 columns"),
        (torch.ones(2), ["a", "b"], r"shape \[T, B\]"),
        (torch.full((2, 2), 0.5), ["a", "b"], "0/1"),
        (torch.ones(2, 2), ["a", "a"], "unique"),
    ],
)
def test_bad_bits(bits, names, match) -> None:
    with pytest.raises(maskc.MaskShapeError, match=match):
        maskc.Mask(bits, names)


def test_truncated_and_corrupt_files(tmp_path) -> None:
    m = maskc.Mask.full(3, ["a", "b"])
    p = tmp_path / "m.json"
    m.save(p)
    text = p.read_text()
    p.write_text(text[: len(text) // 2])
    with pytest.raises(maskc.MaskFileError, match="truncated"):
        maskc.Mask.load(p)
    d = json.loads(text)
    d["bits"][1] = "1"
    p.write_text(json.dumps(d))
    with pytest.raises(maskc.MaskFileError, match="2 characters"):
        maskc.Mask.load(p)
    p.write_text(json.dumps({"hello": 1}))
    with pytest.raises(maskc.MaskFileError, match="not a maskc mask"):
        maskc.Mask.load(p)


def test_fingerprint_checks_model(tmp_path) -> None:
    a = DiT(input_size=4, hidden_size=16, depth=1, num_heads=2)
    b = DiT(input_size=4, hidden_size=32, depth=1, num_heads=2)
    m = maskc.Mask.full(2, maskc.blocks(a)).for_model(a)
    m.check(a)
    with pytest.raises(maskc.MaskMismatchError, match="block 'blocks.0.attn' differs"):
        m.check(b)
    p = tmp_path / "m.json"
    m.save(p)
    with pytest.raises(maskc.MaskMismatchError, match="blocks.0.attn"):
        maskc.Mask.load(p).check(b)



def test_fingerprint_alone_refuses_other_shapes() -> None:
    """A file that records the fingerprint but no per-block hashes (written by hand or trimmed).

    Planted: the fingerprint hashing block types and names only, not parameter shapes.
    """
    a = DiT(input_size=4, hidden_size=16, depth=1, num_heads=2)
    b = DiT(input_size=4, hidden_size=32, depth=1, num_heads=2)
    d = maskc.Mask.full(2, maskc.blocks(a)).for_model(a).to_dict()
    del d["block_hashes"]
    m = maskc.Mask.from_dict(d)
    m.check(a)
    with pytest.raises(maskc.MaskMismatchError, match="fingerprint .* same names, other block types or shapes"):
        m.check(b)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(
    base=st.fixed_dictionaries({}, optional={
        "format": st.sampled_from(["maskc.mask", "other"]) | json_values,
        "version": st.sampled_from([1, 2]) | json_values,
        "names": st.lists(st.sampled_from(["a", "b", "c"]), max_size=3) | json_values,
        "bits": st.lists(st.text(alphabet="01x", max_size=4), max_size=3) | json_values,
        "timesteps": json_values,
        "scheduler": json_values,
        "provenance": json_values,
    }),
    cut=st.integers(0, 400),
)
def test_fuzzed_files_load_or_raise_maskc_error(tmp_path_factory, base, cut) -> None:
    p = tmp_path_factory.mktemp("f") / "m.json"
    text = json.dumps(base)
    for content in (text, text[:cut]):
        p.write_text(content)
        try:
            m = maskc.Mask.load(p)
        except maskc.MaskFileError:
            continue
        assert m.bits.shape == (len(base["bits"]), len(base["names"]))


def test_bytes_garbage_and_missing_file(tmp_path) -> None:
    p = tmp_path / "m.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(maskc.MaskFileError):
        maskc.Mask.load(p)
    with pytest.raises(maskc.MaskFileError, match="cannot read"):
        maskc.Mask.load(tmp_path / "missing.json")


def test_scheduler_checks() -> None:
    from diffusers import DDIMScheduler, DDPMScheduler

    s = DDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(4)
    m = maskc.Mask.full(4, ["a"], meta={"scheduler": "DDIMScheduler", "timesteps": [float(t) for t in s.timesteps]})
    m.check_scheduler(s)
    s.set_timesteps(5)
    with pytest.raises(maskc.MaskMismatchError, match="5 steps but the mask has T=4"):
        m.check_scheduler(s)
    s2 = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    s2.set_timesteps(4)
    with pytest.raises(maskc.MaskMismatchError, match="timestep 0"):
        m.check_scheduler(s2)
    with pytest.raises(maskc.MaskMismatchError, match="DDPMScheduler"):
        m.check_scheduler(DDPMScheduler())
