"""Exactness where users are: guided generations, conditioning the SD/SDXL/ControlNet family
passes, half precision, and the runtime's bookkeeping (reset, trace eviction, refusals).

Every comparison is against the hook reference (tests/reference.py, on a copy of the
model), never maskc against itself.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel

import maskc
from archs import randomize, small_unet
from maskc.sampling import generate, stack_kwargs
from reference import HookReference
from test_equivalence import leaves_equal


def _bits(steps: int, blocks: int, seed: int, keep: float = 0.5) -> torch.Tensor:
    bits = torch.rand(steps, blocks, generator=torch.Generator().manual_seed(seed)) < keep
    bits[0] = True
    return bits


def _guided(model, bits, names, kwargs, steps=5, guidance=3.0):
    """Final images of a guided DDIM generation: reference, then maskc twice (reset per generation)."""
    s = DDIMScheduler(num_train_timesteps=1000)
    c = model.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(3))
    ref = HookReference(model, bits, names)
    want = generate(ref, s, x, steps, kwargs, guidance)
    tm = maskc.compile(model, maskc.Mask(bits, names))
    got = [generate(tm, s, x, steps, kwargs, guidance, reset=tm.reset) for _ in range(2)]
    plain = generate(model, s, x, steps, kwargs, guidance)
    return want, got, plain, tm


def test_guided_dit_equals_reference() -> None:
    """Batched cond/uncond halves, attention and MLP outputs of the same shape: read order matters."""
    m = randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10), 1)
    names = maskc.blocks(m)
    bits = _bits(5, len(names), 0)
    bits[2] = False  # a step that reads every block: several same-shaped reads at once
    kw = stack_kwargs({"class_labels": torch.tensor([4, 5])}, {"class_labels": torch.full((2,), 10)})
    want, got, plain, tm = _guided(m, bits, names, kw)
    assert len(tm.step_graph(2).reads) >= 2
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert not torch.equal(want, plain)  # the mask does change the images


def _sd_unet(**extra) -> UNet2DConditionModel:
    cfg = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4)
    cfg.update(extra)
    return randomize(UNet2DConditionModel(**cfg), 2)


def test_guided_sd_unet_equals_reference() -> None:
    """Caption embeddings for each class and an empty caption, guided as StableDiffusionPipeline does."""
    m = _sd_unet()
    names = maskc.blocks(m)
    bits = _bits(5, len(names), 1)
    table = torch.randn(11, 3, 12, generator=torch.Generator().manual_seed(0))  # 10 captions + the null caption
    kw = stack_kwargs({"encoder_hidden_states": table[[1, 7]]}, {"encoder_hidden_states": table[[10, 10]]})
    want, got, plain, _ = _guided(m, bits, names, kw)
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert not torch.equal(want, plain)


class GainProcessor:
    """An attention processor with an extra argument, passed through ``cross_attention_kwargs``."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        return gain * self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _steps_equal(model, names, bits, calls) -> None:
    """Every call of ``calls`` (a list of (args, kwargs)) through maskc equals the reference."""
    ref = HookReference(model, bits, names)
    want = [ref(*a, **k) for a, k in calls]
    tm = maskc.compile(model, maskc.Mask(bits, names))
    with torch.no_grad():
        for i, (a, k) in enumerate(calls):
            assert leaves_equal(tm(*a, **k), want[i]), f"step {i}"
    assert tm.step == len(calls)


