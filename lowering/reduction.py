"""Triton source for a reduction region: pointwise prologue + one row reduction + epilogue.

The region's anchor reduces the last dimension of ``x`` of shape ``[*R, N]`` (see
``block_fusion``). The kernel runs one program per row ``r`` of ``R``, holding the whole
row in registers (``BLOCK_N = next_pow2(N)``), so every value is read once and every
result written once::

    x_k   = load(row r of input k, broadcast to [*R, N])        vectors of BLOCK_N
    v     = prologue(x)                                          pointwise, as in pointwise.py
    softmax:     m = max(v), e = exp(v - m), y = e / sum(e)
    log_softmax: y = v - m - log(sum(exp(v - m)))
    layer_norm:  mu = sum(v) / N, c = v - mu, y = c * rsqrt(sum(c^2) / N + eps) * w + b
    sum / mean / amax / amin over [-1]:  one scalar per row
    out   = epilogue(y)                                          vectors or row scalars

Lanes past ``N`` are masked: they are replaced by the reduction's neutral element
(0 for sums, -inf for max) before reducing. Arithmetic is fp32; outputs are cast on store.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from dataclasses import dataclass

from .pointwise import EXPRESSIONS
from .triton_types import TRITON_DTYPES, Unsupported, kernel_signature, kernel_source, literal

aten = torch.ops.aten

_MAX_ROW = 16384  # one row must fit in registers
_MINUS_INF = 'float("-inf")'
_PLUS_INF = 'float("inf")'


@dataclass
class ReductionKernel:
    name: str
    source: str
    row_shape: tuple[int, ...]  # [*R, N]: one program per row of R
    output_shapes: list[tuple[int, ...]]
    outputs: list[torch.dtype]
    block: int  # BLOCK_N, N rounded up to a power of two
    signature: dict[str, str]  # Triton types, for ahead-of-time builds
    output_strides: list[tuple[int, ...]]  # the reference results' layouts

    @property
    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_N": self.block}


def _masked(value: str, neutral: str) -> str:
    return f"tl.where(mask, {value}, {neutral})"


def _reduce(node: fx.Node, value: str, n: int, extra: list[str]) -> tuple[str, list[str]]:
    """Triton lines computing the anchor; returns (result expression, lines)."""
    target, v = node.target, value
    if target in (aten.softmax.int, aten._softmax.default, aten._log_softmax.default, aten.log_softmax.int):
        lines = [f"row_max = tl.max({_masked(v, _MINUS_INF)}, axis=0)",
                 f"shifted = {v} - row_max",
                 f"row_sum = tl.sum({_masked('tl.exp(shifted)', '0.0')}, axis=0)"]
        log = target in (aten._log_softmax.default, aten.log_softmax.int)
        return ("shifted - tl.log(row_sum)" if log else "tl.exp(shifted) / row_sum"), lines
    if target is aten.layer_norm.default:
        weight, bias, eps = extra
        lines = [f"row_mean = tl.sum({_masked(v, '0.0')}, axis=0) / {n}.0",
                 f"centered = {_masked(f'{v} - row_mean', '0.0')}",
                 f"row_rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / {n}.0 + {eps})"]
        result = "centered * row_rstd"
        if weight != "None":
            result = f"({result}) * {weight}"
        if bias != "None":
            result = f"({result}) + {bias}"
        return result, lines
    if target in (aten.sum.dim_IntList, aten.mean.dim):
        total = f"tl.sum({_masked(v, '0.0')}, axis=0)"
        return (total if target is aten.sum.dim_IntList else f"({total} / {n}.0)"), []
    if target is aten.amax.default:
        return f"tl.max({_masked(v, _MINUS_INF)}, axis=0)", []
    if target is aten.amin.default:
        return f"tl.min({_masked(v, _PLUS_INF)}, axis=0)", []
    raise Unsupported(f"reduction {target}")


def generate_reduction(region: fx.GraphModule, name: str) -> ReductionKernel:
    """Triton source of a reduction region (see the module docstring)."""
    placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
    output = next(n for n in region.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    calls = [n for n in region.graph.nodes if n.op == "call_function"]
    anchors = [n for n in calls if n.target not in EXPRESSIONS]
    if len(anchors) != 1:
        raise Unsupported(f"{len(anchors)} non-pointwise ops")
    (anchor,) = anchors
    row_shape = tuple(anchor.args[0].meta["val"].shape)
    n = row_shape[-1]
    if n > _MAX_ROW:
        raise Unsupported(f"rows of {n} elements (at most {_MAX_ROW})")
    if math.prod(row_shape) >= 2**31:
        raise Unsupported("more than 2**31 elements (32-bit indexing)")
    rank = len(row_shape)
    for node in placeholders:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise Unsupported(f"non-tensor input {node.name}")
        try:
            torch.broadcast_shapes(tuple(val.shape), row_shape)
        except RuntimeError:
            raise Unsupported(f"input {node.name} does not broadcast to the rows") from None
    scalar_shapes = {row_shape[:-1] + (1,), row_shape[:-1]}  # keepdim or not
    for node in results:
        shape = tuple(node.meta["val"].shape)
        if shape != row_shape and shape not in scalar_shapes:
            raise Unsupported(f"output {node.name} of shape {list(shape)}")
        if node.meta["val"].dtype not in TRITON_DTYPES or node.meta["val"].dtype == torch.bool:
            raise Unsupported(f"output dtype {node.meta['val'].dtype}")

    params = [f"in{k}_ptr" for k in range(len(placeholders))] + [f"out{j}_ptr" for j in range(len(results))]
    params += [f"size{d}" for d in range(rank)]
    params += [f"in{k}_stride{d}" for k in range(len(placeholders)) for d in range(rank)]
    params += [f"out{j}_stride{d}" for j in range(len(results)) for d in range(rank)]
    last = rank - 1
    body = ["row = tl.program_id(0)", "cols = tl.arange(0, BLOCK_N)", f"mask = cols < size{last}", "rest = row"]
    for d in reversed(range(last)):
        body.append(f"i{d} = rest % size{d}")
        if d:
            body.append(f"rest = rest // size{d}")

    def row_address(prefix: str) -> str:
        return " + ".join([f"i{d} * {prefix}_stride{d}" for d in range(last)] or ["0"])

    values: dict[fx.Node, str] = {}
    for k, node in enumerate(placeholders):
        address = f"{row_address(f'in{k}')} + cols * in{k}_stride{last}"
        body.append(f"x{k} = tl.load(in{k}_ptr + {address}, mask=mask, other=0).to(tl.float32)  # {node.name}")
        values[node] = f"x{k}"
    for node in calls:
        if node is anchor:  # its dims / normalized_shape are known: the last dimension
            args = [values[a] if isinstance(a, fx.Node) else (None if isinstance(a, (list, tuple)) else literal(a))
                    for a in node.args]
        else:
            args = [values[a] if isinstance(a, fx.Node) else literal(a) for a in node.args]
        if node is anchor:
            extra = args[2:5] if node.target is aten.layer_norm.default else []
            if node.target in (aten.sum.dim_IntList, aten.mean.dim) and node.kwargs.get("dtype") not in (None,):
                raise Unsupported("a reduction with a dtype argument")
            expression, lines = _reduce(node, args[0], n, extra)
            body += lines
        else:
            kwargs = {k: (values[v] if isinstance(v, fx.Node) else (v if isinstance(v, str) else literal(v)))
                      for k, v in node.kwargs.items()}
            expression = EXPRESSIONS[node.target](args, kwargs)
            if node.meta["val"].dtype == torch.bool:
                expression = f"tl.where(({expression}) != 0, 1.0, 0.0)"
        body.append(f"v_{node.name} = {expression}")
        values[node] = f"v_{node.name}"
    for j, node in enumerate(results):
        dtype = TRITON_DTYPES[node.meta["val"].dtype]
        value = values[node]
        if tuple(node.meta["val"].shape) == row_shape and n != 1:
            address = f"{row_address(f'out{j}')} + cols * out{j}_stride{last}"
            body.append(f"tl.store(out{j}_ptr + {address}, {value}.to({dtype}), mask=mask)  # {node.name}")
            continue
        if _is_vector(node, anchor):  # a [*R, 1] result computed lane-wise: its lanes are equal
            value = f"tl.sum(tl.where(cols == 0, {value}, 0.0), axis=0)"
        body.append(f"tl.store(out{j}_ptr + {row_address(f'out{j}')}, ({value}).to({dtype}))  # {node.name}")

    ops = [f"{c.name} = {c.target}" for c in calls]
    source = kernel_source(f"reduction region {name}: {len(ops)} ops over rows of shape {list(row_shape)}",
                           ops, name, params, ["BLOCK_N"], body)
    pointers = {f"in{k}_ptr": p.meta["val"].dtype for k, p in enumerate(placeholders)}
    pointers |= {f"out{j}_ptr": r.meta["val"].dtype for j, r in enumerate(results)}
    return ReductionKernel(name, source, row_shape, [tuple(r.meta["val"].shape) for r in results],
                           [r.meta["val"].dtype for r in results], block=1 << max(0, (n - 1).bit_length()),
                           signature=kernel_signature(source, pointers),
                           output_strides=[tuple(r.meta["val"].stride()) for r in results])


def _is_vector(node: fx.Node, anchor: fx.Node) -> bool:
    """Whether ``node``'s value is a row vector (depends on lanes) rather than a row scalar."""
    if anchor.target in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default):
        stack, seen = [node], set()
        while stack:  # a vector if it reaches a placeholder without passing the anchor
            current = stack.pop()
            if current is anchor or current in seen:
                continue
            seen.add(current)
            if current.op == "placeholder":
                return True
            stack.extend(current.all_input_nodes)
        return False
    return True
