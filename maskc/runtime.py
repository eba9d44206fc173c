"""Runtime: TimestepModules, a drop-in for the backbone that dispatches on the step.

The i-th call after construction or ``reset()`` runs ``tm[i]``: the capture of the
model specialized to mask row i (skipped blocks are cache reads). The object owns
the cache; it holds only values a later step reads and frees each after its last
read. A call whose inputs differ in structure, shape, dtype, device or any
non-tensor argument from the current trace is retraced at step 0 and refused in
the middle of a generation.

Timesteps: when the mask records the timesteps it was made for (``mask.meta``), the
timestep argument of each call is checked against them without a device sync per
step: a Python number or a CPU tensor is compared at every step (no sync); a device
tensor is compared once per generation, at step 1 (steps 0 and 1 in one copy, one
sync; two values tell apart step counts and spacings that share a first timestep).
``reset(timesteps)`` checks a whole generation's timesteps at once instead (what
``maskc.apply`` does with the scheduler's), and ``follow(source)`` starts a new
generation whenever the source returns a new timesteps object.

To a caller that reads the backbone's attributes (a diffusers pipeline reads
``unet.config``, ``.dtype``, ``.device``), TimestepModules looks like the backbone:
those and any other public attribute it does not have itself are read from the model.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from maskc.errors import InputChangedError, MaskcError, MaskMismatchError, StepOverflowError
from maskc.mask import Mask
from maskc.passes.capture import Capture, capture, flatten_inputs, guard_key
from maskc.passes.segments import fuse_glue, glue_positions
from maskc.passes.schedule import Schedule, cache_timeline, check_reads_filled, schedule

__all__ = ["TimestepModules", "compile"]


COMPILE_UNITS = ("block", "step")


def _meta(args: tuple, kwargs: dict) -> tuple:
    """What a compiled program is specialized to: the arguments' structure (tuples of tensors included) and
    each tensor's shape, strides, dtype and device, or each other leaf's value; never a tensor's values."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (str(spec),) + tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor)
                               else (type(a).__name__, repr(a)) for a in leaves)


def _own_code(fn: Callable, label: str) -> Callable:
    """``fn`` with a code object of its own.

    Dynamo keeps compiled entries per code object and checks their guards in turn at every
    call, up to 8 (``recompile_limit``); a fullgraph compile past that fails. Compiling the
    blocks themselves would pile every block of a class onto one code object
    (``Module._call_impl``); one code object per program (block or glue run, and input
    shapes) keeps exactly one entry each, however many traces come and go.
    """
    import types

    code = fn.__code__.replace(co_name=label.replace(".", "_").replace(" ", "_"))
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _call_block(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return block(*args, **kwargs)


def _module_signature(m: torch.nn.Module) -> tuple:
    """What a program's guards may read of a module besides tensor shapes: its type, the names, shapes and
    dtypes of its parameters and buffers, and its plain attributes (``eps``, ``bias=None``, ``training``).
    Glue runs of the same code share a program only when these agree, so it never needs a second entry."""
    plain = (bool, int, float, str, type(None))
    return tuple(
        (name, type(sub).__name__,
         tuple((n, tuple(t.shape), t.dtype) for n, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]),
         tuple(sorted((k, v) for k, v in vars(sub).items() if isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v)))))
        for name, sub in m.named_modules())


class _GlueModules(torch.nn.Module):
    """The modules ``m0, m1, ...`` of a canonical glue run: ``self`` of its shared program (one class
    for every run, so the program's guards see one type whatever layer's modules it gets)."""

    def __init__(self, run: torch.fx.GraphModule) -> None:
        super().__init__()
        for name, m in run.named_children():
            setattr(self, name, m)


_EAGER = object()  # a program dynamo or the backend could not compile: each piece runs its own eager code
# a graph break, or the backend failing on the piece's graph: that piece runs eager, the rest stays compiled
# (and, should a program's guards ever fail 8 times, dynamo's recompile limit: that piece too)
_CANNOT = (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError, torch._dynamo.exc.BackendCompilerFailed,
           torch._dynamo.exc.FailOnRecompileLimitHit)


_MISS = object()  # a call the direct path does not take: it goes through dynamo
_PLAIN = (bool, int, float, str, type(None))
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
             operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
             operator.imatmul, operator.setitem}


def _writes(n: torch.fx.Node) -> bool:
    """Whether a node of a dynamo graph may write a tensor in place (conservative: any in-place-named op)."""
    if n.op not in ("call_function", "call_method"):
        return False
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return (n.target in _IN_PLACE or (name.endswith("_") and not name.endswith("__"))
            or "out" in n.kwargs or n.kwargs.get("inplace") is True)


