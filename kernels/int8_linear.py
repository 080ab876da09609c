"""``optcc::int8_linear``: LLM.int8() vector-wise int8 linear with outlier decomposition.

The op computes, for an input ``x`` of shape ``[..., K]`` flattened to rows ``X [M, K]``,
an int8 weight ``Wq [N, K]`` with per-output-channel scales ``s [N]`` (``W ~ Wq * s``)
and an optional bias ``b [N]``, the formulas of :mod:`optcc.kernels.int8_quantize`:
outlier feature columns (``|x| >= threshold``) in fp32, every other value quantized per
row and multiplied in int8 with int32 accumulation. ``threshold <= 0`` means no
decomposition (every column is quantized). With ``weight_only`` the activations stay
fp32: ``Y = X (Wq * s)^T + b``.

The outlier part multiplies the fp32 activations with the *dequantized* int8 weight
columns, as bitsandbytes' ``Linear8bitLt`` does once its fp16 weight is dropped: keeping
the original weight columns would need the weight in two precisions. The outlier
activations, not the weights, are what breaks int8 (their magnitude would crush every
other value of the row to 0), so the weight side loses only its usual per-channel
rounding there.

Kernels, chosen by device:

* CPU: the integer GEMM of :mod:`optcc.kernels.int8_cpu` (oneDNN on CPUs with AMX,
  ``torch._int_mm`` with VNNI, fbgemm on sign-split rows elsewhere; picked once per process
  by what is exact and fast here, or forced by the op's ``cpu_kernel`` argument), with the row quantization, the
  outlier columns, the dequantization and the bias around it.
* CUDA: the Triton kernel in :mod:`optcc.kernels.int8_matmul` (int8 ``tl.dot`` with the
  row x column dequantization, the outlier columns and the bias in one kernel).

:func:`int8_linear_reference` is the straightforward torch implementation every kernel
is tested against. :func:`collect_stats` records, per call, how many values went
through int8, which columns were outliers and which CPU kernel ran.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
import torch.utils.flop_counter

from optcc.onnx_io.common import register_onnx_translation

from .int8_cpu import choose, quantize_rows_int8
from .int8_quantize import int8_linear_reference, outlier_columns, quantize_rows, quantize_weight

__all__ = ["int8_linear", "int8_linear_reference", "quantize_weight", "quantize_rows", "outlier_columns",
           "collect_stats", "LayerStats"]

_lib = torch.library.Library("optcc", "FRAGMENT")


# ----------------------------------------------------------------------------------------
# Statistics


@dataclass
class LayerStats:
    calls: int = 0
    values: int = 0  # activation values multiplied (M x K per call)
    int8_values: int = 0  # of which through the int8 GEMM
    outlier_columns: set = field(default_factory=set)
    kernels: set = field(default_factory=set)  # the CPU kernels / "triton" that ran


_stats_local = threading.local()


@contextlib.contextmanager
def collect_stats():
    """Record per-layer statistics of every ``optcc::int8_linear`` call in the block.

    Yields a ``dict[name, LayerStats]`` filled as the calls happen.
    """
    previous = getattr(_stats_local, "stats", None)
    stats: dict[str, LayerStats] = {}
    _stats_local.stats = stats
    try:
        yield stats
    finally:
        _stats_local.stats = previous


def _record(name: str, rows: torch.Tensor, outliers: torch.Tensor, weight_only: bool, kernel: str) -> None:
    stats = getattr(_stats_local, "stats", None)
    if stats is None:
        return
    layer = stats.setdefault(name, LayerStats())
    layer.calls += 1
    layer.kernels.add(kernel)
    layer.values += rows.numel()
    if not weight_only:
        n_out = int(outliers.sum())
        layer.int8_values += rows.shape[0] * (rows.shape[1] - n_out)
        layer.outlier_columns.update(outliers.nonzero().flatten().tolist())


# ----------------------------------------------------------------------------------------
# CPU: quantization, outliers, dequantization and bias around the chosen integer GEMM


def _int8_linear_cpu(x, weight, weight_scale, bias, threshold, weight_only, kernel_name):
    rows = x.reshape(-1, x.shape[-1]).float()
    if weight_only:
        y = rows @ (weight.float() * weight_scale[:, None]).t()
        if bias is not None:
            y = y.add_(bias.float())
        return y, rows, torch.zeros(0, dtype=torch.bool), "fp32"
    kernel = choose(kernel_name).kernel
    outliers = outlier_columns(rows, threshold)
    columns = outliers.nonzero().flatten() if threshold and threshold > 0 else None
    if columns is not None and columns.numel() == 0:
        columns = None
    if rows.shape[0] == 0:
        return rows.new_zeros(0, weight.shape[0]), rows, outliers, kernel.name
    if kernel.reads_int8:
        xq, row_scale = quantize_rows_int8(rows, columns)
    else:
        xq, row_scale = quantize_rows(rows.index_fill(1, columns, 0.0) if columns is not None else rows)
    y = kernel.run(xq, weight, weight_scale)
    # y = a_i (Xq Wq^T s)_ij + b_j (+ outliers): one pass with the bias, in place
    if bias is not None:
        y = torch.addcmul(bias.float(), y, row_scale[:, None], out=y)
    else:
        y = y.mul_(row_scale[:, None])
    if columns is not None:
        w_out = weight.index_select(1, columns).float() * weight_scale[:, None]
        y = y.addmm_(rows.index_select(1, columns), w_out.t())
    return y, rows, outliers, kernel.name


# ----------------------------------------------------------------------------------------
# The custom op

_lib.define(
    "int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, float threshold, "
    "bool weight_only, str name, str cpu_kernel=\"auto\") -> Tensor"
)


def _int8_linear(x, weight, weight_scale, bias, threshold, weight_only, name, cpu_kernel="auto"):
    if x.is_cuda:
        from .int8_matmul import int8_linear_triton

        rows = x.reshape(-1, x.shape[-1]).float()
        y, outliers = int8_linear_triton(rows, weight, weight_scale, bias, threshold, weight_only)
        used = "triton"
    else:
        y, rows, outliers, used = _int8_linear_cpu(x, weight, weight_scale, bias, threshold, weight_only, cpu_kernel)
    _record(name, rows, outliers, weight_only, used)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _int8_linear_fake(x, weight, weight_scale, bias, threshold, weight_only, name, cpu_kernel="auto"):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_lib.impl("int8_linear", _int8_linear, "CompositeExplicitAutograd")
torch.library.register_fake("optcc::int8_linear", _int8_linear_fake, lib=_lib)

int8_linear = torch.ops.optcc.int8_linear.default



# ----------------------------------------------------------------------------------------
# ONNX: the same formulas in standard ops


def _int8_linear_onnx(x, weight, weight_scale, bias, threshold, weight_only, name, cpu_kernel="auto"):
    """``optcc::int8_linear`` as standard ONNX, per-row semantics kept.

    ONNX's ``DynamicQuantizeLinear`` quantizes a whole tensor with one asymmetric uint8
    scale; LLM.int8() scales each row. So the row quantization is written out (``ReduceMax``
    of ``|X_in|``, ``Mul`` by the reciprocal, ``Round`` - halves to even, as here) and only
    the integer GEMM is ONNX's ``MatMulInteger``, on the sign-split rows as on AVX2 here:
    ``Xq W^T = X+ W^T - X- W^T`` with ``X+, X-`` in [0, 127] as uint8. ONNX Runtime's
    int8 x int8 kernel is exact but 4x slower than fp32 on AVX2, its uint8 x int8 one fast
    but saturating for full-range uint8; the split is exact with the fast one. Outlier
    columns are found at run time as here and multiplied in fp32 through ``Compress`` on
    both operands. (With ``weight_only`` ONNX Runtime folds the
    dequantized weight into an fp32 constant when it loads the file: the file stays int8,
    the memory at run time does not.)"""
    from onnxscript import opset18 as op

    float32, uint8 = 1, 2  # onnx.TensorProto.FLOAT, UINT8
    rows = op.Reshape(op.Cast(x, to=float32), op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))
    column_scale = op.Unsqueeze(weight_scale, op.Constant(value_ints=[1]))
    if weight_only:
        y = op.MatMul(rows, op.Transpose(op.Mul(op.Cast(weight, to=float32), column_scale), perm=[1, 0]))
    else:
        decompose = threshold is not None and threshold > 0
        quantized_part = rows
        if decompose:
            column_max = op.ReduceMax(op.Abs(rows), op.Constant(value_ints=[0]), keepdims=0)
            outliers = op.GreaterOrEqual(column_max, op.Constant(value_float=float(threshold)))
            quantized_part = op.Where(outliers, op.Constant(value_float=0.0), rows)
        row_max = op.ReduceMax(op.Abs(quantized_part), op.Constant(value_ints=[1]), keepdims=1)
        row_scale = op.Div(row_max, op.Constant(value_float=127.0))
        safe_scale = op.Where(op.Greater(row_scale, op.Constant(value_float=0.0)), row_scale,
                              op.Constant(value_float=1.0))
        xq = op.Round(op.Mul(quantized_part, op.Reciprocal(safe_scale)))
        # X = X+ - X-, each in [0, 127] as uint8: a pair of such products fits int16, so ONNX
        # Runtime's fast uint8 x int8 kernel (vpmaddubsw) is exact on every x86 CPU.
        weight_t = op.Transpose(weight, perm=[1, 0])
        zero = op.Constant(value_float=0.0)
        positive = op.MatMulInteger(op.Cast(op.Max(xq, zero), to=uint8), weight_t)
        negative = op.MatMulInteger(op.Cast(op.Max(op.Neg(xq), zero), to=uint8), weight_t)
        y = op.Mul(op.Mul(op.Cast(op.Sub(positive, negative), to=float32), row_scale), weight_scale)
        if decompose:
            outlier_rows = op.Compress(rows, outliers, axis=1)
            # only the outlier columns are dequantized, so no fp32 copy of the weight exists
            outlier_weight = op.Mul(op.Cast(op.Compress(weight, outliers, axis=1), to=float32), column_scale)
            y = op.Add(y, op.MatMul(outlier_rows, op.Transpose(outlier_weight, perm=[1, 0])))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=float32))
    shape = op.Concat(op.Shape(x, start=0, end=-1), op.Shape(weight, start=0, end=1), axis=0)
    return op.CastLike(op.Reshape(y, shape), x)


register_onnx_translation(int8_linear, _int8_linear_onnx)


@torch.utils.flop_counter.register_flop_formula(torch.ops.optcc.int8_linear)
def _int8_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """``2 M N K``: int8 removes no multiply-adds (they become integer ones)."""
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return int(2 * rows * weight_shape[0] * weight_shape[1])
