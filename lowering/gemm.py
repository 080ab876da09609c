"""Triton source for a gemm region: a tiled matmul with the region's epilogue fused in.

``linear`` (``y = x W^T + b``), ``addmm`` (``b + x W``), ``mm`` and ``bmm`` regions
become one kernel. Rows of the output are the flattened leading dimensions ``m`` (each
program unravels its row indices, so any strided ``x`` and any output layout work), the
columns ``n``; ``bmm`` adds a batch axis to the grid. Each program owns a
``[BLOCK_M, BLOCK_N]`` tile::

    acc  = sum_k  X[m, k0:k0+BLOCK_K] @ W[k0:k0+BLOCK_K, n]      tl.dot, fp32 accumulator
    v    = epilogue(acc + b)                                     bias, activation, residual...
    store(out[m, n], v)                                          the only store

The epilogue is the region's pointwise ops, with each extra operand (a bias row, a
residual tile) loaded once per tile by its own strides. fp32 inputs use IEEE fp32 dots
(``input_precision="ieee"``), not TF32, so results match torch's fp32 matmul.

Convolutions keep the vendor kernel (cuDNN through torch) and fuse only the epilogue:
:func:`split_epilogue` cuts the region after its anchor and the rest becomes a pointwise
kernel over the conv's output. An implicit-GEMM conv could save one write and one read
of the conv output; that is worth measuring on a GPU before replacing a cuDNN conv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from .pointwise import EXPRESSIONS
from .triton_types import TRITON_DTYPES, Unsupported, kernel_signature, kernel_source, literal

aten = torch.ops.aten
MATMULS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default)


@dataclass
class GemmKernel:
    name: str
    source: str
    kind: str  # which aten op
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    m: int
    n: int
    k: int
    batch: int
    operands: list[int]  # region-input positions of x, w, bias (bias -1 when absent)
    epilogue_inputs: list[int]  # region-input positions read by the epilogue, in order
    blocks: tuple[int, int, int]
    signature: dict[str, str]  # Triton types, for ahead-of-time builds
    out_stride: tuple[int, ...]  # the reference result's layout

    @property
    def constexprs(self) -> dict[str, int]:
        return dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), self.blocks))


def _block(size: int, largest: int) -> int:
    return max(16, min(largest, 1 << max(0, (size - 1).bit_length())))


def generate_gemm(region: fx.GraphModule, name: str) -> GemmKernel:
    placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
    position = {p: i for i, p in enumerate(placeholders)}
    output = next(n for n in region.graph.nodes if n.op == "output")
    if isinstance(output.args[0], (tuple, list)):
        raise Unsupported("a gemm region with several results")
    result = output.args[0]
    calls = [n for n in region.graph.nodes if n.op == "call_function"]
    anchor = calls[0]
    if anchor.target not in MATMULS:
        raise Unsupported(f"anchor {anchor.target} (convolutions keep the vendor kernel)")
    if any(c.target not in EXPRESSIONS for c in calls[1:]):
        raise Unsupported("an epilogue op without a Triton expression")
    args = list(anchor.args)
    if anchor.target is aten.addmm.default:
        bias, x, w = args[:3]
        if anchor.kwargs.get("beta", 1) != 1 or anchor.kwargs.get("alpha", 1) != 1:
            raise Unsupported("addmm with alpha/beta")
    else:
        x, w = args[:2]
        bias = args[2] if len(args) > 2 else None
    for operand in (x, w, bias):
        if operand is not None and operand not in position:
            raise Unsupported("a matmul operand computed inside the region")
    if bias is not None and bias.meta["val"].dim() != 1:
        raise Unsupported("a bias that is not one row")
    xv, wv = x.meta["val"], w.meta["val"]
    out = anchor.meta["val"]
    if xv.dtype != wv.dtype or xv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported(f"matmul of {xv.dtype} and {wv.dtype}")
    batch = out.shape[0] if anchor.target is aten.bmm.default else 1
    k = xv.shape[-1]
    n = out.shape[-1]
    m = math.prod(out.shape[:-1]) // batch
    out_shape = tuple(out.shape)
    row_dims = out_shape[1:-1] if anchor.target is aten.bmm.default else out_shape[:-1]
    if any(tuple(v.shape) != out_shape for v in (c.meta["val"] for c in calls[1:])):
        raise Unsupported("an epilogue op that changes the shape")
    epilogue_inputs = []
    for c in calls[1:]:
        for a in c.all_input_nodes:
            if a in position and a not in epilogue_inputs:
                epilogue_inputs.append(a)

    rank_rows = len(row_dims)
    params = ["x_ptr", "w_ptr", "bias_ptr"] + [f"e{i}_ptr" for i in range(len(epilogue_inputs))] + ["out_ptr"]
    params += ["M", "N", "K"] + [f"row_size{d}" for d in range(rank_rows)]
    params += [f"x_stride_row{d}" for d in range(rank_rows)] + ["x_stride_k", "x_stride_batch"]
    params += ["w_stride_k", "w_stride_n", "w_stride_batch", "bias_stride"]
    for i in range(len(epilogue_inputs)):
        params += [f"e{i}_stride_row{d}" for d in range(rank_rows)] + [f"e{i}_stride_n", f"e{i}_stride_batch"]
    params += [f"out_stride_row{d}" for d in range(rank_rows)] + ["out_stride_n", "out_stride_batch"]

    def row_offset(prefix: str) -> str:
        return " + ".join(f"r{d}[:, None] * {prefix}_stride_row{d}" for d in range(rank_rows)) or "0"

    dot_precision = ', input_precision="ieee"' if xv.dtype == torch.float32 else ""
    body = [
        "pid_m = tl.program_id(0)",
        "pid_n = tl.program_id(1)",
        "pid_b = tl.program_id(2)",
        "rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        "rk = tl.arange(0, BLOCK_K)",
        "m_ok = rm < M",
        "n_ok = rn < N",
        "rest = rm",
    ]
    for d in reversed(range(rank_rows)):
        body.append(f"r{d} = rest % row_size{d}")
        if d:
            body.append(f"rest = rest // row_size{d}")
    w_k, w_n = ("k[:, None]", "rn[None, :]")
    body += [
        "x_base = x_ptr + pid_b * x_stride_batch + " + row_offset("x"),
        "w_base = w_ptr + pid_b * w_stride_batch",
        "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "for k0 in range(0, K, BLOCK_K):",
        "    k = k0 + rk",
        "    k_ok = k < K",
        "    a = tl.load(x_base + k[None, :] * x_stride_k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)",
        f"    b = tl.load(w_base + {w_k} * w_stride_k + {w_n} * w_stride_n, mask=k_ok[:, None] & n_ok[None, :], other=0.0)",
        f"    acc += tl.dot(a, b{dot_precision})",
        "tile_ok = m_ok[:, None] & n_ok[None, :]",
    ]
    values: dict[fx.Node, str] = {}
    result_value = "acc"
    if bias is not None:
        body.append("acc += tl.load(bias_ptr + rn[None, :] * bias_stride, mask=n_ok[None, :], other=0.0).to(tl.float32)")
    values[anchor] = "acc"
    for i, node in enumerate(epilogue_inputs):
        address = f"e{i}_ptr + pid_b * e{i}_stride_batch + {row_offset(f'e{i}')} + rn[None, :] * e{i}_stride_n"
        body.append(f"e{i} = tl.load({address}, mask=tile_ok, other=0.0).to(tl.float32)  # {node.name}")
        values[node] = f"e{i}"
    for c in calls[1:]:
        c_args = [values[a] if isinstance(a, fx.Node) else literal(a) for a in c.args]
        kwargs = {key: (values[v] if isinstance(v, fx.Node) else (v if isinstance(v, str) else literal(v)))
                  for key, v in c.kwargs.items()}
        expression = EXPRESSIONS[c.target](c_args, kwargs)
        if c.meta["val"].dtype == torch.bool:
            raise Unsupported("a boolean epilogue result")
        body.append(f"v_{c.name} = {expression}")
        values[c] = f"v_{c.name}"
    result_value = values[result]
    out_dtype = result.meta["val"].dtype
    body.append(f"tl.store(out_ptr + pid_b * out_stride_batch + {row_offset('out')} + rn[None, :] * out_stride_n, "
                f"{result_value}.to({TRITON_DTYPES[out_dtype]}), mask=tile_ok)")
    blocks = (_block(m, 64), _block(n, 64), _block(k, 64))
    ops = [f"{c.name} = {c.target}" for c in calls]
    source = kernel_source(f"gemm region {name}: [{m} x {k}] @ [{k} x {n}] x {batch}, then {len(calls) - 1} epilogue ops",
                           ops, name, params, ["BLOCK_M", "BLOCK_N", "BLOCK_K"], body)
    operands = [position[x], position[w], position[bias] if bias is not None else -1]
    pointers = {"x_ptr": xv.dtype, "w_ptr": wv.dtype, "out_ptr": out_dtype,
                "bias_ptr": bias.meta["val"].dtype if bias is not None else xv.dtype}
    pointers |= {f"e{i}_ptr": e.meta["val"].dtype for i, e in enumerate(epilogue_inputs)}
    return GemmKernel(name, source, str(anchor.target), out_shape, out_dtype, m, n, k, batch, operands,
                      [position[e] for e in epilogue_inputs], blocks, kernel_signature(source, pointers),
                      tuple(result.meta["val"].stride()))


def row_strides(t: torch.Tensor, rank_rows: int, batched: bool) -> list[int]:
    """Strides of a tensor's row dims (after the batch dim, before the last)."""
    start = 1 if batched else 0
    return list(t.stride()[start:start + rank_rows])


def split_epilogue(region: fx.GraphModule) -> tuple[fx.Node, fx.GraphModule | None, list[int]]:
    """Cut a gemm region after its anchor: ``(anchor, epilogue, inputs)`` where ``epilogue``
    is a GraphModule of the remaining ops taking ``(anchor result, *region inputs[inputs])``,
    or None when the anchor is the whole region."""
    placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
    calls = [n for n in region.graph.nodes if n.op == "call_function"]
    anchor, rest = calls[0], calls[1:]
    if not rest:
        return anchor, None, []
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    env[anchor] = graph.placeholder("anchor_out")
    env[anchor].meta = dict(anchor.meta)
    used = [p for p in placeholders if any(p in c.all_input_nodes for c in rest)]
    for p in used:
        env[p] = graph.placeholder(p.name)
        env[p].meta = dict(p.meta)
    for c in rest:
        env[c] = graph.node_copy(c, lambda a: env[a])
    out = next(n for n in region.graph.nodes if n.op == "output")
    graph.output(fx.map_arg(out.args[0], lambda a: env[a]))
    return anchor, fx.GraphModule(torch.nn.Module(), graph), [placeholders.index(p) for p in used]