class _Program:
    """A piece's code compiled by ``torch.compile`` (one code object, fullgraph, static shapes), and the
    graph its backend compiled, recorded to be called without dynamo (see ``_Direct``).

    ``template`` says where each input of that graph comes from, relative to the call that compiled it:
    ``("arg", i)`` the i-th leaf of the call's (args, kwargs), ``("attr", name)`` a parameter or buffer of
    its first argument (the block, or the glue run's modules); False when some input is neither.
    """

    def __init__(self, fn: Callable, label: str, backend: str | Callable) -> None:
        self.inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        self.dynamo = torch.compile(_own_code(fn, label), backend=self._record, fullgraph=True, dynamic=False)
        self.compiles = 0
        self.compiled: Callable | None = None
        self.writes = True  # the graph has an in-place operation (it might write its inputs)
        self.template: list[tuple[str, Any]] | bool | None = None
        self._example_ids: list[int] | None = None

    def _record(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        compiled = self.inner(gm, example_inputs)
        self.compiles += 1
        self.compiled = compiled
        self.writes = any(_writes(n) for n in gm.graph.nodes)
        # ids only: the inputs themselves (activations) are not kept alive
        self._example_ids = [id(e) if type(e) in _TENSOR_TYPES else None for e in example_inputs]
        return compiled

    def make_template(self, first: Any, leaves: list) -> None:
        """Where the compiled graph's inputs come from, read off the call that compiled it (``first`` and
        the flat leaves of its arguments, each tensor given once)."""
        ids = self._example_ids
        self._example_ids = None
        self.template = False
        if ids is None or None in ids:
            return
        tensors = [id(t) for t in leaves if isinstance(t, torch.Tensor)]
        if len(set(tensors)) != len(tensors):  # an argument given twice: the graph may rely on the alias
            return
        at = {id(t): i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)}
        attrs: dict[int, str] = {}
        if isinstance(first, torch.nn.Module):
            for n, t in [*first.named_parameters(remove_duplicate=False), *first.named_buffers(remove_duplicate=False)]:
                attrs.setdefault(id(t), n)
        template = []
        for i in ids:
            if i in at:
                template.append(("arg", at[i]))
            elif i in attrs:
                template.append(("attr", attrs[i]))
            else:  # a global or a plain module attribute: dynamo guards on its identity; keep dynamo
                return
        self.template = template


class _Direct:
    """One piece's call of its program's compiled graph without dynamo, taken once shown equal to dynamo's.

    Dynamo checks a program's guards at every call (each parameter's properties, the modules'
    attributes, the global state); for the small blocks of a DiT that costs about as much as their
    arithmetic. Within a trace a piece is always given arguments of the same structure and shapes,
    so the piece calls the backend's graph with the inputs dynamo would pass: its own parameters
    (resolved once) and its arguments' tensors (picked by position), and rebuilds the result. A call
    whose argument structure, non-tensor values or global state (grad mode, autocast, default dtype,
    ...) differ from the first one's goes through dynamo instead.
    """

    __slots__ = ("compiled", "base", "slots", "in_spec", "consts", "state", "out_base", "out_slots", "out_spec",
                 "n_args", "kw_keys", "out_kind")

    def __init__(self, compiled: Callable, base: list, slots: list[tuple[int, int]], args: tuple, kwargs: dict,
                 in_spec: Any, consts: list[tuple[int, Any]], state: Any, ret: Any, out_leaves: list, out_spec: Any) -> None:
        self.compiled, self.base, self.slots, self.consts, self.state = compiled, base, slots, consts, state
        self.in_spec, self.out_spec = in_spec, out_spec
        # arguments that are all leaves (the usual case) are flattened without pytree: same leaves, same order
        flat = all(isinstance(v, (torch.Tensor, *_PLAIN)) for v in (*args, *kwargs.values()))
        self.n_args, self.kw_keys = (len(args), tuple(kwargs)) if flat else (None, None)
        self.out_slots = [i for i, v in enumerate(out_leaves) if isinstance(v, torch.Tensor)]
        self.out_base = [None if isinstance(v, torch.Tensor) else v for v in out_leaves]
        self.out_kind = ("tensor" if type(ret) in _TENSOR_TYPES else
                         "tuple" if type(ret) is tuple and all(type(v) in _TENSOR_TYPES for v in ret) else "tree")

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        if self.n_args is not None and len(args) == self.n_args and tuple(kwargs) == self.kw_keys:
            leaves = [*args, *kwargs.values()]
            if any(isinstance(v, (tuple, list, dict)) for v in leaves):
                return _MISS
        else:
            leaves, structure = pytree.tree_flatten((args, kwargs))
            if structure != self.in_spec:
                return _MISS
        if not self.state.check():
            return _MISS
        for i, v in self.consts:
            if type(leaves[i]) is not type(v) or leaves[i] != v:
                return _MISS
        out = self.run(leaves)
        if out is _MISS:
            return out
        if self.out_kind == "tensor":
            return out[0]
        if self.out_kind == "tuple":
            return tuple(out)
        res = list(self.out_base)
        for pos, o in zip(self.out_slots, out):
            res[pos] = o
        return pytree.tree_unflatten(res, self.out_spec)

    def run(self, leaves: list) -> Any:
        """The compiled graph's flat outputs for the flat argument leaves of a call (_MISS if a leaf that
        must be a tensor is not one)."""
        inputs = list(self.base)
        for pos, i in self.slots:
            v = inputs[pos] = leaves[i]
            if type(v) not in _TENSOR_TYPES:  # a tensor argument left out (None) or given as a subclass
                return _MISS
        return self.compiled(*inputs)


