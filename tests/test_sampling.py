"""The shared denoising loop: classifier-free guidance as pipelines do it, compiled masks inside it."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

import maskc
from archs import randomize
from maskc.sampling import denoise, generate, stack_kwargs


def small_dit() -> DiTTransformer2DModel:
    return randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                           num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10), 1).eval()


def test_guided_noise_matches_two_separate_calls() -> None:
    m = small_dit()
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor(500)
    y = torch.tensor([1, 2, 3])
    kw = stack_kwargs({"class_labels": y}, {"class_labels": torch.full((3,), 10)})
    with torch.no_grad():
        got = denoise(m, x, t, kw, guidance_scale=4.0)
        c = m(x, t.expand(3), class_labels=y).sample[:, :1]  # learned-variance channel cut
        u = m(x, t.expand(3), class_labels=torch.full((3,), 10)).sample[:, :1]
    assert got.shape == x.shape
    torch.testing.assert_close(got, u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_compiled_mask_in_a_guided_generation_is_exact() -> None:
    """Against the hook reference (not maskc against itself), twice with reset in between."""
    from reference import HookReference

    m = small_dit()
    names = maskc.blocks(m)
    bits = torch.rand(5, len(names), generator=torch.Generator().manual_seed(0)) < 0.5
    bits[0] = True
    bits[3] = False  # reads every block at once: the order of same-shaped reads matters
    tm = maskc.compile(m, maskc.Mask(bits, names))
    full = maskc.compile(m, maskc.Mask.full(5, names))
    x = torch.randn(2, 1, 8, 8)
    kw = stack_kwargs({"class_labels": torch.tensor([4, 5])}, {"class_labels": torch.full((2,), 10)})
    s = DDIMScheduler(num_train_timesteps=1000)
    a = generate(m, s, x, 5, kw, 2.0)
    want = generate(HookReference(m, bits, names), s, x, 5, kw, 2.0)
    assert torch.equal(generate(full, s, x, 5, kw, 2.0, reset=full.reset), a)
    b1 = generate(tm, s, x, 5, kw, 2.0, reset=tm.reset)
    b2 = generate(tm, s, x, 5, kw, 2.0, reset=tm.reset)  # reset per generation: same result again
    assert torch.equal(b1, want) and torch.equal(b2, want) and not torch.equal(want, a)


def test_generate_leaves_the_callers_scheduler_as_it_was() -> None:
    """learn, eval and the demo pass the user's scheduler; sampling must not re-time it or advance its state.

    Planted: generate() stepping the caller's scheduler instead of a copy.
    """
    from diffusers import DPMSolverMultistepScheduler

    m = small_dit()
    x = torch.randn(2, 1, 8, 8)
    kw = {"class_labels": torch.tensor([1, 2])}
    for s in (DDIMScheduler(num_train_timesteps=1000), DPMSolverMultistepScheduler(num_train_timesteps=1000)):
        s.set_timesteps(10)
        before = (s.timesteps.clone(), getattr(s, "step_index", None))
        a = generate(m, s, x, 5, kw)
        assert torch.equal(s.timesteps, before[0]) and getattr(s, "step_index", None) == before[1], type(s).__name__
        assert torch.equal(generate(m, s, x, 5, kw), a)  # and the next generation sees the same schedule
