"""Segments: the glue of a step graph (the nodes between block calls) fused into one call per run.

A step graph alternates glue and blocks. With ``compile_unit="block"`` the blocks are
compiled once and shared by every step; the glue around them (a DiT's adaLN modulation,
gates and residual adds, a U-Net's time embedding) would run op by op in eager. This pass
cuts the glue into *runs*: the nodes between two consecutive block calls in graph order
(placeholders and ``get_attr`` nodes excluded: they become inputs of the run). Given the
positions of the full graph (``glue_positions`` of the capture, every block present), a
run is also cut where a skipped block stood, so that a step's glue is made of the same
pieces whatever it skips (fewer distinct programs to compile). Each run
with at least ``min_ops`` operations becomes one ``call_module`` node whose submodule is
the run as its own GraphModule, and its values that the rest of the graph reads come back
through ``getitem``.

Invariants of the result:
- it computes what the input graph computes (each run's nodes, in their order, moved into
  its submodule; every value the rest of the graph reads is returned);
- block nodes (``meta["maskc_block"]``), placeholders, ``get_attr`` nodes and the output
  node are kept as they are;
- a run's submodule is in canonical form: inputs ``x0, x1, ...`` in order of first use,
  values ``v0, v1, ...``, submodules ``m0, m1, ...`` and it always returns a tuple; two runs
  that do the same operations on different modules of the same structure (layer 3's and
  layer 4's adaLN glue) have the same ``code``, which is what lets a compiler share one
  compiled program between them, with the modules' weights as its inputs.
"""
from __future__ import annotations

import operator
from typing import Any, Mapping

import torch.fx as fx

__all__ = ["fuse_glue", "glue_positions", "GLUE_PREFIX"]

GLUE_PREFIX = "maskc_glue_"

_FREE = {operator.getitem, getattr}  # bookkeeping, not work: does not count toward min_ops


def glue_positions(graph: fx.Graph) -> dict[str, int]:
    """Node name -> how many block calls precede it in ``graph`` (a capture, every block present)."""
    pos, k = {}, 0
    for n in graph.nodes:
        if "maskc_block" in n.meta:
            k += 1
        pos[n.name] = k
    return pos


def _runs(graph: fx.Graph, positions: Mapping[str, int] | None) -> list[list[fx.Node]]:
    runs: list[list[fx.Node]] = [[]]
    at = None
    for n in graph.nodes:
        if "maskc_block" in n.meta:
            runs.append([])
        elif n.op not in ("placeholder", "get_attr", "output"):
            p = positions.get(n.name) if positions is not None else None
            if p != at and runs[-1]:
                runs.append([])
            at = p
            runs[-1].append(n)
    return [r for r in runs if r]


def _work(run: list[fx.Node]) -> int:
    return sum(1 for n in run if not (n.op == "call_function" and n.target in _FREE))


def _canonical(gm: fx.GraphModule, run: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {x: g.placeholder(f"x{j}") for j, x in enumerate(inputs)}
    mods: dict[str, str] = {}
    root: dict[str, Any] = {}
    for j, n in enumerate(run):
        target = n.target
        if n.op == "call_module":
            assert isinstance(target, str)
            if target not in mods:
                mods[target] = f"m{len(mods)}"
                root[mods[target]] = gm.get_submodule(target)
            target = mods[target]
        env[n] = g.create_node(n.op, target, fx.map_arg(n.args, env.__getitem__), fx.map_arg(n.kwargs, env.__getitem__),
                               name=f"v{j}", type_expr=n.type)
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(root, g, class_name="MaskcGlueRun")


def fuse_glue(gm: fx.GraphModule, min_ops: int = 3, positions: Mapping[str, int] | None = None,
              ) -> tuple[fx.GraphModule, dict[str, fx.GraphModule]]:
    """Fuse each glue run of ``gm`` (in place) with at least ``min_ops`` operations into one call;
    with ``positions`` (``glue_positions`` of the graph ``gm`` was cut from), runs also end where
    the position changes.

    Returns ``(gm, runs)``: ``runs`` maps each new ``call_module`` target to the run's
    canonical GraphModule, which ``gm`` holds under that name.
    """
    graph = gm.graph
    fused: dict[str, fx.GraphModule] = {}
    for run in _runs(graph, positions):
        if _work(run) < min_ops:
            continue
        members = set(run)
        inputs: dict[fx.Node, None] = {}
        for n in run:
            for a in n.all_input_nodes:
                if a not in members:
                    inputs.setdefault(a, None)
        outputs = [n for n in run if any(u not in members for u in n.users)]
        if not outputs:  # dead glue (nothing reads it): fx dead-code elimination's business, not ours
            continue
        sub = _canonical(gm, run, list(inputs), outputs)
        target = f"{GLUE_PREFIX}{len(fused)}"
        gm.add_submodule(target, sub)
        fused[target] = sub
        with graph.inserting_after(run[-1]):
            call = graph.call_module(target, tuple(inputs))
        last = call
        for j, o in enumerate(outputs):
            with graph.inserting_after(last):
                last = graph.call_function(operator.getitem, (call, j))
            o.replace_all_uses_with(last, delete_user_cb=lambda u: u not in members)
        for n in reversed(run):
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
    return gm, fused