def _same(a: torch.Tensor, b: Any) -> bool:
    return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.stride() == b.stride() and bool(torch.equal(a, b)))


def _first_call(program: _Program, first: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """Call ``program`` through dynamo; return its result and the piece's ``_Direct`` (False when the
    direct call cannot be shown to do the same: the graph has in-place operations, an input is not a
    plain tensor or number or is not found, the program has more than one graph, or the direct call's
    result is not bit for bit dynamo's)."""
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    state = torch._C._dynamo.guards.GlobalStateGuard()
    ret = program.dynamo(first, *args, **kwargs)
    if program.template is None and program.compiles == 1:
        program.make_template(first, leaves)
    if (program.compiles != 1 or not program.template or torch.compiler.is_compiling()
            or program.writes  # it might write its inputs: running it again to check would write them twice
            or any(not (type(v) in _TENSOR_TYPES or isinstance(v, _PLAIN)) for v in leaves)):
        return ret, False
    base: list[Any] = []
    slots = []
    for pos, (kind, where) in enumerate(program.template):
        if kind == "arg":
            base.append(None)
            slots.append((pos, where))
        else:
            base.append(operator.attrgetter(where)(first))
    consts = [(i, v) for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)]
    out_leaves, out_spec = pytree.tree_flatten(ret)
    if any(not isinstance(v, (torch.Tensor, *_PLAIN)) for v in out_leaves):
        return ret, False
    direct = _Direct(program.compiled, base, slots, args, kwargs, in_spec, consts, state, ret, out_leaves, out_spec)
    got = list(direct.run(leaves))  # every leaf is a plain tensor or number here: never _MISS
    if len(got) != len(direct.out_slots) or not all(_same(g, out_leaves[i]) for g, i in zip(got, direct.out_slots)):
        return ret, False
    return ret, direct


class _Compiled(torch.nn.Module):
    """A block or a glue run of one trace, run by a compiled program shared through the compiler.

    The program is picked at the first call by ``key`` and the inputs' shapes, strides and
    dtypes (fixed for the life of a trace): the same block in every step variant, and glue
    runs of the same code in any layer, share it. The first call goes through dynamo; later
    ones call the compiled graph directly when ``_first_call`` could show that equal
    (``_Direct``). Where dynamo cannot take the piece whole (a graph break) or the backend
    fails on it, it runs eager from then on, with one warning per program.
    """

    def __init__(self, owner: "_BlockCompiler", what: str, key: Any, fn: Callable, first: Any, eager: Callable) -> None:
        super().__init__()
        self.owner, self.what, self.key, self.fn, self.eager = owner, what, key, fn, eager
        self.first = first  # the program's first argument: the block, or the run's modules
        self.program: Any = None
        self.program_key: Any = None  # (key, input metadata), set with the program at the first call
        self.direct: Any = None  # _Direct, False where dynamo stays, None before the first call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        direct = self.direct
        if direct and not torch.compiler.is_compiling():
            out = direct(args, kwargs)
            if out is not _MISS:
                return out
        program = self.program
        if program is None:
            self.program_key = (self.key, _meta(args, kwargs))
            program = self.program = self.owner.program(self.what, self.program_key, self.fn)
        if program is not _EAGER:
            try:
                if direct is None and self.owner.direct:
                    out, self.direct = _first_call(program, self.first, args, kwargs)
                    self.owner.direct_pieces += bool(self.direct)
                    return out
                return program.dynamo(self.first, *args, **kwargs)
            except _CANNOT as e:
                self.program = self.owner.failed(self.what, self.program_key, e)
        return self.eager(*args, **kwargs)


