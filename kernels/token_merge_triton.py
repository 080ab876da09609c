"""Triton kernel of ``optcc::token_merge`` on GPUs: a deterministic gather-and-reduce.

The op (:mod:`optcc.kernels.token_merge`) merges ``x [B, N, C]`` into ``n_out`` tokens::

    x'[b, j] = sum_{i : dest[b, i] = j} w[b, i] x[b, i]  /  sum_{i : dest[b, i] = j} w[b, i]
    s'[b, j] = sum_{i : dest[b, i] = j} s[b, i]

Its torch implementation is a ``scatter_add``, which on CUDA adds with float atomics: the
order of the additions, and so the low bits of the result, depends on the scheduling. This
kernel inverts the plan first and then *gathers*, so every output element is summed by one
thread in one fixed order (its sources in ascending input position) and the result is the
same on every run:

1. In torch (three small ``[B, N]`` kernels, no atomics): ``order = sort(dest, stable)``
   lists every row's input tokens grouped by destination, in input order within a group;
   ``start[b, j]`` / ``count[b, j]`` (``searchsorted`` of ``0 .. n_out - 1`` in the sorted
   ``dest``) say where output token ``j``'s sources are in ``order`` and how many there are.
2. ``token_merge_kernel``: one program per ``(block of BLOCK_J output tokens, b, block of
   BLOCK_C channels)``. It loads its tokens' ``start`` / ``count`` and loops ``t`` up to the
   largest ``count`` of the block; step ``t`` gathers the ``t``-th source of every token of
   the block (masked where a token has fewer) - its weight, its size and a ``[BLOCK_J,
   BLOCK_C]`` tile of ``x`` (rows contiguous along ``C``, so the loads coalesce) - and adds
   into fp32 accumulators. At the end it stores ``acc / w_sum`` in ``x``'s dtype and, from
   the programs of the first channel block only, the summed sizes.

Sizes are summed in int64 when ``size`` is an integer tensor and in fp32 otherwise (exact for
integer-valued sizes below 2^24, which is what ToMe's sizes are). A group with no sources or
a zero total weight gives ``0 / 0 = nan``, like the torch implementation. ``dest`` must lie
in ``[0, n_out)``: a destination outside is not an error here (it is never gathered).

Expected cost (not measured: there is no GPU where this was written): the kernel reads ``x``
once and writes ``x'`` once plus ``O(B N)`` indices - memory bound and O(N C) per row, unlike
a one-hot ``[n_out, N] @ [N, C]`` product (O(n_out N C)). For ViT-B/16 ToMe shapes (B = 64,
N = 197, C = 768, n_out ~ 180, fp16) that is ~19 MB read + ~18 MB written, ~10-15 us at
H100/H200 bandwidth, plus the launch of the kernel and of the three torch index kernels
(~5 us each), comparable to the torch path's ``scatter_add`` + division (which also
materialises an fp32 ``[B, n_out, C]`` temporary). The loop of a block runs as long as its
largest group: with ToMe plans groups have 1-3 sources; with ``topk_plan``'s fused token
(``N - keep`` sources) one block per ``(b, channel block)`` loops ``N - keep`` times while
the others loop once, a tail the GPU hides behind the other programs.

``token_merge_kernel`` is tested in the Triton interpreter against the torch implementation
and compiled ahead of time for sm_80 / sm_90 (:mod:`optcc.lowering.aot`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["token_merge_kernel", "token_merge_triton", "inverse_plan", "kernel_signature"]


@triton.jit
def token_merge_kernel(
    x_ptr, w_ptr, size_ptr, order_ptr, start_ptr, count_ptr, out_ptr, size_out_ptr,
    N, C, n_out,
    stride_xb, stride_xn, stride_xc,
    SIZE_IS_INT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_j = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = rj < n_out
    c_ok = rc < C

    start = tl.load(start_ptr + b * n_out + rj, mask=j_ok, other=0)
    count = tl.load(count_ptr + b * n_out + rj, mask=j_ok, other=0)
    x_row = x_ptr + b * stride_xb

    acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
    w_sum = tl.zeros((BLOCK_J,), dtype=tl.float32)
    if SIZE_IS_INT:
        s_sum = tl.zeros((BLOCK_J,), dtype=tl.int64)
    else:
        s_sum = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for t in range(0, tl.max(count, axis=0)):
        live = t < count
        src = tl.load(order_ptr + b * N + start + t, mask=live, other=0)
        w = tl.load(w_ptr + b * N + src, mask=live, other=0.0)
        s = tl.load(size_ptr + b * N + src, mask=live, other=0)
        xv = tl.load(x_row + src.to(tl.int64)[:, None] * stride_xn + rc[None, :] * stride_xc,
                     mask=live[:, None] & c_ok[None, :], other=0.0)
        acc += xv.to(tl.float32) * w[:, None]
        w_sum += w
        s_sum += s.to(s_sum.dtype)

    out_row = (b * n_out + rj).to(tl.int64) * C
    # lanes past n_out, and groups whose weights are all 0 (as the torch form: 0)
    y = acc / tl.where(j_ok, tl.maximum(w_sum, 1.1754943508222875e-38), 1.0)[:, None]
    tl.store(out_ptr + out_row[:, None] + rc[None, :], y.to(out_ptr.dtype.element_ty),
             mask=j_ok[:, None] & c_ok[None, :])
    tl.store(size_out_ptr + b * n_out + rj, s_sum.to(size_out_ptr.dtype.element_ty), mask=j_ok & (pid_c == 0))


def inverse_plan(dest: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, start, count)`` (int32): output token ``j`` of row ``b`` gathers the input
    tokens ``order[b, start[b, j] : start[b, j] + count[b, j]]`` (ascending). Sort and
    ``searchsorted`` only, so it is deterministic on every device."""
    b = dest.shape[0]
    sorted_dest, order = torch.sort(dest, dim=1, stable=True)
    targets = torch.arange(n_out, device=dest.device, dtype=dest.dtype).expand(b, n_out).contiguous()
    start = torch.searchsorted(sorted_dest, targets)
    end = torch.searchsorted(sorted_dest, targets, right=True)
    return order.to(torch.int32), start.to(torch.int32), (end - start).to(torch.int32)


