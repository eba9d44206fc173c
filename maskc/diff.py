"""The graph diff page: step i of a compiled mask against the original model, as one HTML file.

``diff(model, mask, step=i)`` captures the model once (``passes.capture``), plans every
step (``passes.schedule``), counts MACs per step with ``FlopCounterMode`` and writes a
page with three parts:

1. the block level: the block graph (``passes.blockgraph``, skip and residual edges
   included) laid out in execution order (x) and resolution (y, so a U-Net draws a U),
   every block marked as running, read from the cache or removed as dead code, and the
   glue between blocks marked as kept or removed;
2. the fx node-level diff of step i's GraphModule against the capture's graph: nodes
   removed, cache placeholders added, values written for later steps;
3. the T x B mask as a heatmap beside the MACs and cache bytes of every step.

Invariants of the page:
- it loads nothing: no scripts, fonts, images or style sheets from anywhere; pictures
  are matplotlib SVG inlined with text kept as ``<text>`` and metadata stripped;
- every block of the mask has exactly one status at step i, in the picture (SVG
  element id ``block:<status>:<name>``) and in the block table (``data-status``):
  ``runs`` (mask bit 1, executes), ``cached`` (mask bit 0: the network sees its cached
  value; ``data-read`` says whether this step's graph still reads it) or ``dead``
  (mask bit 1, but dead-code elimination removed it: its output reaches neither the
  outputs nor a later step).
"""
from __future__ import annotations

import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from maskc.errors import MaskcError
from maskc.mask import Mask
from maskc.passes.blockgraph import block_macs, build_block_graph
from maskc.passes.blocks import example_inputs
from maskc.passes.capture import Capture, capture, flatten_inputs
from maskc.passes.schedule import Schedule, cache_timeline, schedule

__all__ = ["diff", "analyze", "Analysis", "StepRow", "RUNS", "CACHED", "DEAD"]

RUNS, CACHED, DEAD = "runs", "cached", "dead"
COLORS = {RUNS: "#1f77b4", CACHED: "#ff7f0e", DEAD: "#ffffff", "glue": "#9e9e9e", "glue-removed": "#d62728"}


@dataclass
class StepRow:
    """What step i of a compiled mask does: blocks run, cache reads and writes, MACs, cache bytes."""

    step: int
    timestep: float | None
    runs: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    macs: int  # FlopCounterMode FLOPs / 2 of this step's module on the example
    cache_bytes: int  # bytes the cache holds during the step
    same_as: int  # the first step that shares this step's module (== step if none earlier)


@dataclass
class Analysis:
    """One capture of a model under a mask, planned for every step and measured."""

    model_name: str
    mask: Mask
    capture: Capture
    schedule: Schedule
    rows: list[StepRow]
    original_macs: int  # one forward of the original model on the example
    block_macs: dict[str, int]
    block_bytes: dict[str, int]
    graph: Any  # networkx.DiGraph of the blocks (passes.blockgraph)
    example_desc: str
    all_blocks_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def status(self, i: int) -> dict[str, str]:
        """Each block's status at step i: runs, cached or dead (see the module docstring)."""
        sg = self.schedule.steps[i]
        run = set(sg.runs)
        row = self.mask.bits[i].tolist()
        return {b: (CACHED if not on else RUNS if b in run else DEAD) for b, on in zip(self.mask.names, row)}


def _example(model: torch.nn.Module, example: tuple[tuple, dict] | None) -> tuple[tuple, dict]:
    if example is not None:
        args, kwargs = example
        return tuple(args), dict(kwargs)
    ex = example_inputs(model)
    if ex is None:
        raise MaskcError(
            f"no example inputs for {type(model).__name__}: pass example=(args, kwargs), the arguments of one "
            "model call (batch 1 is enough)"
        )
    return ex


