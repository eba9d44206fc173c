"""TimestepModules as a drop-in: signature, return type, steps, reset, retrace, refusals."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

import maskc
from archs import small_unet
from maskc.models.dit import DiT


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return small_unet()


def _mask(names, steps=3, skip_from=1):
    bits = torch.ones(steps, len(names), dtype=torch.bool)
    bits[skip_from:, ::2] = False
    return maskc.Mask(bits, names)


def test_return_type_and_return_dict(unet) -> None:
    names = maskc.blocks(unet)
    x, t = torch.randn(1, 2, 8, 8), torch.tensor(3)
    tm = maskc.compile(unet, maskc.Mask.full(2, names))
    with torch.no_grad():
        out = tm(x, t)
        assert type(out) is type(unet(x, t))
        with pytest.raises(maskc.InputChangedError, match="non-tensor"):
            tm(x, t, return_dict=False)  # another non-tensor argument mid-generation
        tm.reset()
        tup = tm(x, t, return_dict=False)  # retraced at step 0
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.sample)


def test_step_overflow_and_reset(unet) -> None:
    names = maskc.blocks(unet)
    tm = maskc.compile(unet, _mask(names))
    x, t = torch.randn(1, 2, 8, 8), torch.tensor(3)
    with torch.no_grad():
        first = [tm(x + i, t - i).sample for i in range(3)]
        with pytest.raises(maskc.StepOverflowError, match="T=3"):
            tm(x, t)
        tm.reset()
        assert tm.step == 0
        again = [tm(x + i, t - i).sample for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_retrace_at_step0_refuse_midway(unet) -> None:
    names = maskc.blocks(unet)
    tm = maskc.compile(unet, _mask(names))
    t = torch.tensor(3)
    with torch.no_grad():
        tm(torch.randn(1, 2, 8, 8), t)
        with pytest.raises(maskc.InputChangedError, match="reset"):
            tm(torch.randn(2, 2, 8, 8), t)  # batch size changed mid-generation
        tm.reset()
        x2 = torch.randn(2, 2, 16, 16)  # new batch and resolution at step 0: retraced
        assert torch.equal(tm(x2, t).sample, unet(x2, t).sample)
        assert tm[0].graph is not None
        with pytest.raises(maskc.InputChangedError):
            tm(x2.double(), t)  # dtype changed mid-generation


def test_inputs_of_wrong_signature(unet) -> None:
    tm = maskc.compile(unet, maskc.Mask.full(2, maskc.blocks(unet)))
    with pytest.raises(maskc.CaptureError, match="forward"):
        tm(torch.randn(1, 2, 8, 8), torch.tensor(1), nonsense=3)


def test_empty_cache_refused(unet) -> None:
    names = maskc.blocks(unet)
    bits = torch.ones(3, len(names), dtype=torch.bool)
    bits[0, 2] = False
    with pytest.raises(maskc.EmptyCacheError, match=names[2]):
        maskc.compile(unet, maskc.Mask(bits, names))


def test_mask_for_another_model(unet) -> None:
    dit = DiT(input_size=4, hidden_size=16, depth=1, num_heads=2)
    mask = maskc.Mask.full(2, maskc.blocks(dit))
    with pytest.raises(maskc.MaskMismatchError, match="blocks.0.attn"):
        maskc.compile(unet, mask)


def test_getitem_before_trace(unet) -> None:
    tm = maskc.compile(unet, maskc.Mask.full(2, maskc.blocks(unet)))
    assert len(tm) == 2
    with pytest.raises(maskc.MaskcError, match="example_args"):
        tm[0]


def test_identical_rows_share_a_module(unet) -> None:
    names = maskc.blocks(unet)
    bits = torch.ones(6, len(names), dtype=torch.bool)
    bits[[1, 3], 0] = False  # rows 1, 3 identical; rows 0, 2, 4, 5 all ones
    tm = maskc.compile(unet, maskc.Mask(bits, names), example_args=(torch.randn(1, 2, 8, 8), torch.tensor(1)))
    assert tm[1] is tm[3]
    assert tm[0] is tm[2]  # both write block 0 for the next step
    assert tm[4] is not tm[2]  # same row, but nothing reads what step 4 would write
    assert tm.step_graph(4).writes == () and tm.step_graph(2).writes == (names[0],)
    assert tm.step_graph(1).reads == (names[0],) and names[0] not in tm.step_graph(1).runs


def test_cache_frees_after_last_read(unet) -> None:
    names = maskc.blocks(unet)
    bits = torch.ones(4, len(names), dtype=torch.bool)
    bits[1, -1] = False  # last block read at step 1 only
    tm = maskc.compile(unet, maskc.Mask(bits, names))
    x, t = torch.randn(1, 2, 8, 8), torch.tensor(3)
    with torch.no_grad():
        tm(x, t)
        assert tm.cache_entries() == [names[-1]]
        tm(x, t)
        assert tm.cache_entries() == []
        tm(x, t)
        tm(x, t)
    assert tm.peak_cache_entries == 1


class TwoLinear(torch.nn.Module):
    """Blocks ``a`` and ``b``; subclasses write the glue between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)