def _launch_blocks(n_out: int, c: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(c, 1)), 256)
    block_j = min(triton.next_power_of_2(max(n_out, 1)), 4)
    return block_j, block_c


def token_merge_triton(x, size, dest, n_out, weight=None, *, block_j=None, block_c=None, num_warps=4):
    """``optcc::token_merge`` with :func:`token_merge_kernel`; the contract of the torch
    implementation: ``x [B, N, C]``, ``size [B, N]``, ``dest [B, N]`` in ``[0, n_out)``,
    ``weight [B, N]`` or None (``w = size``) -> ``(x' [B, n_out, C]`` in ``x``'s dtype,
    ``size' [B, n_out]`` in ``size``'s dtype), accumulated in fp32.

    ``block_j`` / ``block_c`` (powers of two) override the launch blocks (tests use small ones).
    """
    b, n, c = x.shape
    out = torch.empty((b, n_out, c), dtype=x.dtype, device=x.device)
    size_out = torch.empty((b, n_out), dtype=size.dtype, device=x.device)
    if out.numel() == 0 and size_out.numel() == 0:
        return out, size_out
    w = (size if weight is None else weight).to(torch.float32).contiguous()
    size_in = size.contiguous()
    order, start, count = inverse_plan(dest, n_out)
    default_j, default_c = _launch_blocks(n_out, c)
    block_j, block_c = block_j or default_j, block_c or default_c
    # at least one channel block, so that ``size'`` is written even when C == 0
    grid = (triton.cdiv(n_out, block_j), b, max(triton.cdiv(c, block_c), 1))
    token_merge_kernel[grid](
        x, w, size_in, order, start, count, out, size_out,
        n, c, n_out,
        x.stride(0), x.stride(1), x.stride(2),
        SIZE_IS_INT=not (size.is_floating_point() or size.is_complex()),
        BLOCK_J=block_j, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out, size_out


def kernel_signature(dtype: str = "fp16", size_dtype: str = "fp32") -> dict[str, str]:
    """Triton types of :func:`token_merge_kernel`'s parameters, for ahead-of-time builds:
    ``dtype`` is that of ``x`` and ``x'`` (``"fp16"``, ``"bf16"``, ``"fp32"``), ``size_dtype``
    that of the sizes (``"fp32"``, ``"i64"``, ...; ``SIZE_IS_INT`` must agree)."""
    return {
        "x_ptr": f"*{dtype}", "w_ptr": "*fp32", "size_ptr": f"*{size_dtype}",
        "order_ptr": "*i32", "start_ptr": "*i32", "count_ptr": "*i32",
        "out_ptr": f"*{dtype}", "size_out_ptr": f"*{size_dtype}",
        "N": "i32", "C": "i32", "n_out": "i32",
        "stride_xb": "i32", "stride_xn": "i32", "stride_xc": "i32",
        "SIZE_IS_INT": "constexpr", "BLOCK_J": "constexpr", "BLOCK_C": "constexpr",
    }
