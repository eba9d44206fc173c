"""Capture: a model and example inputs -> a torch.fx graph in which every block is one node.

Plain ``torch.fx.symbolic_trace`` cannot trace diffusers backbones: their forward
functions branch on shapes, None-ness and dtypes. This tracer runs the model on
the example inputs *while* tracing: every proxy carries the real value it stands
for, so shapes, dtypes, ``len``, ``bool`` and iteration are answered concretely,
while tensor computations stay symbolic. Blocks are leaf modules and become
single ``call_module`` nodes.

Invariants of the result (``Capture``):
- ``gm(*flat_tensor_inputs)`` returns the flat output leaves of ``model(...)``,
  bit-identical in eager mode for inputs that match ``guard``.
- The trace is specialized to the guard: the pytree structure of the arguments,
  every tensor's shape, dtype and device, and every non-tensor argument's value.
- Every block is exactly one ``call_module`` node whose target is the block's
  qualified name, and ``node.meta["maskc_block"]`` holds that name.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._symbolic_trace import _orig_module_call
from torch.fx.node import map_aggregate

from maskc.errors import BlockError, CaptureError

__all__ = ["Capture", "capture", "guard_key", "flatten_inputs"]

# Tensor attributes that are answered with the concrete value of the example.
_CONCRETE_ATTRS = frozenset(
    {
        "shape", "dtype", "device", "ndim", "is_cuda", "is_cpu", "is_meta", "layout",
        "is_sparse", "is_quantized", "is_mkldnn", "is_nested", "requires_grad",
        "is_leaf", "itemsize",
    }
)
# Tensor methods whose results are metadata, answered concretely too.
_CONCRETE_METHODS = frozenset(
    {
        "size", "dim", "numel", "nelement", "element_size", "is_floating_point",
        "is_complex", "is_contiguous", "get_device", "stride", "ndimension",
    }
)
_MISSING = object()


class DataDependentError(Exception):
    """Python control flow on tensor data met during capture (internal; rewrapped)."""


class ValueProxy(fx.Proxy):
    """A proxy that also holds the real value of what it stands for."""

    def __init__(self, node: fx.Node, tracer: "ValueTracer", value: Any = _MISSING) -> None:
        super().__init__(node, tracer)
        self.__dict__["value"] = value

    # isinstance(p, torch.Tensor) (hence torch.is_tensor) holds for tensor-valued
    # proxies, so that `if torch.is_tensor(t)` takes the branch the real call takes.
    @property  # type: ignore[misc]
    def __class__(self):  # noqa: D401
        v = self.__dict__.get("value", _MISSING)
        if isinstance(v, torch.Tensor):
            return torch.Tensor
        return type(self)

    def __repr__(self) -> str:
        return f"ValueProxy({self.node.name})"

    def __getattr__(self, k: str) -> Any:
        v = self.__dict__.get("value", _MISSING)
        if k.startswith("__"):
            raise AttributeError(k)
        if isinstance(v, torch.Tensor):
            if k in _CONCRETE_ATTRS:
                return getattr(v, k)
            if k in _CONCRETE_METHODS:
                return getattr(v, k)
        if k.startswith("_") or (v is not _MISSING and not hasattr(v, k)):
            return getattr(v, k)  # concrete, or the AttributeError the real object raises
        return ValueAttribute(self, k)

    def _concrete(self, construct: str) -> Any:
        v = self.value
        if isinstance(v, (torch.Tensor, int, float, complex)) and not isinstance(v, bool):
            # The answer depends on tensor *data*: baking in the example's answer would be
            # silently wrong for other inputs.
            raise DataDependentError(construct)
        return v

    def __bool__(self) -> bool:
        return bool(self._concrete("bool() of a tensor value (a data-dependent if/while/and/or/assert)"))

    def __len__(self) -> int:
        return len(self.value)

    def __int__(self) -> int:
        return int(self._concrete("int() of a tensor value"))

    def __float__(self) -> float:
        return float(self._concrete("float() of a tensor value"))

    def __index__(self) -> int:
        return operator.index(self._concrete("a tensor value used as an index or size"))

    def __contains__(self, item: Any) -> bool:
        return item in self.value

    def keys(self) -> Any:  # type: ignore[override]
        return self.value.keys()

    # A proxy of a tuple or list (a block that returns several values) stays a Python
    # tuple of per-element proxies under slicing and concatenation, so each element is
    # its own value and dead-code elimination sees which ones are used.
    def _elements(self) -> tuple:
        return tuple(self[i] for i in range(len(self.value)))

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice) and isinstance(self.value, (tuple, list)):
            return self._elements()[k]
        return self.tracer.create_proxy("call_function", operator.getitem, (self, k), {})

    def __add__(self, o: Any) -> Any:
        if isinstance(self.value, (tuple, list)) and isinstance(o, (tuple, list)):
            return self._elements() + tuple(o)
        return self.tracer.create_proxy("call_function", operator.add, (self, o), {})

    def __radd__(self, o: Any) -> Any:
        if isinstance(self.value, (tuple, list)) and isinstance(o, (tuple, list)):
            return tuple(o) + self._elements()
        return self.tracer.create_proxy("call_function", operator.add, (o, self), {})

    # In-place operators stay in place (plain fx would rebind to an out-of-place op,
    # which changes aliasing semantics); they are recorded as operator.i* nodes.
    def __iadd__(self, o: Any) -> Any:
        if isinstance(self.value, (tuple, list)):
            return self + o
        return self.tracer.create_proxy("call_function", operator.iadd, (self, o), {})

    def __isub__(self, o: Any) -> Any:
        return self.tracer.create_proxy("call_function", operator.isub, (self, o), {})

    def __imul__(self, o: Any) -> Any:
        return self.tracer.create_proxy("call_function", operator.imul, (self, o), {})

    def __itruediv__(self, o: Any) -> Any:
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, o), {})

    def __setitem__(self, k: Any, v: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, k, v), {})

    def __iter__(self) -> Iterator[Any]:
        v = self.value
        n = v.shape[0] if isinstance(v, torch.Tensor) else len(v)
        return iter([self[i] for i in range(n)])


class ValueAttribute(ValueProxy):
    """``proxy.attr``: a method call if called, else a lazy ``getattr`` node."""

    def __init__(self, root: ValueProxy, attr: str) -> None:  # noqa: D107
        self.__dict__.update(root=root, attr=attr, tracer=root.tracer, _node=None)
        self.__dict__["value"] = getattr(root.value, attr)

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        if self._node is None:
            self.__dict__["_node"] = self.tracer.create_proxy(
                "call_function", getattr, (self.root, self.attr), {}
            ).node
        return self._node

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tracer.create_proxy("call_method", self.attr, (self.root,) + args, kwargs)


def _value_of(a: Any) -> Any:
    return map_aggregate(a, lambda x: x.value if isinstance(x, ValueProxy) else x)


class ValueTracer(fx.Tracer):
    """fx tracer whose proxies carry real values; blocks are leaves."""

    def __init__(self, blocks: Iterable[str], placeholders: dict[str, Any]) -> None:
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.blocks = set(blocks)
        self.placeholder_values = placeholders
        self.block_calls: dict[str, int] = {}
        self._real_depth = 0

    @contextlib.contextmanager
    def _real(self) -> Iterator[None]:
        self._real_depth += 1
        try:
            yield
        finally:
            self._real_depth -= 1

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.blocks:
            return True
        return super().is_leaf_module(m, qualname)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._real_depth:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: torch.nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        if self._real_depth:
            return forward(*args, **kwargs)
        name = self.path_of_module(m)
        if name in self.blocks:
            self.block_calls[name] = self.block_calls.get(name, 0) + 1
        return super().call_module(m, forward, args, kwargs)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, ValueProxy):  # before Tracer's isinstance(a, torch.Tensor) branch
            return a.node
        return super().create_arg(a)

    def proxy(self, node: fx.Node) -> ValueProxy:
        return ValueProxy(node, self)

    def _compute(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            return self.placeholder_values[target]
        a, kw = _value_of(args), _value_of(kwargs)
        with self._real():
            if kind == "call_function":
                return target(*a, **kw)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **kw)
            if kind == "call_module":
                return _orig_module_call(self.root.get_submodule(target), *a, **kw)
            if kind == "get_attr":
                obj: Any = self.root
                for atom in target.split("."):
                    obj = getattr(obj, atom)
                return obj
        raise AssertionError(kind)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[override]
        value = self._compute(kind, target, args, kwargs)
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr)
        p.__dict__["value"] = value
        if kind == "call_module" and target in self.blocks:
            p.node.meta["maskc_block"] = target
            tensors = [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
            p.node.meta["maskc_out_shapes"] = [tuple(v.shape) for v in tensors]
            p.node.meta["maskc_out_dtypes"] = [v.dtype for v in tensors]
            p.node.meta["maskc_out_strides"] = [tuple(v.stride()) for v in tensors]
            p.node.meta["maskc_out_is_tensor"] = isinstance(value, torch.Tensor)
            p.node.meta["maskc_out_bytes"] = sum(v.numel() * v.element_size() for v in tensors)
        return p

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        # The caller has already decided the flat tensor inputs: one placeholder each.
        spec: pytree.TreeSpec = concrete_args["spec"]  # type: ignore[index]
        leaves: list[Any] = concrete_args["leaves"]  # type: ignore[index]
        names: list[str] = concrete_args["names"]  # type: ignore[index]
        sig: inspect.Signature = concrete_args["signature"]  # type: ignore[index]
        out_box: dict[str, Any] = concrete_args["out"]  # type: ignore[index]
        proxies = []
        for leaf, nm in zip(leaves, names):
            if nm is None:
                proxies.append(leaf)
            else:
                self.placeholder_values[nm] = leaf
                proxies.append(self.create_proxy("placeholder", nm, (), {}))
        root = self.root

        def flat_fn(*_: Any) -> Any:
            arguments = pytree.tree_unflatten(proxies, spec)
            bound = inspect.BoundArguments(sig, arguments)
            out = root_fn(root, *bound.args, **bound.kwargs)
            out_leaves, out_spec = pytree.tree_flatten(out)
            out_box["spec"] = out_spec
            return tuple(out_leaves)

        return flat_fn, [p for p, nm in zip(proxies, names) if nm is not None]


@dataclass
class Capture:
    """A block-granular trace of one model, specialized to one input signature."""

    gm: fx.GraphModule
    blocks: list[str]
    guard: Any
    in_spec: pytree.TreeSpec
    tensor_leaf_index: list[int]  # positions of tensor leaves among all input leaves
    out_spec: pytree.TreeSpec
    signature: inspect.Signature
    block_nodes: dict[str, str] = field(default_factory=dict)  # block -> node name


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, str(x.device), x.requires_grad)
    try:
        hash(x)
        return ("C", type(x).__name__, x)
    except TypeError:
        return ("C", type(x).__name__, repr(x))


def flatten_inputs(sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[list[Any], pytree.TreeSpec]:
    """Bind args to the forward signature (defaults applied) and flatten to pytree leaves."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(
            f"the arguments do not match the model's forward{sig}: {e}. "
            "Call with the arguments the model itself accepts."
        ) from None
    bound.apply_defaults()
    return pytree.tree_flatten(dict(bound.arguments))


