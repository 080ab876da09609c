"""``optcc::int8_linear``: LLM.int8() vector-wise int8 linear with outlier decomposition.

The op computes, for an input ``x`` of shape ``[..., K]`` flattened to rows ``X [M, K]``,
an int8 weight ``Wq [N, K]`` with per-output-channel scales ``s [N]`` (``W ~ Wq * s``)
and an optional bias ``b [N]``::

    O        = { k : max_i |X[i, k]| >= threshold }            outlier feature columns
    X_in     = X with the columns in O set to 0
    a_i      = max_k |X_in[i, k]| / 127                          per-row activation scale
    Xq[i, k] = round(X_in[i, k] / a_i)                           int8 in [-127, 127]
    Y[i, j]  = a_i * s_j * sum_k Xq[i, k] Wq[j, k]               int8 x int8 -> int32
             + sum_{k in O} X[i, k] * (Wq[j, k] * s_j)           fp32, outlier columns
             + b_j

``threshold <= 0`` means no decomposition (every column is quantized). With
``weight_only`` the activations stay fp32: ``Y = X (Wq * s)^T + b``.

The outlier part multiplies the fp32 activations with the *dequantized* int8 weight
columns, as bitsandbytes' ``Linear8bitLt`` does once its fp16 weight is dropped: keeping
the original weight columns would need the weight in two precisions. The outlier
activations, not the weights, are what breaks int8 (their magnitude would crush every
other value of the row to 0), so the weight side loses only its usual per-channel
rounding there.

Kernels, chosen by device:

* CPU: fbgemm's int8 GEMM (``quantized::linear_dynamic`` on prepacked int8 weights), fed
  with the already-quantized rows so that its per-tensor activation quantization is the
  identity (scale 1, zero point 0): the per-row semantics above hold exactly. On CPUs
  without VNNI fbgemm multiplies ``uint8 x int8`` pairs with 16-bit saturation
  (``vpmaddubsw``), so the rows are split into their positive and negative parts
  (``Xq = P - N``, both in ``[0, 127]``, where no pair sum can saturate) and stacked into
  one GEMM of ``2M`` rows. Where the quantized engine is missing the integer product is
  computed in fp32 (exact up to accumulation order).
* CUDA: the Triton kernel in :mod:`optcc.kernels.int8_matmul` (int8 ``tl.dot`` with the
  row x column dequantization, the outlier columns and the bias in one kernel).

:func:`int8_linear_reference` is the straightforward torch implementation every kernel
is tested against. :func:`collect_stats` records, per call, how many values went
through int8 and which columns were outliers.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

_lib = torch.library.Library("optcc", "FRAGMENT")


# ----------------------------------------------------------------------------------------
# Quantization (shared by the pass, the reference and the kernels)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel absmax quantization: ``weight ~ q * scale[:, None]``, q int8."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def outlier_columns(rows: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Bool ``[K]``: the columns holding any value with ``|x| >= threshold``."""
    if not threshold or threshold <= 0 or rows.shape[0] == 0:
        return torch.zeros(rows.shape[-1], dtype=torch.bool, device=rows.device)
    # |x| >= t  <=>  x >= t or x <= -t: two column reductions, no [M, K] temporaries
    # (torch.aminmax is several times slower than amax + amin here)
    return (rows.amax(dim=0) >= threshold) | (rows.amin(dim=0) <= -threshold)


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax quantization: ``rows ~ q * scale[:, None]``; q holds integers in
    [-127, 127] (returned in ``rows``' float dtype, so kernels can feed it where they need)."""
    scale = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.div(rows, safe[:, None]).round_(), scale


def int8_linear_reference(x, weight, weight_scale, bias=None, threshold=6.0, weight_only=False):
    """LLM.int8() in plain torch with fp32 arithmetic (the module docstring's formulas)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    w = weight.float() * weight_scale[:, None]
    if weight_only:
        y = rows @ w.t()
    else:
        outliers = outlier_columns(rows, threshold)
        xq, row_scale = quantize_rows(rows.masked_fill(outliers, 0.0))
        y = (xq @ weight.float().t()) * row_scale[:, None] * weight_scale[None, :]
        y = y + rows[:, outliers] @ w[:, outliers].t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------
# Statistics


@dataclass
class LayerStats:
    calls: int = 0
    values: int = 0  # activation values multiplied (M x K per call)
    int8_values: int = 0  # of which through the int8 GEMM
    outlier_columns: set = field(default_factory=set)


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


def _record(name: str, rows: torch.Tensor, outliers: torch.Tensor, weight_only: bool) -> None:
    stats = getattr(_stats_local, "stats", None)
    if stats is None:
        return
    layer = stats.setdefault(name, LayerStats())
    layer.calls += 1
    layer.values += rows.numel()
    if not weight_only:
        n_out = int(outliers.sum())
        layer.int8_values += rows.shape[0] * (rows.shape[1] - n_out)
        layer.outlier_columns.update(outliers.nonzero().flatten().tolist())


# ----------------------------------------------------------------------------------------
# CPU kernel: fbgemm


def _fbgemm_engine() -> str | None:
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            return engine
    return None


class _PackedWeights:
    """fbgemm-prepacked copies of int8 weights, one per weight tensor, freed with it."""

    def __init__(self):
        self._packed: dict[int, object] = {}

    def get(self, weight: torch.Tensor):
        key = id(weight)
        packed = self._packed.get(key)
        if packed is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensors are deprecated, the GEMM is not
                qweight = torch._make_per_tensor_quantized_tensor(weight, 1.0, 0)
                packed = torch.ops.quantized.linear_prepack(qweight, None)
            self._packed[key] = packed
            weakref.finalize(weight, self._packed.pop, key, None)
        return packed

    def clear(self):
        self._packed.clear()


packed_weights = _PackedWeights()


def fbgemm_int_matmul(xq: torch.Tensor, weight: torch.Tensor, *, split_signs: bool = True) -> torch.Tensor:
    """``xq @ weight.T`` for integer-valued fp32 ``xq`` in [-127, 127] and int8 ``weight``,
    as fp32, through fbgemm's int8 GEMM.

    The rows are padded with one row holding 255 in its first entry (and 0 or -255), so
    that fbgemm's per-tensor activation range is exactly 255 wide: scale 1, so the
    quantization it applies reproduces ``xq`` exactly. ``split_signs`` (see the module
    docstring) avoids 16-bit saturation on CPUs without VNNI at twice the GEMM work;
    without it, results may saturate wherever a pair of products exceeds 32767.
    """
    packed = packed_weights.get(weight)
    m, k = xq.shape
    if split_signs:
        # [P; N; pad] written in place: P = max(xq, 0), N = -min(xq, 0), both in [0, 127]
        stacked = xq.new_empty(2 * m + 1, k)
        torch.clamp_min(xq, 0, out=stacked[:m])
        torch.clamp_max(xq, 0, out=stacked[m:2 * m]).neg_()
        stacked[2 * m].zero_()
        stacked[2 * m, 0] = 255.0  # range [0, 255]: scale 1, zero point 0
        out = torch.ops.quantized.linear_dynamic(stacked, packed, False)
        return out[:m].sub_(out[m:2 * m])  # in place: a fresh [M, N] buffer costs page faults
    pad = xq.new_zeros(2, k)
    pad[0, 0], pad[1, 0] = 128.0, -127.0  # range [-127, 128]: scale 1, zero point 127
    return torch.ops.quantized.linear_dynamic(torch.cat([xq, pad]), packed, False)[:m]


def _int_matmul_cpu(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if _fbgemm_engine() is not None and xq.shape[0] > 0:
        return fbgemm_int_matmul(xq, weight)
    return xq @ weight.float().t()


def _int8_linear_cpu(x, weight, weight_scale, bias, threshold, weight_only):
    rows = x.reshape(-1, x.shape[-1]).float()
    if weight_only:
        y = rows @ (weight.float() * weight_scale[:, None]).t()
        outliers = torch.zeros(0, dtype=torch.bool)
    else:
        outliers = outlier_columns(rows, threshold)
        has_outliers = bool(outliers.any())
        inliers = rows.masked_fill(outliers, 0.0) if has_outliers else rows
        xq, row_scale = quantize_rows(inliers)
        y = _int_matmul_cpu(xq, weight).mul_(row_scale[:, None]).mul_(weight_scale[None, :])
        if has_outliers:
            columns = outliers.nonzero().flatten()
            w_out = weight.index_select(1, columns).float() * weight_scale[:, None]
            y = y.addmm_(rows.index_select(1, columns), w_out.t())
    if bias is not None:
        y = y.add_(bias.float())
    return y, rows, outliers


# ----------------------------------------------------------------------------------------
# The custom op

_lib.define(
    "int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, float threshold, "
    "bool weight_only, str name) -> Tensor"
)


def _int8_linear(x, weight, weight_scale, bias, threshold, weight_only, name):
    if x.is_cuda:
        from .int8_matmul import int8_linear_triton

        rows = x.reshape(-1, x.shape[-1]).float()
        y, outliers = int8_linear_triton(rows, weight, weight_scale, bias, threshold, weight_only)
    else:
        y, rows, outliers = _int8_linear_cpu(x, weight, weight_scale, bias, threshold, weight_only)
    _record(name, rows, outliers, weight_only)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _int8_linear_fake(x, weight, weight_scale, bias, threshold, weight_only, name):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_lib.impl("int8_linear", _int8_linear, "CompositeExplicitAutograd")
torch.library.register_fake("optcc::int8_linear", _int8_linear_fake, lib=_lib)

int8_linear = torch.ops.optcc.int8_linear.default
