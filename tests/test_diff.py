"""maskc.diff: the page names every block with its status at the step, and loads nothing from the network."""
from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import torch

import maskc
from maskc.diff import analyze, pick_step, render, short_names

pytest.importorskip("matplotlib")


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    """A two-level U-Net (ResNets and attention, skip connections) with random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()


def example(model: torch.nn.Module) -> tuple[tuple, dict]:
    return (torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10])), {}


class Page(HTMLParser):
    """Every element's attributes, and the text inside <svg> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))


def parse(page: str) -> Page:
    p = Page()
    p.feed(page)
    return p


def table_status(p: Page) -> dict[str, str]:
    return {a["data-block"]: a["data-status"] for t, a in p.elements if t == "tr" and "data-block" in a}


def svg_status(p: Page) -> dict[str, str]:
    out = {}
    for _, a in p.elements:
        m = re.fullmatch(r"block:(runs|cached|dead):(.+)", a.get("id") or "")
        if m:
            out[m.group(2)] = m.group(1)
    return out


NETWORK = [
    re.compile(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I),  # src=/href= to http(s) or //
    re.compile(r"@import", re.I),
    re.compile(r"""url\(\s*["']?\s*(?:https?:)?//""", re.I),
    re.compile(r"<script[^>]*\bsrc", re.I),
    re.compile(r"<link\b", re.I),
]


@pytest.fixture(scope="module")
def case():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_unet()
    names = maskc.blocks(model, example=example(model))
    assert len(names) == 12
    # Rows chosen so that the drawn steps show every status: cached values read and unread, dead blocks,
    # glue removed wholly and partly (the time embedding lives on while conv_in dies); step 3 is only measured.
    rows = ["111111111111", "010110000010", "101000101001", "011001011100"]
    bits = torch.tensor([[c == "1" for c in r] for r in rows])
    mask = maskc.Mask(bits, names)
    an = analyze(model, mask, example(model))
    yield model, mask, an, {i: render(an, i) for i in (0, 1, 2)}
    torch.set_num_threads(threads)


def test_diff_writes_the_page(case, tmp_path) -> None:
    model, mask, _, pages = case
    path = tmp_path / "diff.html"
    page = maskc.diff(model, mask, step=2, path=path, example=example(model))
    assert path.read_text(encoding="utf-8") == page
    assert table_status(parse(page)) == table_status(parse(pages[2]))


@pytest.mark.parametrize("step", [1, 2])
def test_page_names_every_skipped_block_as_cached(case, step) -> None:
    model, mask, an, pages = case
    p = parse(pages[step])
    skipped = {b for b, on in zip(mask.names, mask.bits[step].tolist()) if not on}
    table, svg = table_status(p), svg_status(p)
    assert skipped and set(table) == set(mask.names) == set(svg)
    assert {b for b, s in table.items() if s == "cached"} == skipped
    assert {b for b, s in svg.items() if s == "cached"} == skipped
    # blocks the step graph runs are drawn as running, and nothing else is
    runs = set(an.schedule.steps[step].runs)
    assert {b for b, s in table.items() if s == "runs"} == runs == {b for b, s in svg.items() if s == "runs"}
    assert {b for b, s in table.items() if s == "dead"} == set(mask.names) - skipped - runs
    if step == 1:
        assert {b for b, s in table.items() if s == "dead"}  # the down blocks that only fed skipped ones


def test_page_loads_nothing_from_the_network(case) -> None:
    for page in case[3].values():
        for pat in NETWORK:
            assert not pat.search(page), pat.pattern
        p = parse(page)
        assert not [a for t, a in p.elements if t in ("img", "script", "iframe", "object", "embed")]
        assert sum(t == "svg" for t, _ in p.elements) == 2  # the block graph and the heatmap, inline


