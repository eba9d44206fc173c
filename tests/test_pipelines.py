"""maskc.apply / maskc.remove / maskc.learn(pipe) on diffusers pipelines around tiny random models.

The reference is tests/reference.py's HookReference (forward hooks that replace skipped
blocks' outputs by cached ones) on a copy of the backbone, run through the same
pipeline before maskc is applied. Every noise prediction the pipeline receives is
recorded (forward hooks on whatever the pipeline calls) and compared with torch.equal,
so a clamp on the final images cannot hide a difference.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

import maskc
from archs import SMALL_SEARCH, randomize
from maskc.pipelines import learn_inputs
from reference import HookReference

T = 4


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """These models are tiny: one thread is faster than two, and far faster on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_pipe() -> DDIMPipeline:
    unet = randomize(UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")), 0)
    return _quiet(DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)))


def tiny_vae(levels: int = 1) -> AutoencoderKL:
    """``levels`` resolutions: latents are 2 ** (levels - 1) times smaller than images."""
    return randomize(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * levels,
                                   down_block_types=("DownEncoderBlock2D",) * levels,
                                   up_block_types=("UpDecoderBlock2D",) * levels,
                                   layers_per_block=1, norm_num_groups=4, sample_size=8), 1)


def tiny_clip() -> tuple[Any, Any]:
    """A CLIP tokenizer over the 256 byte symbols (no merges) and a one-layer CLIP text encoder, built here."""
    import json
    import os
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs + [256 + k for k in range(256 - len(bs))]  # GPT-2's byte-to-symbol map
    symbols = [chr(c) for c in cs]
    vocab = {w: i for i, w in enumerate(symbols + [c + "</w>" for c in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=8)
    torch.manual_seed(4)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=8, projection_dim=16,
                                       bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1))
    return tok, enc.eval()


def sd_pipe(text: bool = False, vae_levels: int = 1) -> StableDiffusionPipeline:
    """Tiny Stable Diffusion; with ``text`` a tiny CLIP text encoder, else prompt_embeds only."""
    tok, enc = tiny_clip() if text else (None, None)
    unet = randomize(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4), 2)
    return _quiet(StableDiffusionPipeline(vae=tiny_vae(vae_levels), text_encoder=enc, tokenizer=tok, unet=unet,
                                          scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False))


def dit_pipe() -> DiTPipeline:
    dit = randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000), 3)
    return _quiet(DiTPipeline(transformer=dit, vae=tiny_vae(), scheduler=DDIMScheduler(num_train_timesteps=1000)))


def embeds(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, 16, generator=g), torch.randn(n, 5, 16, generator=g)


def random_mask(model: torch.nn.Module, pipe: Any, steps: int = T, seed: int = 0) -> maskc.Mask:
    """A random mask (row 0 all ones) that records the scheduler and timesteps it is for."""
    names = maskc.blocks(model)
    bits = torch.rand(steps, len(names), generator=torch.Generator().manual_seed(seed)) < 0.5
    bits[0] = True
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps)
    return maskc.Mask(bits, names, {"scheduler": type(sched).__name__, "timesteps": [float(t) for t in sched.timesteps]})


class Recorder:
    """Forward hook recording every noise prediction a module hands the pipeline."""

    def __init__(self, module: torch.nn.Module, on_call: Callable[[], None] | None = None) -> None:
        self.outs: list[torch.Tensor] = []
        self.on_call = on_call
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _m: Any, _a: Any, out: Any) -> None:
        o = out[0] if isinstance(out, tuple) else out.sample
        self.outs.append(o.detach().clone())
        if self.on_call is not None:
            self.on_call()

    def take(self) -> list[torch.Tensor]:
        outs, self.outs = self.outs, []
        return outs

    def close(self) -> None:
        self.handle.remove()


