"""Planted bugs, and a harness that checks the tests catch each one.

The bugs sit in the compiler and runtime (``passes/``, ``maskc/runtime.py``,
``maskc/backend.py``), in learning (``maskc/rollout.py``, ``maskc/learn.py``'s budget
projection, ``maskc/refine.py``'s search), in the peers' schedules
(``maskc/schedules.py``), in evaluation (``maskc/eval.py``'s FD and paired bootstrap) and
in ``maskc bench``'s choice of peers and margins (``maskc/bench.py``), in the mask file
(``maskc/mask.py``), the shared sampling loop (``maskc/sampling.py``), diffusers pipelines
(``maskc/pipelines.py``), the exported runner (``maskc/export.py``), block selection
(``passes/blocks.py``), the command line (``maskc/cli.py``) and the diff page (``maskc/diff.py``).
Each ``Mutant`` replaces one exact snippet of one file (the
snippet must occur exactly once, so a mutant that no longer applies fails loudly
instead of passing silently). The harness copies the package to a temporary folder,
plants one bug there, puts the copy first on ``PYTHONPATH`` and ``sys.path`` (checked:
the tests import the copy) and runs pytest on the mutant's tests with ``-x`` under the
"mutation" hypothesis profile (no shrinking), in a child forked from a server that has
imported torch, diffusers and the rest once (``MASKC_MUTANT_FORK=0``: a fresh interpreter
per mutant, which imports them again: 15 to 18 s more per mutant on this machine with other
work on its cores, 2026-12-08). A mutant is *killed* when pytest fails.

- ``tests/test_mutants.py`` runs every mutant against its own ``tests`` (what CI runs);
- ``python benchmarks/bench_mutation.py`` runs every mutant against the whole fast suite and
  writes ``benchmarks/results/mutation.md`` and ``.json`` (which test killed it, time).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    why: str  # what the bug would do to a user
    tests: tuple[str, ...] = field(default=())  # pytest node ids or files that must catch it (CI subset)


EQ = "tests/test_equivalence.py::test_masked_steps_equal_reference"
INV = "tests/test_invariants.py"
RT = "tests/test_runtime.py"
EX = "tests/test_exactness.py"
FUZZ = "tests/test_fuzz_runtime.py"
PIPE = "tests/test_pipelines.py"
DIRECT = "tests/test_direct.py"
PHASES = "tests/test_learn_phases.py"
SCHED = "tests/test_schedules.py"
EVAL = "tests/test_eval.py"
BENCH = "tests/test_bench.py"
MASK = "tests/test_mask.py"
SAMP = "tests/test_sampling.py"
EXPORT = "tests/test_export.py"
PICK = "tests/test_pick.py"

MUTANTS: tuple[Mutant, ...] = (
    Mutant("reset-keeps-cache", "maskc/runtime.py",
           "        self._step = 0\n        self._cache.clear()", "        self._step = 0",
           "reset() leaves the previous generation's values in the cache", (EX + "::test_reset_clears_everything",)),
    Mutant("backend-ignored", "maskc/runtime.py",
           "        return blocks.glue(gm, fuse, positions)\n", "        return gm\n",
           "backend= is ignored: no block is compiled", ("tests/test_backend.py::test_blocks_compiled_once_and_shared_by_every_step",)),
    Mutant("blocks-not-shared", "maskc/runtime.py",
           "(self, f\"block {name!r}\", (\"block\", name, id(block))", "(self, f\"block {name!r}\", (\"block\", name, id(gm))",
           "every step variant compiles its blocks anew: compile time grows with the distinct steps",
           ("tests/test_backend.py::test_blocks_compiled_once_and_shared_by_every_step",)),
    Mutant("step-unit-ignored", "maskc/runtime.py",
           "    return torch.compile(gm, backend=backend, fullgraph=True, dynamic=False)", "    return gm",
           "compile_unit='step' compiles nothing", ("tests/test_backend.py::test_step_unit_compiles_every_distinct_step",)),
    Mutant("backend-no-wrap-around", "maskc/backend.py",
           "        if self.step >= self.steps:  # wrap-around: T calls make a generation\n            self.reset()\n", "",
           "torch.compile(backend=maskc.backend(mask)) fails at the first call of the second generation",
           ("tests/test_backend_fn.py::test_reset_mid_generation_and_wrap_around",)),
    Mutant("backend-reset-ignored", "maskc/backend.py",
           "        if isinstance(be, MaskBackend):\n            be.reset()\n", "        if isinstance(be, MaskBackend):\n",
           "maskc.reset(compiled) leaves an interrupted generation's step count and cache",
           ("tests/test_backend_fn.py::test_reset_mid_generation_and_wrap_around",)),
    Mutant("glue-runs-not-cut-at-skipped-blocks", "maskc/runtime.py",
           "fn = _step_callable(sg.gm, backend, blocks, positions=positions)", "fn = _step_callable(sg.gm, backend, blocks)",
           "glue runs merge across skipped blocks: each variant's glue is new code, so more programs to compile",
           ("tests/test_glue.py::test_glue_programs_are_shared_by_layers_and_steps",)),
    Mutant("programs-blind-to-shapes", "maskc/runtime.py",
           "            self.program_key = (self.key, _meta(args, kwargs))\n",
           "            self.program_key = (self.key, ())\n",
           "one program (code object) for every input shape: dynamo recompiles it per shape and fails past 8",
           ("tests/test_glue.py::test_many_input_shapes_never_hit_the_recompile_limit",)),
    Mutant("glue-run-drops-graph-outputs", "passes/segments.py",
           "        outputs = [n for n in run if any(u not in members for u in n.users)]",
           "        outputs = [n for n in run if any(u not in members and u.op != \"output\" for u in n.users)]",
           "a glue run's value that only the step's outputs read is not returned by the fused run",
           ("tests/test_glue.py::test_fused_glue_steps_equal_reference",)),
    Mutant("glue-runs-keep-their-names", "passes/segments.py",
           "                               name=f\"v{j}\", type_expr=n.type)", "                               name=n.name, type_expr=n.type)",
           "fused runs keep the graph's node names: the same work in two layers is two programs",
           ("tests/test_glue.py::test_glue_programs_are_shared_by_layers_and_steps",)),
    Mutant("backend-failure-crashes", "maskc/runtime.py",
           "torch._dynamo.exc.UserError, torch._dynamo.exc.BackendCompilerFailed,\n",
           "torch._dynamo.exc.UserError,\n",
           "a backend that fails on one block or glue run takes the whole model down instead of that piece running eager",
           ("tests/test_glue.py::test_a_backend_failure_runs_each_piece_eager_with_its_own_code",)),
    Mutant("programs-keyed-by-tensor-values", "maskc/runtime.py",
           "    leaves, spec = pytree.tree_flatten((args, kwargs))\n",
           "    leaves, spec = list(args) + list(kwargs.values()), None\n",
           "a block given a tuple of tensors is keyed by their printed values: compiled anew for every step variant",
           ("tests/test_glue.py::test_blocks_given_tuples_of_tensors_are_compiled_once",)),
    Mutant("glue-programs-blind-to-module-attributes", "maskc/runtime.py",
           "key = (\"glue\", run.code, tuple(_module_signature(m) for m in mods.children()))",
           "key = (\"glue\", run.code, tuple(type(m) for m in mods.children()))",
           "two layers whose glue differs only in a module attribute (a norm's eps) share one program: dynamo "
           "recompiles it at every call that switches layer, and fails past 8",
           ("tests/test_glue.py::test_glue_runs_differing_in_a_module_attribute_get_programs_of_their_own",)),
    Mutant("outline-misreads-paths", "passes/outline.py",
           """    s = s.replace(".__dict__['_modules']", "").replace("._modules", "")\n""", "",
           "dynamo's module paths are not mapped to block names: no block is found, so nothing is skipped",
           ("tests/test_backend_fn.py::test_backend_steps_equal_reference",)),
    Mutant("slots-share-touching-lifetimes", "passes/buffers.py",
           "    return any(s1 <= e2 and s2 <= e1 for s1, e1 in a for s2, e2 in b)",
           "    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)",
           "under cuda_graphs=True an entry last read at step i shares storage with one written at step i: a step "
           "output that aliases the read (glue returning a cached value as is) is overwritten by the write",
           ("tests/test_cudagraphs.py::test_lifetimes_that_touch_do_not_share",)),
    Mutant("static-writes-dropped", "maskc/cudagraphs.py",
           "            self.slots[self.buffers.slot_of[b]].copy_(v)  # type: ignore[index]\n", "            pass\n",
           "under cuda_graphs=True the cache slots are never filled: skipped blocks read garbage",
           ("tests/test_cudagraphs.py::test_static_buffers_equal_reference",)),
    Mutant("no-dead-code-elimination", "passes/rewrite.py",
           "    out_gm.graph.eliminate_dead_code()\n", "",
           "glue and blocks that only fed skipped blocks still run: no saving", (INV,)),
    Mutant("write-every-run", "passes/schedule.py",
           "writes = tuple(b for b in order if bool(row[col[b]]) and pending[b])",
           "writes = tuple(b for b in order if bool(row[col[b]]))",
           "every block that runs is cached, so nothing dies with skipped consumers", (INV,)),
    Mutant("guard-ignores-dtype", "passes/capture.py",
           '("T", tuple(x.shape), x.dtype, str(x.device), x.requires_grad)',
           '("T", tuple(x.shape), str(x.device), x.requires_grad)',
           "a trace made for float32 serves float64 inputs", (EX + "::test_dtype_or_device_change_mid_generation", FUZZ)),
    Mutant("guard-ignores-shape", "passes/capture.py",
           '("T", tuple(x.shape), x.dtype, str(x.device), x.requires_grad)',
           '("T", x.dtype, str(x.device), x.requires_grad)',
           "a trace made for one batch size or resolution serves another", (RT, FUZZ)),
    Mutant("guard-ignores-device", "passes/capture.py",
           '("T", tuple(x.shape), x.dtype, str(x.device), x.requires_grad)',
           '("T", tuple(x.shape), x.dtype, x.requires_grad)',
           "a trace made on one device serves another", (EX + "::test_dtype_or_device_change_mid_generation",)),
    Mutant("guard-ignores-numbers", "passes/capture.py",
           'return ("C", type(x).__name__, x)', 'return ("C", type(x).__name__)',
           "a trace made for return_dict=True (or one int timestep) serves other values", (RT, FUZZ)),
    Mutant("numbers-reuse-old-graph", "maskc/runtime.py",
           "return self._step_plan(key, args, kwargs), leaves", "return self._plan, leaves",
           "an int timestep that changed reuses the graph traced for the old value",
           (RT + "::test_python_number_timesteps_retrace_per_step", FUZZ)),
    Mutant("numbers-read-check-dropped", "maskc/runtime.py",
           "if sg.reads != base_sg.reads:", "if False:",
           "a Python number that changes what a step reads is not refused",
           (EX + "::test_number_that_changes_reads_is_refused",)),
    Mutant("reads-reversed", "maskc/runtime.py",
           "*[cache[b] for b in sg.reads]", "*[cache[b] for b in reversed(sg.reads)]",
           "cached values fed to the step graph in the wrong order", (EQ, EX + "::test_guided_dit_equals_reference")),
    Mutant("writes-to-wrong-blocks", "maskc/runtime.py",
           "zip(sg.writes, out[n:])", "zip(reversed(sg.writes), out[n:])",
           "values written to the cache under the wrong block names", (EQ,)),
    Mutant("freed-one-step-early", "passes/schedule.py",
           "drops[r].append(b)", "drops[max(r - 1, 0)].append(b)",
           "a cache entry is freed one step before its last read", (EQ,)),
    Mutant("never-freed", "maskc/runtime.py",
           "    for b in plan.schedule.drop_after[i]:\n        cache.pop(b, None)\n", "",
           "cache entries are never freed", (EQ,)),
    Mutant("first-skipped-block-runs", "passes/schedule.py",
           "skip = tuple(b for b in order if not bool(row[col[b]]))",
           "skip = tuple(b for b in order[1:] if not bool(row[col[b]]))",
           "a skipped block still runs, on the step's fresh inputs", (EQ, INV)),
    Mutant("placeholders-reversed", "passes/rewrite.py",
           "        anchor = ph\n", "",
           "cache placeholders are created in reverse order, so reads bind to the wrong values", (EQ,)),
    Mutant("rectify-ignores-later-reads", "passes/rectify.py",
           "need = demand or pending[b]", "need = demand",
           "rectify turns off runs whose value a later step reads", ("tests/test_rectify.py", INV)),
    Mutant("blockgraph-drops-skip-edges", "passes/blockgraph.py",
           "            for s in ins:\n                g.add_edge(s, b)\n",
           "            for s in sorted(ins)[:1]:\n                g.add_edge(s, b)\n",
           "the block graph keeps one input edge per block, so rectify misses consumers", ("tests/test_rectify.py", INV)),
    Mutant("empty-cache-allowed", "passes/schedule.py",
           "bad = (~bits) & (~ran)", "bad = (~bits) & (~ran) & False",
           "a mask that reads an empty cache is not refused", (RT + "::test_empty_cache_refused",)),
    Mutant("overflow-off-by-one", "maskc/runtime.py",
           "if i >= self.mask.steps:", "if i > self.mask.steps:",
           "call T+1 is not refused with StepOverflowError", (RT + "::test_step_overflow_and_reset",)),
    Mutant("midway-change-not-refused", "maskc/runtime.py",
           "            if self._step != 0:\n                assert self._plan is not None\n                raise InputChangedError(",
           "            if False:\n                assert self._plan is not None\n                raise InputChangedError(",
           "a batch-size change in the middle of a generation is traced anew against a stale cache",
           (RT + "::test_retrace_at_step0_refuse_midway", FUZZ)),
    Mutant("numbers-check-accepts-tensors", "maskc/runtime.py",
           'if not (a[0] == b[0] == "C" and a[1] == b[1] and a[1] in ("int", "float")):',
           'if not (a[0] == b[0] and a[1] == b[1]):',
           "a tensor change mid-generation is taken for a Python-number change", (FUZZ,)),
    Mutant("evicts-newest-trace", "maskc/runtime.py",
           "self._plans.pop(next(iter(self._plans)))", "self._plans.pop(next(reversed(self._plans)))",
           "past max_traces the newest trace is evicted, so alternating shapes retrace every time",
           (EX + "::test_trace_eviction_keeps_the_newest",)),
    Mutant("traces-unbounded", "maskc/runtime.py",
           "            while len(self._plans) > self.max_traces:\n", "            while False:\n",
           "traces pile up without bound", (EX + "::test_trace_eviction_keeps_the_newest",)),
    Mutant("pipeline-calls-share-a-generation", "maskc/runtime.py",
           "if self._followed is None or key[0] is not self._followed[0] or key[1] != self._followed[1]:",
           "if self._followed is None:",
           "a second pipeline call continues the first one's generation",
           (PIPE + "::test_ddim_pipeline_equals_reference_twice_after_batch_change_and_after_remove",)),
    Mutant("timesteps-unchecked", "maskc/runtime.py",
           "if self._want_ts is not None and not self._ts_checked and self._ts_param is not None:", "if False:",
           "a mask made for DDIM-20 timesteps is driven with DDIM-50 ones without a word",
           (PIPE + "::test_compile_refuses_other_timesteps_than_the_mask_records",)),
    Mutant("same-number-at-two-steps", "maskc/runtime.py",
           "sp = self._step_plans.get((key, i))",
           "sp = next((v for (k, _j), v in self._step_plans.items() if k == key), None)",
           "a Python-number timestep seen at an earlier step reuses that step's graph (another mask row)",
           (EX + "::test_same_number_timestep_at_two_steps",)),
    Mutant("direct-ignores-numbers", "maskc/runtime.py",
           "        for i, v in self.consts:\n", "        for i, v in ():\n",
           "a compiled piece called without dynamo answers a call with another Python number (a scale, a flag) "
           "with the graph dynamo specialized to the first one's",
           (DIRECT + "::test_a_changed_number_or_structure_goes_through_dynamo",)),
    Mutant("direct-ignores-global-state", "maskc/runtime.py",
           "        if not self.state.check():\n            return _MISS\n", "",
           "after a no_grad generation, a call with grad on runs the inference graph: no gradient",
           (DIRECT + "::test_grad_mode_changed_after_the_first_call",)),
    Mutant("direct-check-runs-writers-twice", "maskc/runtime.py",
           "            or program.writes  # it might write its inputs: running it again to check would write them twice\n", "",
           "a block that writes its input in place writes it twice at its first call (the check runs it again)",
           (DIRECT + "::test_a_block_that_writes_its_input_writes_it_once",)),
    Mutant("direct-misses-left-out-tensors", "maskc/runtime.py",
           "            if type(v) not in _TENSOR_TYPES:  # a tensor argument left out (None) or given as a subclass\n"
           "                return _MISS\n", "",
           "a call that passes None where the first passed a tensor crashes inside the compiled graph",
           (DIRECT + "::test_a_changed_number_or_structure_goes_through_dynamo",)),
    Mutant("direct-never-taken", "maskc/runtime.py",
           "                if direct is None and self.owner.direct:", "                if direct is None and False:",
           "every piece goes through dynamo's guards at every call: the compiled steps lose their speed on small blocks",
           (DIRECT + "::test_steps_with_and_without_direct_calls_are_identical",)),
    Mutant("direct-unchecked", "maskc/runtime.py",
           "    if len(got) != len(direct.out_slots) or not all(_same(g, out_leaves[i]) for g, i in zip(got, direct.out_slots)):\n"
           "        return ret, False\n", "",
           "a piece whose result is not what its compiled graph returns (an input handed back as is, which dynamo "
           "returns outside the graph) gets the graph's outputs alone when called without dynamo",
           (DIRECT + "::test_a_block_that_hands_back_its_input_stays_with_dynamo",)),
    Mutant("direct-flattens-mixed-outputs", "maskc/runtime.py",
           '"tuple" if type(ret) is tuple and all(type(v) in _TENSOR_TYPES for v in ret)', '"tuple" if type(ret) is tuple',
           "a block returning a tuple with None or nested skips gets a flat tuple of tensors back",
           (DIRECT + "::test_outputs_that_are_not_all_tensors_keep_their_structure",)),
    # Learning: whole-generation rollouts, the budget projection, the trajectory search.
    Mutant("rollout-reruns-one-step-late", "maskc/rollout.py",
           "            d = int(diff[0]) if len(diff) else self.T",
           "            d = min(int(diff[0]) + 1, self.T) if len(diff) else self.T",
           "a candidate is rerun from the step after its first change: learning scores masks it never ran",
           (PHASES + "::test_rollout_is_the_runtime_bit_for_bit",)),
    Mutant("rollout-shares-stored-cache", "maskc/rollout.py",
           "        cache, sched = dict(cache), copy.deepcopy(sched)",
           "        sched = copy.deepcopy(sched)",
           "a rejected candidate's block outputs leak into the stored state that later candidates rerun from",
           (PHASES + "::test_rollout_is_the_runtime_bit_for_bit",)),
    Mutant("score-floor-tiny", "maskc/rollout.py",
           "MSE_FLOOR = 1e-5  #", "MSE_FLOOR = 1e-12  #",
           "the search's score no longer saturates: one bit-identical sample counts 120 dB and can decide alone",
           (PHASES + "::test_scores_are_the_plain_and_the_saturating_psnr_of_runtime_samples",)),
    Mutant("shift-charge-dropped", "maskc/rollout.py",
           "        return sat if self._f_ref is None else sat - self.shift_weight * self.shift2(img)",
           "        return sat",
           "learn(features=..., shift_weight=...) searches by PSNR alone: the feature shift it was asked to charge "
           "is ignored",
           (PHASES + "::test_score_charges_the_feature_shift_of_runtime_samples",)),
    Mutant("shift-biased", "maskc/rollout.py",
           "    return float(mean.pow(2).sum()) - var_sum / n",
           "    return float(mean.pow(2).sum())",
           "the feature shift is the biased squared mean: noise alone reads as a shift, more so on few noises",
           (PHASES + "::test_feature_shift_is_unbiased_fds_mean_term_and_adds_over_processes",)),
    Mutant("shift-not-reduced-over-processes", "maskc/rollout.py",
           "            dist.all_reduce(sums)\n",
           "",
           "under torchrun each process charges the shift of its own share of the noises: the processes disagree "
           "and the mask depends on the process count",
           (PHASES + "::test_the_charged_score_is_the_same_over_processes",)),
    Mutant("search-not-charged", "maskc/learn.py",
           "uncond, seed + restart, shift_weight=cfg.shift_weight)",
           "uncond, seed + restart)",
           "the trajectory search ignores learn(features=...): only the restarts' selection charges the shift",
           ("tests/test_learn.py::test_the_search_charges_the_feature_shift",)),
    Mutant("selection-not-charged", "maskc/learn.py",
           "keep_states=False,\n                         shift_weight=cfg.shift_weight)",
           "keep_states=False)",
           "the restarts are chosen by PSNR alone although learning was asked to charge the feature shift",
           ("tests/test_learn.py::test_the_restarts_selection_charges_the_feature_shift",)),
    Mutant("pick-drops-the-shift-charge", "maskc/pick.py",
           '    if learn_kw.get("features") is not None or learn_kw.get("shift_weight"):',
           "    if False:",
           "learn_best with features picks its seed by PSNR alone, silently undoing the charge the user asked for",
           ("tests/test_pick.py::test_refuses_a_pick_it_cannot_make_fairly",)),
    Mutant("pipeline-drops-the-feature-map", "maskc/learn.py",
           "checkpoint_dir=checkpoint_dir, progress=progress, features=features, **overrides)",
           "checkpoint_dir=checkpoint_dir, progress=progress, **overrides)",
           "learn(pipe, features=f, shift_weight=W) loses f on the way to the backbone's learning",
           ("tests/test_pipelines.py::test_learn_from_a_pipeline_passes_the_feature_map_on",)),
    Mutant("search-scores-plain-psnr", "maskc/refine.py",
           '    measure = rollout.score if score == "saturating" else rollout.psnr',
           "    measure = rollout.psnr",
           "the search ranks masks by plain PSNR, which bit-identical (blank) samples dominate",
           (PHASES + "::test_search_never_worse_than_its_seeds_and_stays_in_the_window",)),
    Mutant("search-score-unchecked", "maskc/refine.py",
           "    if score not in (\"saturating\", \"psnr\"):\n        raise",
           "    if False:\n        raise",
           "a misspelt search score is taken for plain PSNR, silently",
           (PHASES + "::test_an_unknown_search_score_is_refused",)),
    Mutant("budget-first-prefix-over-target", "maskc/learn.py",
           "    best = min(range(len(order) + 1), key=lambda k: (abs(keep(k)[1] - target), k))",
           "    best = next((k for k in range(len(order) + 1) if keep(k)[1] >= target), len(order))",
           "the budget step takes the first prefix that reaches the target, not the closest: masks overshoot",
           (PHASES + "::test_project_budget_is_the_closest_prefix",)),
    Mutant("row-store-ignores-sampling-code", "maskc/bench.py",
           '''{"row_code": row_code, **{k: key[k] for k in ROW_KEY},''',
           '''{**{k: key[k] for k in ROW_KEY},''',
           "maskc bench serves stored rows after the sampling or scoring code changed: tables mix two codes",
           ("tests/test_bench.py::test_row_store_is_keyed_by_the_sampling_code_and_the_row_settings_not_by_learning",)),
    Mutant("row-version-ignores-source-root", "maskc/bench.py",
           '''        if root is not None:
            return os.path.join(root, SOURCE_DIRS[m], "__init__.py")''',
           '''        if False:
            return os.path.join(root, SOURCE_DIRS[m], "__init__.py")''',
           "seed_row_store.py hashes today's code for an older commit's: it seeds rows of other sampling code",
           ("tests/test_bench.py::test_row_version_of_a_source_tree_is_the_imported_codes_and_follows_its_files",)),
    Mutant("row-store-unused", "maskc/bench.py",
           '''        reused = [i for i, ident in enumerate(ids) if part.get("row", ident) is None and from_store(i)]''',
           '''        reused = []''',
           "maskc bench samples every row again after a learning change, though the store holds them",
           ("tests/test_bench.py::test_row_store_serves_rows_of_the_same_bits_and_sampling_code",)),
    Mutant("partial-keyed-by-path", "maskc/bench.py",
           '''    return {"code": version, "model": weights_version(path), "sampler"''',
           '''    return {"code": version, "model": os.path.abspath(path), "sampler"''',
           "a committed partial folder does not resume in another checkout: every row is sampled again",
           ("tests/test_bench.py::test_a_partial_folder_is_keyed_by_the_models_content_not_its_path",)),
    Mutant("row-version-by-absolute-path", "maskc/bench.py",
           "    return [path for _, path in sorted(named)]",
           "    return sorted(path for _, path in named)",
           "a checkout whose subpackages resolve elsewhere files its rows under another row version (a cache miss)",
           ("tests/test_bench.py::test_row_version_does_not_depend_on_where_the_subpackages_lie",)),
    Mutant("restarts-keep-the-worst", "maskc/learn.py",
           "    return max(range(len(sel)), key=lambda k: (sel[k], -k)), sel",
           "    return min(range(len(sel)), key=lambda k: (sel[k], -k)), sel",
           "search_restarts keeps the restart whose mask does worst on the selection noises",
           ("tests/test_learn.py::test_search_restarts_keep_the_best_on_selection_noises",)),
    Mutant("restarts-ignored", "maskc/learn.py",
           "        if res is not None and cfg.search_restarts > 1:",
           "        if res is not None and cfg.search_restarts > 99:",
           "search_restarts=3 runs the single search and says nothing",
           ("tests/test_learn.py::test_search_restarts_keep_the_best_on_selection_noises",)),
    Mutant("restarts-select-on-calibration-noises", "maskc/learn.py",
           "    return seed * 7919 + 29",
           "    return seed * 7919 + 17",
           "the restarts are chosen on restart 0's calibration noises, which its search overfits, not on fresh ones",
           ("tests/test_learn.py::test_selection_noises_are_no_restarts_calibration_noises",
            "tests/test_learn.py::test_search_restarts_keep_the_best_on_selection_noises")),
    Mutant("fit-ignores-upper-bound", "maskc/refine.py",
           "                    if fc <= hi and (best is None or fc > best[1]):",
           "                    if best is None or fc > best[1]:",
           "fitting a seed into the MACs window can jump over it: learned masks land above budget",
           (PHASES + "::test_fit_to_window_lands_inside",)),
    Mutant("search-accepts-worse", "maskc/refine.py",
           "        if p > p_best + 1e-9:\n            rollout.accept()",
           "        if True:\n            rollout.accept()",
           "the search keeps its last move, not its best mask: the result can be worse than a peer",
           (PHASES + "::test_search_never_worse_than_its_seeds_and_stays_in_the_window",)),
    Mutant("search-not-seeded-with-peers", "maskc/refine.py",
           "    for p, f, m, b in sorted(scored_peers, key=lambda z: -z[0])[:fitted_peers]:",
           "    for p, f, m, b in sorted(scored_peers, key=lambda z: -z[0])[:0]:",
           "the search starts from the learned mask alone: 'never worse than a peer' no longer holds",
           (PHASES + "::test_search_never_worse_than_its_seeds_and_stays_in_the_window",)),
    Mutant("search-repair-unchecked", "maskc/refine.py",
           "                if lo <= fd <= hi:\n                    fixed = (d, fd)",
           "                if True:\n                    fixed = (d, fd)",
           "a move repaired at another step is scored even when still outside the MACs window",
           (PHASES + "::test_search_never_worse_than_its_seeds_and_stays_in_the_window",)),
    # The pick among seeds (maskc.pick.learn_best).
    Mutant("pick-keeps-the-worst", "maskc/pick.py",
           "    k = max(range(len(seeds)), key=lambda i: (scores[i], -i))",
           "    k = min(range(len(seeds)), key=lambda i: (scores[i], -i))",
           "learn_best returns the seed whose mask does worst on the selection noises",
           (PICK + "::test_pick_keeps_the_best_of_the_seeds_masks_on_the_selection_noises",)),
    Mutant("pick-scores-on-calibration-noises", "maskc/pick.py",
           "int(n_select), int(select_seed), inputs",
           "int(n_select), seeds[0], inputs",
           "the pick scores masks on the first seed's own calibration noises, which favour that seed's mask",
           (PICK + "::test_pick_keeps_the_best_of_the_seeds_masks_on_the_selection_noises",)),
    Mutant("pick-checkpoints-shared", "maskc/pick.py",
           'os.path.join(checkpoint_dir, f"seed-{s}")', "checkpoint_dir",
           "every seed resumes from one checkpoint folder: a later seed reads or overwrites another's progress",
           (PICK + "::test_checkpoints_one_folder_per_seed",)),
    Mutant("pick-every-process-learns-every-seed", "maskc/pick.py",
           "    for s in [s for k, s in enumerate(seeds) if k % world == rank]:",
           "    for s in seeds:",
           "under torchrun every process learns every seed: N processes take as long as one",
           (PICK + "::test_under_torchrun_each_process_learns_only_its_share_of_the_seeds",)),
    Mutant("cli-learn-ignores-extra-seeds", "maskc/cli.py",
           "    if len(args.seed) == 1:\n        return functools.partial(maskc.learn, seed=args.seed[0])",
           "    if len(args.seed) >= 1:\n        return functools.partial(maskc.learn, seed=args.seed[0])",
           "maskc learn --seed 0 1 2 learns with seed 0 alone and says nothing",
           ("tests/test_cli.py::test_learn_with_several_seeds_keeps_the_pick",)),
    # Peers: the schedules a learned mask is compared with.
    Mutant("deepcache-keeps-deep-up-blocks", "maskc/schedules.py",
           'tuple(f"up_blocks.{n_up - 1 - k}." for k in range(depth))',
           'tuple(f"up_blocks.{k}." for k in range(depth))',
           "DeepCache's shallow branch runs the deepest up stage instead of the outermost one",
           (SCHED + "::test_deepcache_uniform",)),
    Mutant("deepcache-nonuniform-fewer-full-steps", "maskc/schedules.py",
           "    n_full = math.ceil(steps / interval)",
           "    n_full = steps // interval",
           "DeepCache non-uniform drops a full step when N does not divide the steps: compared at fewer MACs",
           (SCHED + "::test_deepcache_nonuniform_has_as_many_full_steps_as_uniform",)),
    Mutant("random-bisects-backwards", "maskc/schedules.py",
           "        lo, hi = (mid, hi) if f < target else (lo, mid)",
           "        lo, hi = (lo, mid) if f < target else (mid, hi)",
           "random masks at 'equal MACs' miss the target: the sanity floor is at another budget",
           (SCHED + "::test_random_equal_macs_hits_the_target",)),
    Mutant("delta-threshold-never-restarts", "maskc/schedules.py",
           "            full.append(i)\n            acc = 0.0",
           "            full.append(i)",
           "the TeaCache-like peer runs every step once the threshold is first reached",
           (PHASES + "::test_delta_threshold_accumulates",)),
    Mutant("library-without-every-other-step", "maskc/schedules.py",
           "    for n in range(2, top + 1):",
           "    for n in range(3, top + 1):",
           "the simplest peer (reuse the whole model every other step) is missing from the library",
           (PHASES + "::test_peer_library_families",)),
    # Evaluation: FD and its paired bootstrap.
    Mutant("fd-biased-covariance", "maskc/eval.py",
           "        return m + self.centre, (second - n * m[:, :, None] * m[:, None, :]) / (n - 1)",
           "        return m + self.centre, (second - n * m[:, :, None] * m[:, None, :]) / n",
           "FD uses the biased covariance: figures differ from torchmetrics' FID on the same features",
           (EVAL + "::test_frechet_distances_match_torchmetrics_on_every_resample",)),
    Mutant("fd-cross-term-halved", "maskc/eval.py",
           "    return (m - mu).square().sum(-1), tr + tr_sigma - 2 * lam.sqrt().sum(-1)",
           "    return (m - mu).square().sum(-1), tr + tr_sigma - lam.sqrt().sum(-1)",
           "FD's covariance term drops half the cross term: every FD is inflated",
           (EVAL + "::test_frechet_distances_match_torchmetrics_on_every_resample",)),
    Mutant("bootstrap-unpaired", "maskc/eval.py",
           "    return {k: frechet_distances(f, mu, sigma, counts) for k, f in features.items()}",
           "    return {k: frechet_distances(f, mu, sigma, counts.roll(len(k), 0)) for k, f in features.items()}",
           "each method's FD is resampled on other noises: margins' intervals stop cancelling the shared draw",
           (EVAL + "::test_paired_bootstrap_shares_the_resamples",)),
    Mutant("fd-to-original-base-on-other-resamples", "maskc/eval.py",
           "        mean_b, cov_b = mb(c)",
           "        mean_b, cov_b = mb(c.flip(0))",
           "FD to the original draws other noises for the original than for the method",
           (EVAL + "::test_fd_between_paired_sets_matches_torchmetrics_on_every_resample",)),
    # The bench: which peers a learned mask is compared with, and the margins' intervals.
    Mutant("bench-peer-over-budget", "maskc/bench.py",
           '            if r is not None and r["macs_fraction"] <= cap + 1e-9:',
           '            if r is not None and r["macs_fraction"] <= max(caps.values()) + 1e-9:',
           "every level is given the dearest level's cap: cheap learned masks are compared with dearer peers",
           (BENCH + "::test_peer_selection_respects_each_level_cap",)),
    Mutant("bench-picks-worst-member", "maskc/bench.py",
           '                if j is None or r["psnr"] > records[j]["psnr"]:',
           '                if j is None or r["psnr"] < records[j]["psnr"]:',
           "each family is represented by its worst member: every margin flatters the learned mask",
           (BENCH + "::test_peer_selection_respects_each_level_cap",)),
    Mutant("bench-psnr-margin-reversed", "maskc/bench.py",
           "counts @ (psnrs[a] - psnrs[at[id(r)]]).double() / n",
           "counts @ (psnrs[at[id(r)]] - psnrs[a]).double() / n",
           "the PSNR margin's interval has the wrong sign: a lead reads as a loss",
           (BENCH + "::test_paired_intervals_compare_the_right_rows",)),
    Mutant("bench-peer-group-every-level", "maskc/bench.py",
           '    return ([r for r in rows if t in (r.get("best_for") or [])]',
           '    return ([r for r in rows if r.get("best_for")]',
           "a learned mask is compared with peers chosen for other MACs levels",
           (BENCH + "::test_paired_intervals_compare_the_right_rows",)),
    Mutant("bench-fd-margin-unpaired", "maskc/bench.py",
           '"fd_margin_ci": interval(fd[at[id(r)]] - fd[a])',
           '"fd_margin_ci": interval(fd[at[id(r)]].roll(1) - fd[a])',
           "the FD margin's interval pairs different resamples: it no longer cancels the shared noise draw",
           (BENCH + "::test_paired_intervals_compare_the_right_rows",)),
    Mutant("bench-original-claim-not-exclusive", "maskc/bench.py",
           "        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)",
           "        fd = os.open(path, os.O_CREAT | os.O_WRONLY)",
           "every shard chooses the peers itself, and every shard samples each batch of the original itself",
           (BENCH + "::test_shards_make_a_shared_piece_once",)),
    Mutant("bench-waits-on-a-dead-process", "maskc/bench.py",
           "    except ProcessLookupError:\n        return False\n",
           "    except ProcessLookupError:\n        return True\n",
           "a shard killed while sampling a batch or choosing peers leaves a lock every later run waits on forever",
           (BENCH + "::test_shards_make_a_shared_piece_once",)),
    Mutant("bench-learning-unlocked", "maskc/bench.py",
           "            if _try_lock(lock, stale_s):\n                try:\n                    got = load(item)",
           "            if True:\n                try:\n                    got = load(item)",
           "shards started together each learn every mask: the learning phase takes as long as with one process",
           (BENCH + "::test_shards_split_the_learning",)),
    Mutant("bench-shards-learn-in-turn", "maskc/bench.py",
           "            elif i not in told and os.path.exists(lock):",
           "            else:\n                while os.path.exists(lock):\n                    time.sleep(poll)\n"
           "                continue\n            if i not in told and os.path.exists(lock):",
           "a shard waits for the mask another is learning instead of learning the next one",
           (BENCH + "::test_shards_split_the_learning",)),
    Mutant("bench-stored-batches-ignored", "maskc/bench.py",
           "                x = part.get_tensor(stored_as[i])\n",
           "                x = None\n",
           "a killed bench samples the whole method again: up to an hour of one core lost at DDIM 50, n=2000",
           (BENCH + "::test_bench_resumes_a_method_at_its_batch",)),
    Mutant("bench-gone-folder-made-again", "maskc/bench.py",
           "        part.create = False  # from here on",
           "        part.create = True  # from here on",
           "a shard still sampling when another writes the table makes the folder again and samples the table anew",
           (BENCH + "::test_a_shard_stops_when_the_table_is_written_under_it",)),
    Mutant("bench-shards-sample-every-batch", "maskc/bench.py",
           '                              lambda i: os.path.join(part.dir, stored_as[i] + ".lock"), log)',
           '                              lambda i: os.path.join(part.dir, stored_as[i] + f".{id(fn)}.lock"), log)',
           "shards that start together each sample the whole original: about an hour of one core idle at DDIM 50",
           (BENCH + "::test_shards_started_together_split_the_originals_batches",)),
    # -- the mask file, the sampling loop, pipelines, export ------------------------------
    Mutant("mask-bits-inverted-on-load", "maskc/mask.py",
           'bits = torch.tensor([[c == "1" for c in r]', 'bits = torch.tensor([[c == "0" for c in r]',
           "a saved mask loads as its complement: every block the file runs is skipped",
           (MASK + "::test_roundtrip",)),
    Mutant("mask-timesteps-unchecked", "maskc/mask.py",
           "if abs(float(a) - b) > 1e-6:", "if abs(float(a) - b) > 1e6:",
           "a mask learned for leading timesteps runs silently on trailing ones (same step count)",
           (MASK + "::test_scheduler_checks",)),
    Mutant("mask-fingerprint-ignores-shapes", "maskc/mask.py",
           '                h.update(f"{pn}{tuple(p.shape)}".encode())\n', "                pass\n",
           "a mask file without per-block hashes runs on a wider model with the same block names",
           (MASK + "::test_fingerprint_alone_refuses_other_shapes",)),
    Mutant("cfg-halves-swapped", "maskc/sampling.py",
           "    e_c, e_u = out.chunk(2)", "    e_u, e_c = out.chunk(2)",
           "guidance pushes away from the condition: learning and evaluation sample the wrong images",
           (SAMP + "::test_guided_noise_matches_two_separate_calls",)),
    Mutant("generate-mutates-scheduler", "maskc/sampling.py",
           "    sched = copy.deepcopy(scheduler)\n", "    sched = scheduler\n",
           "maskc.learn re-times and advances the user's scheduler",
           (SAMP + "::test_generate_leaves_the_callers_scheduler_as_it_was",)),
    Mutant("variance-channels-kept", "maskc/sampling.py",
           "    out = out[:, : x.shape[1]]\n", "",
           "a learned-variance model (DiT) hands its variance channels to the scheduler as noise",
           (SAMP + "::test_guided_noise_matches_two_separate_calls",)),
    Mutant("remove-keeps-step-modules", "maskc/pipelines.py",
           "    pipe.register_modules(**{name: tm.model})", "    pipe.register_modules(**{name: tm})",
           "maskc.remove(pipe) leaves the masked backbone in the pipeline",
           (PIPE + "::test_ddim_pipeline_equals_reference_twice_after_batch_change_and_after_remove",)),
    Mutant("pipeline-scheduler-swap-unchecked", "maskc/pipelines.py",
           "            _check_scheduler_class(self._mask, sched)\n", "",
           "a scheduler swapped in after apply() runs a mask made for another scheduler",
           (PIPE + "::test_mismatched_schedule_is_refused_before_any_backbone_work",)),
    Mutant("learn-inputs-uncond-is-cond", "maskc/pipelines.py",
           "uncond = text(ne, nm) if guided else None", "uncond = text(pe, pm) if guided else None",
           "learning from a text pipeline guides with the prompt instead of the negative prompt",
           (PIPE + "::test_learn_inputs_carry_the_pipelines_conditioning",)),
    Mutant("learn-inputs-dit-null-label", "maskc/pipelines.py",
           "null = 1000  # DiT", "null = 0  # DiT",
           "learning from DiTPipeline uses class 0 as the unconditional label",
           (PIPE + "::test_learn_inputs_carry_the_pipelines_conditioning",)),
    Mutant("learn-inputs-pixels-as-latents", "maskc/pipelines.py",
           "(height // vae_f) if height", "height if height",
           "learning from an LDM pipeline with height= samples latents the VAE factor too tall",
           (PIPE + "::test_learn_inputs_carry_the_pipelines_conditioning",)),
    Mutant("export-drops-before-read", "maskc/export.py",
           "        for b in self._drop_after[i]:\n",
           "        for b in (self._drop_after[i + 1] if i + 1 < len(self._drop_after) else []) + self._drop_after[i]:\n",
           "the exported runner frees a cached value one step before its last read",
           (EXPORT + "::test_unet_matches_eager_at_every_step_of_ddim",)),
    Mutant("export-reset-keeps-cache", "maskc/export.py",
           "        self._step = 0\n        self._cache.clear()", "        self._step = 0",
           "an exported runner reset midway keeps the abandoned generation's cache alive",
           (EXPORT + "::test_call_convention_overflow_and_refused_inputs",)),
    Mutant("export-inputs-unchecked", "maskc/export.py",
           "            if not _leaf_matches(x, rec):", "            if False:",
           "an exported runner called with another batch size runs programs specialized to the old one",
           (EXPORT + "::test_call_convention_overflow_and_refused_inputs",)),
    Mutant("blocks-nest", "passes/blocks.py",
           '        if not any(n.startswith(c + ".") for c in chosen):', "        if True:",
           "maskc.blocks(types=...) with types that nest selects a block and a module inside it",
           (RT + "::test_blocks_by_type_are_outermost_and_subclasses_inherit",)),
    Mutant("blocks-rule-exact-class", "passes/blocks.py",
           "    for cls in type(model).__mro__:", "    for cls in type(model).__mro__[:1]:",
           "a user's subclass of UNet2DModel has no default blocks",
           (RT + "::test_blocks_by_type_are_outermost_and_subclasses_inherit",)),
    Mutant("blocks-named-order", "passes/blocks.py",
           "    return sorted(names, key=first.__getitem__)", "    return list(names)",
           "a U-Net's blocks listed in named_modules order (up blocks before the mid block): masks' columns "
           "and the learner's order of blocks are not the order they run in",
           (RT + "::test_blocks_in_execution_order",)),
    Mutant("cli-learn-target-dropped", "maskc/cli.py",
           "                          target=args.target, cond=cond, uncond=uncond",
           "                          target=0.6, cond=cond, uncond=uncond",
           "maskc learn --target 0.7 learns a 0.6 mask", ("tests/test_cli.py::test_learn_from_a_model_folder",)),
    Mutant("cli-learn-seed-dropped", "maskc/cli.py",
           "        return functools.partial(maskc.learn, seed=args.seed[0])",
           "        return functools.partial(maskc.learn, seed=0)",
           "maskc learn --seed is ignored: every seed gives the same mask", ("tests/test_cli.py::test_learn_from_a_model_folder",)),
    Mutant("cli-bench-own-shard-only-ignored", "maskc/cli.py",
           "help_shards=not args.own_shard_only", "help_shards=True",
           "maskc bench --shard 0/3 --own-shard-only goes on to sample the other shards' methods",
           ("tests/test_cli.py::test_bench_shard_flags_reach_the_config",)),
    Mutant("cli-sample-rows-swapped", "maskc/cli.py",
           '    if mask is None or args.compare:\n        variants.append(("original", model))\n'
           '    if mask is not None:\n        variants.append(("maskc", maskc.compile(model, mask)))\n',
           '    if mask is not None:\n        variants.append(("maskc", maskc.compile(model, mask)))\n'
           '    if mask is None or args.compare:\n        variants.append(("original", model))\n',
           "maskc sample --compare puts the masked row on top, where the picture says the original is",
           ("tests/test_cli.py::test_sample_applies_the_mask",)),
    Mutant("diff-dead-blocks-shown-running", "maskc/diff.py",
           "(CACHED if not on else RUNS if b in run else DEAD)", "(CACHED if not on else RUNS)",
           "the diff page draws blocks that dead-code elimination removed as running",
           ("tests/test_diff.py::test_page_names_every_skipped_block_as_cached",)),
    Mutant("rectify-demand-sticks", "passes/rectify.py",
           "                needed[b] = need\n                pending[b] = False\n", "                needed[b] = need\n",
           "a cached read keeps every earlier run of the block alive, not only the latest: dead runs are kept",
           (INV,)),
    Mutant("rectify-drops-first-run", "passes/rectify.py",
           "                    need = True  # keep", "                    need = False  # keep",
           "rectify removes a block's first run although later steps skip it: they read an empty cache",
           ("tests/test_rectify.py::test_first_run_of_a_later_skipped_block_is_kept_even_when_dead",)),
    Mutant("isolated-run-erases-first-run", "passes/rectify.py",
           "if alone_in_time and alone_in_depth and ran_before[i, j]:", "if alone_in_time and alone_in_depth:",
           "the isolated-run heuristic turns off a block's first run, leaving later reads an empty cache",
           ("tests/test_rectify.py::test_heuristic_rules_keep_a_blocks_first_run",)),
    Mutant("stage-skipped-erases-first-run", "passes/rectify.py",
           "if len(cols) > 1 and len(on) == 1 and ran_before[i, on[0]]:", "if len(cols) > 1 and len(on) == 1:",
           "the stage-skipped heuristic turns off a block's first run, leaving later reads an empty cache",
           ("tests/test_rectify.py::test_heuristic_rules_keep_a_blocks_first_run",)),
)


def _copy_package(dst: str) -> str:
    """A copy of the repository under ``dst`` in which ``maskc`` is importable from the folder itself.

    ``passes/`` is nested as ``maskc/passes`` (the layout an install has), and the tests run
    with the copy as working directory, which Python puts before the installed package.
    """
    pkg = os.path.join(dst, "pkg")
    ignore = shutil.ignore_patterns("weights", "__pycache__", ".hypothesis")
    shutil.copytree(os.path.join(ROOT, "maskc"), os.path.join(pkg, "maskc"), ignore=ignore)
    os.symlink(os.path.join(ROOT, "maskc", "models", "weights"), os.path.join(pkg, "maskc", "models", "weights"))
    shutil.copytree(os.path.join(ROOT, "passes"), os.path.join(pkg, "maskc", "passes"), ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(pkg, "tests"), ignore=ignore)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), pkg)
    return pkg


def _target(pkg: str, file: str) -> str:
    top, rest = file.split("/", 1)
    return os.path.join(pkg, "maskc", rest) if top == "maskc" else os.path.join(pkg, "maskc", "passes", rest)


def plant(pkg: str, m: Mutant) -> None:
    path = _target(pkg, m.file)
    with open(path) as f:
        src = f.read()
    if src.count(m.old) != 1:
        raise RuntimeError(f"mutant {m.name}: the snippet occurs {src.count(m.old)} times in {m.file}; update tests/mutation.py")
    with open(path, "w") as f:
        f.write(src.replace(m.old, m.new))


def _env(pkg: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg + os.pathsep + env.get("PYTHONPATH", "")
    env["HYPOTHESIS_PROFILE"] = "mutation"
    env["MASKC_MUTANT_ROOT"] = pkg  # tests/conftest.py checks maskc is imported from here
    env.pop("PYTEST_ADDOPTS", None)
    return env


IMPORTS_CHECKED = ".maskc-imports-checked"  # written by tests/conftest.py under MASKC_MUTANT_ROOT


def check_imports_copy(pkg: str) -> None:
    """The pytest run in ``pkg`` imported maskc from the copy: its conftest checked and left a marker.

    (Checked inside the run, not by a separate interpreter: one Python start less per mutant.)"""
    marker = os.path.join(pkg, IMPORTS_CHECKED)
    if not os.path.exists(marker):
        raise RuntimeError(f"the tests in {pkg} did not check where maskc came from (no {IMPORTS_CHECKED}): "
                           "tests/conftest.py must run its MASKC_MUTANT_ROOT check")
    with open(marker) as f:
        files = f.read().split()
    if not files or not all(os.path.realpath(f).startswith(os.path.realpath(pkg)) for f in files):
        raise RuntimeError(f"the tests imported {files}, not the mutated copy under {pkg}")


@dataclass
class Result:
    mutant: Mutant
    killed: bool
    seconds: float
    killer: str  # first failing test, or ""
    tail: str


# A pytest run per mutant spends most of its time importing torch, diffusers, transformers and
# inductor. A fork server imports them once (never maskc) and forks a child per run, which
# chdirs into the copy, puts it first on sys.path and runs pytest.main there: the same
# isolation as a fresh interpreter (each child starts from the same untouched parent), at a
# fraction of the start-up. MASKC_MUTANT_FORK=0 runs each mutant in a fresh interpreter.
_FORK_SERVER = r"""
import atexit, json, os, signal, sys, traceback
import numpy, torch, networkx, hypothesis, pytest, safetensors
import diffusers
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
import torch._dynamo, torch._inductor.compile_fx, torch.export, torch.fx
for optional in ("timm", "torchmetrics", "transformers"):  # the tests that need them skip without them
    try:
        __import__(optional)
    except ImportError:
        pass
