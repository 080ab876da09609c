"""The quantization of LLM.int8() and its plain-torch reference, shared by every kernel.

For rows ``X [M, K]``, an int8 weight ``Wq [N, K]`` with per-output-channel scales ``s [N]``
(``W ~ Wq * s``) and an optional bias ``b [N]``::

    O        = { k : max_i |X[i, k]| >= threshold }            outlier feature columns
    X_in     = X with the columns in O set to 0
    a_i      = max_k |X_in[i, k]| / 127                          per-row activation scale
    Xq[i, k] = round(X_in[i, k] * (1 / a_i))                     int8 in [-127, 127]
    Y[i, j]  = a_i * s_j * sum_k Xq[i, k] Wq[j, k]               int8 x int8 -> int32
             + sum_{k in O} X[i, k] * (Wq[j, k] * s_j)           fp32, outlier columns
             + b_j

Rounding is to nearest even, of ``X * (1 / a)`` with the reciprocal taken in fp32: the
rule PyTorch's and fbgemm's quantize kernels apply, so that a fused vectorized
quantization produces the very integers of this reference (a division instead of the
reciprocal differs in about one value in a million).
"""

from __future__ import annotations

import torch


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
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays 0 with any scale
    return torch.mul(rows, safe.reciprocal()[:, None]).round_(), scale


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
