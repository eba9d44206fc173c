"""Export: a traced TimestepModules -> one .pt2 archive that runs a generation with torch alone.

``export(tm, "model.pt2")`` writes, with torch's PT2 archive format (``package_pt2``):

- ``weights``: a trivial exported program whose state dict (and constants) carry every
  weight of the backbone exactly once;
- ``step_<k>``: one program per *distinct* step graph of the traced schedule. Weights are
  not baked into them: each takes ``(weights, *model_tensor_inputs, *cache_reads)``, the
  weights it uses in the order listed in the manifest. So the archive holds the weights
  once however many variants there are, and a loaded runner holds them in memory once.
  With ``aoti=True`` the step programs are AOTInductor-compiled shared libraries instead
  of exported programs (one C++ compile per variant, tens of seconds each on a CPU);
- ``extra/maskc.json``: the manifest (which program runs at which step, its reads,
  writes and cache drops, the call signature, the traced input metadata and the output
  structure), plain JSON.

``load_exported(path)`` returns an ``ExportedRunner`` with the TimestepModules call
convention: the i-th call after loading or ``reset()`` runs step i; a call past T raises
``StepOverflowError``. It needs torch and the standard library only: this file imports
nothing else at module level, and ``load_exported`` imports neither maskc's tracer nor
diffusers. ``import maskc`` itself imports diffusers (``maskc/__init__`` pulls in the
learning code), so a deployment without maskc loads this one file by path::

    import importlib.util
    spec = importlib.util.spec_from_file_location("maskc_export", "/path/to/maskc/export.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    run = mod.load_exported("model.pt2")

Loaded this way the errors are local classes with the maskc names (``MaskcError``,
``StepOverflowError``, ``InputChangedError``); imported as ``maskc.export`` they are
maskc's own.

Invariants:
- step i of the runner computes exactly what step graph i of ``tm`` computes (same ops;
  exported programs run through ``ExportedProgram.module()``), on the same cache values;
- the programs are specialized to the trace: input shapes, dtypes and every non-tensor
  argument (e.g. ``return_dict``) are fixed; the runner refuses other inputs;
- outputs are rebuilt from the stored structure: tensors, tuples, lists and dicts as
  such; a model output class (diffusers' ``UNet2DOutput`` and other ``BaseOutput``
  subclasses) becomes an ``ExportedOutput`` with the same fields, readable as
  ``out.sample``, ``out["sample"]`` and ``out[0]``.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["export", "load_exported", "ExportedRunner", "ExportedOutput"]

FORMAT = "maskc-export"
VERSION = 1
MANIFEST = "maskc.json"
WEIGHTS = "weights"
_PREFIX = "model."  # the weights carrier holds the backbone as its submodule "model"

if __name__.startswith("maskc."):  # imported as part of maskc
    from maskc.errors import InputChangedError, MaskcError, StepOverflowError
else:  # this file loaded alone, with torch only (see the module docstring)

    class MaskcError(Exception):  # type: ignore[no-redef]
        """Base class of the errors of a standalone exported runner."""

    class StepOverflowError(MaskcError):  # type: ignore[no-redef]
        """The runner was called more than T times without reset()."""

    class InputChangedError(MaskcError):  # type: ignore[no-redef]
        """The inputs differ from the ones the archive was exported for."""


# -- output structure ----------------------------------------------------------------


class ExportedOutput:
    """A model output class rebuilt without its library: fields as attributes, keys and positions.

    ``out.sample``, ``out["sample"]`` and ``out[0]`` are the same tensor; ``to_tuple()``
    gives the fields in order, as diffusers' ``BaseOutput`` does (None fields left out).
    """

    def __init__(self, type_name: str, fields: dict[str, Any]) -> None:
        self.__dict__["_type_name"] = type_name
        self.__dict__["_fields"] = dict(fields)

    def __getattr__(self, k: str) -> Any:
        try:
            return self.__dict__["_fields"][k]
        except KeyError:
            raise AttributeError(f"{self._type_name} has no field {k!r}; fields: {list(self._fields)}") from None

    def __getitem__(self, k: int | str | slice) -> Any:
        if isinstance(k, str):
            return self._fields[k]
        return self.to_tuple()[k]

    def keys(self) -> list[str]:
        return list(self._fields)

    def to_tuple(self) -> tuple:
        return tuple(v for v in self._fields.values() if v is not None)

    def __len__(self) -> int:
        return len(self.to_tuple())

    def __repr__(self) -> str:
        return f"ExportedOutput[{self._type_name}]({', '.join(self._fields)})"


def _spec_to_json(spec: pytree.TreeSpec) -> dict:
    """A TreeSpec as plain JSON: leaves, tuples, lists, dicts, namedtuples and dict-like output classes."""
    if spec.is_leaf():
        return {"t": "leaf"}
    kids = [_spec_to_json(c) for c in spec.children()]
    typ, ctx = spec.type, spec.context
    if typ is tuple or typ is list:
        return {"t": typ.__name__, "c": kids}
    if typ is dict or (isinstance(typ, type) and issubclass(typ, dict) and typ.__module__ == "collections"):
        keys = list(ctx)
        if not all(isinstance(k, (str, int)) for k in keys):
            raise TypeError(f"dict keys {keys!r} are not str or int")
        return {"t": "dict", "keys": keys, "c": kids}
    if isinstance(typ, type) and issubclass(typ, tuple) and hasattr(typ, "_fields"):
        return {"t": "object", "name": typ.__name__, "keys": list(typ._fields), "c": kids}
    if isinstance(ctx, (list, tuple)) and all(isinstance(k, str) for k in ctx) and len(ctx) == len(kids):
        return {"t": "object", "name": typ.__name__, "keys": list(ctx), "c": kids}
    raise TypeError(f"output type {getattr(typ, '__name__', typ)} (context {ctx!r}) has no plain-JSON form")


def _unflatten(leaves: list[Any], node: dict, pos: list[int]) -> Any:
    t = node["t"]
    if t == "leaf":
        v = leaves[pos[0]]
        pos[0] += 1
        return v
    kids = [_unflatten(leaves, c, pos) for c in node["c"]]
    if t == "tuple":
        return tuple(kids)
    if t == "list":
        return kids
    if t == "dict":
        return dict(zip(node["keys"], kids))
    return ExportedOutput(node["name"], dict(zip(node["keys"], kids)))


# -- inputs --------------------------------------------------------------------------


def _jsonable(v: Any) -> bool:
    try:
        return json.loads(json.dumps(v)) == v
    except (TypeError, ValueError):
        return False


def _value_record(x: Any) -> dict:
    """A non-tensor input leaf as the trace fixed it: its type and value (or repr, if not plain JSON)."""
    if _jsonable(x):
        return {"kind": "value", "type": type(x).__name__, "value": x}
    return {"kind": "value", "type": type(x).__name__, "repr": repr(x)}


def _leaf_matches(x: Any, rec: dict) -> bool:
    if rec["kind"] == "tensor":
        return (
            isinstance(x, torch.Tensor)
            and list(x.shape) == rec["shape"]
            and str(x.dtype).removeprefix("torch.") == rec["dtype"]
        )
    if isinstance(x, torch.Tensor) or type(x).__name__ != rec["type"]:
        return False
    return x == rec["value"] if "value" in rec else repr(x) == rec["repr"]


def _signature_to_json(sig: inspect.Signature) -> list[dict]:
    params = []
    for p in sig.parameters.values():
        d: dict[str, Any] = {"name": p.name, "kind": p.kind.name}
        if p.default is not inspect.Parameter.empty and _jsonable(p.default):
            d["default"] = p.default
        params.append(d)
    return params


def _signature_from_json(params: list[dict]) -> inspect.Signature:
    return inspect.Signature(
        [
            inspect.Parameter(p["name"], getattr(inspect.Parameter, p["kind"]), default=p.get("default", inspect.Parameter.empty))
            for p in params
        ]
    )


def _spec_key(spec: pytree.TreeSpec) -> str:
    try:
        return pytree.treespec_dumps(spec)
    except Exception:  # noqa: BLE001 - a custom input node type without a serialized name
        return str(spec)


# -- export --------------------------------------------------------------------------


class _WeightsCarrier(torch.nn.Module):
    """Holds the backbone so that its exported state dict stores every weight once."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


