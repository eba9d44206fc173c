"""Hypothesis strategies for small random backbones of the five supported families.

Each draw gives a ``Case``: a model with random (non-zero) weights in eval mode,
the per-step call ``inputs(x, t)`` and how to read the noise prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import strategies as st


@dataclass
class Case:
    family: str
    model: torch.nn.Module
    shape: tuple[int, int, int, int]  # N, C, H, W of the sample
    inputs: Callable[[torch.Tensor, torch.Tensor], tuple[tuple, dict]]
    cfg: dict

    def eps(self, out: Any) -> torch.Tensor:
        o = out if isinstance(out, torch.Tensor) else out[0]
        return o[:, : self.shape[1]]

    def __repr__(self) -> str:
        return f"Case({self.family}, {self.cfg}, shape={self.shape})"


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (diffusers and DiT zero-init some layers, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:  # norm scales stay near 1, everything else near 0; nothing kept from the init
                base = torch.ones_like(p) if bool((p == 1).all()) else torch.zeros_like(p)
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@st.composite
def unet2d(draw: Any) -> Case:
    from diffusers import UNet2DModel

    levels = draw(st.integers(1, 3))
    chans = tuple(draw(st.sampled_from([8, 16])) * (1 + (i > 0)) for i in range(levels))
    attn = [draw(st.booleans()) for _ in range(levels)]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    cfg = dict(
        sample_size=draw(st.sampled_from([4, 8])) * 2 ** (levels - 1),
        in_channels=draw(st.integers(1, 3)),
        block_out_channels=chans,
        layers_per_block=draw(st.integers(1, 2)),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=4,
        attention_head_dim=draw(st.sampled_from([None, 4])),
        add_attention=draw(st.booleans()),
        resnet_time_scale_shift=draw(st.sampled_from(["default", "scale_shift"])),
        num_class_embeds=draw(st.sampled_from([None, 5])),
    )
    cfg["out_channels"] = cfg["in_channels"]
    model = randomize(UNet2DModel(**cfg), draw(st.integers(0, 2**16)))
    n = draw(st.integers(1, 2))
    labels = torch.arange(n) % 5

    def inputs(x: torch.Tensor, t: torch.Tensor) -> tuple[tuple, dict]:
        kw = {"class_labels": labels} if cfg["num_class_embeds"] else {}
        return (x, t), kw

    s = cfg["sample_size"]
    return Case("unet2d", model, (n, cfg["in_channels"], s, s), inputs, cfg)


@st.composite
def unet2d_cond(draw: Any) -> Case:
    from diffusers import UNet2DConditionModel

    levels = draw(st.integers(1, 3))
    chans = tuple(8 * (1 + (i > 0)) for i in range(levels))
    attn = [draw(st.booleans()) for _ in range(levels)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    cross = draw(st.sampled_from([8, 12]))
    cfg = dict(
        sample_size=4 * 2 ** (levels - 1),
        in_channels=draw(st.integers(1, 4)),
        block_out_channels=chans,
        layers_per_block=draw(st.integers(1, 2)),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=4,
        cross_attention_dim=cross,
        attention_head_dim=4,
        use_linear_projection=draw(st.booleans()),
        mid_block_type=draw(st.sampled_from(["UNetMidBlock2DCrossAttn", None])),
    )
    cfg["out_channels"] = cfg["in_channels"]
    model = randomize(UNet2DConditionModel(**cfg), draw(st.integers(0, 2**16)))
    n = draw(st.integers(1, 2))
    ehs = torch.randn(n, draw(st.integers(1, 4)), cross, generator=torch.Generator().manual_seed(1))

    def inputs(x: torch.Tensor, t: torch.Tensor) -> tuple[tuple, dict]:
        return (x, t), {"encoder_hidden_states": ehs}

    s = cfg["sample_size"]
    return Case("unet2d_cond", model, (n, cfg["in_channels"], s, s), inputs, cfg)


@st.composite
def dit(draw: Any) -> Case:
    from diffusers import DiTTransformer2DModel

    heads = draw(st.integers(1, 2))
    cfg = dict(
        num_attention_heads=heads,
        attention_head_dim=draw(st.sampled_from([4, 8])),
        in_channels=draw(st.integers(1, 4)),
        num_layers=draw(st.integers(1, 3)),
        sample_size=draw(st.sampled_from([4, 8])),
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    )
    model = randomize(DiTTransformer2DModel(**cfg), draw(st.integers(0, 2**16)))
    n = draw(st.integers(1, 2))
    labels = torch.arange(n) % 10

    def inputs(x: torch.Tensor, t: torch.Tensor) -> tuple[tuple, dict]:
        return (x,), {"timestep": t.expand(n), "class_labels": labels}

    s = cfg["sample_size"]
    return Case("dit", model, (n, cfg["in_channels"], s, s), inputs, cfg)


@st.composite
def pixart(draw: Any) -> Case:
    from diffusers import PixArtTransformer2DModel

    heads = draw(st.integers(1, 2))
    in_ch = draw(st.integers(1, 4))
    extra = draw(st.booleans())
    hd = 12 if extra else 8  # the size embeddings need the inner dim divisible by 3
    cfg = dict(
        num_attention_heads=heads,
        attention_head_dim=hd,
        in_channels=in_ch,
        out_channels=draw(st.sampled_from([in_ch, 2 * in_ch])),
        num_layers=draw(st.integers(1, 3)),
        cross_attention_dim=heads * hd,
        caption_channels=draw(st.sampled_from([8, 12])),
        sample_size=draw(st.sampled_from([4, 8])),
        norm_num_groups=1,
        use_additional_conditions=extra,
    )
    model = randomize(PixArtTransformer2DModel(**cfg), draw(st.integers(0, 2**16)))
    n = draw(st.integers(1, 2))
    g = torch.Generator().manual_seed(2)
    caption = torch.randn(n, draw(st.integers(1, 4)), cfg["caption_channels"], generator=g)
    s = cfg["sample_size"]
    cond: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
    if extra:
        cond = {"resolution": torch.full((n, 2), 8.0 * s), "aspect_ratio": torch.ones(n, 1)}

    def inputs(x: torch.Tensor, t: torch.Tensor) -> tuple[tuple, dict]:
        return (x,), {
            "encoder_hidden_states": caption,
            "timestep": t.expand(n),
            "added_cond_kwargs": cond,
            "return_dict": False,
        }

    return Case("pixart", model, (n, in_ch, s, s), inputs, cfg)


@st.composite
def timm_dit(draw: Any) -> Case:
    from maskc.models.dit import DiT

    cfg = dict(
        input_size=draw(st.sampled_from([4, 8])),
        patch_size=2,
        in_channels=draw(st.integers(1, 3)),
        hidden_size=draw(st.sampled_from([16, 32])),
        depth=draw(st.integers(1, 3)),
        num_heads=draw(st.sampled_from([2, 4])),
        num_classes=10,
        learn_sigma=draw(st.booleans()),
    )
    model = randomize(DiT(**cfg), draw(st.integers(0, 2**16)))
    n = draw(st.integers(1, 2))
    labels = torch.arange(n) % 10

    def inputs(x: torch.Tensor, t: torch.Tensor) -> tuple[tuple, dict]:
        return (x, t.expand(n).float(), labels), {}

    s = cfg["input_size"]
    return Case("timm_dit", model, (n, cfg["in_channels"], s, s), inputs, cfg)


FAMILIES = {"unet2d": unet2d, "unet2d_cond": unet2d_cond, "dit": dit, "pixart": pixart, "timm_dit": timm_dit}


def random_bits(draw: Any, steps: int, blocks: int) -> torch.Tensor:
    """Row 0 all ones (the cache must be filled before it is read), the rest drawn."""
    p = draw(st.sampled_from([0.2, 0.5, 0.8]))
    rows = [[True] * blocks]
    for _ in range(steps - 1):
        rows.append(draw(st.lists(st.booleans() if p == 0.5 else st.sampled_from([True] * int(10 * p) + [False] * (10 - int(10 * p))), min_size=blocks, max_size=blocks)))
    return torch.tensor(rows, dtype=torch.bool)


def small_unet(sample_size: int = 8, channels: int = 2, seed: int = 0):
    """A two-level UNet2DModel with one attention level: the fixed model of example-based tests."""
    from diffusers import UNet2DModel

    m = UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16)
        if sample_size == 8 else (16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    return randomize(m, seed)


# maskc.learn settings for tests about something else than the search: every phase runs (the search and its
# restarts too), on few noises
SMALL_SEARCH = {"search_batch": 2, "search_evals": 20, "select_batch": 3}
