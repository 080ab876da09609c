"""Triton source for a pointwise region: one kernel, one load per input, one store per output.

A pointwise region's ops all produce tensors of one shape, the *iteration space*
``[s_0, ..., s_{r-1}]``. The generated kernel walks it as a flat index ``p`` in blocks of
``BLOCK``; each program unravels ``p`` into ``(i_0, ..., i_{r-1})`` and addresses every
tensor with its own strides, so broadcast inputs (stride 0 along broadcast dims) and
non-contiguous views are read in place::

    i_{r-1} = p mod s_{r-1},  i_{r-2} = (p div s_{r-1}) mod s_{r-2},  ...
    x_k     = load(x_k_ptr + sum_d i_d * stride(x_k, d))            once per input
    v_n     = op_n(v_..)                                             one expression per node
    store(out_j_ptr + sum_d i_d * stride(out_j, d), v_j)              once per output

Arithmetic runs in fp32 (the inputs are upcast on load, as Inductor does for fp16/bf16)
and each output is cast to its dtype on store. Python scalars in the graph are written
into the source. An op outside :data:`EXPRESSIONS` makes the region unsupported: it
then runs its reference subgraph (the caller says so), never an approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .triton_types import TRITON_DTYPES, Unsupported, kernel_signature, kernel_source, literal

aten = torch.ops.aten

_SQRT1_2 = 1.0 / math.sqrt(2.0)


def _tanh(x: str) -> str:
    # libdevice tanh does not run in the interpreter; tanh(x) = 2 sigmoid(2x) - 1 is exact math
    return f"(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"


def _gelu(args: list[str], kwargs: dict) -> str:
    x = args[0]
    if kwargs.get("approximate", "none") == "tanh":
        inner = f"0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})"
        return f"(0.5 * {x} * (1.0 + {_tanh(inner)}))"
    return f"(0.5 * {x} * (1.0 + tl.erf({x} * {_SQRT1_2!r})))"


def _clamp(args: list[str], kwargs: dict) -> str:
    x = args[0]
    low = args[1] if len(args) > 1 else kwargs.get("min", "None")
    high = args[2] if len(args) > 2 else kwargs.get("max", "None")
    if low != "None":
        x = f"tl.maximum({x}, {low})"
    if high != "None":
        x = f"tl.minimum({x}, {high})"
    return x


def _pow(args: list[str], kwargs: dict) -> str:
    x, exponent = args
    if exponent in ("2", "2.0"):
        return f"({x} * {x})"
    if exponent in ("0.5",):
        return f"tl.sqrt({x})"
    return f"tl.exp({exponent} * tl.log({x}))"  # x > 0 only, as torch.pow for float exponents


def _binary(symbol: str) -> Callable[[list[str], dict], str]:
    def expression(args: list[str], kwargs: dict) -> str:
        a, b = args[:2]
        alpha = kwargs.get("alpha")
        if alpha not in (None, "1", "1.0"):
            b = f"({b} * {alpha})"
        return f"({a} {symbol} {b})"

    return expression


#: ATen op -> Triton expression from the operands' expressions (all fp32 values).
EXPRESSIONS: dict[Any, Callable[[list[str], dict], str]] = {
    aten.add.Tensor: _binary("+"),
    aten.sub.Tensor: _binary("-"),
    aten.mul.Tensor: _binary("*"),
    aten.div.Tensor: _binary("/"),
    aten.neg.default: lambda a, k: f"(-{a[0]})",
    aten.abs.default: lambda a, k: f"tl.abs({a[0]})",
    aten.relu.default: lambda a, k: f"tl.maximum({a[0]}, 0.0)",
    aten.gelu.default: _gelu,
    aten.sigmoid.default: lambda a, k: f"tl.sigmoid({a[0]})",
    aten.tanh.default: lambda a, k: _tanh(a[0]),
    aten.exp.default: lambda a, k: f"tl.exp({a[0]})",
    aten.log.default: lambda a, k: f"tl.log({a[0]})",
    aten.sqrt.default: lambda a, k: f"tl.sqrt({a[0]})",
    aten.rsqrt.default: lambda a, k: f"tl.rsqrt({a[0]})",
    aten.erf.default: lambda a, k: f"tl.erf({a[0]})",
    aten.reciprocal.default: lambda a, k: f"(1.0 / {a[0]})",
    aten.clamp.default: _clamp,
    aten.hardtanh.default: lambda a, k: _clamp([a[0], a[1] if len(a) > 1 else "-1.0", a[2] if len(a) > 2 else "1.0"], {}),
    aten.leaky_relu.default: lambda a, k: f"tl.where({a[0]} > 0.0, {a[0]}, {a[0]} * {a[1] if len(a) > 1 else 0.01})",
    aten.pow.Tensor_Scalar: _pow,
    aten.where.self: lambda a, k: f"tl.where({a[0]} != 0.0, {a[1]}, {a[2]})",
    aten.logical_not.default: lambda a, k: f"({a[0]} == 0.0)",
}
# Boolean logic (only on booleans: bitwise ops on integers are not expressed here).
_BOOLEAN_ONLY = {aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.logical_and.default, aten.logical_or.default}
for _op in _BOOLEAN_ONLY:
    _symbol = "&" if "and" in str(_op) else "|"
    EXPRESSIONS[_op] = lambda a, k, s=_symbol: f"(({a[0]} != 0.0) {s} ({a[1]} != 0.0))"
# Comparisons give booleans, held as 1.0 / 0.0 like every other value.
for _name, _symbol in (("gt", ">"), ("lt", "<"), ("ge", ">="), ("le", "<="), ("eq", "=="), ("ne", "!=")):
    for _overload in ("Scalar", "Tensor"):
        EXPRESSIONS[getattr(getattr(aten, _name), _overload)] = (
            lambda a, k, s=_symbol: f"({a[0]} {s} {a[1]})")


@dataclass
class PointwiseKernel:
    name: str
    source: str
    shape: tuple[int, ...]
    inputs: list[int]  # which region inputs are tensors (by position)
    outputs: list[torch.dtype]
    block: int = 1024
    signature: dict[str, str] = field(default_factory=dict)  # Triton types, for ahead-of-time builds
    strides: list[tuple[int, ...]] = field(default_factory=list)  # the reference results' layouts

    @property
    def constexprs(self) -> dict[str, int]:
        return {"BLOCK": self.block}


def generate_pointwise(region: fx.GraphModule, name: str) -> PointwiseKernel:
    """Triton source of a pointwise region (see the module docstring)."""
    placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
    output = next(n for n in region.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    shapes = {tuple(n.meta["val"].shape) for n in region.graph.nodes if n.op == "call_function"}
    if len(shapes) != 1:
        raise Unsupported(f"ops of several shapes {sorted(shapes)}")
    (shape,) = shapes
    rank = len(shape)
    if math.prod(shape) >= 2**31:
        raise Unsupported("more than 2**31 elements (32-bit indexing)")
    for node in placeholders:
        if not isinstance(node.meta.get("val"), torch.Tensor):
            raise Unsupported(f"non-tensor input {node.name}")
    for node in results:
        if node.meta["val"].dtype not in TRITON_DTYPES:
            raise Unsupported(f"output dtype {node.meta['val'].dtype}")

    params = [f"in{k}_ptr" for k in range(len(placeholders))] + [f"out{j}_ptr" for j in range(len(results))]
    params += ["numel"] + [f"size{d}" for d in range(rank)]
    params += [f"in{k}_stride{d}" for k in range(len(placeholders)) for d in range(rank)]
    params += [f"out{j}_stride{d}" for j in range(len(results)) for d in range(rank)]
    body = [
        "offset = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "mask = offset < numel",
        "rest = offset",
    ]
    for d in reversed(range(rank)):
        body.append(f"i{d} = rest % size{d}")
        if d:
            body.append(f"rest = rest // size{d}")

    def address(prefix: str) -> str:
        return " + ".join(f"i{d} * {prefix}_stride{d}" for d in range(rank)) or "0"

    values: dict[fx.Node, str] = {}
    for k, node in enumerate(placeholders):
        var = f"x{k}"
        body.append(f"{var} = tl.load(in{k}_ptr + {address(f'in{k}')}, mask=mask, other=0).to(tl.float32)  # {node.name}")
        values[node] = var
    for node in region.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target not in EXPRESSIONS:
            raise Unsupported(f"op {node.target}")
        if node.target in _BOOLEAN_ONLY and node.meta["val"].dtype != torch.bool:
            raise Unsupported(f"{node.target} on {node.meta['val'].dtype}")
        args = [values[a] if isinstance(a, fx.Node) else literal(a) for a in node.args]
        kwargs = {k: (values[v] if isinstance(v, fx.Node) else (v if isinstance(v, str) else literal(v)))
                  for k, v in node.kwargs.items()}
        var = f"v_{node.name}"
        expression = EXPRESSIONS[node.target](args, kwargs)
        if node.meta["val"].dtype == torch.bool:
            expression = f"tl.where(({expression}) != 0, 1.0, 0.0)"
        body.append(f"{var} = {expression}")
        values[node] = var
    for j, node in enumerate(results):
        dtype = TRITON_DTYPES[node.meta["val"].dtype]
        value = values[node]
        stored = f"({value} != 0.0)" if dtype == "tl.int1" else f"{value}.to({dtype})"
        body.append(f"tl.store(out{j}_ptr + {address(f'out{j}')}, {stored}, mask=mask)  # {node.name}")

    ops = [f"{n.name} = {n.target}" for n in region.graph.nodes if n.op == "call_function"]
    source = kernel_source(f"pointwise region {name}: {len(ops)} ops over shape {list(shape)}", ops, name,
                           params, ["BLOCK"], body)
    pointers = {f"in{k}_ptr": p.meta["val"].dtype for k, p in enumerate(placeholders)}
    pointers |= {f"out{j}_ptr": r.meta["val"].dtype for j, r in enumerate(results)}
    return PointwiseKernel(name, source, shape, list(range(len(placeholders))),
                           [n.meta["val"].dtype for n in results], signature=kernel_signature(source, pointers),
                           strides=[tuple(n.meta["val"].stride()) for n in results])