def guard_key(leaves: list[Any], spec: pytree.TreeSpec) -> Any:
    """What a trace is specialized to: structure, tensor metadata, non-tensor values."""
    return (str(spec), tuple(_leaf_key(x) for x in leaves))


def _user_frame(tb: Any) -> tuple[str, int, str] | None:
    """Innermost traceback frame outside torch, maskc and the Python stdlib."""
    here = os.path.dirname(os.path.abspath(__file__))
    skip = (
        os.path.dirname(torch.__file__),
        here,
        os.path.join(os.path.dirname(here), "maskc"),
        os.path.dirname(os.__file__),
    )
    found = None
    for fs in traceback.extract_tb(tb):
        fn = os.path.abspath(fs.filename)
        if not fn.startswith(skip):
            found = (fs.filename, fs.lineno or 0, (fs.line or linecache.getline(fs.filename, fs.lineno or 0)).strip())
    return found


_INPLACE_FUNCTIONS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.setitem,
}


def _refuse_inplace_on_blocks(gm: fx.GraphModule, model: torch.nn.Module) -> None:
    """Glue that mutates a block's output in place would corrupt the cached value."""
    for n in gm.graph.nodes:
        inplace = (n.op == "call_function" and n.target in _INPLACE_FUNCTIONS) or (
            n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("_")
        )
        if not inplace or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        src = n.args[0]
        while src.op == "call_function" and src.target is operator.getitem and isinstance(src.args[0], fx.Node):
            src = src.args[0]
        if "maskc_block" in src.meta:
            raise CaptureError(
                f"cannot capture {type(model).__name__}: `{n.format_node()}` mutates the output of block "
                f"{src.meta['maskc_block']!r} in place, which would corrupt its cached value. "
                "Make that op part of the block (choose a larger block) or leave this block out."
            )


