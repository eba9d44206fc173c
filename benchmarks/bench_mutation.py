"""Rerun the planted-bug harness against the whole fast suite and write the report.

    python benchmarks/bench_mutation.py            # every mutant of tests/mutation.py
    python benchmarks/bench_mutation.py --only reads-reversed never-freed
    python benchmarks/bench_mutation.py --tool-sample 60   # also 60 random cosmic-ray mutants (pip install cosmic-ray)

Writes benchmarks/results/mutation.md and mutation.json: for each mutant, killed or
survived, the first test that failed, and the time. A baseline run (no bug) comes first
and must pass, or the report would mean nothing. CI runs the same mutants against their
own named tests (tests/test_mutants.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from mutation import MUTANTS, ROOT, Mutant, _target, run_mutant  # noqa: E402

TOOL_FILES = ("passes/schedule.py", "passes/rewrite.py", "passes/rectify.py", "passes/blockgraph.py", "maskc/runtime.py")


def tool_mutants(n: int, seed: int) -> tuple[list[tuple[Mutant, dict]], int]:
    """``n`` mutations drawn at random (seeded) from cosmic-ray's full list over TOOL_FILES, and its length.

    cosmic-ray enumerates every operator at every place (its ``init``); running all of them
    against the suite would take hours on 2 cores, so a uniform sample estimates the score.
    """
    import random
    import sqlite3
    import tempfile

    specs = []
    with tempfile.TemporaryDirectory() as d:
        for f in TOOL_FILES:
            cfg, db = os.path.join(d, "cr.toml"), os.path.join(d, f.replace("/", "_") + ".sqlite")
            with open(cfg, "w") as fh:
                fh.write(f'[cosmic-ray]\nmodule-path = "{os.path.join(ROOT, f)}"\ntimeout = 600.0\nexcluded-modules = []\n'
                         'test-command = "true"\n[cosmic-ray.distributor]\nname = "local"\n')
            subprocess.run(["cosmic-ray", "init", cfg, db], check=True, capture_output=True)
            with sqlite3.connect(db) as c:
                specs += [dict(file=f, op=op, occ=occ, line=line) for op, occ, line in c.execute(
                    "select operator_name, occurrence, start_pos_row from mutation_specs")]
    specs.sort(key=lambda x: (x["file"], x["line"], x["op"], x["occ"]))
    print(f"cosmic-ray lists {len(specs)} mutations over {', '.join(TOOL_FILES)}")
    pick = random.Random(seed).sample(specs, min(n, len(specs)))
    return [(Mutant(f"cr:{x['file']}:{x['line']}:{x['op'].split('/')[-1]}#{x['occ']}", x["file"], "", "",
                    "cosmic-ray " + x["op"]), x) for x in pick], len(specs)


def _cosmic_planter(x: dict):
    def plant(pkg: str) -> None:
        subprocess.run(["cosmic-ray", "apply", _target(pkg, x["file"]), x["op"], str(x["occ"])], check=True,
                       capture_output=True)
    return plant

# every test file but the harness itself and the multi-minute learning/bench/demo end-to-end files
SUITE = tuple(sorted(
    f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests"))
    if f.startswith("test_") and f.endswith(".py")
    and f not in ("test_mutants.py", "test_learn.py", "test_bench.py", "test_shipped.py", "test_eval.py", "test_cli.py")
))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="mutant names to run (default: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--tool-sample", type=int, default=0, help="also run this many random cosmic-ray mutations")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cosmic-ray sample")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    base = run_mutant(None, SUITE, timeout=1800)
    if base.killed:
        print(base.tail)
        raise SystemExit("the suite fails without any planted bug; fix that first")
    print(f"baseline: suite passes in {base.seconds:.0f} s")
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(lambda m: run_mutant(m, SUITE, timeout=1800), mutants))
        tool, n_tool = tool_mutants(args.tool_sample, args.seed) if args.tool_sample else ([], 0)
        tool_results = list(pool.map(lambda mx: run_mutant(mx[0], SUITE, timeout=1800, planter=_cosmic_planter(mx[1])),
                                     tool))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = [{"mutant": r.mutant.name, "file": r.mutant.file, "bug": r.mutant.why, "killed": r.killed and bool(r.killer),
             "killed_by": r.killer, "seconds": round(r.seconds, 1), "ci_tests": list(r.mutant.tests)} for r in results]
    meta = {"date": datetime.date.today().isoformat(), "git": rev, "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "suite": list(SUITE), "baseline_seconds": round(base.seconds, 1),
            "hypothesis_profile": "mutation (derandomized, 25 examples, no shrinking)", "workers": args.workers}
    tool_rows = [{"mutant": r.mutant.name, "killed": r.killed and bool(r.killer), "killed_by": r.killer,
                  "seconds": round(r.seconds, 1), "tail": "" if r.killed else r.tail} for r in tool_results]
    meta["cosmic_ray"] = {"files": list(TOOL_FILES), "listed": n_tool, "sampled": len(tool_rows), "seed": args.seed}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mutation.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "cosmic_ray_rows": tool_rows}, f, indent=1)
    killed = sum(r["killed"] for r in rows)
    lines = [
        "# Planted bugs (mutation testing)", "",
        f"`python benchmarks/bench_mutation.py` on {meta['date']}, commit {rev}, {meta['cpus']} CPUs, {args.workers} mutants at a "
        f"time, hypothesis profile {meta['hypothesis_profile']}. Each mutant plants one bug in a copy of `passes/` or "
        "`maskc/runtime.py` and runs the suite below with `-x`; it is killed when a test fails. "
        f"Baseline (no bug): the suite passes in {base.seconds:.0f} s.", "",
        f"Suite: {', '.join(f'`{s}`' for s in SUITE)}.", "",
        f"**{killed} of {len(rows)} killed, {len(rows) - killed} survived.**", "",
        "| mutant | file | the bug | result | first failing test | s |", "| --- | --- | --- | --- | --- | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['mutant']} | `{r['file']}` | {r['bug']} | {'killed' if r['killed'] else '**survived**'} | "
                     f"`{r['killed_by'] or '-'}` | {r['seconds']:.0f} |")
    if tool_rows:
        tk = sum(r["killed"] for r in tool_rows)
        lines += ["", "## A random sample of cosmic-ray's mutations", "",
                  f"cosmic-ray (a well-kept mutation tool) lists {n_tool} mutations of {', '.join(f'`{f}`' for f in TOOL_FILES)}; "
                  f"running all of them against this suite would take hours on this machine, so {len(tool_rows)} were drawn "
                  f"at random (seed {args.seed}) and run the same way (`cosmic-ray apply` on the copy). "
                  f"**{tk} of {len(tool_rows)} killed.** Survivors, each read and explained below the table:", "",
                  "| mutation (file:line:operator#occurrence) | result | first failing test | s |", "| --- | --- | --- | ---: |"]
        for r in tool_rows:
            lines.append(f"| `{r['mutant']}` | {'killed' if r['killed'] else '**survived**'} | `{r['killed_by'] or '-'}` | "
                         f"{r['seconds']:.0f} |")
    with open(os.path.join(args.out, "mutation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if killed == len(rows) else 1  # the planted bugs must all die; tool survivors are for reading


if __name__ == "__main__":
    sys.exit(main())