try:
    from transformers import CLIPTextModel, CLIPTokenizer  # lazy modules: load them here, not in each child
except ImportError:
    pass
# the plugins pytest loads from entry points (whichever are installed), imported here once too
from importlib.metadata import entry_points
for ep in entry_points(group="pytest11"):
    try:
        ep.load()
    except Exception:  # a plugin that cannot load here fails the same way in the child, where pytest reports it
        pass
assert not any(k == "maskc" or k.startswith("maskc.") for k in sys.modules), "the server must not import maskc"
# everything the server holds goes to gc's permanent generation: a child's collections (pytest runs gc.collect
# at exit) skip the server's millions of objects instead of scanning them, and so do not touch, and copy,
# their pages either
import gc
gc.collect()
gc.freeze()
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.clear()
            os.environ.update(req["env"])
            os.chdir(req["cwd"])
            sys.path.insert(0, req["cwd"])
            signal.alarm(max(1, int(req["timeout"])))  # its default action ends the child
            code = int(pytest.main(req["args"]))
            signal.alarm(0)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                atexit._run_exitfuncs()  # what an interpreter's exit runs (inductor stops its compile workers)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""
_servers = threading.local()
_started: list[subprocess.Popen] = []
_broken: list[str] = []  # why a server could not start: then every later run takes the slow path at once