class _BlockCompiler:
    """Blocks and glue runs compiled once and shared by every step variant and every trace.

    A step variant is its glue calling the shared compiled blocks: a mask with V distinct
    step graphs costs one compile per distinct (block, input shapes), not V whole-model
    compiles. The glue's runs between blocks are fused (``passes.segments``) and compiled
    too, each distinct (code, module types, input shapes) once for all steps and layers;
    runs too small to gain (fewer than ``glue_min_ops`` operations) stay eager.
    """

    def __init__(self, backend: str | Callable, glue_min_ops: int = 3, direct: bool = True) -> None:
        self.backend = backend
        self.glue_min_ops = glue_min_ops
        self.direct = direct  # pieces call their compiled graphs without dynamo once shown equal (_Direct)
        self.direct_pieces = 0
        self.programs: dict[Any, Any] = {}  # (kind, key, meta) -> compiled program, or _EAGER
        self.eager_blocks: dict[str, str] = {}  # block -> why it runs eager
        self.eager_glue = 0  # glue programs that run eager

    def program(self, what: str, key: Any, fn: Callable) -> Callable:
        got = self.programs.get(key)
        if got is None:
            got = self.programs[key] = _Program(fn, f"maskc {what} {len(self.programs)}", self.backend)
        return got

    def failed(self, what: str, key: Any, e: Exception) -> Any:
        """Mark the program ``key`` eager for every piece that shares it (each then runs its own eager code)."""
        import warnings

        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if key[0][0] == "block":
            self.eager_blocks[key[0][1]] = reason
        else:
            self.eager_glue += 1
        self.programs[key] = _EAGER
        warnings.warn(
            f"maskc: {what} cannot be compiled as one graph ({reason}); it runs eager, the rest stays compiled. "
            "A graph break comes from data-dependent control flow; a backend failure is the backend's to report.",
            stacklevel=3)
        return _EAGER

    def glue(self, gm: torch.fx.GraphModule, fuse: bool = True, positions: dict[str, int] | None = None,
             ) -> torch.fx.GraphModule:
        """``gm`` with each block call redirected to its shared compiled block (same calling convention)
        and, with ``fuse``, each glue run of ``glue_min_ops`` or more operations one compiled call
        (runs cut where the capture had a block too, given its ``positions``)."""
        import copy

        graph = copy.deepcopy(gm.graph)
        root: dict[str, Any] = {}
        for n in graph.nodes:
            if n.op == "call_module":
                if "maskc_block" in n.meta:
                    name = n.meta["maskc_block"]
                    block = gm.get_submodule(n.target)
                    n.target = "maskc_compiled_" + "_".join(name.split("."))
                    root[n.target] = _Compiled(self, f"block {name!r}", ("block", name, id(block)), _call_block,
                                               block, block)
                else:
                    root[n.target] = gm.get_submodule(n.target)
            elif n.op == "get_attr":
                root[n.target] = operator.attrgetter(n.target)(gm)
        glue = torch.fx.GraphModule(root, graph, class_name="MaskedStepGlue")
        if fuse:
            glue, runs = fuse_glue(glue, self.glue_min_ops, positions)
            for target, run in runs.items():
                mods = _GlueModules(run)
                key = ("glue", run.code, tuple(_module_signature(m) for m in mods.children()))
                setattr(glue, target, _Compiled(self, "a glue run between blocks", key, type(run).forward, mods, run))
        return glue

    def report(self) -> dict[str, Any]:
        """Blocks compiled and run eager (with why); programs (one per piece and input shapes) of each kind."""
        kinds = [k[0][0] for k in self.programs]
        blocks = {k[0][1] for k in self.programs if k[0][0] == "block"}
        return {"compiled_blocks": len(blocks - set(self.eager_blocks)), "eager_blocks": dict(self.eager_blocks),
                "block_programs": kinds.count("block"), "glue_programs": kinds.count("glue"),
                "eager_glue_programs": self.eager_glue, "direct_pieces": self.direct_pieces}


def _step_callable(gm: torch.fx.GraphModule, backend: str | Callable, blocks: _BlockCompiler | None,
                   fuse: bool = True, positions: dict[str, int] | None = None) -> Callable:
    """The step graph itself for eager; its glue over shared compiled blocks; or torch.compile of the whole step."""
    if backend == "eager":
        return gm
    if blocks is not None:
        return blocks.glue(gm, fuse, positions)
    return torch.compile(gm, backend=backend, fullgraph=True, dynamic=False)


