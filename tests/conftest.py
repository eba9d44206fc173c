"""Hypothesis profiles, the one-thread setting, test order, and the planted-bug harness's import check.

A property that takes fewer examples takes a fraction of the profile's count, never a fixed number.

- "ci" (the default): derandomized and bounded, so a red CI is a real bug.
- "dev": random and several times more examples (HYPOTHESIS_PROFILE=dev pytest).
- "mutation": like "ci" but without shrinking, for the planted-bug harness
  (tests/mutation.py), where only "does some example fail" matters.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

_common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=25, **_common)
settings.register_profile("dev", max_examples=150, **_common)
settings.register_profile("mutation", derandomize=True, max_examples=25,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# one thread: the models under test are tiny, and two threads on two shared cores spin against each other
# (a small conv measured 14 ms with 2 threads against 0.2 ms with 1 on a loaded machine)
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the planted-bug run, then the other ``slow`` tests, then the rest (each group in
    collection order). Under ``-n 2`` (with ``--maxschedchunk=1``) the two workers start on the long
    tests together and fill in with short ones, instead of one worker finishing the suite alone behind
    the planted-bug run."""
    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("mutation") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under the planted-bug harness (MASKC_MUTANT_ROOT set), record where maskc was imported from, so the
    harness can check the tests ran against the mutated copy (tests/mutation.py, check_imports_copy)."""
    root = os.environ.get("MASKC_MUTANT_ROOT")
    if not root:
        return
    import maskc
    import maskc.passes.schedule
    import maskc.runtime

    with open(os.path.join(root, ".maskc-imports-checked"), "w") as f:
        f.write("\n".join(m.__file__ for m in (maskc, maskc.passes.schedule, maskc.runtime)))