@atexit.register
def _stop_servers() -> None:
    for srv in _started:  # end of input ends a server's loop
        if srv.stdin is not None and not srv.stdin.closed:
            srv.stdin.close()
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()


def _discard(srv: subprocess.Popen) -> None:
    srv.kill()
    srv.wait()
    for pipe in (srv.stdin, srv.stdout):
        if pipe is not None:
            pipe.close()


def _fork_server() -> subprocess.Popen | None:
    """This thread's fork server (started on first use), or None where it cannot run."""
    if os.environ.get("MASKC_MUTANT_FORK", "1") == "0" or not hasattr(os, "fork") or _broken:
        return None
    srv = getattr(_servers, "proc", None)
    if srv is not None and srv.poll() is None:
        return srv
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "MASKC_MUTANT_ROOT")}
    srv = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, cwd=tempfile.gettempdir(), env=env)
    if srv.stdout is None or srv.stdout.readline().strip() != "ready":
        _discard(srv)
        _broken.append("the fork server did not start (its error is on stderr above)")
        warnings.warn(f"planted-bug harness: {_broken[0]}; each mutant runs in a fresh interpreter, "
                      "which imports torch and diffusers again (seconds more per mutant)")
        return None
    _servers.proc = srv
    _started.append(srv)
    return srv