def test_data_dependent_control_flow_named() -> None:
    class M(TwoLinear):
        def forward(self, x):
            h = self.a(x)
            if h.mean() > 0:
                return self.b(h)
            return h

    tm = maskc.compile(M(), maskc.Mask.full(2, ["a", "b"]))
    with pytest.raises(maskc.CaptureError, match=r"test_runtime.py:\d+: `if h.mean\(\) > 0:`"):
        tm(torch.randn(2, 4))


def test_inplace_mutation_of_block_output_refused() -> None:
    class M(TwoLinear):
        def forward(self, x):
            h = self.a(x)
            h += 1
            return self.b(h)

    tm = maskc.compile(M(), maskc.Mask.full(2, ["a", "b"]))
    with pytest.raises(maskc.CaptureError, match="in place"):
        tm(torch.randn(2, 4))


def test_blocks_overrides_and_errors(unet) -> None:
    assert maskc.blocks(unet, types=(torch.nn.Conv2d,))[0] == "conv_in"
    with pytest.raises(maskc.BlockError, match="not a submodule"):
        maskc.blocks(unet, names=["nope"])
    with pytest.raises(maskc.BlockError, match="nest"):
        maskc.blocks(unet, names=["down_blocks.0", "down_blocks.0.resnets.0"])
    with pytest.raises(maskc.BlockError, match="no default blocks"):
        maskc.blocks(torch.nn.Linear(2, 2))


def test_blocks_by_type_are_outermost_and_subclasses_inherit(unet) -> None:
    """Planted: types that nest (a Conv2d inside a ResnetBlock2D) both selected; the table keyed on the exact class."""
    from diffusers.models.resnet import ResnetBlock2D

    names = maskc.blocks(unet, types=(ResnetBlock2D, torch.nn.Conv2d))
    assert not [(a, b) for a in names for b in names if b.startswith(a + ".")]
    assert "conv_in" in names and "down_blocks.0.resnets.0" in names
    assert "down_blocks.0.resnets.0.conv1" not in names

    class MyUNet(UNet2DModel):  # a user's subclass keeps its parent's default blocks
        pass

    sub = MyUNet(**unet.config)
    assert maskc.blocks(sub) == maskc.blocks(unet)


def test_blocks_in_execution_order() -> None:
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
    )
    names = maskc.blocks(m)
    prefixes = [n.split(".")[0] for n in names]
    assert prefixes.index("mid_block") < prefixes.index("up_blocks")  # not named_modules order
    assert prefixes == sorted(prefixes, key=["down_blocks", "mid_block", "up_blocks"].index)


def test_python_number_timesteps_retrace_per_step(unet) -> None:
    from reference import HookReference

    names = maskc.blocks(unet)
    bits = torch.ones(4, len(names), dtype=torch.bool)
    bits[1:, 1::2] = False
    ref = HookReference(unet, bits, names)
    x = torch.randn(1, 2, 8, 8)
    ts = [900, 600, 300, 1]
    try:
        expected = [ref(x + k, t).sample for k, t in enumerate(ts)]
    finally:
        ref.close()
    tm = maskc.compile(unet, maskc.Mask(bits, names))
    with pytest.warns(UserWarning, match="Python-number"), torch.no_grad():
        got = [tm(x + k, t).sample for k, t in enumerate(ts)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    tm.reset()
    with torch.no_grad():  # second generation: all steps already traced
        again = [tm(x + k, t).sample for k, t in enumerate(ts)]
    assert all(torch.equal(a, b) for a, b in zip(again, expected))