class _Plan:
    """Everything derived from one capture: the step graphs and their compiled callables."""

    def __init__(self, cap: Capture, sched: Schedule, backend: str | Callable, blocks: _BlockCompiler | None) -> None:
        self.capture = cap
        self.schedule = sched
        self.static: Any = None  # StaticSteps when cuda_graphs=True (False: this trace cannot use them)
        self.callables: list[Callable] = []
        compiled: dict[int, Callable] = {}
        positions = glue_positions(cap.gm.graph) if blocks is not None else None
        for sg in sched.steps:
            fn = compiled.get(id(sg))
            if fn is None:
                fn = _step_callable(sg.gm, backend, blocks, positions=positions)
                compiled[id(sg)] = fn
            self.callables.append(fn)

    def step(self, i: int) -> tuple[Any, Callable]:
        return self.schedule.steps[i], self.callables[i]


def run_step(plan: Any, i: int, tensors: list[Any], cache: dict[str, Any]) -> tuple[list[Any], int]:
    """Step i of ``plan`` on ``cache``: its graph fed the cached values it reads; the values later
    steps read kept, the entries whose last read this was freed. Returns the flat outputs and the
    number of entries held at the step's peak (after its writes, before the frees)."""
    sg, fn = plan.step(i)
    out = fn(*tensors, *[cache[b] for b in sg.reads])
    n = sg.n_outputs
    for b, v in zip(sg.writes, out[n:]):
        cache[b] = v
    held = len(cache)
    for b in plan.schedule.drop_after[i]:
        cache.pop(b, None)
    return list(out[:n]), held


class _StepPlan:
    """One step of a generation whose Python-number arguments (e.g. the timestep) changed.

    The step is traced anew and rewritten with the generation's schedule (same skips,
    same writes), so the cache stays consistent; its reads must come out the same.
    """

    def __init__(self, cap: Capture, base: _Plan, i: int, skip: tuple[str, ...], backend: str | Callable,
                 blocks: _BlockCompiler | None) -> None:
        from maskc.passes.rewrite import rewrite_step

        base_sg = base.schedule.steps[i]
        sg = rewrite_step(cap.gm, cap.block_nodes, skip, base_sg.writes)
        if sg.reads != base_sg.reads:
            raise InputChangedError(
                f"a non-tensor argument changed at step {i} and changed which cached values the step reads; "
                "keep non-tensor arguments fixed within a generation (pass the timestep as a tensor)"
            )
        self.capture = cap
        self.schedule = base.schedule
        self._sg = sg
        # its glue holds this step's numbers as constants: compiled, it would cost one compile per step
        self._fn = _step_callable(sg.gm, backend, blocks, fuse=False)

    def step(self, i: int) -> tuple[Any, Callable]:
        return self._sg, self._fn


