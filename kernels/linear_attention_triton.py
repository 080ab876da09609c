"""Triton kernels of ``optcc::linear_attention`` (:mod:`optcc.kernels.linear_attention`).

Same contract as the op: ``q [B, Hq, L, E]``, ``k [B, Hk, S, E]``, ``v [B, Hk, S, Ev]`` (any
strides, grouped heads), ``key_mask [B, S]`` bool or None, a non-negative feature map ``phi``
with ``F`` features; ``O [B, Hq, L, Ev]`` in q's dtype, contiguous::

    O_i = phi(q_i) sum_j phi(k_j)^T v_j / (phi(q_i) sum_j phi(k_j) + eps)

Feature maps: ``relu`` and ``elu1`` are applied in the kernels right after the q / k tile
loads (``FEATURE`` 1 / 2; fp32 math on the loaded tile). Every other map (``cosine``,
``focused``, ``favor``, ``hedgehog``: row norms, random projections, per-head matmuls and
softmaxes) is computed by the op's torch code into fp32 ``phi(Q)`` / ``phi(K)`` tensors
which the same kernels read with ``FEATURE`` 0 (identity). Masked keys: their features and
their value rows are set to 0 in the loads (the mask is read as bytes), so a padded key's
NaN never reaches the sums.

Non-causal (two phases, the linear order):

1. ``linear_attention_state_kernel``: one program per ``(key/value head, block of BLOCK_F
   features, block of BLOCK_V value dims)``; it streams the keys in ``BLOCK_S`` tiles and
   accumulates ``state = phi(K)^T V`` (``tl.dot``, fp32 accumulator) and ``z = sum_j
   phi(K_j)``; stores both in fp32 (``[B Hk, F, Ev]``, ``[B Hk, F]``, a few KiB per head).
2. ``linear_attention_output_kernel``: one program per ``(block of BLOCK_L query rows,
   query head, block of BLOCK_V)``; it loops over the features in ``BLOCK_F`` tiles:
   ``acc += phi(Q) state`` (``tl.dot``), ``den += phi(Q) . z``; stores ``acc / (den + eps)``.
   The query heads of a group read their key/value head's state.

Causal (chunked, as flash-linear-attention's chunk kernels): ``linear_attention_causal_kernel``,
one program per ``(query head, block of BLOCK_V value dims)`` walks the sequence in chunks
of ``BLOCK_C`` positions, keeping the running ``state [F, BLOCK_V]`` and ``z [F]`` of the
earlier chunks in fp32 registers; per chunk ``A = tril(phi(Q_c) phi(K_c)^T)``,
``O_c = (A V_c + phi(Q_c) state) / (A 1 + phi(Q_c) z + eps)``, then ``state += phi(K_c)^T
V_c``, ``z += sum phi(K_c)``: four ``tl.dot`` per chunk. The whole feature dim is one tile,
so ``F <= MAX_CAUSAL_FEATURES`` (256); the op uses its torch chunked form beyond.

Precision: products accumulate in fp32; for 16-bit inputs the operands of ``tl.dot`` (the
features, ``A``, the state) are cast to the input dtype (tensor cores), as flash-linear-
attention does; ``z`` and the denominators are fp32 throughout. fp32 inputs multiply in
``ieee`` fp32 unless ``torch.backends.cuda.matmul.allow_tf32``. The Triton interpreter
multiplies bf16 tiles wrongly, so there (``DOT_IN_FP32``) the operands stay fp32; so do
FAVOR's features with fp16 inputs (their range exceeds fp16's).

What the op does not send here (:func:`supports`): the non-causal quadratic order (short
sequences, where torch's batched matmuls are the right tool), fp64, a causal ``F > 256``,
more than 65535 ``B Hq`` programs on a grid axis. Launch blocks come from fixed rules, not
an autotuner (expected, not measured - no GPU where this was written: the non-causal phases
read Q, K, V once each and are bound by memory bandwidth for ``F, Ev <= 128``; the causal
kernel has only ``B Hq ceil(Ev / BLOCK_V)`` programs, each sequential over ``L / BLOCK_C``
chunks, so it fills an H100 only with ``B Hq >= ~128``, and recomputes the key side once per
query head of a group; a chunk-parallel state pass would be the next step).

The kernels are tested in the Triton interpreter against the torch forms and built ahead of
time for sm_80 / sm_90 (:mod:`optcc.lowering.aot`).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["linear_attention_state_kernel", "linear_attention_output_kernel", "linear_attention_causal_kernel",
           "linear_attention_triton", "supports", "kernel_signature", "FUSED_FEATURE_MAPS", "MAX_CAUSAL_FEATURES"]

#: Feature maps applied inside the kernels, and their ``FEATURE`` ids (0: features given).
FUSED_FEATURE_MAPS = {"relu": 1, "elu1": 2}
MAX_CAUSAL_FEATURES = 256
_MAX_GRID_Y = 65535
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _feature(x, FEATURE: tl.constexpr):
    if FEATURE == 1:  # relu
        x = tl.maximum(x, 0.0)
    elif FEATURE == 2:  # elu(x) + 1
        x = tl.where(x > 0.0, x + 1.0, tl.exp(x))
    return x


@triton.jit
def linear_attention_state_kernel(
    k_ptr, v_ptr, mask_ptr, state_ptr, z_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    kv_heads, seq_k, feat_dim, head_dim_v,
    FEATURE: tl.constexpr, HAS_MASK: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
):
    batch_head = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_v = tl.program_id(2)
    batch = (batch_head // kv_heads).to(tl.int64)
    head = (batch_head % kv_heads).to(tl.int64)
    rf = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    f_ok = rf < feat_dim
    v_ok = rv < head_dim_v
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh

    acc = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    z = tl.zeros([BLOCK_F], dtype=tl.float32)
    for key_start in range(0, seq_k, BLOCK_S):
        rs = key_start + tl.arange(0, BLOCK_S)
        real = rs < seq_k
        if HAS_MASK:
            real = real & (tl.load(mask_ptr + batch * stride_mb + rs * stride_mn, mask=real, other=0) != 0)
        k_tile = tl.load(k_base + rs[:, None] * stride_kn + rf[None, :] * stride_kd,
                         mask=real[:, None] & f_ok[None, :], other=0.0)
        # padded lanes / masked keys: 0 after the map too (elu1(0) = 1)
        phi = tl.where(real[:, None] & f_ok[None, :], _feature(k_tile.to(tl.float32), FEATURE), 0.0)
        v_tile = tl.load(v_base + rs[:, None] * stride_vn + rv[None, :] * stride_vd,
                         mask=real[:, None] & v_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            v_tile = v_tile.to(tl.float32)
        acc = tl.dot(tl.trans(phi.to(v_tile.dtype)), v_tile, acc, input_precision=INPUT_PRECISION)
        z += tl.sum(phi, 0)

    state_base = state_ptr + batch_head.to(tl.int64) * feat_dim * head_dim_v
    tl.store(state_base + rf[:, None] * head_dim_v + rv[None, :], acc, mask=f_ok[:, None] & v_ok[None, :])
    tl.store(z_ptr + batch_head.to(tl.int64) * feat_dim + rf, z, mask=f_ok & (pid_v == 0))


@triton.jit
def linear_attention_output_kernel(
    q_ptr, state_ptr, z_ptr, out_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, kv_group_size, seq_q, feat_dim, head_dim_v, eps,
    FEATURE: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_l = tl.program_id(0)
    batch_head = tl.program_id(1)
    pid_v = tl.program_id(2)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    kv_batch_head = batch * (num_heads // kv_group_size) + head // kv_group_size
    rl = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    l_ok = rl < seq_q
    v_ok = rv < head_dim_v
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    state_base = state_ptr + kv_batch_head * feat_dim * head_dim_v
    z_base = z_ptr + kv_batch_head * feat_dim

    acc = tl.zeros([BLOCK_L, BLOCK_V], dtype=tl.float32)
    den = tl.zeros([BLOCK_L], dtype=tl.float32)
    for feat_start in range(0, feat_dim, BLOCK_F):
        rf = feat_start + tl.arange(0, BLOCK_F)
        f_ok = rf < feat_dim
        q_tile = tl.load(q_base + rl[:, None] * stride_qm + rf[None, :] * stride_qd,
                         mask=l_ok[:, None] & f_ok[None, :], other=0.0)
        phi = tl.where(l_ok[:, None] & f_ok[None, :], _feature(q_tile.to(tl.float32), FEATURE), 0.0)
        state = tl.load(state_base + rf[:, None] * head_dim_v + rv[None, :], mask=f_ok[:, None] & v_ok[None, :],
                        other=0.0)
        z = tl.load(z_base + rf, mask=f_ok, other=0.0)
        den += tl.sum(phi * z[None, :], 1)
        if DOT_IN_FP32:
            acc = tl.dot(phi, state, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(phi.to(out_ptr.dtype.element_ty), state.to(out_ptr.dtype.element_ty), acc,
                         input_precision=INPUT_PRECISION)

    out = acc / (den + eps)[:, None]
    out_base = out_ptr + batch * stride_ob + head * stride_oh
    tl.store(out_base + rl[:, None] * stride_om + rv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=l_ok[:, None] & v_ok[None, :])


@triton.jit
def linear_attention_causal_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, kv_group_size, seq_len, feat_dim, head_dim_v, eps,
    FEATURE: tl.constexpr, HAS_MASK: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
):
    batch_head = tl.program_id(0)
    pid_v = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    kv_head = head // kv_group_size
    rf = tl.arange(0, BLOCK_F)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    f_ok = rf < feat_dim
    v_ok = rv < head_dim_v
    offsets = tl.arange(0, BLOCK_C)
    lower = offsets[:, None] >= offsets[None, :]  # key j <= query i inside a chunk
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    out_base = out_ptr + batch * stride_ob + head * stride_oh

    state = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    z = tl.zeros([BLOCK_F], dtype=tl.float32)
    for chunk_start in range(0, seq_len, BLOCK_C):
        rc = chunk_start + offsets
        c_ok = rc < seq_len
        real = c_ok
        if HAS_MASK:
            real = real & (tl.load(mask_ptr + batch * stride_mb + rc * stride_mn, mask=c_ok, other=0) != 0)
        q_tile = tl.load(q_base + rc[:, None] * stride_qm + rf[None, :] * stride_qd,
                         mask=c_ok[:, None] & f_ok[None, :], other=0.0)
        phi_q = tl.where(c_ok[:, None] & f_ok[None, :], _feature(q_tile.to(tl.float32), FEATURE), 0.0)
        k_tile = tl.load(k_base + rc[:, None] * stride_kn + rf[None, :] * stride_kd,
                         mask=real[:, None] & f_ok[None, :], other=0.0)
        phi_k = tl.where(real[:, None] & f_ok[None, :], _feature(k_tile.to(tl.float32), FEATURE), 0.0)
        v_tile = tl.load(v_base + rc[:, None] * stride_vn + rv[None, :] * stride_vd,
                         mask=real[:, None] & v_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            v_tile = v_tile.to(tl.float32)
        q_op = phi_q.to(v_tile.dtype)
        k_op = phi_k.to(v_tile.dtype)

        scores = tl.dot(q_op, tl.trans(k_op), input_precision=INPUT_PRECISION)  # [C, C]
        scores = tl.where(lower, scores, 0.0)
        num = tl.dot(scores.to(v_tile.dtype), v_tile, input_precision=INPUT_PRECISION)
        num = tl.dot(q_op, state.to(v_tile.dtype), num, input_precision=INPUT_PRECISION)
        den = tl.sum(scores, 1) + tl.sum(phi_q * z[None, :], 1)
        out = num / (den + eps)[:, None]
        tl.store(out_base + rc[:, None] * stride_om + rv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=c_ok[:, None] & v_ok[None, :])

        state = tl.dot(tl.trans(k_op), v_tile, state, input_precision=INPUT_PRECISION)
        z += tl.sum(phi_k, 0)


# ----------------------------------------------------------------------------------------
# Launchers


def _runs_in_interpreter() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(linear_attention_state_kernel, InterpretedFunction)


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def supports(q, k, v, feature_map, params, causal, num_features=0, order="auto") -> bool:
    """Whether the op sends these inputs to :func:`linear_attention_triton` (see the module docstring)."""
    from .linear_attention import feature_dim, matmul_order

    if q.dtype not in _SUPPORTED_DTYPES:
        return False
    b, hq, length, e = q.shape
    features = feature_dim(feature_map, e, params, num_features)
    if b * hq > _MAX_GRID_Y or features == 0:
        return False
    if causal:
        return features <= MAX_CAUSAL_FEATURES
    if order == "auto":
        order = matmul_order(length, k.shape[2], features, v.shape[3], hq // k.shape[1])
    return order == "linear"


def linear_attention_triton(q, k, v, key_mask=None, feature_map="elu1", params=None, causal=False, eps=1e-6, seed=0,
                            scale=None, num_features=0, power=3.0, *, block_s=None, block_l=None, block_f=None,
                            block_v=None, block_c=None, num_warps=None, num_stages=None):
    """``optcc::linear_attention`` with the Triton kernels (arguments of the op, without
    ``chunk_size`` / ``order``: the chunk is ``block_c``, the order always the linear one).
    Tensors must be on a CUDA device, or on the CPU with ``TRITON_INTERPRET=1``.

    ``block_*`` (powers of two >= 16), ``num_warps`` and ``num_stages`` override the launch
    rules (tests use small blocks to get several tiles)."""
    from .linear_attention import _check, feature_maps

    _check(q, k, v, key_mask, feature_map, params, causal, 1, "auto")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"linear_attention_triton: {q.dtype} is not supported (float32, float16, bfloat16)")
    interpreted = _runs_in_interpreter()
    if not interpreted and q.device.type != "cuda":
        raise ValueError(f"linear_attention_triton: tensors are on {q.device}; the kernels need a CUDA device "
                         "(or TRITON_INTERPRET=1 for the interpreter)")
    b, hq, length, _ = q.shape
    hk, seq_k, ev = k.shape[1], k.shape[2], v.shape[3]
    if feature_map in FUSED_FEATURE_MAPS:
        feature, qs, ks = FUSED_FEATURE_MAPS[feature_map], q, k
    else:
        feature = 0
        qs, ks = feature_maps(q, k, key_mask, feature_map, params, causal=causal, seed=seed, scale=scale,
                              num_features=num_features, power=power)
    features = qs.shape[-1]
    out = torch.empty((b, hq, length, ev), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if features == 0 or seq_k == 0:
        return out.zero_()
    if causal and features > MAX_CAUSAL_FEATURES:
        raise ValueError(f"linear_attention_triton: causal needs F <= {MAX_CAUSAL_FEATURES} features, got {features}")
    if b * hq > _MAX_GRID_Y:
        raise ValueError(f"linear_attention_triton: batch * heads = {b * hq} exceeds {_MAX_GRID_Y} programs")

    has_mask = key_mask is not None
    mask = key_mask.view(torch.uint8) if has_mask else q  # placeholder pointer, never read
    mask_strides = mask.stride() if has_mask else (0, 0)
    # FAVOR's features span e^-60 .. e^60 (:func:`favor_features`): beyond fp16, so fp32 products
    dot_in_fp32 = (interpreted and q.dtype != torch.float32) or (feature_map == "favor" and q.dtype == torch.float16)
    allow_tf32 = not interpreted and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if allow_tf32 else "ieee"
    cap = 64
    device = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    if not causal:
        bf = block_f or _block(features, cap)
        bv = block_v or _block(ev, cap)
        bs = block_s or _block(seq_k, cap)
        bl = block_l or _block(length, cap)
        warps, stages = num_warps or 4, num_stages or (1 if interpreted else 2)
        state = torch.empty((b * hk, features, ev), dtype=torch.float32, device=q.device)
        z = torch.empty((b * hk, features), dtype=torch.float32, device=q.device)
        with device:
            linear_attention_state_kernel[(b * hk, triton.cdiv(features, bf), triton.cdiv(ev, bv))](
                ks, v, mask, state, z,
                *ks.stride(), *v.stride(), *mask_strides,
                hk, seq_k, features, ev,
                FEATURE=feature, HAS_MASK=has_mask, DOT_IN_FP32=dot_in_fp32, INPUT_PRECISION=precision,
                BLOCK_S=bs, BLOCK_F=bf, BLOCK_V=bv, num_warps=warps, num_stages=stages,
            )
            linear_attention_output_kernel[(triton.cdiv(length, bl), b * hq, triton.cdiv(ev, bv))](
                qs, state, z, out,
                *qs.stride(), *out.stride(),
                hq, hq // hk, length, features, ev, float(eps),
                FEATURE=feature, DOT_IN_FP32=dot_in_fp32, INPUT_PRECISION=precision,
                BLOCK_L=bl, BLOCK_F=bf, BLOCK_V=bv, num_warps=warps, num_stages=stages,
            )
        return out
    bf = _block(features, MAX_CAUSAL_FEATURES) if block_f is None else block_f
    if bf < features:
        raise ValueError(f"linear_attention_triton: causal block_f={bf} must cover the {features} features")
    wide = features > 64
    bc = block_c or _block(length, 32 if wide else 64)
    bv = block_v or _block(ev, 32 if features > 128 else 64)
    warps, stages = num_warps or (8 if wide else 4), num_stages or (1 if interpreted else 2)
    with device:
        linear_attention_causal_kernel[(b * hq, triton.cdiv(ev, bv))](
            qs, ks, v, mask, out,
            *qs.stride(), *ks.stride(), *v.stride(), *mask_strides, *out.stride(),
            hq, hq // hk, length, features, ev, float(eps),
            FEATURE=feature, HAS_MASK=has_mask, DOT_IN_FP32=dot_in_fp32, INPUT_PRECISION=precision,
            BLOCK_C=bc, BLOCK_F=bf, BLOCK_V=bv, num_warps=warps, num_stages=stages,
        )
    return out


def kernel_signature(kernel: str, dtype: str = "fp16", feature_dtype: str | None = None) -> dict[str, str]:
    """Triton types of the parameters of ``kernel`` (``"state"``, ``"output"``, ``"causal"``),
    for ahead-of-time builds: ``dtype`` is v's and the output's (``"fp16"``, ``"bf16"``,
    ``"fp32"``), ``feature_dtype`` that of the q / k pointers (default ``dtype``; ``"fp32"``
    for features computed in torch, ``FEATURE=0``)."""
    feature_dtype = feature_dtype or dtype

    def strides(prefix, dims):
        return {f"stride_{prefix}{d}": "i32" for d in dims}

    constexprs = {"FEATURE": "constexpr", "DOT_IN_FP32": "constexpr", "INPUT_PRECISION": "constexpr"}
    if kernel == "state":
        return {"k_ptr": f"*{feature_dtype}", "v_ptr": f"*{dtype}", "mask_ptr": "*u8", "state_ptr": "*fp32",
                "z_ptr": "*fp32", **strides("k", "bhnd"), **strides("v", "bhnd"), **strides("m", "bn"),
                "kv_heads": "i32", "seq_k": "i32", "feat_dim": "i32", "head_dim_v": "i32",
                **constexprs, "HAS_MASK": "constexpr",
                "BLOCK_S": "constexpr", "BLOCK_F": "constexpr", "BLOCK_V": "constexpr"}
    if kernel == "output":
        return {"q_ptr": f"*{feature_dtype}", "state_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": f"*{dtype}",
                **strides("q", "bhmd"), **strides("o", "bhmd"),
                "num_heads": "i32", "kv_group_size": "i32", "seq_q": "i32", "feat_dim": "i32",
                "head_dim_v": "i32", "eps": "fp32", **constexprs,
                "BLOCK_L": "constexpr", "BLOCK_F": "constexpr", "BLOCK_V": "constexpr"}
    if kernel == "causal":
        return {"q_ptr": f"*{feature_dtype}", "k_ptr": f"*{feature_dtype}", "v_ptr": f"*{dtype}", "mask_ptr": "*u8",
                "out_ptr": f"*{dtype}", **strides("q", "bhmd"), **strides("k", "bhnd"), **strides("v", "bhnd"),
                **strides("m", "bn"), **strides("o", "bhmd"),
                "num_heads": "i32", "kv_group_size": "i32", "seq_len": "i32", "feat_dim": "i32",
                "head_dim_v": "i32", "eps": "fp32", **constexprs, "HAS_MASK": "constexpr",
                "BLOCK_C": "constexpr", "BLOCK_F": "constexpr", "BLOCK_V": "constexpr"}
    raise ValueError(f"unknown kernel {kernel!r} (state, output, causal)")