def _describe(args: tuple, kwargs: dict) -> str:
    def d(v: Any) -> str:
        return f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
    parts = [d(a) for a in args] + [f"{k}={d(v)}" for k, v in kwargs.items() if v is not None]
    return ", ".join(parts)


def analyze(model: torch.nn.Module, mask: Mask, example: tuple[tuple, dict] | None = None,
            progress: bool = False) -> Analysis:
    """Capture ``model`` once on ``example``, plan ``mask``'s steps and count each step's MACs.

    Steps run in order with the cache the previous steps leave (the runtime's calling
    convention, ``passes.rewrite``); each distinct step module is counted once under
    ``FlopCounterMode``, and a step whose module was counted and writes nothing is not run.
    """
    mask.check(model)
    args, kwargs = _example(model, example)
    cap = capture(model, mask.names, args, kwargs)
    sched = schedule(cap, mask.bits, mask.names)
    per_block, total = block_macs(model, mask.names, args, kwargs)
    g = build_block_graph(cap.gm, model, per_block)
    nbytes = {n.meta["maskc_block"]: int(n.meta.get("maskc_out_bytes", 0)) for n in cap.gm.graph.nodes
              if "maskc_block" in n.meta}
    timeline = cache_timeline(sched, nbytes)
    leaves, _ = flatten_inputs(cap.signature, args, kwargs)
    tensors = [leaves[j] for j in cap.tensor_leaf_index]
    ts = mask.meta.get("timesteps")
    cache: dict[str, Any] = {}
    first: dict[int, int] = {}
    macs: dict[int, int] = {}  # id of a distinct step module -> its MACs
    rows: list[StepRow] = []
    steps: Any = range(mask.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="MACs per step", unit="step", leave=False)
    with torch.no_grad():
        for i in steps:
            sg = sched.steps[i]
            if id(sg) not in macs or sg.writes:  # a module already counted that writes nothing needs no run
                inputs = (*tensors, *[cache[b] for b in sg.reads])
                if id(sg) in macs:
                    out = sg.gm(*inputs)
                else:
                    with FlopCounterMode(display=False) as fc:
                        out = sg.gm(*inputs)
                    macs[id(sg)] = fc.get_total_flops() // 2
                for b, v in zip(sg.writes, out[sg.n_outputs:]):
                    cache[b] = v
            for b in sched.drop_after[i]:
                cache.pop(b, None)
            rows.append(StepRow(i, float(ts[i]) if ts and i < len(ts) else None, sg.runs, sg.reads, sg.writes,
                                macs[id(sg)], timeline[i], first.setdefault(id(sg), i)))
    return Analysis(type(model).__name__, mask, cap, sched, rows, total, per_block, nbytes, g,
                    _describe(args, kwargs), all_blocks_bytes=sum(nbytes.values()))


# -- the block level ---------------------------------------------------------------------------

@dataclass
class _Item:
    kind: str  # "block" or "glue"
    name: str  # block name, or the glue's module (common prefix of its nodes' modules)
    nodes: list[str]  # fx node names
    x: float = 0.0
    y: float = 0.0
    removed: int = 0  # glue nodes removed at the step