def capture(model: torch.nn.Module, blocks: list[str], args: tuple = (), kwargs: dict | None = None) -> Capture:
    """Trace ``model(*args, **kwargs)`` into a GraphModule with ``blocks`` as single nodes."""
    kwargs = kwargs or {}
    modules = dict(model.named_modules())
    for b in blocks:
        if b not in modules:
            raise BlockError(
                f"block {b!r} is not a submodule of {type(model).__name__}; "
                "expected qualified names from model.named_modules(). Use maskc.blocks(model) to list them."
            )
    sig = inspect.signature(type(model).forward)
    params = list(sig.parameters.values())[1:]
    sig_noself = sig.replace(parameters=params)
    leaves, spec = flatten_inputs(sig_noself, args, kwargs)
    names = [f"in_{i}" if isinstance(leaf, torch.Tensor) else None for i, leaf in enumerate(leaves)]
    tracer = ValueTracer(blocks, {})
    out_box: dict[str, Any] = {}
    try:
        with torch.no_grad():
            graph = tracer.trace(
                model,
                concrete_args={"spec": spec, "leaves": leaves, "names": names, "signature": sig_noself, "out": out_box},  # type: ignore[arg-type]
            )
    except Exception as e:  # noqa: BLE001 - rewrapped with the construct and the line
        where = _user_frame(e.__traceback__)
        loc = f" at {where[0]}:{where[1]}: `{where[2]}`" if where else ""
        what = f"{e}" if isinstance(e, DataDependentError) else f"{type(e).__name__}: {e}"
        raise CaptureError(
            f"cannot capture {type(model).__name__}{loc}: {what}. "
            "maskc traces the forward with real example values; a construct it cannot follow "
            "must be inside a block. Pass blocks=[...] (or maskc.blocks(model, types=...)) so that "
            "the offending module is a block, or report the construct."
        ) from e
    for b in blocks:
        n = tracer.block_calls.get(b, 0)
        if n != 1:
            raise BlockError(
                f"block {b!r} was called {n} times in one forward; a block must be called exactly once "
                "(a module called through .forward() or reused is not a block). Choose other blocks."
            )
    gm = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Captured")
    _refuse_inplace_on_blocks(gm, model)
    block_nodes = {n.meta["maskc_block"]: n.name for n in gm.graph.nodes if "maskc_block" in n.meta}
    return Capture(
        gm=gm,
        blocks=list(blocks),
        guard=guard_key(leaves, spec),
        in_spec=spec,
        tensor_leaf_index=[i for i, nm in enumerate(names) if nm is not None],
        out_spec=out_box["spec"],
        signature=sig_noself,
        block_nodes=block_nodes,
    )