class TimestepModules(torch.nn.Module):
    """T step-specialized modules of one backbone, called in order like the backbone itself."""

    def __init__(
        self,
        model: torch.nn.Module,
        mask: Mask,
        backend: str | Callable = "eager",
        example_args: tuple | None = None,
        example_kwargs: dict | None = None,
        max_traces: int = 4,
        compile_unit: str = "block",
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(mask, Mask):
            raise MaskcError(f"expected a maskc.Mask, got {type(mask).__name__}; build one with maskc.Mask(bits, names)")
        if compile_unit not in COMPILE_UNITS:
            raise MaskcError(f"compile_unit={compile_unit!r}: expected one of {COMPILE_UNITS} ('block': each block "
                             "compiled once and shared by all steps; 'step': each distinct step graph compiled whole)")
        mask.check(model)
        check_reads_filled(mask.bits, mask.names)
        self.model = model
        self.mask = mask
        self.backend = backend
        self.max_traces = max_traces
        self.compile_unit = compile_unit
        self.cuda_graphs = cuda_graphs
        self._warned_static = False
        self._blocks = _BlockCompiler(backend) if backend != "eager" and compile_unit == "block" else None
        self._plans: dict[Any, _Plan] = {}  # guard -> plan, most recent last
        self._plan: _Plan | None = None  # the plan of the current generation (set at step 0)
        self._step_plans: dict[tuple[Any, int], _StepPlan] = {}
        self._warned_numbers = False
        self._signature = None
        self._step = 0
        self._cache: dict[str, Any] = {}
        self.peak_cache_entries = 0
        self._want_ts: list[float] | None = mask.meta.get("timesteps")
        self._ts_param = _timestep_param(model)
        self._ts_checked = False  # this generation's timesteps were checked as a whole (reset(timesteps))
        self._t0: torch.Tensor | None = None  # step 0's device timestep, checked at step 1
        self._follow: Callable[[], Any] | None = None
        self._followed: tuple[Any, int] | None = None
        if example_args is not None or example_kwargs is not None:
            self._ensure_plan(tuple(example_args or ()), dict(example_kwargs or {}))

    # -- container protocol ------------------------------------------------------
    def __len__(self) -> int:
        return self.mask.steps

    def __getitem__(self, i: int) -> torch.fx.GraphModule:
        """The GraphModule of step i for the current trace (functional form, see passes.rewrite)."""
        if self._plan is None:
            raise MaskcError(
                "no trace yet: call the TimestepModules once, or pass example_args to maskc.compile, before tm[i]"
            )
        return self._plan.schedule.steps[i].gm

    def step_graph(self, i: int):
        """The StepGraph of step i: module plus its reads, writes and runs."""
        self[i]
        assert self._plan is not None
        return self._plan.schedule.steps[i]

    @property
    def step(self) -> int:
        """Index of the next call within the generation."""
        return self._step

    def reset(self, timesteps: Any = None) -> None:
        """Start a new generation: step counter to 0, cache emptied.

        With ``timesteps`` (the generation's, e.g. ``scheduler.timesteps`` after
        ``set_timesteps``), their count and values are checked against the mask now,
        once, and the per-step timestep check is off for this generation.
        """
        self._step = 0
        self._cache.clear()
        self._t0 = None
        self._ts_checked = False
        if timesteps is not None:
            self._check_timesteps(timesteps)
            self._ts_checked = True

    def follow(self, source: Callable[[], Any] | None) -> None:
        """Start a new generation whenever ``source()`` returns a new timesteps object.

        ``source`` is read before every call, e.g. ``lambda: pipe.scheduler.timesteps``
        (diffusers schedulers assign a new tensor in each ``set_timesteps``, which every
        pipeline call runs). A new object, or one changed in place, means
        ``reset(timesteps)``. ``None`` stops following.
        """
        self._follow = source
        self._followed = None

    # -- looking like the backbone -------------------------------------------------
    @property
    def config(self) -> Any:
        """The backbone's config (pipelines read ``unet.config.sample_size`` and the like)."""
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's dtype: its own ``dtype`` if it has one, else its first parameter's."""
        d = getattr(self.model, "dtype", None)
        if isinstance(d, torch.dtype):
            return d
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """The backbone's device: its own ``device`` if it has one, else its first parameter's."""
        d = getattr(self.model, "device", None)
        if isinstance(d, torch.device):
            return d
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def __getattr__(self, name: str) -> Any:
        """Public attributes this module lacks are read from the backbone (read-only lookups)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if name.startswith("_") or model is None:
                raise
        return getattr(model, name)

    # -- timesteps ----------------------------------------------------------------
    def _check_timesteps(self, timesteps: Any) -> None:
        """A whole generation's timesteps against the mask: count always, values if recorded."""
        ts = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
        if len(ts) != self.mask.steps:
            raise MaskMismatchError(
                f"the generation has {len(ts)} timesteps but the mask has T={self.mask.steps} rows; run "
                f"{self.mask.steps} steps (num_inference_steps={self.mask.steps}) or use a mask made for {len(ts)}"
            )
        if self._want_ts is not None:
            for i, t in enumerate(ts):
                self._timestep_mismatch(i, float(t))

    def _timestep_mismatch(self, i: int, got: float) -> None:
        want = float(self._want_ts[i]) if self._want_ts is not None and i < len(self._want_ts) else got
        if abs(got - want) > 1e-4 * max(1.0, abs(want)):
            raise MaskMismatchError(
                f"step {i} gets timestep {got:g}, but the mask was made for timestep {want:g} there "
                f"({self.mask.meta.get('scheduler', 'a scheduler')} with {self.mask.steps} steps): the schedules "
                f"differ in step count or spacing. Drive it with the timesteps it was made for "
                f"(scheduler.set_timesteps({self.mask.steps}) on the same scheduler), or make a mask for this schedule"
            )

    def _check_step_timestep(self, i: int, args: tuple, kwargs: dict) -> None:
        """Step i's timestep argument against the mask, without a device sync per step (module docstring)."""
        name, pos = self._ts_param  # type: ignore[misc]
        t = kwargs.get(name) if name in kwargs else (args[pos] if pos is not None and pos < len(args) else None)
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            self._timestep_mismatch(i, float(t))
        elif isinstance(t, torch.Tensor) and t.numel() > 0:
            first = t.reshape(-1)[:1]
            if first.device.type == "cpu":
                self._timestep_mismatch(i, float(first))
            elif i == 0:
                self._t0 = first
                if self.mask.steps == 1:
                    self._timestep_mismatch(0, float(first))
            elif i == 1 and self._t0 is not None:
                t0, t1 = torch.cat([self._t0, first.to(self._t0.dtype)]).tolist()  # one sync per generation
                self._timestep_mismatch(0, float(t0))
                self._timestep_mismatch(1, float(t1))

    # -- tracing -----------------------------------------------------------------
    def _ensure_plan(self, args: tuple, kwargs: dict) -> tuple[Any, list[Any]]:
        if self._signature is None:
            import inspect

            sig = inspect.signature(type(self.model).forward)
            self._signature = sig.replace(parameters=list(sig.parameters.values())[1:])
        leaves, spec = flatten_inputs(self._signature, args, kwargs)
        key = guard_key(leaves, spec)
        plan = self._plans.get(key)
        if self._step != 0 and plan is not self._plan:
            assert self._plan is not None
            if _only_numbers_differ(self._plan.capture.guard, key):
                return self._step_plan(key, args, kwargs), leaves
        if plan is None:
            if self._step != 0:
                assert self._plan is not None
                raise InputChangedError(
                    f"inputs changed at step {self._step} of a generation: "
                    f"{_describe_change(self._plan.capture.guard, key)}. A generation must keep batch size, "
                    "resolution, dtype, device and non-tensor arguments fixed; call reset() before a new one."
                )
            cap = capture(self.model, self.mask.names, args, kwargs)
            plan = _Plan(cap, schedule(cap, self.mask.bits, self.mask.names), self.backend, self._blocks)
            self._plans[key] = plan
            while len(self._plans) > self.max_traces:
                self._plans.pop(next(iter(self._plans)))
        elif self._step != 0 and plan is not self._plan:
            assert self._plan is not None
            raise InputChangedError(
                f"inputs changed at step {self._step} of a generation: "
                f"{_describe_change(self._plan.capture.guard, key)}; call reset() before a new one"
            )
        self._plan = plan
        return plan, leaves

    def _step_plan(self, key: Any, args: tuple, kwargs: dict) -> _StepPlan:
        i = self._step
        sp = self._step_plans.get((key, i))
        if sp is None:
            if not self._warned_numbers:
                import warnings

                warnings.warn(
                    "a Python-number argument (such as a timestep given as an int) changed within a generation: "
                    "maskc traces the model again for each such step, which costs about one extra forward. "
                    "Pass the timestep as a tensor, as diffusers pipelines do.",
                    stacklevel=4,
                )
                self._warned_numbers = True
            assert self._plan is not None
            cap = capture(self.model, self.mask.names, args, kwargs)
            skip = tuple(b for b, on in zip(self.mask.names, self.mask.bits[i].tolist()) if not on)
            sp = _StepPlan(cap, self._plan, i, skip, self.backend, self._blocks)
            self._step_plans[(key, i)] = sp
            while len(self._step_plans) > 2 * self.mask.steps:
                self._step_plans.pop(next(iter(self._step_plans)))
        return sp

    # -- the call ----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._follow is not None:
            ts = self._follow()
            key = (ts, getattr(ts, "_version", 0))
            if self._followed is None or key[0] is not self._followed[0] or key[1] != self._followed[1]:
                self.reset(ts)  # raises on a mismatch, and then again at every call until the schedule changes
                self._followed = key
        i = self._step
        if self._want_ts is not None and not self._ts_checked and self._ts_param is not None:
            self._check_step_timestep(i, args, kwargs)
        if i >= self.mask.steps:
            raise StepOverflowError(
                f"called {i + 1} times, but the mask has T={self.mask.steps} steps; "
                "call reset() before each new generation, or use a mask with as many rows as model evaluations"
            )
        plan, leaves = self._ensure_plan(args, kwargs)
        tensors = [leaves[j] for j in plan.capture.tensor_leaf_index]
        static = self._static(plan)
        if static is not None:
            flat = static(i, tensors)
            if static.device is not None and static.device.type != "cuda":
                self._warn_static(f"cuda_graphs=True with inputs on {static.device.type}: no CUDA graph is captured; "
                                  "the steps run eagerly over the same static buffers")
            self._step = i + 1
            return pytree.tree_unflatten(list(flat), plan.capture.out_spec)
        outs, held = run_step(plan, i, tensors, self._cache)
        self.peak_cache_entries = max(self.peak_cache_entries, held)
        self._step = i + 1
        return pytree.tree_unflatten(outs, plan.capture.out_spec)

    def _static(self, plan: Any) -> Any:
        """The trace's StaticSteps when cuda_graphs=True and the trace allows them, else None."""
        if not self.cuda_graphs or not isinstance(plan, _Plan):
            return None
        if plan.static is None:
            from maskc.cudagraphs import StaticSteps, static_support

            why = static_support(plan)
            if why is not None:
                self._warn_static(f"cuda_graphs=True: {why}; this trace runs without static buffers or CUDA graphs")
                plan.static = False
            else:
                plan.static = StaticSteps(plan)
        return plan.static or None

    def _warn_static(self, msg: str) -> None:
        if not self._warned_static:
            import warnings

            warnings.warn(msg, stacklevel=4)
            self._warned_static = True

    def cache_report(self) -> dict[str, Any]:
        """Cache bytes held during each step (this mask's liveness) against caching every block.

        ``all_blocks_bytes`` is what a cache keeping every block's latest output holds
        (DeepCache's approach) once every block has run.
        """
        self[0]
        assert self._plan is not None
        nbytes = {
            n.meta["maskc_block"]: int(n.meta.get("maskc_out_bytes", 0))
            for n in self._plan.capture.gm.graph.nodes
            if "maskc_block" in n.meta
        }
        per_step = cache_timeline(self._plan.schedule, nbytes)
        report = {
            "per_step_bytes": per_step,
            "peak_bytes": max(per_step) if per_step else 0,
            "all_blocks_bytes": sum(nbytes.values()),
            "block_bytes": nbytes,
        }
        if self._plan.static:  # cuda_graphs=True: static slots (shared where lifetimes allow), graphs, pool
            report["static"] = self._plan.static.report()
        return report

    def compile_report(self) -> dict[str, Any]:
        """With a compiling backend and ``compile_unit="block"``: how many blocks are compiled, and
        which run eager because dynamo could not take them whole (block name -> reason)."""
        if self._blocks is None:
            return {"compile_unit": self.compile_unit, "backend": self.backend, "compiled_blocks": 0, "eager_blocks": {}}
        return {"compile_unit": self.compile_unit, "backend": self.backend, **self._blocks.report()}

    def cache_entries(self) -> list[str]:
        """Blocks whose value the cache holds right now."""
        return list(self._cache)


def _timestep_param(model: torch.nn.Module) -> tuple[str, int | None] | None:
    """(name, positional index or None) of the forward argument that is the timestep, if any."""
    import inspect

    try:
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    for k in ("timestep", "timesteps", "t"):
        for j, p in enumerate(params):
            if p.name == k:
                positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                return k, j if positional and all(
                    q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD) for q in params[:j]) else None
    return None


