"""Flash attention forward (FlashAttention-2 style) in Triton, beside its torch reference.

Computes ``O = softmax(Q K^T * scale + mask) V`` for ``[B, H, L, D]`` queries and
``[B, H_kv, S, D]`` / ``[B, H_kv, S, D_v]`` keys and values without ever materialising the
``L x S`` score matrix. One program owns one ``BLOCK_M`` block of query rows of one
(batch, head) pair, keeps its ``Q`` tile in registers and streams the keys and values in
``BLOCK_N`` blocks. For each key block ``j`` it keeps, per query row, the running maximum
``m_i``, the running softmax denominator ``l_i`` and the unnormalised output ``acc``
(all fp32)::

    S_j   = Q K_j^T * scale + mask_j               (-inf where a key is masked out)
    m_new = max(m_i, rowmax(S_j))
    P_j   = exp(S_j - m_new)
    alpha = exp(m_i - m_new)                        rescales what was summed so far
    l_i   = alpha * l_i + rowsum(P_j)
    acc   = alpha * acc + P_j V_j
    m_i   = m_new

and stores ``O = acc / l_i`` once at the end: the only global store of the kernel.

Design choices:

* Exponentials are base 2 (``exp2``): ``scale * log2(e)`` is folded into the scores and the
  additive mask is multiplied by ``log2(e)``, which leaves the softmax unchanged.
* A row whose keys are all masked has ``m_i = -inf``; the subtraction uses 0 instead of
  ``m_new`` then, so ``P`` and ``alpha`` are ``exp(-inf) = 0`` rather than NaN, and the row's
  ``l_i`` stays 0. Such rows are stored as 0, as torch's ``scaled_dot_product_attention``
  returns them.
* Causal attention is aligned top-left like torch's ``is_causal`` (query ``i`` sees keys
  ``j <= i``). The key loop of a query block stops after the block's last visible key, so
  key blocks that are fully masked are never loaded. There is one key loop (not a split
  into unmasked and diagonal blocks): the masks cost a compare per score, and the kernel
  keeps exactly two matrix products, ``Q K^T`` and ``P V``.
* Masks: an additive float mask or a boolean mask (``True`` = attend) broadcastable to
  ``[B, H, L, S]``, read through its strides (a broadcast dimension has stride 0, nothing
  is expanded in memory). A mask and ``is_causal`` may be combined (torch refuses that
  combination; here both apply).
* Any strides for q/k/v/out (e.g. ``[B, L, H, D].transpose(1, 2)`` views); the batch and head
  offsets are computed in int64.
* Head dims up to 256; the tile width is the next power of two (at least 16, the smallest
  ``tl.dot`` depth) and the padding columns are masked on load and store. The value head
  dim may differ from the query/key head dim.
* fp32/fp16/bf16 inputs; both products accumulate in fp32, ``P`` is cast to the value dtype
  for ``P V`` (tensor cores on GPUs), the output has the input dtype. fp32 products are
  exact (``ieee``) unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
* Grouped-query attention: with ``enable_gqa=True`` the keys/values may have ``H_kv`` heads,
  ``H % H_kv == 0``, and query head ``h`` reads key/value head ``h // (H / H_kv)``.
* Block sizes come from a small table (:data:`GPU_LAUNCH_CONFIGS`), not an autotuner, so a
  launch never benchmarks; in the Triton interpreter blocks are as large as the problem
  allows (its cost is per program and per operation, not per element).

The Triton interpreter multiplies bf16 tiles wrongly, so under ``TRITON_INTERPRET=1`` bf16
tiles are cast to fp32 after loading (``DOT_IN_FP32``); on GPUs the products take bf16.

Forward only: there is no backward kernel, and dropout is not supported.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: The largest query/key or value head dim the kernel takes (the fp32 ``acc`` tile and
#: the ``Q`` tile live in registers; beyond 256 they spill).
MAX_HEAD_DIM = 256

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# exp(x) == exp2(x * LOG2E)
LOG2E = tl.constexpr(1.4426950408889634)

_NO_MASK, _ADDITIVE_MASK, _BOOLEAN_MASK = 0, 1, 2


@triton.jit
def flash_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, kv_group_size, seq_q, seq_k, scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    query_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = batch_head % num_heads
    kv_head = (head // kv_group_size).to(tl.int64)
    head = head.to(tl.int64)

    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    key_offsets = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    row_ok = rows < seq_q
    dim_ok = dims < HEAD_DIM  # constant-true (folded away) when HEAD_DIM is a power of two
    dim_v_ok = dims_v < HEAD_DIM_V

    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    mask_base = mask_ptr + batch * stride_mb + head * stride_mh

    q = tl.load(q_base + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    qk_scale = scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if IS_CAUSAL:
        # Keys after the block's last query row are masked for every row of the block.
        key_end = tl.minimum(seq_k, (query_block + 1) * BLOCK_M)
    else:
        key_end = seq_k
    for key_start in range(0, key_end, BLOCK_N):
        keys = key_start + key_offsets
        key_ok = keys < seq_k
        k_t = tl.load(k_base + keys[None, :] * stride_kn + dims[:, None] * stride_kd,
                      mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        if DOT_IN_FP32:
            k_t = k_t.to(tl.float32)
        scores = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale

        visible = key_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (rows[:, None] >= keys[None, :])
        if MASK_KIND != 0:
            mask_tile = tl.load(mask_base + rows[:, None] * stride_mm + keys[None, :] * stride_mn,
                                mask=row_ok[:, None] & key_ok[None, :], other=0)
            if MASK_KIND == 1:
                scores += mask_tile.to(tl.float32) * LOG2E
            else:
                visible = visible & (mask_tile != 0)
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # While a row has seen only masked keys m_new is -inf; subtracting 0 instead keeps
        # exp2(-inf - (-inf)) = NaN out of p and alpha.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(v_base + keys[:, None] * stride_vn + dims_v[None, :] * stride_vd,
                    mask=key_ok[:, None] & dim_v_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    # Rows with every key masked have l_i == 0 and acc == 0; dividing them by 1 stores the 0
    # torch returns for such rows instead of 0 / 0.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_base = out_ptr + batch * stride_ob + head * stride_oh
    tl.store(out_base + rows[:, None] * stride_om + dims_v[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_v_ok[None, :])


def kernel_signature(dtype: str = "fp16", mask_dtype: str | None = None) -> dict[str, str]:
    """Triton types of :func:`flash_attention_fwd_kernel`'s parameters, for ahead-of-time builds.

    ``dtype`` is the Triton name of the q/k/v/out element type (``"fp16"``, ``"bf16"``,
    ``"fp32"``); ``mask_dtype`` that of the mask (``"u8"`` for a boolean mask), or None
    when there is no mask (the pointer is then a placeholder of ``dtype``).
    """
    pointers = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    pointers["mask_ptr"] = f"*{mask_dtype or dtype}"
    strides = {f"stride_{t}{d}": "i32" for t, dims in (("q", "bhmd"), ("k", "bhnd"), ("v", "bhnd"),
                                                       ("m", "bhmn"), ("o", "bhmd")) for d in dims}
    scalars = {"num_heads": "i32", "kv_group_size": "i32", "seq_q": "i32", "seq_k": "i32", "scale": "fp32"}
    constexprs = {name: "constexpr" for name in (
        "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "MASK_KIND", "DOT_IN_FP32", "INPUT_PRECISION",
        "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV")}
    return {**pointers, **strides, **scalars, **constexprs}


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


#: GPU launch parameters by (largest head dim, bytes per element).
#:
#: * 16-bit inputs, head dim <= 64: 128 query rows per program amortise each K/V tile over
#:   many rows; 4 warps hold the 128 x 64 fp32 ``acc`` in 64 registers a thread; three
#:   stages of 64-key K and V tiles (48 KiB) hide the load latency.
#: * head dim 128: same tiles, 8 warps so that ``acc`` and ``Q`` stay in registers;
#:   3 stages of K/V (96 KiB) + Q (32 KiB) fit the 163 KiB of shared memory of sm_80.
#: * head dim 256: 64 x 32 tiles; larger ones spill registers or exceed shared memory.
#: * fp32 (twice the bytes, no fp16 tensor-core path): half the tiles and fewer stages.
GPU_LAUNCH_CONFIGS: dict[tuple[int, int], LaunchConfig] = {
    (64, 2): LaunchConfig(128, 64, 4, 3),
    (128, 2): LaunchConfig(128, 64, 8, 3),
    (256, 2): LaunchConfig(64, 32, 8, 2),
    (64, 4): LaunchConfig(64, 32, 4, 2),
    (128, 4): LaunchConfig(64, 32, 4, 2),
    (256, 4): LaunchConfig(32, 32, 4, 1),
}

# The interpreter runs a program at a time with numpy: the fewer programs and loop steps
# the faster, so tiles cover the whole problem up to this size.
_INTERPRETER_MAX_BLOCK = 256


def gpu_launch_config(head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The :data:`GPU_LAUNCH_CONFIGS` entry for this head dim (the larger of q/k's and v's)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {head_dim} > {MAX_HEAD_DIM} is not supported")
    bucket = next(limit for limit in (64, 128, 256) if head_dim <= limit)
    return GPU_LAUNCH_CONFIGS[(bucket, 4 if dtype == torch.float32 else 2)]


def _interpreter_config(seq_q: int, seq_k: int) -> LaunchConfig:
    block_m = min(_INTERPRETER_MAX_BLOCK, max(16, triton.next_power_of_2(seq_q)))
    block_n = min(_INTERPRETER_MAX_BLOCK, max(16, triton.next_power_of_2(seq_k)))
    return LaunchConfig(block_m, block_n, num_warps=4, num_stages=1)


def _runs_in_interpreter() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(flash_attention_fwd_kernel, InterpretedFunction)


def _check_inputs(query, key, value, attn_mask, dropout_p, enable_gqa):
    if dropout_p != 0.0:
        raise NotImplementedError(f"flash_attention: dropout (dropout_p={dropout_p}) is not supported; "
                                  "the kernel is an inference forward pass, use dropout_p=0.0")
    tensors = {"query": query, "key": key, "value": value}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-d [batch, heads, seq, head_dim], "
                             f"got shape {tuple(tensor.shape)}")
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"flash_attention: {name} has dtype {tensor.dtype}; "
                            "supported are float32, float16 and bfloat16")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"flash_attention: query, key and value must have one dtype, got "
                        f"{query.dtype}, {key.dtype} and {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"flash_attention: query, key and value are on different devices "
                         f"({query.device}, {key.device}, {value.device})")
    batch, heads, _, head_dim = query.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(f"flash_attention: batch sizes differ (query {batch}, key {key.shape[0]}, "
                         f"value {value.shape[0]})")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"flash_attention: key has {key.shape[1]} heads but value has {value.shape[1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"flash_attention: key has {key.shape[2]} positions but value has {value.shape[2]}")
    if key.shape[3] != head_dim:
        raise ValueError(f"flash_attention: query head dim {head_dim} differs from key head dim {key.shape[3]}")
    kv_heads = key.shape[1]
    if kv_heads != heads:
        if not enable_gqa:
            raise ValueError(f"flash_attention: query has {heads} heads but key/value have {kv_heads}; "
                             "pass enable_gqa=True for grouped-query attention")
        if kv_heads == 0 or heads % kv_heads:
            raise ValueError(f"flash_attention: grouped-query attention needs the query heads ({heads}) "
                             f"to be a multiple of the key/value heads ({kv_heads})")
    for name, dim in (("query/key", head_dim), ("value", value.shape[3])):
        if dim == 0:
            raise ValueError(f"flash_attention: {name} head dim is 0")
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"flash_attention: {name} head dim {dim} > {MAX_HEAD_DIM} is not supported")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"flash_attention: attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"flash_attention: attn_mask must be boolean (True = attend) or floating "
                            f"(added to the scores), got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"flash_attention: attn_mask is on {attn_mask.device}, query on {query.device}")


def _expand_mask(attn_mask: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    try:
        expanded = attn_mask.expand(shape)  # a view: broadcast dimensions get stride 0
    except RuntimeError:
        raise ValueError(f"flash_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                         f"to [batch, heads, L, S] = {list(shape)}") from None
    if expanded.dtype == torch.bool:
        expanded = expanded.view(torch.uint8)  # same bytes; Triton loads bytes, not i1
    return expanded


def _empty_like_query(query: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """The output, laid out like the query (a [B, L, H, D] view stays one; no later copies)."""
    batch, heads, seq_q, _ = query.shape
    if query.stride(1) < query.stride(2):
        return query.new_empty((batch, seq_q, heads, head_dim_v)).transpose(1, 2)
    return query.new_empty((batch, heads, seq_q, head_dim_v))


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, *, block_m=None, block_n=None, num_warps=None, num_stages=None):
    """``torch.nn.functional.scaled_dot_product_attention`` (forward, no dropout) with the Triton kernel.

    ``query [B, H, L, D]``, ``key [B, H_kv, S, D]``, ``value [B, H_kv, S, D_v]`` (any strides)
    -> ``[B, H, L, D_v]`` in the input dtype, laid out like ``query``. ``attn_mask`` is boolean
    (True = attend) or floating (added to the scores) and broadcastable to ``[B, H, L, S]``;
    ``is_causal`` masks keys after the query position (top-left aligned, as torch) and may
    be combined with a mask. ``scale`` defaults to ``1 / sqrt(D)``. Rows whose keys are all
    masked are 0. Tensors must be on a CUDA device, or on the CPU with ``TRITON_INTERPRET=1``.

    ``block_m``/``block_n``/``num_warps``/``num_stages`` override the block-size table.
    """
    _check_inputs(query, key, value, attn_mask, dropout_p, enable_gqa)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        raise NotImplementedError("flash_attention: forward only, no backward; call it under "
                                  "torch.no_grad() or on tensors that do not require grad")
    interpreted = _runs_in_interpreter()
    if not interpreted and query.device.type != "cuda":
        raise ValueError(f"flash_attention: tensors are on {query.device}; the Triton kernel needs a CUDA "
                         "device (or TRITON_INTERPRET=1 to run it on the CPU in the interpreter)")

    batch, heads, seq_q, head_dim = query.shape
    kv_heads, seq_k, head_dim_v = key.shape[1], key.shape[2], value.shape[3]
    out = _empty_like_query(query, head_dim_v)
    if out.numel() == 0:
        return out
    if seq_k == 0:  # no keys at all: every row is fully masked
        return out.zero_()
    if batch * heads > 65535:
        raise ValueError(f"flash_attention: batch * heads = {batch * heads} exceeds the 65535 programs "
                         "of the launch grid's second axis")

    if interpreted:
        config = _interpreter_config(seq_q, seq_k)
    else:
        config = gpu_launch_config(max(head_dim, head_dim_v), query.dtype)
    block_m = block_m or config.block_m
    block_n = block_n or config.block_n
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"flash_attention: {name}={block} must be a power of two >= 16")

    if attn_mask is None:
        mask_kind, mask = _NO_MASK, query  # placeholder pointer, never read
        mask_strides = (0, 0, 0, 0)
    else:
        mask = _expand_mask(attn_mask, (batch, heads, seq_q, seq_k))
        mask_kind = _BOOLEAN_MASK if attn_mask.dtype == torch.bool else _ADDITIVE_MASK
        mask_strides = mask.stride()
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    dot_in_fp32 = interpreted and query.dtype == torch.bfloat16
    allow_tf32 = not interpreted and torch.backends.cuda.matmul.allow_tf32
    input_precision = "tf32" if allow_tf32 else "ieee"

    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    with torch.cuda.device(query.device) if query.device.type == "cuda" else contextlib.nullcontext():
        flash_attention_fwd_kernel[grid](
            query, key, value, mask, out,
            *query.stride(), *key.stride(), *value.stride(), *mask_strides, *out.stride(),
            heads, heads // kv_heads, seq_q, seq_k, float(scale),
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
            IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind,
            DOT_IN_FP32=dot_in_fp32, INPUT_PRECISION=input_precision,
            BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
            num_warps=num_warps or config.num_warps, num_stages=num_stages or config.num_stages,
        )
    return out


def reference_attention(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The math :func:`flash_attention` computes, in plain torch and fp32; returns fp32.

    Same arguments and masking rules as :func:`flash_attention`: a boolean mask keeps the
    scores where it is True, a float mask is added, ``is_causal`` keeps key ``j <= i`` for
    query ``i``, and a row with every key masked is 0.
    """
    q, k, v = query.float(), key.float(), value.float()
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if enable_gqa and kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=-3)
        v = v.repeat_interleave(heads // kv_heads, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    seq_q, seq_k = scores.shape[-2:]
    if seq_k == 0:
        return q.new_zeros((*scores.shape[:-1], v.shape[-1]))
    if is_causal:
        causal = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    row_max = scores.amax(dim=-1, keepdim=True)
    fully_masked = row_max == float("-inf")
    weights = torch.exp(scores - row_max.masked_fill(fully_masked, 0.0))
    denominator = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(fully_masked, 0.0, weights / denominator.masked_fill(fully_masked, 1.0))
    return weights @ v