def test_sdxl_added_cond_kwargs_and_cross_attention_kwargs() -> None:
    """SDXL-style ``text_time`` conditioning and a processor argument in ``cross_attention_kwargs``."""
    m = _sd_unet(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    m.set_attn_processor(GainProcessor())
    names = maskc.blocks(m)
    bits = _bits(4, len(names), 2)
    g = torch.Generator().manual_seed(1)
    ehs, x = torch.randn(2, 3, 12, generator=g), torch.randn(2, 2, 8, 8, generator=g)
    added = {"text_embeds": torch.randn(2, 8, generator=g), "time_ids": torch.rand(2, 6, generator=g) * 64}
    calls = [((x + k, torch.tensor(900 - 200 * k)), {"encoder_hidden_states": ehs, "added_cond_kwargs": added,
                                                      "cross_attention_kwargs": {"gain": 0.5}}) for k in range(4)]
    _steps_equal(m, names, bits, calls)
    tm = maskc.compile(m, maskc.Mask(bits, names))
    with torch.no_grad():  # the processor argument is part of what a trace is specialized to
        a = tm(*calls[0][0], **calls[0][1]).sample
        tm.reset()
        b = tm(*calls[0][0], **{**calls[0][1], "cross_attention_kwargs": {"gain": 2.0}}).sample
    assert not torch.equal(a, b)


def test_class_projection() -> None:
    m = _sd_unet(class_embed_type="projection", projection_class_embeddings_input_dim=6)
    names = maskc.blocks(m)
    bits = _bits(3, len(names), 3)
    g = torch.Generator().manual_seed(2)
    x, ehs, cl = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 12, generator=g), torch.randn(1, 6, generator=g)
    calls = [((x * (k + 1), torch.tensor(800 - 300 * k)), {"encoder_hidden_states": ehs, "class_labels": cl}) for k in range(3)]
    _steps_equal(m, names, bits, calls)


def test_controlnet_residuals() -> None:
    """Residuals from a ControlNet at each step (``down_block_additional_residuals``), as the pipeline passes them."""
    from diffusers import ControlNetModel

    m = _sd_unet()
    cn = randomize(ControlNetModel.from_unet(m, conditioning_embedding_out_channels=(4, 8)), 5)
    names = maskc.blocks(m)
    bits = _bits(3, len(names), 4)
    g = torch.Generator().manual_seed(3)
    x, ehs, cond = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 12, generator=g), torch.rand(1, 3, 16, 16, generator=g)  # pixel space: 2x the latent
    calls = []
    with torch.no_grad():
        for k in range(3):
            t = torch.tensor(700 - 300 * k)
            down, mid = cn(x + k, t, ehs, controlnet_cond=cond, return_dict=False)
            calls.append(((x + k, t), {"encoder_hidden_states": ehs, "down_block_additional_residuals": down,
                                       "mid_block_additional_residual": mid}))
    _steps_equal(m, names, bits, calls)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype) -> None:
    """The same kernels in the same order: bit-identical to the reference in the same dtype."""
    m = copy.deepcopy(small_unet()).to(dtype)
    names = maskc.blocks(m)
    bits = _bits(4, len(names), 5)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(4)).to(dtype)
    calls = [((x * (1 - 0.2 * k), torch.tensor(900 - 250 * k)), {}) for k in range(4)]
    _steps_equal(m, names, bits, calls)


# -- the runtime's bookkeeping ---------------------------------------------------------------


def test_reset_clears_everything() -> None:
    m = small_unet()
    names = maskc.blocks(m)
    bits = torch.ones(4, len(names), dtype=torch.bool)
    bits[1:, ::2] = False  # every even block is read at steps 1..3
    tm = maskc.compile(m, maskc.Mask(bits, names))
    x, t = torch.randn(1, 2, 8, 8), torch.tensor(5)
    with torch.no_grad():
        tm(x, t)
        tm(x + 1, t)
        assert tm.cache_entries() and tm.step == 2
        tm.reset()
        assert tm.step == 0 and tm.cache_entries() == [], "reset() must empty the cache"
        ref = HookReference(m, bits, names)
        for k in range(4):
            assert leaves_equal(tm(x - k, t - k), ref(x - k, t - k)), f"step {k} after reset"
        assert tm.cache_entries() == []