def _only_numbers_differ(old: Any, new: Any) -> bool:
    """Same structure and tensors; only Python int/float arguments differ."""
    if old[0] != new[0] or len(old[1]) != len(new[1]):
        return False
    for a, b in zip(old[1], new[1]):
        if a == b:
            continue
        if not (a[0] == b[0] == "C" and a[1] == b[1] and a[1] in ("int", "float")):
            return False
    return True


def _describe_change(old: Any, new: Any) -> str:
    if old[0] != new[0]:
        return "the argument structure differs"
    for k, (a, b) in enumerate(zip(old[1], new[1])):
        if a != b:
            kind = "tensor" if a[0] == "T" else "non-tensor"
            return f"{kind} input {k} was {a[1:]} and is now {b[1:]}"
    return "the inputs differ"


def compile(
    model: torch.nn.Module,
    mask: Mask,
    backend: str | Callable = "eager",
    example_args: tuple | None = None,
    example_kwargs: dict | None = None,
    compile_unit: str = "block",
    cuda_graphs: bool = False,
) -> TimestepModules:
    """T modules, one per step of ``mask``, in which skipped blocks are cache reads.

    ``backend="eager"`` runs the fx GraphModules as they are (bit-exact). Any other
    value is a ``torch.compile`` backend. With ``compile_unit="block"`` (the default)
    each block is compiled once (``fullgraph=True``, static shapes) and every step
    variant calls the same compiled block; the glue between blocks is cut into runs
    (``passes.segments``) and each distinct run is compiled once for all steps and
    layers, so compile time barely grows with the number of distinct steps; ``"step"`` compiles each distinct step graph
    whole instead (glue compiled too, one full compile per variant). ``cuda_graphs=True``
    runs each trace over static buffers and, on CUDA, replays one CUDA graph per distinct
    step variant (``maskc.cudagraphs``). The trace happens at the first call, or now if
    example inputs are given.
    """
    return TimestepModules(model, mask, backend, example_args, example_kwargs, compile_unit=compile_unit,
                           cuda_graphs=cuda_graphs)
