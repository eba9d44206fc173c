"""Public wrappers of the block-graph and rectification passes."""
from __future__ import annotations

from typing import Any, Sequence

import networkx as nx
import torch

from maskc.errors import MaskcError
from maskc.mask import Mask
from maskc.passes.blockgraph import block_macs, build_block_graph
from maskc.passes.capture import capture
from maskc.passes.rectify import RULES, Change, heuristic_bits, rectify_bits

__all__ = ["block_graph", "rectify", "Change", "RULES"]


def block_graph(model: torch.nn.Module, *example_args: Any, blocks: Sequence[str] | None = None,
                **example_kwargs: Any) -> nx.DiGraph:
    """networkx.DiGraph of data dependencies between blocks (plus "input" and "output").

    Traced on the example call (a batch-1 example is built for table backbones when
    none is given). Block nodes carry type, macs, shapes, bytes and order;
    ``graph.graph["total_macs"]`` is the whole model's MACs on the example.
    """
    from maskc.passes.blocks import example_inputs

    if not example_args and not example_kwargs:
        ex = example_inputs(model)
        if ex is None:
            raise MaskcError(
                f"no example inputs for {type(model).__name__}: call maskc.block_graph(model, *args, **kwargs) "
                "with one call's arguments"
            )
        example_args, example_kwargs = ex
    if blocks is None:
        from maskc import blocks as default_blocks

        blocks = default_blocks(model, example=(tuple(example_args), dict(example_kwargs)))
    blocks = list(blocks)
    cap = capture(model, blocks, tuple(example_args), dict(example_kwargs))
    macs, total = block_macs(model, blocks, tuple(example_args), dict(example_kwargs))
    g = build_block_graph(cap.gm, model, macs)
    g.graph["total_macs"] = total
    g.graph["backbone"] = type(model).__name__
    return g


def rectify(mask: Mask, graph: nx.DiGraph, exact: bool = True, rules: Sequence[str] = tuple(RULES)) -> Mask:
    """A mask with every dead execution turned off (and empty-cache reads fixed).

    ``exact=True`` (default) changes no output. ``exact=False`` first applies the
    heuristic ``rules`` (see ``maskc.RULES``), which trade fidelity for MACs, then
    the exact pass. The returned mask's ``changes`` lists every change and its reason.
    """
    bits = mask.bits
    changes: list[Change] = []
    if not exact:
        bits, changes = heuristic_bits(bits, mask.names, tuple(rules))
    out_bits, more = rectify_bits(bits, mask.names, graph)
    out = Mask(out_bits, mask.names, mask.meta)
    out.changes = changes + more  # type: ignore[attr-defined]
    prov = dict(out.meta.get("provenance", {}))
    prov["rectify"] = {
        "exact": exact,
        "rules": [] if exact else list(rules),
        "turned_off": sum(c.turned == "off" for c in out.changes),  # type: ignore[attr-defined]
        "turned_on": sum(c.turned == "on" for c in out.changes),  # type: ignore[attr-defined]
    }
    out.meta["provenance"] = prov
    return out
