"""The planted-bug harness as a standing check: every mutant in tests/mutation.py is caught
by the tests it names (each run in a copy of the package with that one bug)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from mutation import MUTANTS, ROOT, run_mutant


def test_every_mutant_applies_once() -> None:
    """A snippet that no longer occurs exactly once would make its mutant vacuous."""
    for m in MUTANTS:
        with open(os.path.join(ROOT, m.file)) as f:
            assert f.read().count(m.old) == 1, f"mutant {m.name}: snippet not found exactly once in {m.file}"
        assert m.tests, f"mutant {m.name} names no tests"


@pytest.mark.slow
@pytest.mark.mutation
def test_every_planted_bug_is_caught() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda m: run_mutant(m, m.tests), MUTANTS))
    survived = [r for r in results if not (r.killed and r.killer)]
    report = "\n\n".join(f"{r.mutant.name} ({r.mutant.file}): {r.mutant.why}\n{r.tail}" for r in survived)
    assert not survived, f"{len(survived)} of {len(results)} planted bugs survived:\n{report}"
