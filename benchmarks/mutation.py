"""Rerun the planted-bug harness against the whole fast suite and write the report.

    python benchmarks/mutation.py            # every mutant of tests/mutation.py
    python benchmarks/mutation.py --only reads-reversed never-freed

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
from mutation import MUTANTS, ROOT, run_mutant  # noqa: E402

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
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    base = run_mutant(None, SUITE, timeout=1800)
    if base.killed:
        print(base.tail)
        raise SystemExit("the suite fails without any planted bug; fix that first")
    print(f"baseline: suite passes in {base.seconds:.0f} s")
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(lambda m: run_mutant(m, SUITE, timeout=1800), mutants))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = [{"mutant": r.mutant.name, "file": r.mutant.file, "bug": r.mutant.why, "killed": r.killed and bool(r.killer),
             "killed_by": r.killer, "seconds": round(r.seconds, 1), "ci_tests": list(r.mutant.tests)} for r in results]
    meta = {"date": datetime.date.today().isoformat(), "git": rev, "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "suite": list(SUITE), "baseline_seconds": round(base.seconds, 1),
            "hypothesis_profile": "mutation (derandomized, 25 examples, no shrinking)", "workers": args.workers}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mutation.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    killed = sum(r["killed"] for r in rows)
    lines = [
        "# Planted bugs (mutation testing)", "",
        f"`python benchmarks/mutation.py` on {meta['date']}, commit {rev}, {meta['cpus']} CPUs, {args.workers} mutants at a "
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
    with open(os.path.join(args.out, "mutation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