def run(pipe: Any, call: dict, rec: Recorder) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Images (float32, before PIL) and the noise predictions of one pipeline call."""
    out = pipe(**call, generator=torch.Generator().manual_seed(7), output_type="np", return_dict=False)[0]
    return np.asarray(out), rec.take()


def reference_runs(pipe: Any, mask: maskc.Mask, calls: list[dict]) -> list[tuple[np.ndarray, list[torch.Tensor]]]:
    """Each call through ``pipe`` with the hook reference (on a copy of the backbone) as its backbone."""
    name = maskc.pipelines.backbone_name(pipe)
    model = getattr(pipe, name)
    ref = HookReference(copy.deepcopy(model), mask.bits, mask.names)

    def advance() -> None:
        ref.step += 1

    rec = Recorder(ref.model, advance)
    pipe.register_modules(**{name: ref.model})
    results = []
    try:
        for call in calls:
            ref.step = 0
            ref.cache.clear()
            results.append(run(pipe, call, rec))
    finally:
        rec.close()
        ref.close()
        pipe.register_modules(**{name: model})
    return results


def assert_same(got: tuple[np.ndarray, list[torch.Tensor]], want: tuple[np.ndarray, list[torch.Tensor]]) -> None:
    assert len(got[1]) == len(want[1])
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert torch.equal(a, b), f"noise prediction of step {i} differs from the reference"
    assert np.array_equal(got[0], want[0])


def check_pipeline(pipe: Any, calls: list[dict]) -> None:
    """Reference before apply; maskc: each call twice, in order (batch sizes change); original after remove."""
    name = maskc.pipelines.backbone_name(pipe)
    model = getattr(pipe, name)
    mask = random_mask(model, pipe)
    rec = Recorder(model)
    originals = [run(pipe, c, rec) for c in calls]
    rec.close()
    refs = reference_runs(pipe, mask, calls)
    for o, r in zip(originals, refs):  # the mask changes the result, so equality below means something
        assert not all(torch.equal(a, b) for a, b in zip(o[1], r[1]))
    config_before = pipe.config[name]

    tm = maskc.apply(pipe, mask)
    assert getattr(pipe, name) is tm and pipe.components[name] is tm
    rec = Recorder(tm)
    for call, want in zip(calls, refs):
        assert_same(run(pipe, call, rec), want)
        assert_same(run(pipe, call, rec), want)  # twice in a row: every call is a fresh generation
    rec.close()

    assert maskc.remove(pipe) is model
    assert getattr(pipe, name) is model and pipe.components[name] is model and pipe.config[name] == config_before
    rec = Recorder(model)
    for call, want in zip(calls, originals):
        assert_same(run(pipe, call, rec), want)
    rec.close()


def test_ddim_pipeline_equals_reference_twice_after_batch_change_and_after_remove() -> None:
    pipe = ddim_pipe()
    check_pipeline(pipe, [dict(batch_size=2, num_inference_steps=T), dict(batch_size=1, num_inference_steps=T),
                          dict(batch_size=3, num_inference_steps=T)])


def test_stable_diffusion_cfg_equals_reference_twice_after_batch_change_and_after_remove() -> None:
    pipe = sd_pipe()
    (p2, n2), (p1, n1) = embeds(2, 0), embeds(1, 1)
    common = dict(num_inference_steps=T, guidance_scale=3.0, height=8, width=8)
    check_pipeline(pipe, [dict(prompt_embeds=p2, negative_prompt_embeds=n2, **common),
                          dict(prompt_embeds=p1, negative_prompt_embeds=n1, **common),
                          dict(prompt_embeds=p1, negative_prompt_embeds=n1, num_images_per_prompt=2, **common)])


def test_stable_diffusion_with_prompts_equals_reference() -> None:
    pipe = sd_pipe(text=True)
    common = dict(num_inference_steps=T, guidance_scale=3.0, height=8, width=8)
    check_pipeline(pipe, [dict(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], **common),
                          dict(prompt="a cat", num_images_per_prompt=3, **common)])


def test_dit_pipeline_cfg_equals_reference() -> None:
    pipe = dit_pipe()
    check_pipeline(pipe, [dict(class_labels=[1, 2], num_inference_steps=T, guidance_scale=4.0),
                          dict(class_labels=[5], num_inference_steps=T, guidance_scale=4.0)])


def test_pixart_alpha_cfg_equals_reference_and_learns() -> None:
    tr = randomize(PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                            caption_channels=16), 5)
    pipe = _quiet(PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tr,
                                      scheduler=DDIMScheduler(num_train_timesteps=1000)))
    g = torch.Generator().manual_seed(0)
    text = dict(prompt_embeds=torch.randn(2, 6, 16, generator=g), prompt_attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
                negative_prompt_embeds=torch.randn(2, 6, 16, generator=g), negative_prompt_attention_mask=torch.ones(2, 6),
                negative_prompt=None)
    common = dict(num_inference_steps=T, guidance_scale=3.0, height=8, width=8, use_resolution_binning=False)
    check_pipeline(pipe, [dict(**text, **common), dict(**{k: v[:1] if v is not None else v for k, v in text.items()}, **common)])
    li = learn_inputs(pipe, **text, guidance_scale=3.0, num_inference_steps=3)
    c, u = li["cond"](3, g), li["uncond"](3, g)
    assert torch.equal(c["encoder_attention_mask"], text["prompt_attention_mask"][[0, 1, 0]].float())
    assert torch.equal(u["encoder_hidden_states"], text["negative_prompt_embeds"][[0, 1, 0]])
    assert c["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    mask = maskc.learn(pipe, target=0.7, **text, guidance_scale=3.0, num_inference_steps=3, iters=2, batch=2,
                       progress=False, **SMALL_SEARCH)
    assert mask.steps == 3 and mask.meta["provenance"]["pipeline"] == "PixArtAlphaPipeline"


def test_a_call_that_raised_midway_leaks_nothing_into_the_next() -> None:
    pipe = sd_pipe()
    p, n = embeds(1, 0)
    call = dict(prompt_embeds=p, negative_prompt_embeds=n, num_inference_steps=T, guidance_scale=3.0, height=8, width=8)
    mask = random_mask(pipe.unet, pipe)
    (want,) = reference_runs(pipe, mask, [call])
    tm = maskc.apply(pipe, mask)

    class Stop(Exception):
        pass

    def stop(_pipe: Any, i: int, _t: Any, _kw: dict) -> dict:
        if i == 1:
            raise Stop
        return _kw

    with pytest.raises(Stop):
        pipe(**call, callback_on_step_end=stop, output_type="np")
    assert tm.step == 2 and tm.cache_entries()  # stopped mid-generation, cache holding values
    rec = Recorder(tm)
    assert_same(run(pipe, call, rec), want)
    rec.close()


def count_calls(model: torch.nn.Module) -> list[int]:
    """A counter of forward calls into any submodule of ``model`` (what step graphs run)."""
    n = [0]
    for m in model.modules():
        m.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def test_mismatched_schedule_is_refused_before_any_backbone_work() -> None:
    pipe = ddim_pipe()
    model = pipe.unet
    mask = random_mask(model, pipe)
    (want,) = reference_runs(pipe, mask, [dict(batch_size=1, num_inference_steps=T)])
    calls = count_calls(model)

    tm = maskc.apply(pipe, mask)
    with pytest.raises(maskc.MaskMismatchError, match=f"{T + 2} timesteps but the mask has T={T}"):
        pipe(batch_size=1, num_inference_steps=T + 2)  # step count
    trailing = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.scheduler = trailing
    with pytest.raises(maskc.MaskMismatchError, match="mask was made for timestep"):
        pipe(batch_size=1, num_inference_steps=T)  # same count, other timesteps
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(maskc.MaskMismatchError, match="scheduler is a DDPMScheduler"):
        pipe(batch_size=1, num_inference_steps=T)  # other scheduler class
    assert calls[0] == 0 and tm.step == 0
    with pytest.raises(maskc.MaskMismatchError, match="scheduler is a DDPMScheduler"):
        maskc.apply(pipe, mask)  # refused at apply too
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    rec = Recorder(pipe.unet)
    assert_same(run(pipe, dict(batch_size=1, num_inference_steps=T), rec), want)  # nothing left behind


def test_compile_refuses_other_timesteps_than_the_mask_records() -> None:
    pipe = ddim_pipe()
    model = pipe.unet
    mask = random_mask(model, pipe, steps=T)
    tm = maskc.compile(model, mask)
    x = torch.randn(1, 3, 8, 8)
    s = DDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(T)
    with torch.no_grad():
        for t in s.timesteps:  # its own schedule, tensor or number
            tm(x, t)
        tm.reset()
        for t in s.timesteps.tolist():
            tm(x, t)
        tm.reset()
        s.set_timesteps(2 * T)  # DDIM-8 timesteps for a DDIM-4 mask
        with pytest.raises(maskc.MaskMismatchError, match="step 0 gets timestep"):
            tm(x, s.timesteps[0])
        assert tm.step == 0
        with pytest.raises(maskc.MaskMismatchError, match=f"has {2 * T} timesteps"):
            tm.reset(s.timesteps)  # checked as a whole
        s.set_timesteps(T)
        tm.reset(s.timesteps)
        for t in s.timesteps:
            tm(x, t)


class PlainNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 4).double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + t)


def test_the_swapped_module_looks_like_the_backbone() -> None:
    pipe = sd_pipe()
    unet = pipe.unet
    tm = maskc.compile(unet, maskc.Mask.full(T, maskc.blocks(unet)))
    assert tm.config is unet.config and tm.dtype == unet.dtype and tm.device == unet.device
    assert tm.conv_in is unet.conv_in and tm.attn_processors.keys() == unet.attn_processors.keys()
    assert hasattr(tm, "add_embedding") == hasattr(unet, "add_embedding")
    assert not hasattr(tm, "no_such_attribute") and not hasattr(tm, "_hf_hook")
    plain = PlainNet()  # a backbone without config, dtype or device attributes
    tp = maskc.compile(plain, maskc.Mask.full(2, ["a", "b"]))
    assert tp.dtype == torch.float64 and tp.device == torch.device("cpu") and not hasattr(tp, "config")
    pipe.unet = tm  # what a user may do by hand: the pipeline runs (one generation, reset by hand)
    p, n = embeds(1, 0)
    pipe(prompt_embeds=p, negative_prompt_embeds=n, num_inference_steps=T, height=8, width=8, output_type="np")
    assert pipe.dtype == unet.dtype and pipe.device == unet.device


def test_learn_from_pipelines_and_apply_the_mask() -> None:
    pipe = ddim_pipe()
    mask = maskc.learn(pipe, target=0.7, steps=3, iters=2, batch=2, progress=False,  # steps: num_inference_steps
                       **SMALL_SEARCH)
    s = copy.deepcopy(pipe.scheduler)
    s.set_timesteps(3)
    assert mask.steps == 3 and mask.meta["timesteps"] == [float(t) for t in s.timesteps]
    assert mask.meta["scheduler"] == "DDIMScheduler" and mask.meta["provenance"]["pipeline"] == "DDIMPipeline"
    maskc.apply(pipe, mask)
    assert pipe(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 8, 8, 3)

    sd = sd_pipe(text=True)
    mask = maskc.learn(sd, target=0.7, prompt=["a cat", "a dog"], negative_prompt="blurry", guidance_scale=3.0,
                       num_inference_steps=3, iters=2, batch=2, progress=False, **SMALL_SEARCH)
    assert mask.steps == 3 and mask.meta["provenance"]["guidance_scale"] == 3.0
    maskc.apply(sd, mask)
    sd(prompt="a bird", guidance_scale=3.0, num_inference_steps=3, height=8, width=8, output_type="np")


def test_learn_from_a_pipeline_passes_the_feature_map_on() -> None:
    """learn(pipe, features=f, shift_weight=W) charges f of the pipeline's final samples: images in [0, 1] with the
    pipeline's shape, one row per calibration noise."""
    seen = []

    def feats(img: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(img.shape[1:]), float(img.min()), float(img.max())))
        return img.flatten(1)[:, :5]

    mask = maskc.learn(ddim_pipe(), target=0.7, steps=3, iters=2, batch=2, progress=False, **SMALL_SEARCH,
                       search_restarts=1, features=feats, shift_weight=5.0)
    assert mask.meta["provenance"]["features"].endswith("feats") and mask.meta["provenance"]["pipeline"]
    assert mask.meta["provenance"]["config"]["shift_weight"] == 5.0
    assert seen and all(s == (3, 8, 8) and 0 <= lo <= hi <= 1 for s, lo, hi in seen)