def _run_forked(args: list[str], env: dict[str, str], cwd: str, timeout: float) -> tuple[str, int] | None:
    """pytest ``args`` in a child of the fork server: (output, exit code; -1 on timeout), or None if no server."""
    srv = _fork_server()
    if srv is None:
        return None
    out_path = os.path.join(cwd, ".pytest-output")
    try:
        assert srv.stdin is not None and srv.stdout is not None
        srv.stdin.write(json.dumps({"args": args, "env": env, "cwd": cwd, "out": out_path, "timeout": timeout}) + "\n")
        srv.stdin.flush()
        code = int(json.loads(srv.stdout.readline())["code"])
    except (OSError, ValueError, KeyError) as e:
        _discard(srv)
        warnings.warn(f"planted-bug harness: the fork server died ({type(e).__name__}: {e}); this mutant runs in a "
                      "fresh interpreter and the next one starts a new server")
        return None
    with open(out_path, errors="replace") as f:
        out = f.read()
    if code == -signal.SIGALRM:
        return f"{out}\ntimed out after {timeout} s", -1
    return out, code


def run_mutant(m: Mutant | None, tests: tuple[str, ...], timeout: float = 900,
               planter: Callable[[str], None] | None = None) -> Result:
    """Plant ``m`` (None: no bug, the baseline) in a copy and run ``tests`` with -x.

    ``planter(pkg)``, if given, plants the bug instead (e.g. a cosmic-ray mutation).
    """
    with tempfile.TemporaryDirectory(prefix="maskc-mutant-") as d:
        pkg = _copy_package(d)
        if planter is not None:
            planter(pkg)
        elif m is not None:
            plant(pkg, m)
        t0 = time.perf_counter()
        # -o addopts replaces the copied pyproject's addopts (--durations would fill the tail kept for survivors)
        opts = ["-x", "-q", "-o", "addopts=-p no:cacheprovider", "-m", "not mutation", "--no-header", "-rf"]
        cmd = [sys.executable, "-m", "pytest", *opts, *tests]
        # plugins the server imported (anyio, via transformers) are not assertion-rewritten: say nothing about it
        forked = _run_forked([*opts, "-W", "ignore::pytest.PytestAssertRewriteWarning", *tests], _env(pkg), pkg, timeout)
        if forked is not None:
            out, code = forked
        else:
            try:
                r = subprocess.run(cmd, env=_env(pkg), cwd=pkg, capture_output=True, text=True, timeout=timeout)
                out, code = r.stdout + r.stderr, r.returncode
            except subprocess.TimeoutExpired as e:
                out, code = f"timed out after {timeout} s: {e}", -1
        secs = time.perf_counter() - t0
        if code != -1:
            check_imports_copy(pkg)
    killer = next((ln.split(" ", 1)[1].split(" - ")[0] for ln in out.splitlines() if ln.startswith("FAILED ")), "")
    dummy = m or Mutant("baseline", "", "", "", "no bug planted")
    return Result(dummy, code != 0, secs, killer, "\n".join(out.splitlines()[-15:]))