class _WeightsAsInputs(torch.nn.Module):
    """A step graph whose weights come in as its first argument instead of living in it."""

    def __init__(self, gm: torch.fx.GraphModule, names: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_gm", gm)  # not a submodule: its weights must not be exported with it
        self._names = names

    def forward(self, weights: list[torch.Tensor], *args: Any) -> Any:
        return torch.func.functional_call(self._gm, dict(zip(self._names, weights)), args, strict=False)


def _canonical_names(model: torch.nn.Module) -> dict[int, str]:
    """id(tensor) -> the first name the model gives it (tied weights share one name)."""
    names: dict[int, str] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), n)
    return names


def _example_inputs(guard: Any, tensor_leaf_index: list[int]) -> list[torch.Tensor]:
    """Tensors with the traced shapes and dtypes (values do not matter: shapes are static)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for j in tensor_leaf_index:
        _, shape, dtype, device, _ = guard[1][j]
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g, dtype=dtype).to(device))
        else:
            out.append(torch.zeros(shape, dtype=dtype, device=device))
    return out


def _step_program(sg: Any, canon: dict[int, str], example: tuple, aoti: bool) -> tuple[Any, dict]:
    """One step graph as a program taking (weights, *inputs, *reads), and its manifest entry."""
    tensors = dict(sg.gm.named_parameters())
    tensors.update(sg.gm.named_buffers())
    # The model's weights become inputs; tensors the trace made (constants) stay in the program.
    local = [n for n, v in tensors.items() if id(v) in canon]
    weights = [tensors[n] for n in local]
    ep = torch.export.export(_WeightsAsInputs(sg.gm, local), (weights, *example), strict=False)
    program = _aoti_files(ep, (weights, *example)) if aoti else ep
    ep.example_inputs = None  # they would store the weights again with every program
    meta = {
        "weights": [canon[id(w)] for w in weights],
        "reads": list(sg.reads),
        "writes": list(sg.writes),
        "n_outputs": sg.n_outputs,
    }
    if aoti:  # compiled code assumes the example strides; the runner restores them
        meta["weight_strides"] = [list(w.stride()) for w in weights]
        meta["strides"] = [list(v.stride()) for v in _tensor_leaves(example)]
    return program, meta


def _step_programs(sched: Any, canon: dict[int, str], inputs: list[torch.Tensor], aoti: bool) -> tuple[dict, list, list]:
    """Programs of the distinct step graphs (numbered by first use), their manifest entries, the program of each step.

    An eager generation on ``inputs`` provides each program's example cache reads.
    """
    programs: dict[str, Any] = {}
    metas: list[dict] = []
    index: dict[int, int] = {}  # id(StepGraph) -> program number
    cache: dict[str, Any] = {}
    with torch.no_grad():
        for i, sg in enumerate(sched.steps):
            reads = [cache[b] for b in sg.reads]
            if id(sg) not in index:
                index[id(sg)] = len(metas)
                name = f"step_{len(metas)}"
                programs[name], meta = _step_program(sg, canon, (*inputs, *reads), aoti)
                metas.append({"name": name, **meta})
            out = sg.gm(*inputs, *reads)
            for b, v in zip(sg.writes, out[sg.n_outputs :]):
                cache[b] = v
            for b in sched.drop_after[i]:
                cache.pop(b, None)
    return programs, metas, [index[id(sg)] for sg in sched.steps]


def export(tm: Any, path: str | os.PathLike, *, aoti: bool = False) -> str:
    """Write the distinct step programs of ``tm``'s current trace, its weights once, and its schedule to ``path``.

    ``tm`` must be traced (called once, or compiled with ``example_args``); the archive is
    specialized to that trace's input shapes and non-tensor arguments. ``aoti=True``
    compiles each distinct step with AOTInductor (a C++ compile per variant) instead of
    storing exported programs. Returns the path written.
    """
    from maskc.runtime import TimestepModules
    from torch.export.pt2_archive._package import package_pt2

    if not isinstance(tm, TimestepModules):
        raise MaskcError(
            f"maskc.export expects the TimestepModules returned by maskc.compile(model, mask), got {type(tm).__name__}; "
            "compile the model first"
        )
    plan = tm._plan  # read-only: the plan of the current trace
    if plan is None:
        raise MaskcError(
            "this TimestepModules has no trace yet, so there is nothing to export: call it once with the inputs of a "
            "generation (or pass example_args to maskc.compile), then call maskc.export"
        )
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise MaskcError(f"export path {path!r} must end in .pt2 (torch's archive format); choose a name like model.pt2")
    cap, sched = plan.capture, plan.schedule
    try:
        out_json = _spec_to_json(cap.out_spec)
    except TypeError as e:
        raise MaskcError(
            f"cannot export the model's output structure: {e}. Expected tensors in tuples, lists, dicts or "
            "output classes with named fields; call the model with return_dict=False before exporting"
        ) from None

    inputs = _example_inputs(cap.guard, cap.tensor_leaf_index)
    programs, prog_meta, steps = _step_programs(sched, _canonical_names(tm.model), inputs, aoti)
    carrier = torch.export.export(_WeightsCarrier(tm.model), (torch.zeros(1),), strict=False)
    carrier.example_inputs = None
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "model": type(tm.model).__name__,
        "backend": "aoti" if aoti else "export",
        "steps": steps,
        "drop_after": [list(d) for d in sched.drop_after],
        "programs": prog_meta,
        "signature": _signature_to_json(cap.signature),
        "in_spec": _spec_key(cap.in_spec),
        "inputs": _input_records(cap.guard),
        "tensor_leaf_index": list(cap.tensor_leaf_index),
        "out_spec": out_json,
    }
    extra = {MANIFEST: json.dumps(manifest)}
    if aoti:
        package_pt2(path, exported_programs={WEIGHTS: carrier}, aoti_files=programs, extra_files=extra)
    else:
        package_pt2(path, exported_programs={WEIGHTS: carrier, **programs}, extra_files=extra)
    return path


def _input_records(guard: Any) -> list[dict]:
    """Per flattened input leaf, from the trace's guard: tensor shape and dtype, or the non-tensor value."""
    recs: list[dict] = []
    for key in guard[1]:
        if key[0] == "T":  # ("T", shape, dtype, device, requires_grad)
            recs.append({"kind": "tensor", "shape": list(key[1]), "dtype": str(key[2]).removeprefix("torch.")})
        elif key[1] != "str" and isinstance(key[2], str):  # ("C", type name, repr) of an unhashable value
            recs.append({"kind": "value", "type": key[1], "repr": key[2]})
        else:  # ("C", type name, value)
            recs.append(_value_record(key[2]))
    return recs


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(tree) if isinstance(v, torch.Tensor)]


