"""Linear attention on the CPU, in blocks of positions: the same math as
:func:`optcc.kernels.linear_attention.linear_attention_torch`, a fraction of its memory traffic.

Why blocks. At long sequences the op is a handful of elementwise passes and thin GEMMs
over ``[B, H, L, E]`` tensors; done whole, every temporary is a fresh allocation of tens of
MB, which glibc serves with ``mmap`` (above its 32 MB threshold) and the kernel has to fault
in and zero page by page on every call - measured on a 2-core EPYC at 16k tokens, 12 heads,
``elu1``: 0.29 s for the op whole, of which the feature maps alone took 0.19 s. Cut into
blocks of :func:`block_rows` positions (a few MB each), the temporaries are reused from the
heap and stay in cache, and the result is written straight into SDPA's output layout.

Forms (``phi`` a row-wise feature map, ``G = Hq / Hk`` query heads per key/value head):

* non-causal: ``state = sum_blocks phi(K_b)^T V_b``, ``z = sum_blocks sum_j phi(K_b,j)``, then
  each query block ``O_b = phi(Q_b) state / (phi(Q_b) z + eps)``;
* causal: blocks in order, each the chunked form of ``linear_attention_torch`` (its chunks
  see each other through an exclusive prefix of chunk states) started from the running
  ``(state, z)`` of the blocks before it - GLA's inter-chunk recurrence at block granularity.

Only for real tensors outside autograd and tracing, row-wise maps (FAVOR's shifts span the
whole key sequence: it stays in the whole form) and the linear matmul order; everything else
runs ``linear_attention_torch``. Tested against it and the fp64 reference at odd sizes.
"""

from __future__ import annotations

import torch

from . import linear_attention as la

#: elements of one block of queries (or keys) across batch and heads: 512k fp32 = 2 MB (the fastest of 256k-2M at 1k-16k tokens).
BLOCK_ELEMENTS = 1 << 19
#: below this many elements in q the op runs whole (blocks would only add Python overhead).
MIN_ELEMENTS = 1 << 20
ROW_WISE = ("relu", "elu1", "cosine", "focused", "hedgehog")


def block_rows(batch: int, heads: int, width: int, chunk_size: int) -> int:
    """Positions per block: about :data:`BLOCK_ELEMENTS` elements, a multiple of ``chunk_size``."""
    rows = max(1, BLOCK_ELEMENTS // max(1, batch * heads * width))
    return max(chunk_size, rows // chunk_size * chunk_size)


def applies(q, k, v, feature_map, params, causal, order) -> bool:
    """Whether :func:`linear_attention_blocked` takes this call (see the module docstring)."""
    if q.device.type != "cpu" or feature_map not in ROW_WISE or q.numel() < MIN_ELEMENTS or q.requires_grad:
        return False
    if causal:
        return True
    b, hq, length, _ = q.shape
    if order == "auto":
        features = la.feature_dim(feature_map, q.shape[-1], params)
        order = la.matmul_order(length, k.shape[2], features, v.shape[3], hq // k.shape[1])
    return order == "linear"


def _side(x, feature_map, params, power):
    """``phi(x)`` for one side (q or k); ``params``: that side's Hedgehog maps."""
    if feature_map == "relu":
        return la.relu_features(x)
    if feature_map == "elu1":
        return la.elu1_features(x)
    if feature_map == "cosine":
        return la.cosine_features(x)
    if feature_map == "focused":
        return la.focused_features(x, power)
    return la.hedgehog_features(x, params)


def _keys(k, v, key_mask, lo, hi, feature_map, params, power, dtype):
    kb, vb = k[:, :, lo:hi].to(dtype), v[:, :, lo:hi].to(dtype)
    if key_mask is None:
        return _side(kb, feature_map, params, power), vb
    real = key_mask[:, None, lo:hi, None]
    kb, vb = torch.where(real, kb, torch.zeros_like(kb)), torch.where(real, vb, torch.zeros_like(vb))
    pk = _side(kb, feature_map, params, power)
    return torch.where(real, pk, torch.zeros_like(pk)), vb


@torch.no_grad()
def linear_attention_blocked(q, k, v, key_mask=None, feature_map="elu1", params=None, causal=False, eps=1e-6,
                             power=3.0, chunk_size=la.DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """The op's value (checked arguments, a row-wise map), ``[B, Hq, L, Ev]`` in SDPA's layout."""
    b, hq, length, e = q.shape
    hk, s, ev = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hk
    dtype = la._compute_dtype(q.dtype)
    q_params, k_params = (params[:hq], params[hq:]) if feature_map == "hedgehog" else (None, None)
    out = torch.empty((b, length, hq, ev), dtype=q.dtype, device=q.device).transpose(1, 2)
    rows = block_rows(b, hq, max(e, ev), chunk_size)
    if not causal:
        state, z = None, None
        for lo in range(0, s, rows):
            pk, vb = _keys(k, v, key_mask, lo, min(s, lo + rows), feature_map, k_params, power, dtype)
            part, zpart = pk.transpose(-1, -2) @ vb, pk.sum(dim=-2)
            state, z = (part, zpart) if state is None else (state + part, z + zpart)
        for lo in range(0, length, rows):
            hi = min(length, lo + rows)
            pq = _side(q[:, :, lo:hi].to(dtype), feature_map, q_params, power)
            pq = pq.reshape(b, hk, g * (hi - lo), -1)
            o = (pq @ state).div_((pq @ z[..., None]).add_(eps))
            out[:, :, lo:hi].copy_(o.reshape(b, hq, hi - lo, ev))
        return out
    state = z = None
    for lo in range(0, length, rows):
        hi = min(length, lo + rows)
        pk, vb = _keys(k, v, key_mask, lo, hi, feature_map, k_params, power, dtype)
        pq = _side(q[:, :, lo:hi].to(dtype), feature_map, q_params, power).reshape(b, hk, g, hi - lo, -1)
        o, state, z = la.causal_chunked_with_state(pq, pk, vb, eps, chunk_size, state, z)
        out[:, :, lo:hi].copy_(o.reshape(b, hq, hi - lo, ev))
    return out
