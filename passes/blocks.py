"""Blocks: the default-block table, keyed by backbone type, and block selection.

A block set is a list of qualified module names none of which contains another.
The table says, per backbone class, which module types are blocks (and under
which submodule); knowledge about backbones lives here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from maskc.errors import BlockError

__all__ = ["BlockRule", "DEFAULT_BLOCKS", "select_blocks", "default_rule", "example_inputs", "execution_order"]


def _diffusers_types(*names: str) -> tuple[type, ...]:
    import diffusers.models.attention as att
    import diffusers.models.attention_processor as ap
    import diffusers.models.resnet as res

    table = {
        "ResnetBlock2D": res.ResnetBlock2D,
        "Attention": ap.Attention,
        "FeedForward": att.FeedForward,
    }
    if "Transformer2DModel" in names:
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        table["Transformer2DModel"] = Transformer2DModel
    return tuple(table[n] for n in names)


def _timm_types() -> tuple[type, ...]:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention

    return (Attention, Mlp)


@dataclass(frozen=True)
class BlockRule:
    """Which modules of a backbone are blocks: instances of ``types()`` under ``within``."""

    types: Callable[[], tuple[type, ...]]
    within: str = ""  # only modules whose qualified name starts with this prefix
    example: Callable[[torch.nn.Module], tuple[tuple, dict]] | None = None


def _sample(model: torch.nn.Module, channels: int, size: Any) -> torch.Tensor:
    size = size if isinstance(size, (tuple, list)) else (size, size)
    p = next(model.parameters())
    return torch.zeros(1, channels, *size, dtype=p.dtype, device=p.device)


def _ex_unet2d(m: Any) -> tuple[tuple, dict]:
    c = m.config
    kw: dict[str, Any] = {}
    if c.num_class_embeds is not None or c.class_embed_type is not None:
        kw["class_labels"] = torch.zeros(1, dtype=torch.long, device=m.device)
    return (_sample(m, c.in_channels, c.sample_size or 32), torch.tensor([1], device=m.device)), kw


def _ex_unet2dcond(m: Any) -> tuple[tuple, dict]:
    c = m.config
    d = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
    ehs = torch.zeros(1, 4, d, dtype=m.dtype, device=m.device)
    kw: dict[str, Any] = {}
    if getattr(m, "class_embedding", None) is not None:
        if c.class_embed_type == "projection":
            kw["class_labels"] = torch.zeros(1, c.projection_class_embeddings_input_dim, dtype=m.dtype, device=m.device)
        else:
            kw["class_labels"] = torch.zeros(1, dtype=torch.long, device=m.device)
    if c.addition_embed_type == "text_time":
        n_time = (c.projection_class_embeddings_input_dim - d) // c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(1, d, dtype=m.dtype, device=m.device),
            "time_ids": torch.zeros(1, max(n_time, 1), dtype=m.dtype, device=m.device),
        }
    return (_sample(m, c.in_channels, c.sample_size or 32), torch.tensor([1], device=m.device), ehs), kw


def _ex_dit(m: Any) -> tuple[tuple, dict]:
    c = m.config
    return (_sample(m, c.in_channels, c.sample_size),), {
        "timestep": torch.tensor([1], device=m.device),
        "class_labels": torch.zeros(1, dtype=torch.long, device=m.device),
    }


def _ex_pixart(m: Any) -> tuple[tuple, dict]:
    c = m.config
    s = c.sample_size
    acond: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
    if m.use_additional_conditions:
        acond = {
            "resolution": torch.tensor([[s * 8.0, s * 8.0]], device=m.device),
            "aspect_ratio": torch.tensor([[1.0]], device=m.device),
        }
    return (_sample(m, c.in_channels, s),), {
        "encoder_hidden_states": torch.zeros(1, 4, c.caption_channels, dtype=m.dtype, device=m.device),
        "timestep": torch.tensor([1], device=m.device),
        "added_cond_kwargs": acond,
    }


def _ex_timm_dit(m: Any) -> tuple[tuple, dict]:
    p = next(m.parameters())
    x = torch.zeros(1, m.in_channels, m.input_size, m.input_size, dtype=p.dtype, device=p.device)
    return (x, torch.tensor([1.0], device=p.device), torch.zeros(1, dtype=torch.long, device=p.device)), {}


# Keyed by class name along the MRO, so subclasses inherit their parent's rule.
DEFAULT_BLOCKS: dict[str, BlockRule] = {
    "UNet2DModel": BlockRule(lambda: _diffusers_types("ResnetBlock2D", "Attention"), example=_ex_unet2d),
    "UNet2DConditionModel": BlockRule(
        lambda: _diffusers_types("ResnetBlock2D", "Transformer2DModel"), example=_ex_unet2dcond
    ),
    "DiTTransformer2DModel": BlockRule(
        lambda: _diffusers_types("Attention", "FeedForward"), "transformer_blocks.", _ex_dit
    ),
    "PixArtTransformer2DModel": BlockRule(
        lambda: _diffusers_types("Attention", "FeedForward"), "transformer_blocks.", _ex_pixart
    ),
    "DiT": BlockRule(_timm_types, "blocks.", _ex_timm_dit),  # maskc.models.DiT (timm layers)
}


def default_rule(model: torch.nn.Module) -> BlockRule | None:
    """The table entry for the nearest class in ``type(model).__mro__``, if any."""
    for cls in type(model).__mro__:
        rule = DEFAULT_BLOCKS.get(cls.__name__)
        if rule is not None:
            return rule
    return None


def _outermost(names: list[str]) -> list[str]:
    """Drop names contained in another selected name (blocks must not nest)."""
    chosen: list[str] = []
    for n in names:
        if not any(n.startswith(c + ".") for c in chosen):
            chosen.append(n)
    return chosen


def example_inputs(model: torch.nn.Module) -> tuple[tuple, dict] | None:
    """A batch-1 example call for a table backbone (used to order blocks), else None."""
    rule = default_rule(model)
    if rule is None or rule.example is None:
        return None
    return rule.example(model)


def execution_order(model: torch.nn.Module, names: Sequence[str], args: tuple, kwargs: dict) -> list[str]:
    """``names`` sorted by the order of their first call in ``model(*args, **kwargs)``."""
    modules = dict(model.named_modules())
    first: dict[str, int] = {}
    handles = []
    for n in names:
        def hook(_m: Any, _a: Any, n: str = n) -> None:
            first.setdefault(n, len(first))

        handles.append(modules[n].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in first]
    if missing:
        raise BlockError(
            f"blocks {missing[:3]} never run in a forward of {type(model).__name__}; "
            "expected every block to be called. Leave them out of the block list."
        )
    return sorted(names, key=first.__getitem__)


def select_blocks(
    model: torch.nn.Module,
    types: Iterable[type] | None = None,
    names: Iterable[str] | None = None,
    within: str | None = None,
) -> list[str]:
    """Qualified names of the blocks, in ``named_modules`` order, outermost only."""
    modules = dict(model.named_modules())
    if names is not None:
        names = list(names)
        for n in names:
            if n not in modules or n == "":
                raise BlockError(
                    f"{n!r} is not a submodule of {type(model).__name__}; expected names from "
                    "model.named_modules() such as " + ", ".join(repr(k) for k in list(modules)[1:4])
                )
        nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
        if nested:
            raise BlockError(
                f"block {nested[0][1]!r} lies inside block {nested[0][0]!r}; blocks must not nest. Keep one of them."
            )
        return names
    if types is None:
        rule = default_rule(model)
        if rule is None:
            # Fall back to timm DiT layers if the model is built from them.
            try:
                tt = _timm_types()
            except ImportError:
                tt = ()
            if tt and any(isinstance(m, tt) for m in modules.values()):
                rule = BlockRule(lambda: tt)
            else:
                raise BlockError(
                    f"maskc has no default blocks for {type(model).__name__}; "
                    "pass types=(...) or names=[...] to maskc.blocks (see the support matrix in the README)."
                )
        types = rule.types()
        within = rule.within if within is None else within
    types = tuple(types)
    within = within or ""
    found = [n for n, m in modules.items() if n and n.startswith(within) and isinstance(m, types)]
    if not found:
        raise BlockError(
            f"no module of types {[t.__name__ for t in types]} in {type(model).__name__}; "
            "pass other types or explicit names."
        )
    return _outermost(found)