def _restride(v: torch.Tensor, stride: list[int]) -> torch.Tensor:
    """``v`` itself if it has ``stride``, else a copy laid out with it (an expanded timestep has stride 0)."""
    if list(v.stride()) == stride:
        return v
    out = torch.empty_strided(v.shape, stride, dtype=v.dtype, device=v.device)
    out.copy_(v)
    return out


def _aoti_files(ep: Any, args: tuple) -> list:
    """AOTInductor output files for one step program (weights stay inputs, so the .so holds none)."""
    return torch._inductor.aot_compile(ep.module(), args, options={"aot_inductor.package": True})


# -- load ----------------------------------------------------------------------------


class ExportedRunner:
    """A generation from an exported archive: the i-th call after loading or reset() runs step i.

    Same call convention as the TimestepModules it came from (same arguments, same
    output structure with output classes as ``ExportedOutput``); owns its cache and
    frees each value after its last read.
    """

    def __init__(self, manifest: dict, programs: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        self.manifest = manifest
        self.steps: list[int] = manifest["steps"]
        self._drop_after: list[list[str]] = manifest["drop_after"]
        self._signature = _signature_from_json(manifest["signature"])
        self._inputs: list[dict] = manifest["inputs"]
        self._tensor_leaf_index: list[int] = manifest["tensor_leaf_index"]
        self._programs = []
        for meta in manifest["programs"]:
            ws = [weights[n] for n in meta["weights"]]
            if "weight_strides" in meta:
                ws = [_restride(w, st) for w, st in zip(ws, meta["weight_strides"])]
            self._programs.append((programs[meta["name"]], ws, meta))
        self._step = 0
        self._cache: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def step(self) -> int:
        """Index of the next call within the generation."""
        return self._step

    def reset(self) -> None:
        """Start a new generation: step counter to 0, cache emptied."""
        self._step = 0
        self._cache.clear()

    def cache_entries(self) -> list[str]:
        """Blocks whose value the cache holds right now."""
        return list(self._cache)

    def _tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InputChangedError(
                f"the arguments do not match the exported model's forward{self._signature}: {e}; "
                "call the runner as you called the model"
            ) from None
        bound.apply_defaults()
        leaves, spec = pytree.tree_flatten(dict(bound.arguments))
        if len(leaves) != len(self._inputs) or _spec_key(spec) != self.manifest["in_spec"]:
            raise InputChangedError(
                "the argument structure differs from the one the archive was exported for; "
                "call with the same arguments (same keywords, same None-ness) or export again with these inputs"
            )
        for k, (x, rec) in enumerate(zip(leaves, self._inputs)):
            if not _leaf_matches(x, rec):
                want = f"a {rec['dtype']} tensor of shape {tuple(rec['shape'])}" if rec["kind"] == "tensor" else repr(
                    rec.get("value", rec.get("repr")))
                got = (f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
                       if isinstance(x, torch.Tensor) else repr(x))
                raise InputChangedError(
                    f"input {k} is {got}, but the archive was exported for {want}; the step programs are "
                    "specialized to the traced shapes and non-tensor arguments: export again with these inputs "
                    "(a Python-number timestep is fixed too: pass the timestep as a tensor)"
                )
        return [leaves[j] for j in self._tensor_leaf_index]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        i = self._step
        if i >= len(self.steps):
            raise StepOverflowError(
                f"called {i + 1} times, but the exported mask has T={len(self.steps)} steps; "
                "call reset() before each new generation"
            )
        tensors = self._tensors(args, kwargs)
        fn, weights, meta = self._programs[self.steps[i]]
        cache = self._cache
        reads = [cache[b] for b in meta["reads"]]
        if "strides" in meta:  # AOTInductor code reads its inputs with the strides it was compiled for
            leaves, spec = pytree.tree_flatten((tensors, reads))
            it = iter(meta["strides"])
            leaves = [_restride(v, next(it)) if isinstance(v, torch.Tensor) else v for v in leaves]
            tensors, reads = pytree.tree_unflatten(leaves, spec)
        out = fn(weights, *tensors, *reads)
        n = meta["n_outputs"]
        for b, v in zip(meta["writes"], out[n:]):
            cache[b] = v
        for b in self._drop_after[i]:
            cache.pop(b, None)
        self._step = i + 1
        return _unflatten(list(out[:n]), self.manifest["out_spec"], [0])


def load_exported(path: str | os.PathLike) -> ExportedRunner:
    """The runner of an archive written by ``export``; uses torch and the standard library only."""
    from torch.export.pt2_archive._package import load_pt2

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MaskcError(f"no exported archive at {path!r}; write one with maskc.export(tm, path)")
    contents = load_pt2(path)
    raw = contents.extra_files.get(MANIFEST)
    if raw is None:
        raise MaskcError(
            f"{path!r} is a .pt2 archive but not one written by maskc.export (no {MANIFEST} inside); "
            "load it with torch.export.load, or export the model with maskc.export"
        )
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise MaskcError(
            f"{path!r} has format {manifest.get('format')!r} version {manifest.get('version')!r}; this loader reads "
            f"{FORMAT!r} version {VERSION}: export the model again with this maskc"
        )
    carrier = contents.exported_programs[WEIGHTS]
    weights = {
        k[len(_PREFIX):]: v.detach()
        for k, v in {**carrier.state_dict, **carrier.constants}.items()
        if k.startswith(_PREFIX) and isinstance(v, torch.Tensor)
    }
    if manifest["backend"] == "aoti":
        programs: dict[str, Any] = dict(contents.aoti_runners)
    else:
        programs = {name: ep.module() for name, ep in contents.exported_programs.items() if name != WEIGHTS}
    return ExportedRunner(manifest, programs, weights)
