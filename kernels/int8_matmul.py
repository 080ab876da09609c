"""Triton kernel of ``optcc::int8_linear`` on GPUs: int8 x int8 -> int32 with a fused epilogue.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ::

    Y = (Xq Wq^T) * a[:, None] * s[None, :]        int8 tl.dot, int32 accumulator
      + (X[:, O] Wq[:, O]^T) * s[None, :]            fp32 tl.dot over the outlier columns O
      + b

``Xq`` is the per-row int8 quantization of the activations with the outlier columns set
to 0 (done in torch before the launch), ``a`` its row scales, ``Wq``/``s`` the int8 weight
and its per-channel scales, ``O`` the outlier column indices (gathered inside the kernel
from the fp32 activations and the int8 weight, which is dequantized in the same epilogue
by ``s``). The reference is :func:`optcc.kernels.int8_linear.int8_linear_reference`.

``int8_matmul_kernel`` is tested in the Triton interpreter and compiled ahead of time for
sm_80 / sm_90 (:mod:`optcc.lowering.aot`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8_quantize import outlier_columns, quantize_rows


@triton.jit
def int8_matmul_kernel(
    xq_ptr, w_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, x_ptr, outlier_idx_ptr, out_ptr,
    M, N, K, n_outliers,
    stride_xqm, stride_xqk, stride_wn, stride_wk, stride_xm, stride_xk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(xq_ptr + rm[:, None] * stride_xqm + k[None, :] * stride_xqk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_ptr + k[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)

    row_scale = tl.load(row_scale_ptr + rm, mask=m_ok, other=0.0)
    col_scale = tl.load(col_scale_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * row_scale[:, None]

    if HAS_OUTLIERS:
        ro = tl.arange(0, BLOCK_O)
        acc_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for o0 in range(0, n_outliers, BLOCK_O):
            o_ok = o0 + ro < n_outliers
            col = tl.load(outlier_idx_ptr + o0 + ro, mask=o_ok, other=0)
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :] * stride_xk,
                         mask=m_ok[:, None] & o_ok[None, :], other=0.0)
            wo = tl.load(w_ptr + col[:, None] * stride_wk + rn[None, :] * stride_wn,
                         mask=o_ok[:, None] & n_ok[None, :], other=0).to(tl.float32)
            acc_out += tl.dot(xo, wo, input_precision="ieee")
        y += acc_out
    y = y * col_scale[None, :]

    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, y,
             mask=m_ok[:, None] & n_ok[None, :])


def int8_matmul(xq, weight, row_scale, col_scale, bias=None, x=None, outlier_idx=None, *,
                block_m=64, block_n=64, block_k=64, block_o=16, num_warps=4):
    """Launch :func:`int8_matmul_kernel`: ``xq [M, K]`` int8, ``weight [N, K]`` int8 -> fp32 ``[M, N]``.

    ``x`` (fp32 ``[M, K]``) and ``outlier_idx`` (int32 column indices) add the outlier part.
    """
    m, k = xq.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=torch.float32, device=xq.device)
    has_outliers = outlier_idx is not None and outlier_idx.numel() > 0
    x_arg = x if has_outliers else xq
    idx_arg = outlier_idx if has_outliers else row_scale
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    int8_matmul_kernel[grid](
        xq, weight, row_scale, col_scale, bias if bias is not None else col_scale, x_arg, idx_arg, out,
        m, n, k, outlier_idx.numel() if has_outliers else 0,
        xq.stride(0), xq.stride(1), weight.stride(0), weight.stride(1),
        x_arg.stride(0), x_arg.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_OUTLIERS=has_outliers,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_O=block_o, num_warps=num_warps,
    )
    return out


def int8_linear_triton(rows, weight, weight_scale, bias, threshold, weight_only, **blocks):
    """``optcc::int8_linear`` on 2-d fp32 ``rows`` with the Triton kernel; returns (y, outlier mask)."""
    if weight_only:
        y = rows @ (weight.float() * weight_scale[:, None]).t()
        if bias is not None:
            y = y + bias.float()
        return y, torch.zeros(0, dtype=torch.bool, device=rows.device)
    outliers = outlier_columns(rows, threshold)
    idx = outliers.nonzero().flatten().to(torch.int32)
    xq, row_scale = quantize_rows(rows.masked_fill(outliers, 0.0))
    y = int8_matmul(xq.to(torch.int8), weight, row_scale.float(), weight_scale.float(),
                    bias.float() if bias is not None else None, rows, idx, **blocks)
    return y, outliers


#: Signature of ``int8_matmul_kernel`` for ahead-of-time compilation (constexprs apart).
KERNEL_SIGNATURE = {
    "xq_ptr": "*i8", "w_ptr": "*i8", "row_scale_ptr": "*fp32", "col_scale_ptr": "*fp32",
    "bias_ptr": "*fp32", "x_ptr": "*fp32", "outlier_idx_ptr": "*i32", "out_ptr": "*fp32",
    "M": "i32", "N": "i32", "K": "i32", "n_outliers": "i32",
    "stride_xqm": "i32", "stride_xqk": "i32", "stride_wn": "i32", "stride_wk": "i32",
    "stride_xm": "i32", "stride_xk": "i32", "stride_om": "i32", "stride_on": "i32",
    "HAS_BIAS": "constexpr", "HAS_OUTLIERS": "constexpr",
    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_O": "constexpr",
}