def test_node_diff_shows_removed_nodes_placeholders_and_writes(case) -> None:
    model, mask, an, pages = case
    sg = an.schedule.steps[1]
    page = pages[1]
    pre = page[page.index("id=node-diff"):page.index("</pre>")]
    added = re.findall(r'<span class="add read">\+ cache read\s+%(\w+)', pre)
    assert sorted(added) == sorted(n.name for n in sg.gm.graph.nodes if "maskc_read" in n.meta)
    removed = set(re.findall(r'<span class="del[^"]*">- [\w ]{10} %(\w+)', pre))
    kept = {n.name for n in sg.gm.graph.nodes}
    assert removed == {n.name for n in an.capture.gm.graph.nodes if n.name not in kept and n.op != "output"}
    assert removed and added
    # step 0 writes what later steps read, on the new output line
    writes = an.schedule.steps[0].writes
    line = re.search(r'<span class="add write">[^<]*</span>', pages[0]).group(0)
    assert writes and all(w in line.split("# then", 1)[1] for w in writes)


def expected_glue(an, step: int) -> dict[int, str]:
    """Item index -> status of every glue segment (a run of non-block nodes between blocks) at the step."""
    kept = {n.name for n in an.schedule.steps[step].gm.graph.nodes}
    items: list[list[str] | None] = []  # None for a block, node names for a glue segment
    for n in an.capture.gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if "maskc_block" in n.meta:
            items.append(None)
        elif items and items[-1] is not None:
            items[-1].append(n.name)
        else:
            items.append([n.name])
    out = {}
    for k, seg in enumerate(items):
        if seg is not None:
            gone = sum(x not in kept for x in seg)
            out[k] = "kept" if gone == 0 else "removed" if gone == len(seg) else "partly-removed"
    return out


def test_glue_removed_as_dead_code_is_marked(case) -> None:
    _, _, an, pages = case
    seen = set()
    for step in (0, 1, 2):
        got = {}
        for _, a in parse(pages[step]).elements:
            m = re.fullmatch(r"glue:([\w-]+):(\d+)", a.get("id") or "")
            if m:
                got[int(m.group(2))] = m.group(1)
        assert got == expected_glue(an, step)
        seen |= set(got.values())
    assert seen == {"kept", "removed", "partly-removed"}  # the case exercises all three


def test_macs_and_cache_per_step(case) -> None:
    """MACs per step match FlopCounterMode on the compiled modules; the full step matches the original."""
    from torch.utils.flop_counter import FlopCounterMode

    model, mask, an, _ = case
    args, kwargs = example(model)
    tm = maskc.compile(model, mask, example_args=args, example_kwargs=kwargs)  # traced now, not under the counter
    for i in range(mask.steps):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            tm(*args, **kwargs)
        assert an.rows[i].macs == fc.get_total_flops() // 2
    assert an.rows[0].macs == an.original_macs
    assert all(r.macs < an.original_macs for r in an.rows[1:])
    assert [r.cache_bytes for r in an.rows] == tm.cache_report()["per_step_bytes"]


def test_refusals(case) -> None:
    model, mask = case[:2]
    with pytest.raises(maskc.MaskcError, match="outside the mask's steps"):
        maskc.diff(model, mask, step=mask.steps, path=None, example=example(model))
    with pytest.raises(maskc.MaskcError, match="expected a maskc.Mask"):
        maskc.diff(model, mask.bits, step=0, path=None)  # type: ignore[arg-type]


def test_helpers() -> None:
    assert short_names(["up_blocks.2.attentions.0", "mid_block.resnets.1"]) == {
        "up_blocks.2.attentions.0": "u2a0", "mid_block.resnets.1": "mr1"}
    assert short_names(["a.x", "a.xx"]) == {"a.x": "a.x", "a.xx": "a.xx"}  # ambiguous: full names
    bits = torch.ones(3, 4, dtype=torch.bool)
    bits[2, :2] = False
    bits[1, :1] = False
    assert pick_step(maskc.Mask(bits, list("abcd"))) == 2
