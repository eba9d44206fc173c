"""Block graph: a capture -> a networkx.DiGraph of data dependencies between blocks.

Nodes are ``"input"``, ``"output"`` and every block name. There is an edge u -> v
iff v (or the output) reads, through any chain of non-block operations, a value
that u produced in the same forward (U-Net skip connections and DiT residual adds
included). No transitive reduction: if v reads u both directly and through w,
both edges u -> v and w -> v are there.

Node attributes of blocks: ``type`` (class name), ``macs`` (multiply-accumulates
from ``FlopCounterMode``, FLOPs / 2, when counted), ``shapes`` (shapes of the
output's tensors), ``bytes`` (their size), ``order`` (position in the forward).
"""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["build_block_graph", "block_macs"]


def block_macs(model: torch.nn.Module, blocks: list[str], args: tuple, kwargs: dict) -> tuple[dict[str, int], int]:
    """MACs of each block and of the whole model for one forward on the example."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(*args, **kwargs)
    counts = fc.get_flop_counts()
    root = type(model).__name__
    per = {b: sum(counts.get(f"{root}.{b}", {}).values()) // 2 for b in blocks}
    return per, fc.get_total_flops() // 2


def build_block_graph(gm: fx.GraphModule, model: torch.nn.Module, macs: dict[str, int] | None = None) -> nx.DiGraph:
    """The dependency graph of the blocks of a capture (see the module docstring)."""
    modules = dict(model.named_modules())
    g = nx.DiGraph()
    g.add_node("input", kind="input")
    g.add_node("output", kind="output")
    sources: dict[fx.Node, frozenset[str]] = {}
    order = 0
    for n in gm.graph.nodes:
        ins: frozenset[str] = frozenset().union(*(sources[a] for a in n.all_input_nodes)) if n.all_input_nodes else frozenset()
        if n.op == "placeholder":
            sources[n] = frozenset({"input"})
        elif n.op == "output":
            for s in ins:
                g.add_edge(s, "output")
        elif "maskc_block" in n.meta:
            b = n.meta["maskc_block"]
            attrs: dict[str, Any] = {
                "kind": "block",
                "type": type(modules[b]).__name__,
                "shapes": n.meta.get("maskc_out_shapes", []),
                "bytes": n.meta.get("maskc_out_bytes", 0),
                "order": order,
            }
            if macs is not None:
                attrs["macs"] = macs.get(b, 0)
            order += 1
            g.add_node(b, **attrs)
            for s in ins:
                g.add_edge(s, b)
            sources[n] = frozenset({b})
        else:
            sources[n] = ins
    return g