def test_learn_inputs_carry_the_pipelines_conditioning() -> None:
    sd = sd_pipe()
    p, n = embeds(2, 0)
    li = learn_inputs(sd, prompt_embeds=p, negative_prompt_embeds=n, guidance_scale=3.0, num_inference_steps=3)
    g = torch.Generator()
    assert li["model"] is sd.unet and li["steps"] == 3 and li["sample_shape"] == (4, 8, 8)
    assert li["guidance_scale"] == 3.0 and li["scheduler"] is not sd.scheduler
    assert torch.equal(li["cond"](3, g)["encoder_hidden_states"], p[[0, 1, 0]])
    assert torch.equal(li["uncond"](3, g)["encoder_hidden_states"], n[[0, 1, 0]])
    li = learn_inputs(sd, prompt_embeds=p, guidance_scale=1.0)  # the pipeline's default steps, no guidance
    assert li["guidance_scale"] is None and li["uncond"] is None and li["steps"] == 50
    sd4 = sd_pipe(vae_levels=3)  # height and width are in pixels; the U-Net samples latents 4 times smaller
    assert sd4.vae_scale_factor == 4
    assert learn_inputs(sd4, prompt_embeds=p, guidance_scale=1.0, height=32, width=16)["sample_shape"] == (4, 8, 4)
    sd = sd_pipe(text=True)
    li = learn_inputs(sd, prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], guidance_scale=2.0)
    want_p, want_n = sd.encode_prompt(["a cat", "a dog"], "cpu", 1, True, ["blurry", "dark"])
    assert torch.equal(li["cond"](2, g)["encoder_hidden_states"], want_p)
    assert torch.equal(li["uncond"](2, g)["encoder_hidden_states"], want_n)

    dit = dit_pipe()
    li = learn_inputs(dit, class_labels=[3, 4], num_inference_steps=3)  # DiTPipeline's default scale 4.0
    assert li["guidance_scale"] == 4.0 and li["model"] is dit.transformer
    assert li["cond"](3, g)["class_labels"].tolist() == [3, 4, 3]
    assert li["uncond"](2, g)["class_labels"].tolist() == [1000, 1000]  # DiTPipeline's null label
    with pytest.raises(maskc.MaskcError, match="class_labels"):
        learn_inputs(dit)
    with pytest.raises(maskc.MaskcError, match="unconditional"):
        learn_inputs(ddim_pipe(), class_labels=[1])


def test_pretrained_model_mask_and_scheduler_fit_a_pipeline() -> None:
    model, mask, sched = maskc.pretrained("fmnist-unet")
    assert not model.training and len(sched.timesteps) == mask.steps == 20
    mask.check(model, sched)
    pipe = _quiet(DDIMPipeline(unet=model, scheduler=sched))
    maskc.apply(pipe, mask)
    img = pipe(batch_size=1, num_inference_steps=mask.steps, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 1) and np.isfinite(img).all()
    with pytest.raises(maskc.MaskcError, match="no shipped model"):
        maskc.pretrained("fmnist-vae")