def _module_of(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        v = list(stack.values())[-1]
        return v[0] if isinstance(v, tuple) else str(v)
    return str(n.target) if n.op == "call_module" else ""


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return "(top level)"
    out = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        out.append(xs[0])
    return ".".join(out) or "(top level)"


def _items(cap: Capture) -> list[_Item]:
    """Blocks and the glue segments between them, in the capture's (execution) order."""
    items: list[_Item] = []
    glue: list[fx.Node] = []

    def flush() -> None:
        if glue:
            items.append(_Item("glue", _common_prefix([_module_of(n) for n in glue]), [n.name for n in glue]))
            glue.clear()

    for n in cap.gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if "maskc_block" in n.meta:
            flush()
            items.append(_Item("block", n.meta["maskc_block"], [n.name]))
        else:
            glue.append(n)
    flush()
    return items


def short_names(names: list[str]) -> dict[str, str]:
    """Compact labels: the first letter of each word and every number (``up_blocks.2.attentions.0`` -> ``u2a0``)."""
    out = {n: "".join(p if p.isdigit() else p[:1] for p in n.split(".")) for n in names}
    if len(set(out.values())) != len(out):
        return {n: n for n in names}
    return out


def _legend_words(names: list[str]) -> str:
    words: dict[str, set[str]] = {}
    for n in names:
        for p in n.split("."):
            if not p.isdigit():
                words.setdefault(p[:1], set()).add(p)
    return ", ".join(f"{k} = {'/'.join(sorted(v))}" for k, v in sorted(words.items()))


def _levels(an: Analysis, items: list[_Item]) -> None:
    """x: execution order; y: resolution level (log2 of the largest spatial size over this one)."""
    sizes = {}
    for it in items:
        if it.kind == "block":
            shapes = an.graph.nodes[it.name].get("shapes") or []
            s = shapes[0] if shapes else ()
            sizes[it.name] = s[-1] if len(s) == 4 else None
    known = [v for v in sizes.values() if v]
    top = max(known) if known else None
    ys: list[float | None] = []
    for it in items:
        if it.kind == "block" and top and sizes.get(it.name):
            ys.append(-math.log2(top / sizes[it.name]))
        elif it.kind == "block":
            ys.append(0.0)
        else:
            ys.append(None)
    for k, it in enumerate(items):  # glue sits between its neighbouring blocks
        it.x = float(k)
        if ys[k] is None:
            prev = next((ys[j] for j in range(k - 1, -1, -1) if ys[j] is not None), None)
            nxt = next((ys[j] for j in range(k + 1, len(items)) if ys[j] is not None), None)
            vals = [v for v in (prev, nxt) if v is not None]
            ys[k] = sum(vals) / len(vals) if vals else 0.0
        it.y = float(ys[k])  # type: ignore[arg-type]


def _svg(fig: Any) -> str:
    """The figure as inline SVG: no XML header, doctype or metadata; text kept as text."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None, "Format": None,
                                                                  "Type": None})
    s = buf.getvalue()
    s = re.sub(r"<\?xml[^>]*\?>", "", s)
    s = re.sub(r"<!DOCTYPE[^>]*>", "", s)
    s = re.sub(r"<metadata>.*?</metadata>", "", s, flags=re.S)
    return s.strip()


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise MaskcError(
            "maskc.diff draws its pictures with matplotlib, which is not installed; "
            "pip install matplotlib (or pip install 'maskc[viz]') and run it again"
        ) from None
    return matplotlib, Figure


def _block_figure(an: Analysis, i: int, items: list[_Item], labels: dict[str, str]) -> str:
    import networkx as nx

    matplotlib, Figure = _matplotlib()
    status = an.status(i)
    sg = an.schedule.steps[i]
    reads = set(sg.reads)
    writes = set(sg.writes)
    kept = {n.name for n in sg.gm.graph.nodes}
    for it in items:
        if it.kind == "glue":
            it.removed = sum(n not in kept for n in it.nodes)
    pos = {it.name if it.kind == "block" else f"glue:{k}": (it.x, it.y) for k, it in enumerate(items)}
    first_y = items[0].y if items else 0.0
    last_y = items[-1].y if items else 0.0
    pos["input"] = (-1.2, first_y)
    pos["output"] = (len(items) + 0.2, last_y)
    g = an.graph
    depth = -min((it.y for it in items), default=0.0)
    blocks = [b for b in an.mask.names if b in g]
    order = {b: g.nodes[b].get("order", 0) for b in blocks}
    # Edges from the block graph; the input's edges only to blocks that no other block feeds.
    fresh, from_cache, unused = [], [], []
    for u, v in g.edges():
        if u == "input" and any(p != "input" for p in g.predecessors(v)):
            continue
        if not (v == "output" or status.get(v) == RUNS):
            unused.append((u, v))
        elif u != "input" and status.get(u) == CACHED:
            from_cache.append((u, v))
        else:
            fresh.append((u, v))
    # Skip edges bow upwards; the axes grow to hold the highest arc (arc3's peak is rad/2 of the chord).
    sx, sy = 0.36, 0.95  # inches per item, per resolution level
    rad = {}
    top = 0.35
    for u, v in fresh + from_cache + unused:
        if not _adjacent((u, v), order):
            (x0, y0), (x1, y1) = pos[u], pos[v]
            chord = math.hypot((x1 - x0) * sx, (y1 - y0) * sy)
            rad[(u, v)] = -min(0.3, 1.2 / max(chord, 1e-6))
            top = max(top, max(y0, y1) + 0.5 * abs(rad[(u, v)]) * chord / sy + 0.1)
    bottom = -depth - 0.55
    width = sx * (len(items) + 2.6)
    height = sy * (top - bottom)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "maskc", "font.size": 8}):
        fig = Figure(figsize=(width, height))
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_axis_off()

        def draw(edges: list, color: str, style: str, width_: float, alpha: float) -> None:
            for e in edges:
                nx.draw_networkx_edges(g, pos, edgelist=[e], ax=ax, edge_color=color, style=style, width=width_,
                                       alpha=alpha, arrows=True, arrowsize=7,
                                       connectionstyle=f"arc3,rad={rad.get(e, 0.0):.4f}",
                                       node_size=260, min_source_margin=6, min_target_margin=6)

        draw(unused, "#c8c8c8", "dotted", 0.8, 0.9)
        draw(fresh, "#404040", "solid", 0.9, 0.8)
        draw(from_cache, COLORS[CACHED], "dashed", 1.5, 1.0)
        # Glue segments between blocks: small diamonds, red when dead-code elimination removed them.
        for k, it in enumerate(items):
            if it.kind != "glue":
                continue
            gone = it.removed == len(it.nodes)
            some = 0 < it.removed < len(it.nodes)
            c = nx.draw_networkx_nodes(
                nx.empty_graph([f"glue:{k}"]), pos, ax=ax, node_shape="D", node_size=45,
                node_color="#ffffff" if gone else COLORS["glue"],
                edgecolors=COLORS["glue-removed"] if (gone or some) else COLORS["glue"], linewidths=1.4)
            c.set_gid(f"glue:{'removed' if gone else 'partly-removed' if some else 'kept'}:{k}")
        # Blocks: one collection each, so each carries its name and status in its SVG id.
        for b in blocks:
            st = status[b]
            face = {RUNS: COLORS[RUNS], CACHED: COLORS[CACHED], DEAD: COLORS[DEAD]}[st]
            c = nx.draw_networkx_nodes(nx.empty_graph([b]), pos, ax=ax, node_shape="s", node_size=260,
                                       node_color=face, edgecolors="#202020" if st != DEAD else "#9e9e9e",
                                       linewidths=1.6 if b in writes else 0.6,
                                       alpha=0.45 if st == CACHED and b not in reads else 1.0)
            if st == DEAD:
                c.set_hatch("xxx")
            c.set_gid(f"block:{st}:{b}")
            x, y = pos[b]
            ax.text(x, y - 0.22, labels[b], ha="center", va="top", fontsize=6.5, color="#202020")
        for n, txt in (("input", "in"), ("output", "out")):
            nx.draw_networkx_nodes(nx.empty_graph([n]), pos, ax=ax, node_shape="o", node_size=110,
                                   node_color="#202020")
            ax.text(pos[n][0], pos[n][1] - 0.22, txt, ha="center", va="top", fontsize=7)
        ax.set_xlim(-1.8, len(items) + 0.8)
        ax.set_ylim(bottom, top)
        svg = _svg(fig)
    return svg


def _adjacent(e: tuple[str, str], order: dict[str, int]) -> bool:
    u, v = e
    if u == "input" or v == "output":
        return True
    return order.get(v, 0) - order.get(u, 0) == 1


# -- the mask heatmap ----------------------------------------------------------------------------

def _mask_figure(an: Analysis, i: int, labels: dict[str, str]) -> str:
    import numpy as np

    matplotlib, Figure = _matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    T, B = an.mask.bits.shape
    grid = np.zeros((T, B))
    for t in range(T):
        st = an.status(t)
        grid[t] = [{CACHED: 0, RUNS: 1, DEAD: 2}[st[b]] for b in an.mask.names]
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "maskc", "font.size": 8}):
        fig = Figure(figsize=(max(6.0, 0.22 * B + 4.0), 1.4 + 0.2 * T))
        gs = fig.add_gridspec(1, 3, width_ratios=[max(3.0, 0.22 * B), 1.3, 1.3], wspace=0.08)
        ax = fig.add_subplot(gs[0])
        cmap = ListedColormap([COLORS[CACHED], COLORS[RUNS], "#e0e0e0"])
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=2, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(B), [labels[b] for b in an.mask.names], rotation=90, fontsize=6.5)
        ylab = [f"{t}" + (f" (t={an.rows[t].timestep:g})" if an.rows[t].timestep is not None else "") for t in range(T)]
        ax.set_yticks(range(T), ylab, fontsize=6.5)
        ax.set_ylabel("step")
        ax.add_patch(Rectangle((-0.5, i - 0.5), B, 1, fill=False, edgecolor="black", linewidth=2.0))
        ax.set_title("mask: blue runs, orange cached, grey dead code", fontsize=8)
        frac = [r.macs / an.original_macs if an.original_macs else 0.0 for r in an.rows]
        a1 = fig.add_subplot(gs[1], sharey=ax)
        a1.barh(range(T), frac, color=[COLORS[RUNS] if t != i else "#0b3d66" for t in range(T)], height=0.8)
        a1.set_xlim(0, max(1.0, max(frac, default=1.0)) * 1.05)
        a1.set_title("MACs (x original)", fontsize=8)
        a1.tick_params(labelleft=False)
        kib = [r.cache_bytes / 1024 for r in an.rows]
        a2 = fig.add_subplot(gs[2], sharey=ax)
        a2.barh(range(T), kib, color=[COLORS[CACHED] if t != i else "#8a3b00" for t in range(T)], height=0.8)
        a2.set_title("cache KiB held", fontsize=8)
        a2.tick_params(labelleft=False)
        for a in (a1, a2):
            a.grid(axis="x", color="#e8e8e8")
            a.set_axisbelow(True)
        svg = _svg(fig)
    return svg


# -- the node-level diff ---------------------------------------------------------------------------

def _node_diff(an: Analysis, i: int) -> tuple[str, dict[str, int]]:
    sg = an.schedule.steps[i]
    status = an.status(i)
    kept = {n.name for n in sg.gm.graph.nodes}
    added = {n.meta["maskc_read"]: n for n in sg.gm.graph.nodes if "maskc_read" in n.meta}
    writes = set(sg.writes)
    lines: list[tuple[str, str, str, str]] = []  # (css class, sign, tag, text)
    counts = {"original": 0, "step": len(kept), "glue_removed": 0, "blocks_cached": 0, "blocks_dead": 0,
              "placeholders": len(added), "writes": len(writes)}
    for n in an.capture.gm.graph.nodes:
        counts["original"] += 1
        txt = n.format_node() or n.name
        b = n.meta.get("maskc_block")
        if n.op == "output":
            new_out = next(m for m in sg.gm.graph.nodes if m.op == "output")
            if writes:
                lines.append(("del", "-", "", txt))
                lines.append(("add write", "+", "writes", f"{new_out.format_node()}    # then {', '.join(sg.writes)}"))
            else:
                lines.append(("keep", " ", "", txt))
        elif b is not None and status.get(b) == CACHED:
            counts["blocks_cached"] += 1
            if b in added:
                lines.append(("del cached", "-", "skipped", txt))
                lines.append(("add read", "+", "cache read", f"{added[b].format_node()}    # {b}'s cached value"))
            else:
                lines.append(("del cached", "-", "skipped", f"{txt}    # its cached value is not read at this step"))
        elif b is not None and status.get(b) == DEAD:
            counts["blocks_dead"] += 1
            lines.append(("del dead", "-", "dead block", txt))
        elif n.name not in kept:
            counts["glue_removed"] += 1
            lines.append(("del dead", "-", "dead glue", txt))
        elif b is not None and b in writes:
            lines.append(("keep write", " ", "writes", f"{txt}    # returned for a later step"))
        else:
            lines.append(("keep", " ", "", txt))
    out = "".join(f'<span class="{c}">{s} {t:<10} {html.escape(x)}</span>' for c, s, t, x in lines)
    return out, counts


# -- the page ------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#202020;max-width:1500px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 6px;border-bottom:1px solid #ddd}
.sub{color:#555;margin:0 0 12px}.fig{overflow-x:auto}.fig svg{max-width:100%;height:auto}
.legend span{display:inline-block;margin-right:16px;font-size:13px}
.sw{display:inline-block;width:12px;height:12px;margin-right:5px;vertical-align:-1px;border:1px solid #333}
.sw.runs{background:#1f77b4}.sw.cached{background:#ff7f0e}
.sw.dead{background:repeating-linear-gradient(45deg,#fff 0 2px,#999 2px 3px);border-color:#999}
.sw.glue{background:#9e9e9e;transform:rotate(45deg);width:9px;height:9px;border-color:#9e9e9e}
.sw.glue-removed{background:#fff;transform:rotate(45deg);width:9px;height:9px;border:2px solid #d62728}
.sw.glue-partly{background:#9e9e9e;transform:rotate(45deg);width:9px;height:9px;border:2px solid #d62728}
.sw.fresh{height:0;border:0;border-top:2px solid #404040;width:18px;vertical-align:3px}
.sw.fromcache{height:0;border:0;border-top:2px dashed #ff7f0e;width:18px;vertical-align:3px}
.sw.unused{height:0;border:0;border-top:2px dotted #bbb;width:18px;vertical-align:3px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr[data-status=runs] td.st{color:#1f77b4;font-weight:600}tr[data-status=cached] td.st{color:#c25400;font-weight:600}
tr[data-status=dead] td.st{color:#777;font-weight:600}tr.cur{background:#fff3cd}
pre.diff{font-size:11.5px;line-height:1.35;background:#fafafa;border:1px solid #e4e4e4;padding:8px;overflow-x:auto}
pre.diff span{display:block;white-space:pre}
.del{background:#fde8e8;color:#8b1a1a}.del.cached{background:#fff0e0;color:#8a3b00}
.add{background:#e6f4ea;color:#135e26}.keep{color:#333}.keep.write{background:#eef4fb;color:#0b3d66}
"""


def _fmt_macs(m: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if m >= div:
            return f"{m / div:.2f}{unit}"
    return f"{m:.0f}"


def _fmt_bytes(b: float) -> str:
    for unit, div in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b:.0f} B"


def _read_from(mask: Mask, i: int, b: int) -> int | None:
    col = mask.bits[:i, b].tolist()
    for j in range(len(col) - 1, -1, -1):
        if col[j]:
            return j
    return None


def render(an: Analysis, i: int) -> str:
    """The page of step i (a string of self-contained HTML)."""
    mask = an.mask
    esc = html.escape
    labels = short_names(mask.names)
    items = _items(an.capture)
    _levels(an, items)
    block_svg = _block_figure(an, i, items, labels)
    mask_svg = _mask_figure(an, i, labels)
    diff_html, counts = _node_diff(an, i)
    status = an.status(i)
    sg = an.schedule.steps[i]
    row = an.rows[i]
    n_st = {s: sum(v == s for v in status.values()) for s in (RUNS, CACHED, DEAD)}
    gen = sum(r.macs for r in an.rows) / (an.original_macs * len(an.rows)) if an.original_macs else 0.0
    glue_removed = sum(it.removed for it in items if it.kind == "glue")
    tstr = f", timestep {row.timestep:g}" if row.timestep is not None else ""
    prov = mask.meta.get("provenance", {}).get("method")
    h: list[str] = []
    h.append(f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>maskc diff: {esc(an.model_name)} "
             f"step {i}</title><style>{_CSS}</style></head><body>")
    h.append(f"<h1>maskc diff: {esc(an.model_name)}, step {i} of {mask.steps}{tstr}</h1>")
    h.append(f'<p class=sub>mask: {mask.steps} steps &times; {len(mask.names)} blocks'
             + (f", {esc(str(prov))}" if prov else "")
             + f"; traced on example ({esc(an.example_desc)}). "
             f"This step: <b>{n_st[RUNS]}</b> blocks run, <b>{n_st[CACHED]}</b> read from the cache "
             f"({len(sg.reads)} of them still read by this step's graph), <b>{n_st[DEAD]}</b> removed as dead, "
             f"{glue_removed} glue nodes removed; <b>{_fmt_macs(row.macs)}</b> MACs "
             f"({row.macs / an.original_macs if an.original_macs else 0:.3f} of the original's "
             f"{_fmt_macs(an.original_macs)}); cache holds {_fmt_bytes(row.cache_bytes)}. "
             f"Whole generation: {gen:.3f} of the original's MACs; peak cache "
             f"{_fmt_bytes(max((r.cache_bytes for r in an.rows), default=0))} "
             f"(caching every block: {_fmt_bytes(an.all_blocks_bytes)}).</p>")
    h.append("<h2>1. Blocks at this step against the original</h2>")
    h.append('<p class=legend><span><i class="sw runs"></i>block runs</span>'
             '<span><i class="sw cached"></i>block read from the cache (faded: not read by this step)</span>'
             '<span><i class="sw dead"></i>block removed as dead code</span>'
             '<span><i class="sw glue"></i>glue kept</span><span><i class="sw glue-partly"></i>glue partly removed</span>'
             '<span><i class="sw glue-removed"></i>glue removed as dead code</span><span><i class="sw fresh"></i>value computed at this step</span>'
             '<span><i class="sw fromcache"></i>value read from the cache</span>'
             '<span><i class="sw unused"></i>edge unused at this step</span></p>')
    h.append(f"<p class=sub>x: execution order; y: resolution (deeper is smaller). Edges are the block graph's data "
             f"dependencies, skip connections and residuals included (arcs); edges from the input go only to blocks "
             f"no other block feeds. Thick outline: written to the cache for a later step. Labels: "
             f"{esc(_legend_words(mask.names))}.</p>")
    h.append(f'<div class=fig id=blocks>{block_svg}</div>')
    h.append("<table id=block-table><tr><th>#</th><th>block</th><th>label</th><th>type</th><th>at this step</th>"
             "<th class=n>MACs / call</th><th>output</th><th>note</th></tr>")
    for j, b in enumerate(mask.names):
        st = status[b]
        node = an.graph.nodes[b] if b in an.graph else {}
        if st == CACHED:
            src = _read_from(mask, i, j)
            note = (f"value of step {src}" if src is not None else "cache empty") + (
                "" if b in sg.reads else "; not read at this step")
        elif st == RUNS:
            note = "written for a later step" if b in sg.writes else ""
        else:
            note = "output reaches neither the outputs nor a later step"
        shapes = ", ".join(str(list(s)) for s in node.get("shapes", []))
        h.append(f'<tr data-block="{esc(b)}" data-status="{st}" data-read="{"yes" if b in sg.reads else "no"}">'
                 f"<td class=n>{j}</td><td><code>{esc(b)}</code></td><td>{esc(labels[b])}</td>"
                 f"<td>{esc(str(node.get('type', '')))}</td><td class=st>{st}</td>"
                 f"<td class=n>{_fmt_macs(an.block_macs.get(b, 0))}</td><td>{esc(shapes)}</td><td>{esc(note)}</td></tr>")
    h.append("</table>")
    h.append("<h2>2. fx node-level diff: step graph against the capture</h2>")
    h.append(f"<p class=sub>The capture has {counts['original']} nodes, step {i}'s GraphModule {counts['step']}. "
             f"Removed: {counts['blocks_cached']} skipped blocks, {counts['blocks_dead']} dead blocks, "
             f"{counts['glue_removed']} dead glue nodes. Added: {counts['placeholders']} cache placeholders. "
             f"Written for later steps: {counts['writes']} values (extra outputs).</p>")
    h.append(f'<pre class=diff id=node-diff>{diff_html}</pre>')
    h.append("<h2>3. The mask, MACs and cache per step</h2>")
    h.append(f'<div class=fig id=mask>{mask_svg}</div>')
    h.append("<table id=step-table><tr><th class=n>step</th><th class=n>timestep</th><th class=n>runs</th>"
             "<th class=n>cache reads</th><th class=n>writes</th><th class=n>MACs</th><th class=n>x original</th>"
             "<th class=n>cache held</th><th>module</th></tr>")
    for r in an.rows:
        same = "" if r.same_as == r.step else f"same as step {r.same_as}"
        frac = r.macs / an.original_macs if an.original_macs else 0.0
        ts = f"{r.timestep:g}" if r.timestep is not None else ""
        h.append(f'<tr class="{"cur" if r.step == i else ""}"><td class=n>{r.step}</td><td class=n>{ts}</td>'
                 f"<td class=n>{len(r.runs)}</td><td class=n>{len(r.reads)}</td><td class=n>{len(r.writes)}</td>"
                 f"<td class=n>{_fmt_macs(r.macs)}</td><td class=n>{frac:.3f}</td>"
                 f"<td class=n>{_fmt_bytes(r.cache_bytes)}</td><td>{same}</td></tr>")
    h.append("</table><p class=sub>MACs: FlopCounterMode FLOPs / 2 of each step's module on the example, glue that "
             "died with skipped blocks counted as saved. Cache: bytes held during the step (only values a later "
             "step reads, each freed after its last read).</p></body></html>")
    return "\n".join(h)


def diff(model: torch.nn.Module, mask: Mask, step: int = 0, path: str | os.PathLike | None = "diff.html",
         example: tuple[tuple, dict] | None = None, progress: bool = False) -> str:
    """Write the graph diff page of ``step`` (self-contained HTML) to ``path`` and return it.

    ``example`` is one model call as ``(args, kwargs)``; by default a batch-1 example is
    built for table backbones. ``path=None`` only returns the page.
    """
    if not isinstance(mask, Mask):
        raise MaskcError(f"expected a maskc.Mask, got {type(mask).__name__}; load one with maskc.Mask.load(path)")
    if not 0 <= int(step) < mask.steps:
        raise MaskcError(f"step {step} is outside the mask's steps 0..{mask.steps - 1}; pick a step in that range")
    an = analyze(model, mask, example, progress=progress)
    page = render(an, int(step))
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    return page


def pick_step(mask: Mask) -> int:
    """The step whose row splits running and skipped blocks most evenly (the most telling diff)."""
    bits = mask.bits
    score = torch.minimum(bits.sum(1), (~bits).sum(1))
    return int(torch.argmax(score))

