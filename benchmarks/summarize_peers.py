"""One table over every ``maskc bench`` result: the learned mask against the best peer of no more MACs.

Reads ``benchmarks/results/bench_*.json`` written by ``maskc bench`` (default ``--peers best``),
and for each model, sampler and learned MACs level names the peer with the highest PSNR among
each family's best member of no more MACs (the rows marked ``best_for`` that level), with the
margins in PSNR and FD. Writes ``benchmarks/results/peers_summary.md`` and ``.json``; every
figure is copied from the bench JSONs, none typed.

Usage: python benchmarks/summarize_peers.py [--results benchmarks/results] [--readme README.md]
(--readme fills the README's table between its peers_summary.py markers.)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def summarize(res: dict) -> list[dict]:
    """Per learned level of one bench result: the learned row, the best peer and the margins."""
    rows = res["rows"]
    orig = rows[0]
    out = []
    for lr in (r for r in rows if r["family"] == "maskc"):
        t = lr["target"]
        peers = [r for r in rows if t in (r.get("best_for") or [])]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["psnr"])
        best_fd = min(peers, key=lambda r: r["fd"])
        best_o = min(peers, key=lambda r: r["fd_to_original"]) if "fd_to_original" in lr else None
        out.append({
            "model": os.path.basename(res["model"]["path"]), "class": res["model"]["class"],
            "sampler": f"{res['sampler'].get('name', 'ddim')} {res['sampler']['steps']}", "n": res["n"],
            "target": t, "macs": lr["macs_fraction"], "psnr": lr["psnr"], "fd": lr["fd"],
            "fd_ratio": lr["fd"] / orig["fd"], "peer": best["method"], "peer_macs": best["macs_fraction"],
            "peer_psnr": best["psnr"], "peer_fd": best["fd"], "margin_db": lr["psnr"] - best["psnr"],
            "best_fd_peer": best_fd["method"], "fd_margin": best_fd["fd"] - lr["fd"],
            "families": len({r["family"] for r in peers}), "date": res.get("quality_date") or res["date"],
            # 95% paired-bootstrap intervals, in tables made since maskc bench computes them
            "fd_ratio_ci": lr.get("fd_ratio_ci"),
            "psnr_margin_ci": lr.get("versus", {}).get(best["method"], {}).get("psnr_margin_ci"),
            "fd_margin_ci": lr.get("versus", {}).get(best_fd["method"], {}).get("fd_margin_ci"),
            # FD to the original's samples from the same noises, in tables made since maskc bench computes it
            "fd_to_original": lr.get("fd_to_original"),
            "best_fd_to_original_peer": best_o["method"] if best_o else None,
            "fd_to_original_margin": best_o["fd_to_original"] - lr["fd_to_original"] if best_o else None,
            "fd_to_original_margin_ci": lr["versus"][best_o["method"]]["fd_to_original_margin_ci"] if best_o else None,
        })
    return out


MODELS = {"fmnist-unet": "U-Net", "fmnist-dit": "DiT", "fmnist-sd": "SD-like"}
SAMPLERS = {"ddim 20": "DDIM 20", "dpm++ 10": "DPM++ 10", "ddim 50": "DDIM 50"}
BEGIN, END = "<!-- peers_summary.py: begin -->", "<!-- peers_summary.py: end -->"


def short_peer(method: str) -> str:
    """The README's short name of a peer row's method (its settings that matter to a reader)."""
    rules = [(r"step-level reuse uniform: interval (\d+)", "step reuse, every {0}"),
             (r"step-level reuse non-uniform: n_full (\d+),.*", "step reuse non-uniform, {0} full steps"),
             (r"δ-threshold \(TeaCache-like, static\).*", "δ-threshold, static"),
             (r"DeepCache (uniform|non-uniform): interval (\d+), depth 1\b.*", "DeepCache {0}, every {1}"),
             (r"DeepCache (uniform|non-uniform): interval (\d+), depth (\d+).*", "DeepCache {0}, every {1}, depth {2}")]
    for pattern, fmt in rules:
        m = re.fullmatch(pattern, method)
        if m:
            return fmt.format(*m.groups())
    return method


def ci(v: float | None, c: list[float] | None, fmt: str) -> str:
    """``v`` formatted, with its interval ``c`` in brackets where the table has one; "-" where it has no ``v``."""
    if v is None:
        return "-"
    return format(v, fmt) + (f" [{c[0]:{fmt}}, {c[1]:{fmt}}]" if c else "")


def readme_table(items: list[dict]) -> list[str]:
    """The README's table: one row per model, sampler and level, in the README's order; intervals where measured."""
    order = lambda s: (list(MODELS).index(s["model"]) if s["model"] in MODELS else 99,
                       list(SAMPLERS).index(s["sampler"]) if s["sampler"] in SAMPLERS else 99, -s["target"])
    lines = ["| model | sampler | n | level | MACs | PSNR dB | FD × orig. | best peer (MACs) | peer PSNR | PSNR margin "
             "| FD margin | FD-to-orig. margin |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for s in sorted(items, key=order):
        lines.append(f"| {MODELS.get(s['model'], s['model'])} | {SAMPLERS.get(s['sampler'], s['sampler'])} | {s['n']} "
                     f"| {s['target']:g} | {s['macs']:.3f} | {s['psnr']:.2f} | {ci(s['fd_ratio'], s['fd_ratio_ci'], '.2f')} "
                     f"| {short_peer(s['peer'])} ({s['peer_macs']:.3f}) | {s['peer_psnr']:.2f} "
                     f"| {ci(s['margin_db'], s['psnr_margin_ci'], '+.2f')} | {ci(s['fd_margin'], s['fd_margin_ci'], '+.2f')} "
                     f"| {ci(s.get('fd_to_original_margin'), s.get('fd_to_original_margin_ci'), '+.2f')} |")
    return lines


def write_readme(path: str, items: list[dict]) -> None:
    """Replaces the lines between the README's BEGIN and END markers with ``readme_table``."""
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n\n" + "\n".join(readme_table(items)) + "\n\n" + END + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--readme", help="also fill the table between the peers_summary.py markers of this README")
    a = ap.parse_args()
    items = []
    for path in sorted(glob.glob(os.path.join(a.results, "bench_*.json"))):
        with open(path) as f:
            res = json.load(f)
        if not res.get("peer_selection"):
            continue  # made with fixed peer lists: no best-of-family rows
        for s in summarize(res):
            items.append({**s, "table": os.path.basename(path)[:-5] + ".md"})
    with open(os.path.join(a.results, "peers_summary.json"), "w") as f:
        json.dump(items, f, indent=1)
    lines = ["# Learned masks against the best peer of no more MACs, every bench table", "",
             "Made by `python benchmarks/summarize_peers.py` from the `maskc bench` JSONs named in the last column. "
             "Peer: among each family's best member of no more MACs than the learned mask (DeepCache uniform and "
             "non-uniform, FORA, step-level reuse uniform and non-uniform, static δ-threshold; chosen on 16 other "
             "noises), the one with the highest PSNR on the table's samples. PSNR margin: learned minus that peer "
             "(the smallest margin over families); FD margin: the lowest-FD peer's FD minus the learned mask's "
             "(positive: learned better). In brackets, where the table has them: 95% paired-bootstrap intervals "
             "(the noises resampled, the same resamples for both methods); tables made before maskc bench computed "
             "them have none. FD-to-orig. margin, in tables made since maskc bench computes it: FD-FMNIST against "
             "the original's samples from the same noises (how far a method moves the original's own distribution), "
             "the lowest such peer's minus the learned mask's.", "",
             "| model | sampler | n | level | MACs | PSNR dB | FD (x orig.) | best peer | peer MACs | peer PSNR "
             "| PSNR margin | FD margin | FD-to-orig. margin | table |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in items:
        lines.append(f"| {s['model']} | {s['sampler']} | {s['n']} | {s['target']:g} | {s['macs']:.3f} | {s['psnr']:.2f} "
                     f"| {s['fd']:.2f} ({ci(s['fd_ratio'], s['fd_ratio_ci'], '.2f')}) | {s['peer']} | {s['peer_macs']:.3f} "
                     f"| {s['peer_psnr']:.2f} | {ci(s['margin_db'], s['psnr_margin_ci'], '+.2f')} "
                     f"| {ci(s['fd_margin'], s['fd_margin_ci'], '+.2f')} "
                     f"| {ci(s['fd_to_original_margin'], s['fd_to_original_margin_ci'], '+.2f')} "
                     f"| [{s['table']}]({s['table']}) |")
    with_ci = [s for s in items if s["fd_margin_ci"]]
    to_o = [s for s in items if s["fd_to_original_margin_ci"]]
    lines += ["", f"PSNR margin below zero at {sum(s['margin_db'] < 0 for s in items)} of {len(items)} points, below "
              f"+0.5 dB at {sum(s['margin_db'] < 0.5 for s in items)}; FD margin below zero at "
              f"{sum(s['fd_margin'] < 0 for s in items)} of {len(items)}"
              + (f"; of the {len(with_ci)} points with intervals, the FD margin is below zero beyond its interval at "
                 f"{sum(s['fd_margin_ci'][1] < 0 for s in with_ci)} and the PSNR margin at "
                 f"{sum(s['psnr_margin_ci'][1] < 0 for s in with_ci if s['psnr_margin_ci'])}" if with_ci else "")
              + (f"; of the {len(to_o)} points with an FD to the original, its margin is below zero beyond its "
                 f"interval at {sum(s['fd_to_original_margin_ci'][1] < 0 for s in to_o)} and above zero beyond it at "
                 f"{sum(s['fd_to_original_margin_ci'][0] > 0 for s in to_o)}" if to_o else "") + "."]
    with open(os.path.join(a.results, "peers_summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if a.readme:
        write_readme(a.readme, items)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
