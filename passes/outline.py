"""Outline: a Dynamo graph (modules inlined) -> a block-granular graph, each block one node.

``torch.compile`` hands a backend a graph in which every module call is inlined: the
operations of a block are ordinary nodes, tagged with ``node.meta["nn_module_stack"]``
(the module path of every enclosing module). This pass groups, for each block in
``blocks``, the nodes whose stack contains that block's path into one partition and
fuses each partition into a ``call_module`` node (``torch.fx.passes.utils.fuser_utils``),
so that the graph has the form ``passes.capture`` produces and the same ``rewrite`` and
``schedule`` passes apply to it unchanged.

Invariants of the result:
- it computes what the input graph computes (the fused submodules hold the same nodes);
- every block found is exactly one ``call_module`` node with ``meta["maskc_block"]`` set
  to the block's name, returning one value (a tensor or a tuple of the block's values
  that the rest of the graph reads);
- ``block_nodes`` maps each block found, in graph order, to its node's name; blocks of
  ``blocks`` that the graph does not contain (e.g. on the other side of a graph break)
  are absent from it.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch.fx as fx
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

__all__ = ["module_path", "outline_blocks"]

_PREFIX = "maskc_block_"


def module_path(dynamo_path: str) -> str:
    """Dynamo's module path (``L['self'].__dict__['_modules']['down_blocks'].0``) as a qualified name."""
    s = re.sub(r"^L\['[^']*'\]", "", dynamo_path)
    s = s.replace(".__dict__['_modules']", "").replace("._modules", "")
    s = re.sub(r"\['([^']+)'\]", r".\1", s)
    s = re.sub(r"\[(\d+)\]", r".\1", s)
    return s.strip(".")


def _block_of(node: fx.Node, wanted: set[str]) -> str | None:
    """The outermost block of ``wanted`` among the modules enclosing ``node``."""
    for path, _type in (node.meta.get("nn_module_stack") or {}).values():
        name = module_path(path)
        if name in wanted:
            return name
    return None


def outline_blocks(gm: fx.GraphModule, blocks: Iterable[str]) -> tuple[fx.GraphModule, dict[str, str]]:
    """Fuse each block's nodes of ``gm`` (in place) into one ``call_module`` node; return (gm, block_nodes)."""
    wanted = set(blocks)
    parts: dict[str, dict[fx.Node, None]] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        b = _block_of(n, wanted)
        if b is not None:
            parts.setdefault(b, {})[n] = None
    names = list(parts)
    if names:
        fuse_by_partitions(gm, [parts[b] for b in names], prefix=_PREFIX)
    block_nodes: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(n.target, str) and n.target.startswith(_PREFIX):
            b = names[int(n.target[len(_PREFIX):])]
            n.meta["maskc_block"] = b
            block_nodes[b] = n.name
    gm.recompile()
    return gm, block_nodes