def test_trace_eviction_keeps_the_newest() -> None:
    """Past ``max_traces`` the oldest trace goes; the newest ones are reused without tracing again."""
    m = small_unet()
    names = maskc.blocks(m)
    tm = maskc.TimestepModules(m, maskc.Mask.full(1, names), max_traces=2)
    t = torch.tensor(3)
    graphs = {}
    with torch.no_grad():
        for n in (1, 2, 3):
            tm.reset()
            tm(torch.randn(n, 2, 8, 8), t)
            graphs[n] = tm[0]
        for n in (3, 2):  # the two newest: same graph objects, no new trace
            tm.reset()
            x = torch.randn(n, 2, 8, 8)
            assert torch.equal(tm(x, t).sample, m(x, t).sample)
            assert tm[0] is graphs[n], f"batch {n} was traced again although it is among the {tm.max_traces} newest"
        tm.reset()
        x = torch.randn(1, 2, 8, 8)
        assert torch.equal(tm(x, t).sample, m(x, t).sample)  # evicted: traced anew, still exact
        assert tm[0] is not graphs[1]
    assert len(tm._plans) == tm.max_traces


class NumberBranch(torch.nn.Module):
    """Glue that branches on a Python-number timestep: below 500, ``a``'s output is not used."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, t):
        h = self.a(x)
        return self.b(x) if t < 500 else self.b(x) + h


def test_number_that_changes_reads_is_refused() -> None:
    """Python-number timesteps are retraced per step, but a step may not change what it reads."""
    m = randomize(NumberBranch(), 0)
    names = ["a", "b"]
    bits = torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    tm = maskc.compile(m, maskc.Mask(bits, names))
    x = torch.randn(2, 4)
    with torch.no_grad(), pytest.warns(UserWarning, match="Python-number"):
        tm(x, 900)
        tm(x, 800)  # same branch, new number: retraced, same reads
        with pytest.raises(maskc.InputChangedError, match="reads"):
            tm(x, 100)  # step 2 skips a: the t=900 plan reads a's cache, the t=100 graph reads nothing
    tm.reset()
    ref = HookReference(m, bits, names)
    with torch.no_grad():
        for t in (900, 800, 700):
            assert torch.equal(tm(x, t), ref(x, t))


def test_same_number_timestep_at_two_steps() -> None:
    """Steps traced per Python-number value are still per step: the same value at two steps, two rows."""
    m = small_unet()
    names = maskc.blocks(m)
    bits = torch.ones(4, len(names), dtype=torch.bool)
    bits[2, ::2] = False
    bits[3, 1::2] = False
    x = torch.randn(1, 2, 8, 8)
    ts = [900, 500, 500, 500]
    ref = HookReference(m, bits, names)
    want = [ref(x * (k + 1), t).sample for k, t in enumerate(ts)]
    tm = maskc.compile(m, maskc.Mask(bits, names))
    with torch.no_grad(), pytest.warns(UserWarning, match="Python-number"):
        for k, t in enumerate(ts):
            assert torch.equal(tm(x * (k + 1), t).sample, want[k]), f"step {k}"


@pytest.mark.parametrize("change", ["dtype", "device"])
def test_dtype_or_device_change_mid_generation(change) -> None:
    m = small_unet()
    names = maskc.blocks(m)
    tm = maskc.compile(m, maskc.Mask(_bits(3, len(names), 6), names))
    x, t = torch.randn(1, 2, 8, 8), torch.tensor(7)
    with torch.no_grad():
        tm(x, t)
        other = x.double() if change == "dtype" else x.to("meta")
        with pytest.raises(maskc.InputChangedError, match="reset"):
            tm(other, t)
        tm.reset()
        if change == "dtype":  # at step 0 a new dtype is traced anew: exact in float64 too
            m64 = copy.deepcopy(m).double()
            tm64 = maskc.compile(m64, maskc.Mask.full(1, names))
            assert torch.equal(tm64(x.double(), t).sample, m64(x.double(), t).sample)
