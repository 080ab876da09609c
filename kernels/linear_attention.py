"""``optcc::linear_attention``: kernelized (linear) attention with a choice of feature maps.

::

    linear_attention(q, k, v, key_mask=None, feature_map="elu1", params=None, causal=False,
                     eps=1e-6, seed=0, scale=None, num_features=0, power=3.0, chunk_size=64,
                     order="auto") -> [B, Hq, L, Ev] in q's dtype

``params``: a feature map's tensor (Hedgehog's maps, or a FAVOR projection); ``seed``,
``scale``, ``num_features``: FAVOR's; ``power``: ``focused``'s; ``chunk_size``: the causal
form's chunk; ``order``: the non-causal matmul order.

Shapes: queries ``q [B, Hq, L, E]``, keys ``k [B, Hk, S, E]``, values ``v [B, Hk, S, Ev]``
with grouped-query attention (``Hq`` a multiple of ``Hk``; query head ``h`` reads key/value
head ``h // (Hq / Hk)``), an optional key mask ``key_mask [B, S]`` (bool, True = a real key).
With a feature map ``phi`` (``E -> F`` features, applied to every row of q and k) the op is::

    O_i = phi(q_i) sum_j phi(k_j)^T v_j  /  (phi(q_i) . sum_j phi(k_j) + eps)

over the keys ``j`` that are real (``key_mask``: a masked key gets zero features, so it adds
nothing to either sum) and, with ``causal`` (``L == S``, top-left aligned like
``scaled_dot_product_attention``'s ``is_causal``), ``j <= i``. Every feature map here is
non-negative, so the denominator is a sum of non-negative kernel values and ``O_i`` a convex
combination of the values; a query that sees no key (all masked, or all features 0) gets 0.

Forms (all in fp32 whatever the input dtype - fp64 inputs stay fp64 -, output in q's dtype):

* non-causal, *linear order*: ``state = phi(K)^T V [F, Ev]`` and ``z = sum_j phi(K_j) [F]``
  per key/value head, then ``O = phi(Q) state / (phi(Q) z + eps)``: ``S F Ev + G L F Ev``
  multiply-adds per key/value head (``G = Hq / Hk`` query heads share the state);
* non-causal, *quadratic order*: ``A = phi(Q) phi(K)^T [L, S]``, ``O = A V / (A 1 + eps)``:
  ``G L S (F + Ev)``. :func:`matmul_order` picks the cheaper (``order="auto"``): the linear
  order when ``S F Ev + G L F Ev < G L S (F + Ev)`` - short sequences with wide heads are
  cheaper quadratic. ``order="linear"`` / ``"quadratic"`` force one (tests: they agree).
* causal, *chunked* (GLA / flash-linear-attention's chunk form): the positions are cut into
  chunks of ``chunk_size`` (default 64); inside a chunk the quadratic form with a causal mask,
  across chunks the running state of every earlier chunk::

      O_c = (tril(phi(Q_c) phi(K_c)^T) V_c + phi(Q_c) H_c) / (tril(...) 1 + phi(Q_c) z_c + eps)
      H_c = sum_{c' < c} phi(K_c')^T V_c',   z_c = sum_{c' < c} sum_j phi(K_c',j)

  computed for all chunks at once (per-chunk states, an exclusive prefix sum over chunks),
  so there is no Python loop and a traced graph has a fixed handful of ops whatever L is.
  :func:`linear_attention_causal_cumsum` is the plain prefix-sum form (a state per position,
  ``L F Ev`` memory) beside it; both are tested against :func:`linear_attention_reference`.

Feature maps (``feature_map``; each a function below, with its formula and reference):

==========  =========================================================  ===================
name        phi(x)                                                     features F
==========  =========================================================  ===================
relu        ``relu(x)``                                                E
elu1        ``elu(x) + 1`` (Katharopoulos et al. 2020)                 E
cosine      ``[1, x / ||x||]``: kernel ``1 + cos(q, k)`` (see below)   E + 1
focused     FLatten's ``||relu(x)|| relu(x)^p / ||relu(x)^p||``        E
favor       Performer FAVOR+ positive random features                  m (``num_features``)
hedgehog    ``[softmax(x W_h + b_h), softmax(-(x W_h + b_h))]``        2 x params' last dim
==========  =========================================================  ===================

* ``cosine`` (Hydra attention's cosine-similarity kernel, Bolya et al. 2022): ``x / ||x||``
  alone gives the kernel ``cos(q, k) in [-1, 1]``, and its normalizer ``sum_j cos(q, k_j)`` can
  be 0 or negative (Hydra has no normalizer at all and trains with the raw sum). Here one
  constant feature 1 is prepended, so the kernel is ``1 + cos(q, k) in [0, 2]``: non-negative,
  the output stays a convex combination of the values like every other map's, and only a
  query antipodal to every key has a 0 denominator (then ``eps`` makes the output 0).
* ``focused`` (FLatten, Han et al. 2023): ``power`` is ``p`` (default 3); ``f`` keeps the norm
  of ``relu(x)`` and sharpens its direction. It is computed on ``relu(x) / max(relu(x))``
  (``f`` is positively homogeneous), so ``relu(x)^p`` never overflows.
* ``favor`` (Performer, Choromanski et al. 2021): ``phi(x) = exp(w_i^T x - ||x||^2 / 2) /
  sqrt(m)`` for ``m`` orthogonal Gaussian rows ``w [m, E]`` (blocks of ``E`` orthonormal rows
  from the QR of Gaussian matrices, each row rescaled to a chi-distributed norm, Performer's
  ``gaussian_orthogonal_random_matrix``), drawn deterministically from ``seed`` by
  :func:`favor_projection`, shared by all heads; or ``params [m, E]`` if given (a graph pass
  should store the projection as a constant and pass it, so the graph does not depend on
  drawing it). ``E[phi(x) . phi(y)] = exp(x . y)``; q and k are multiplied by ``sqrt(scale)``
  each first (``scale`` defaults to ``1 / sqrt(E)``), so the op approximates
  ``softmax(scale q k^T) V``. ``num_features=0`` means ``m = max(E, int(E ln E))``, the
  ``d log d`` of the Performer paper (lucidrains' performer-pytorch default): 266 for
  ``E = 64``. For fp32 range the exponents are shifted by constants that cancel between
  numerator and denominator (:func:`favor_features`): the keys of a head by their largest
  exponent (Performer does the same), each query by its own; causal, the query's shift also
  undoes the part of the key shift that later keys caused, so no output depends on a later
  key - not even through ``eps`` (Performer's causal form does: its key shift spans the row).
  With 16-bit inputs the Triton path multiplies these features in fp32 (fp16 could not hold
  them).
* ``hedgehog`` (Zhang et al. 2024; the softmax-over-features form of LoLCATs / the authors'
  code): per head learned ``W_h [E, F]``, ``b_h [F]``. ``params [Hq + Hk, E + 1, F]``: rows
  ``0 .. Hq - 1`` the query heads' maps, rows ``Hq ..`` the key heads' (queries and keys have
  separate maps, as in Hedgehog), each ``[W_h; b_h]`` (the bias as the last row), so the
  features are ``softmax([x, 1] params[h])`` and ``softmax(-[x, 1] params[h])``, ``2F`` of
  them. :func:`hedgehog_init` gives the identity init (``W = I``, ``b = 0``).

Graphs and export. The op is registered ``CompositeExplicitAutograd`` with a fake
implementation (as ``optcc::int8_linear``), not ``CompositeImplicitAutograd`` (as the token
ops): it stays *one* node through fake-tensor propagation, re-tracing and ``torch.export``,
so later passes and the backend see linear attention, and on real CUDA tensors the op runs
the Triton kernels (:mod:`optcc.kernels.linear_attention_triton`) - an implicit composite
would be traced into its torch ops everywhere and never reach them. It also keeps FAVOR's
random projection out of tracing (drawing it needs a ``torch.Generator``, which does not trace).
To export to plain aten ops:

* :data:`DECOMPOSITIONS` - ``{op: linear_attention_torch}`` for
  ``ExportedProgram.run_decompositions(DECOMPOSITIONS)`` (then ``torch.onnx.export``) or
  ``make_fx(..., decomposition_table=DECOMPOSITIONS)``;
* :func:`decompose_linear_attention(gm)` - in an fx graph whose nodes carry
  ``meta["val"]`` (optcc's canonical IR), every op node is replaced in place by the aten
  nodes of :func:`linear_attention_torch` traced on those fake values (a FAVOR projection
  drawn from ``seed`` becomes a buffer of ``gm``).

Autograd: the backward recomputes :func:`linear_attention_torch` (gradients for q, k, v and
``params``, e.g. to train Hedgehog maps); the Triton kernels are forward only.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.utils.flop_counter
import torch.nn.functional as F

__all__ = [
    "linear_attention", "linear_attention_torch", "linear_attention_reference", "linear_attention_causal_cumsum",
    "softmax_attention", "feature_maps", "feature_dim", "matmul_order", "relu_features", "elu1_features",
    "cosine_features", "focused_features", "favor_features", "favor_projection", "hedgehog_features",
    "hedgehog_init", "DECOMPOSITIONS", "decompose_linear_attention", "FEATURE_MAPS", "DEFAULT_CHUNK_SIZE",
]

FEATURE_MAPS = ("relu", "elu1", "cosine", "focused", "favor", "hedgehog")
ORDERS = ("auto", "linear", "quadratic")
DEFAULT_CHUNK_SIZE = 64

_lib = torch.library.Library("optcc", "FRAGMENT")
_lib.define(
    "linear_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask=None, str feature_map=\"elu1\", "
    "Tensor? params=None, bool causal=False, float eps=1e-6, int seed=0, float? scale=None, "
    "int num_features=0, float power=3.0, int chunk_size=64, str order=\"auto\") -> Tensor"
)


# ----------------------------------------------------------------------------------------
# Feature maps: x [..., E] -> [..., F], in x's (floating) dtype


def _unknown_feature_map(name: str) -> ValueError:
    return ValueError(f"linear_attention: unknown feature map {name!r}; choose from {', '.join(FEATURE_MAPS)}")


def relu_features(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = relu(x)``."""
    return torch.relu(x)


def elu1_features(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020, "Transformers are RNNs"): positive.

    Written ``exp(min(x, 0)) + max(x, 0)`` (the same function): torch's CPU ``elu`` kernel
    took 4x the time of ``exp`` + ``relu`` + ``add`` at 12M elements."""
    return torch.exp(x.clamp(max=0)) + torch.relu(x)


def cosine_features(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = [1, x / ||x||]`` (``E + 1`` features): ``phi(q) . phi(k) = 1 + cos(q, k)``.

    Hydra attention's cosine kernel (Bolya et al. 2022) shifted by the constant feature so
    that it is non-negative (see the module docstring). ``x = 0`` has ``x / ||x|| = 0``.
    """
    unit = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([torch.ones_like(x[..., :1]), unit], dim=-1)


def focused_features(x: torch.Tensor, power: float = 3.0) -> torch.Tensor:
    """FLatten's focused map (Han et al. 2023, "FLatten Transformer")::

        f(x) = ||relu(x)|| relu(x)^p / ||relu(x)^p||

    computed on ``r = relu(x) / max(relu(x))`` (``f(c x) = c f(x)`` for ``c > 0``) so that
    ``r^p`` stays in range; ``relu(x) = 0`` gives 0."""
    r = torch.relu(x)
    top = r.amax(dim=-1, keepdim=True).clamp_min(1e-30)
    r = r / top
    rp = r.pow(power)
    norm_r = torch.linalg.vector_norm(r, dim=-1, keepdim=True)
    norm_rp = torch.linalg.vector_norm(rp, dim=-1, keepdim=True).clamp_min(1e-30)
    return rp * (norm_r * top / norm_rp)


def default_num_features(head_dim: int) -> int:
    """FAVOR's default ``m = max(E, int(E ln E))``."""
    return max(head_dim, int(head_dim * math.log(max(head_dim, 1))))


@functools.lru_cache(maxsize=32)
def _favor_projection_cpu(head_dim: int, num_features: int, seed: int) -> torch.Tensor:
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.no_grad():  # real tensors even inside a trace
        generator = torch.Generator().manual_seed(seed)
        blocks = -(-num_features // head_dim)
        gaussian = torch.randn(blocks, head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-distributed
        rows = q.transpose(-1, -2).reshape(blocks * head_dim, head_dim)[:num_features]  # orthonormal per block
        norms = torch.linalg.vector_norm(
            torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64), dim=1)
        return (rows * norms[:, None]).to(torch.float32)


def favor_projection(head_dim: int, num_features: int = 0, seed: int = 0) -> torch.Tensor:
    """FAVOR+'s orthogonal Gaussian random projection ``w [m, E]`` (fp32, CPU), the same for
    the same ``(E, m, seed)`` on every run and machine (``num_features=0``: the default m)."""
    m = num_features or default_num_features(head_dim)
    return _favor_projection_cpu(int(head_dim), int(m), int(seed)).clone()


def _tracing(x: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return type(x) is not torch.Tensor or _get_current_dispatch_mode() is not None


@functools.lru_cache(maxsize=32)
def _favor_projection_on(head_dim: int, num_features: int, seed: int, device: torch.device) -> torch.Tensor:
    return _favor_projection_cpu(head_dim, num_features, seed).to(device)


def _favor_projection_for(x: torch.Tensor, num_features: int, seed: int) -> torch.Tensor:
    head_dim = x.shape[-1]
    m = num_features or default_num_features(head_dim)
    if _tracing(x):
        # a constant of the traced graph (make_fx / export lift it), not a random op
        w = torch.ops.aten.lift_fresh_copy.default(_favor_projection_cpu(head_dim, m, seed))
        return w.to(device=x.device)
    return _favor_projection_on(head_dim, m, seed, x.device)


#: FAVOR, causal: the most a query's features are lifted by to make up for a key shift that
#: later keys raised (see :func:`favor_features`); e^60 keeps every product finite in fp32.
FAVOR_MAX_LIFT = 60.0


def favor_features(xq: torch.Tensor, xk: torch.Tensor, projection: torch.Tensor, *, valid: torch.Tensor | None = None,
                   causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Performer's FAVOR+ positive random features of ``xq [B, Hq, L, E]`` and ``xk [B, Hk, S,
    E]`` (both already multiplied by ``sqrt(scale)``; ``valid [B, S]``: the real keys)::

        phi(x)_i = exp(w_i^T x - ||x||^2 / 2 - c) / sqrt(m)

    with ``c`` a constant that cancels in the attention's ratio, for fp32 range: for the keys
    of a head ``c_k``, the largest exponent over its real keys and features (so every key
    feature is <= 1 / sqrt(m)); for query ``i`` its own largest exponent, lowered by
    ``c_k - M_i`` when causal, with ``M_i = log sum_{j <= i} exp(m_j)`` (``m_j`` key ``j``'s
    largest exponent; a smooth running max, at most ``log i`` above the exact one, computed
    with a cumsum because ONNX has no cumulative max): the product ``phi(q_i) . phi(k_j)`` is
    then scaled by ``exp(-M_i)``, which depends on no later key, so ``eps`` weighs the same
    whatever comes later (the lift is capped at :data:`FAVOR_MAX_LIFT`: a later key more than
    60 above every earlier one in the exponent damps the earlier rows). Non-causal, ``M_i =
    c_k``. The shifts carry no gradient."""
    w = projection.to(xq.dtype)
    scale = projection.shape[0] ** -0.5
    wq = xq @ w.t()                                                           # [B, Hq, L, m]
    key_exp = xk @ w.t() - 0.5 * (xk * xk).sum(dim=-1, keepdim=True)          # [B, Hk, S, m]
    if valid is not None:  # padded keys: exp(-inf) = 0, and no overflow (nor NaN gradient) there
        key_exp = key_exp.masked_fill(~valid[:, None, :, None], float("-inf"))
    per_key = key_exp.detach().amax(dim=-1)                                   # [B, Hk, S]
    c_k = per_key.amax(dim=-1, keepdim=True)                                  # [B, Hk, 1]
    c_k = torch.where(torch.isfinite(c_k), c_k, torch.zeros_like(c_k))      # no real key
    pk = torch.exp(key_exp - c_k[..., None]) * scale
    q_shift = wq.detach().amax(dim=-1, keepdim=True)                          # [B, Hq, L, 1]
    if causal:
        # c_k - M_i, M_i = log sum_{j <= i} exp(m_j): 0 before the first real key (log 0 = -inf)
        lift = (-torch.log(torch.exp(per_key - c_k).cumsum(dim=-1))).clamp(max=FAVOR_MAX_LIFT)
        q_shift = q_shift - lift.repeat_interleave(xq.shape[1] // xk.shape[1], dim=1)[..., None]
    return torch.exp(wq - q_shift) * scale, pk


def hedgehog_init(heads: int, head_dim: int, features: int | None = None, kv_heads: int | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Hedgehog ``params [heads + kv_heads, head_dim + 1, features]`` at the identity init
    (``W_h = I``, truncated or zero-padded to ``[E, F]``; ``b_h = 0``), as the Hedgehog authors
    initialise their maps: the features start as ``[softmax(x), softmax(-x)]``.
    ``features`` defaults to ``head_dim``, ``kv_heads`` to ``heads``."""
    features = head_dim if features is None else features
    kv_heads = heads if kv_heads is None else kv_heads
    params = torch.zeros(heads + kv_heads, head_dim + 1, features, dtype=dtype)
    params[:, :head_dim] = torch.eye(head_dim, features, dtype=dtype)
    return params


def hedgehog_features(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``[softmax(x W_h + b_h), softmax(-(x W_h + b_h))]`` over the feature dim, for
    ``x [B, H, N, E]`` and this side's ``params [H, E + 1, F]`` (``[W_h; b_h]``) -> ``[B, H, N, 2F]``."""
    head_dim = x.shape[-1]
    params = params.to(x.dtype)
    proj = x @ params[:, :head_dim] + params[:, head_dim:]
    return torch.cat([torch.softmax(proj, dim=-1), torch.softmax(-proj, dim=-1)], dim=-1)


def feature_dim(feature_map: str, head_dim: int, params: torch.Tensor | None = None, num_features: int = 0) -> int:
    """``F``, the number of features ``feature_map`` gives for head dim ``E``."""
    if feature_map in ("relu", "elu1", "focused"):
        return head_dim
    if feature_map == "cosine":
        return head_dim + 1
    if feature_map == "favor":
        if params is not None:
            return params.shape[0]
        return num_features or default_num_features(head_dim)
    if feature_map == "hedgehog":
        return 2 * params.shape[-1]
    raise _unknown_feature_map(feature_map)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def feature_maps(q, k, key_mask=None, feature_map="elu1", params=None, *, causal=False, seed=0, scale=None,
                 num_features=0, power=3.0, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi(q) [B, Hq, L, F], phi(k) [B, Hk, S, F])`` in ``dtype`` (default fp32, or fp64 for
    fp64 inputs), the masked keys' features set to 0 (``causal`` matters to FAVOR's shifts only)."""
    dtype = dtype or _compute_dtype(q.dtype)
    qf, kf = q.to(dtype), k.to(dtype)
    if key_mask is not None:  # padded keys enter the maps as 0 (no NaN / inf, no gradient from them)
        kf = torch.where(key_mask[:, None, :, None], kf, torch.zeros_like(kf))
    if feature_map == "relu":
        pq, pk = relu_features(qf), relu_features(kf)
    elif feature_map == "elu1":
        pq, pk = elu1_features(qf), elu1_features(kf)
    elif feature_map == "cosine":
        pq, pk = cosine_features(qf), cosine_features(kf)
    elif feature_map == "focused":
        pq, pk = focused_features(qf, power), focused_features(kf, power)
    elif feature_map == "favor":
        projection = params if params is not None else _favor_projection_for(qf, num_features, seed)
        root = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
        pq, pk = favor_features(qf * root, kf * root, projection, valid=key_mask, causal=causal)
    elif feature_map == "hedgehog":
        heads = q.shape[1]
        pq, pk = hedgehog_features(qf, params[:heads]), hedgehog_features(kf, params[heads:])
    else:
        raise _unknown_feature_map(feature_map)
    if key_mask is not None:
        pk = torch.where(key_mask[:, None, :, None], pk, torch.zeros_like(pk))
    return pq, pk


# ----------------------------------------------------------------------------------------
# Checks


def _check(q, k, v, key_mask, feature_map, params, causal, chunk_size, order):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"linear_attention: {name} must be 4-d [batch, heads, seq, dim], got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"linear_attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"linear_attention: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, length, e = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"linear_attention: batch sizes differ (q {b}, k {k.shape[0]}, v {v.shape[0]})")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"linear_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in heads or positions")
    if k.shape[3] != e:
        raise ValueError(f"linear_attention: q head dim {e} differs from k head dim {k.shape[3]}")
    hk = k.shape[1]
    if hk == 0 or hq % hk:
        raise ValueError(f"linear_attention: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if causal and length != k.shape[2]:
        raise ValueError(f"linear_attention: causal needs as many queries as keys, got L={length}, S={k.shape[2]}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b, k.shape[2]):
            raise ValueError(f"linear_attention: key_mask must be bool [B, S] = [{b}, {k.shape[2]}], "
                             f"got {key_mask.dtype} {tuple(key_mask.shape)}")
    if feature_map not in FEATURE_MAPS:
        raise _unknown_feature_map(feature_map)
    if feature_map == "hedgehog":
        if params is None or params.dim() != 3 or tuple(params.shape[:2]) != (hq + hk, e + 1):
            got = None if params is None else tuple(params.shape)
            raise ValueError(f"linear_attention: hedgehog needs params [Hq + Hk, E + 1, F] = [{hq + hk}, {e + 1}, F] "
                             f"(hedgehog_init(heads, E, F, kv_heads)), got {got}")
    elif feature_map == "favor":
        if params is not None and (params.dim() != 2 or params.shape[1] != e):
            raise ValueError(f"linear_attention: favor params must be a projection [m, E={e}], "
                             f"got {tuple(params.shape)}")
    elif params is not None:
        raise ValueError(f"linear_attention: feature map {feature_map!r} takes no params")
    if chunk_size < 1:
        raise ValueError(f"linear_attention: chunk_size must be >= 1, got {chunk_size}")
    if order not in ORDERS:
        raise ValueError(f"linear_attention: order must be one of {', '.join(ORDERS)}, got {order!r}")


def matmul_order(seq_q: int, seq_k: int, features: int, head_dim_v: int, group: int = 1) -> str:
    """The cheaper non-causal order per key/value head (``group`` query heads share it):
    ``"linear"`` (``phi(K)^T V`` first, ``S F Ev + G L F Ev`` multiply-adds) when it is below
    ``"quadratic"``'s ``G L S (F + Ev)``."""
    linear = seq_k * features * head_dim_v + group * seq_q * features * head_dim_v
    quadratic = group * seq_q * seq_k * (features + head_dim_v)
    return "linear" if linear < quadratic else "quadratic"


# ----------------------------------------------------------------------------------------
# The torch implementation (CPU, fallbacks, autograd, export decomposition)


def _noncausal(pq, pk, v, eps, order):
    """``pq [B, Hk, R, F]`` (the group's query rows), ``pk [B, Hk, S, F]``, ``v [B, Hk, S, Ev]``."""
    if order == "linear":
        state = pk.transpose(-1, -2) @ v                         # [B, Hk, F, Ev]
        z = pk.sum(dim=-2)                                        # [B, Hk, F]
        num = pq @ state
        den = pq @ z[..., None]
    else:
        a = pq @ pk.transpose(-1, -2)                             # [B, Hk, R, S]
        num = a @ v
        den = a.sum(dim=-1, keepdim=True)
    return num / (den + eps)


def _causal_chunked(pq, pk, v, eps, chunk_size):
    """``pq [B, Hk, G, L, F]``, ``pk [B, Hk, L, F]``, ``v [B, Hk, L, Ev]``."""
    return causal_chunked_with_state(pq, pk, v, eps, chunk_size)[0]


def causal_chunked_with_state(pq, pk, v, eps, chunk_size, state0=None, z0=None):
    """The chunked causal form (shapes as :func:`_causal_chunked`) started from the running
    ``state0 [B, Hk, 1, 1, F, Ev]`` / ``z0 [B, Hk, 1, 1, F]`` of earlier positions (None: none);
    returns ``(out [B, Hk, G, L, Ev], state, z)`` with ``state`` / ``z`` now including these keys."""
    b, hk, g, length, f = pq.shape
    ev = v.shape[-1]
    c = max(1, min(chunk_size, length))
    n = -(-length // c)
    pad = n * c - length
    if pad:  # zero features: padded positions add nothing and are cut off below
        pq = F.pad(pq, (0, 0, 0, pad))
        pk = F.pad(pk, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    qc = pq.reshape(b, hk, g, n, c, f)
    kc = pk.reshape(b, hk, 1, n, c, f)
    vc = v.reshape(b, hk, 1, n, c, ev)
    pos = torch.arange(c, device=pq.device)
    tril = (pos[:, None] >= pos[None, :]).to(pq.dtype)
    a = (qc @ kc.transpose(-1, -2)) * tril                        # [B, Hk, G, N, C, C]
    num = a @ vc
    den = a.sum(dim=-1, keepdim=True)
    chunk_state = kc.transpose(-1, -2) @ vc                       # [B, Hk, 1, N, F, Ev]
    chunk_z = kc.sum(dim=-2)                                      # [B, Hk, 1, N, F]
    # exclusive prefix over chunks: chunk c sees the chunks before it
    state = torch.cat([torch.zeros_like(chunk_state[:, :, :, :1]), chunk_state[:, :, :, :-1]], dim=3).cumsum(dim=3)
    z = torch.cat([torch.zeros_like(chunk_z[:, :, :, :1]), chunk_z[:, :, :, :-1]], dim=3).cumsum(dim=3)
    if state0 is not None:
        state, z = state + state0, z + z0
    num = num + qc @ state
    den = den + qc @ z[..., None]
    out = (num / (den + eps)).reshape(b, hk, g, n * c, ev)
    final_state = state[:, :, :, -1:] + chunk_state[:, :, :, -1:]
    final_z = z[:, :, :, -1:] + chunk_z[:, :, :, -1:]
    return out[:, :, :, :length], final_state, final_z


def linear_attention_torch(q, k, v, key_mask=None, feature_map="elu1", params=None, causal=False, eps=1e-6,
                           seed=0, scale=None, num_features=0, power=3.0, chunk_size=DEFAULT_CHUNK_SIZE,
                           order="auto"):
    """The op in torch ops only (its CPU implementation, the fallback of the Triton path, the
    autograd recompute and the export decomposition): same arguments, ``[B, Hq, L, Ev]`` in
    q's dtype."""
    _check(q, k, v, key_mask, feature_map, params, causal, chunk_size, order)
    b, hq, length, _ = q.shape
    hk, s, ev = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hk
    pq, pk = feature_maps(q, k, key_mask, feature_map, params, causal=causal, seed=seed, scale=scale,
                          num_features=num_features, power=power)
    vf = v.to(pq.dtype)
    if key_mask is not None:
        vf = torch.where(key_mask[:, None, :, None], vf, torch.zeros_like(vf))
    if causal:
        out = _causal_chunked(pq.reshape(b, hk, g, length, -1), pk, vf, eps, chunk_size)
    else:
        if order == "auto":
            order = matmul_order(length, s, pq.shape[-1], ev, g)
        out = _noncausal(pq.reshape(b, hk, g * length, -1), pk, vf, eps, order)
    return out.reshape(b, hq, length, ev).to(q.dtype).contiguous()


def _triton_supports(q, k, v, feature_map, params, causal, num_features, order):
    from .linear_attention_triton import supports

    return supports(q, k, v, feature_map, params, causal, num_features, order)


def _sdpa_layout(out: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, Ev]`` stored as ``[B, L, H, Ev]``, the layout SDPA returns: graphs that
    replaced an SDPA node ``view`` its transpose as ``[B, L, H * Ev]``."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _linear_attention(q, k, v, key_mask=None, feature_map="elu1", params=None, causal=False, eps=1e-6, seed=0,
                      scale=None, num_features=0, power=3.0, chunk_size=DEFAULT_CHUNK_SIZE, order="auto"):
    # real CUDA tensors only: fake / functional tensors of a trace never launch kernels
    if type(q) is torch.Tensor and q.is_cuda:
        _check(q, k, v, key_mask, feature_map, params, causal, chunk_size, order)
        if _triton_supports(q, k, v, feature_map, params, causal, num_features, order):
            from .linear_attention_triton import linear_attention_triton

            return _sdpa_layout(linear_attention_triton(q, k, v, key_mask, feature_map, params, causal, eps, seed,
                                                        scale, num_features, power))
    if type(q) is torch.Tensor and not _tracing(q):
        from . import linear_attention_cpu as cpu

        _check(q, k, v, key_mask, feature_map, params, causal, chunk_size, order)
        if cpu.applies(q, k, v, feature_map, params, causal, order):
            return cpu.linear_attention_blocked(q, k, v, key_mask, feature_map, params, causal, eps, power, chunk_size)
    return _sdpa_layout(linear_attention_torch(q, k, v, key_mask, feature_map, params, causal, eps, seed, scale,
                                               num_features, power, chunk_size, order))


def _linear_attention_fake(q, k, v, key_mask=None, feature_map="elu1", params=None, causal=False, eps=1e-6, seed=0,
                           scale=None, num_features=0, power=3.0, chunk_size=DEFAULT_CHUNK_SIZE, order="auto"):
    _check(q, k, v, key_mask, feature_map, params, causal, chunk_size, order)
    return _sdpa_layout(q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3])))


_TENSOR_ARGS = ("q", "k", "v", "key_mask", "params")
_ALL_ARGS = ("q", "k", "v", "key_mask", "feature_map", "params", "causal", "eps", "seed", "scale", "num_features",
             "power", "chunk_size", "order")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(inputs[_ALL_ARGS.index(name)] for name in _TENSOR_ARGS))
    ctx.arguments = inputs


def _backward(ctx, grad):
    saved = dict(zip(_TENSOR_ARGS, ctx.saved_tensors))
    arguments = dict(zip(_ALL_ARGS, ctx.arguments))
    wanted = [name for name in ("q", "k", "v", "params")
              if saved[name] is not None and ctx.needs_input_grad[_ALL_ARGS.index(name)]]
    with torch.enable_grad():
        for name in _TENSOR_ARGS:
            tensor = saved[name]
            arguments[name] = tensor.detach().requires_grad_(name in wanted) if tensor is not None else None
        out = linear_attention_torch(**arguments)
        grads = torch.autograd.grad(out, [arguments[name] for name in wanted], grad, allow_unused=True)
    by_name = dict(zip(wanted, grads))
    return tuple(by_name.get(name) for name in _ALL_ARGS)


_lib.impl("linear_attention", _linear_attention, "CompositeExplicitAutograd")
torch.library.register_fake("optcc::linear_attention", _linear_attention_fake, lib=_lib)
torch.library.register_autograd("optcc::linear_attention", _backward, setup_context=_setup_context, lib=_lib)

linear_attention = torch.ops.optcc.linear_attention.default


@torch.utils.flop_counter.register_flop_formula(torch.ops.optcc.linear_attention)
def _linear_attention_flops(q_shape, k_shape, v_shape, *args, num_features=0, out_shape=None, **kwargs) -> int:
    """``phi(K)^T V`` and ``phi(Q) S`` with their normalizers: ``2 B H F (Ev + 1) (L + S)``,
    F features per head (``num_features``, else the head size); feature maps not counted."""
    batch, heads, queries, head_dim = (1,) * (4 - len(q_shape)) + tuple(q_shape)
    features = num_features or head_dim
    return int(2 * batch * heads * features * (v_shape[-1] + 1) * (queries + k_shape[-2]))

#: ``{optcc::linear_attention: linear_attention_torch}``: a decomposition table for
#: ``ExportedProgram.run_decompositions`` / ``make_fx(decomposition_table=...)``.
def _decomposed(*args, **kwargs):
    return _sdpa_layout(linear_attention_torch(*args, **kwargs))


DECOMPOSITIONS: dict[Any, Any] = {linear_attention: _decomposed}


def decompose_linear_attention(gm: torch.fx.GraphModule) -> int:
    """Replace every ``optcc::linear_attention`` node of ``gm`` by the aten nodes of
    :func:`linear_attention_torch` (traced with ``make_fx`` on the arguments'
    ``meta["val"]`` fake tensors); returns how many were replaced. The new nodes carry
    ``meta["val"]``; constants (a FAVOR projection drawn from ``seed``) become buffers of ``gm``."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.operator_schemas import normalize_function

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not linear_attention:
            continue
        bound = normalize_function(linear_attention, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        kwargs = dict(bound.kwargs)
        inputs = [name for name in _TENSOR_ARGS if isinstance(kwargs.get(name), torch.fx.Node)]
        missing = [name for name in inputs if not isinstance(kwargs[name].meta.get("val"), torch.Tensor)]
        if missing:
            raise ValueError(f"decompose_linear_attention: {node.name}'s {', '.join(missing)} have no meta['val']")
        fixed = {name: value for name, value in kwargs.items() if name not in inputs}

        def traced(*tensors, fixed=fixed, inputs=inputs):
            return _decomposed(**fixed, **dict(zip(inputs, tensors)))

        sub = make_fx(traced, tracing_mode="fake")(*(kwargs[name].meta["val"] for name in inputs))
        env: dict[torch.fx.Node, Any] = {}
        placeholders = iter(kwargs[name] for name in inputs)
        result = None
        with gm.graph.inserting_before(node):
            for sub_node in sub.graph.nodes:
                if sub_node.op == "placeholder":
                    env[sub_node] = next(placeholders)
                elif sub_node.op == "get_attr":
                    attr = f"linear_attention_constant_{count}"
                    suffix = 0
                    while hasattr(gm, f"{attr}_{suffix}"):
                        suffix += 1
                    gm.register_buffer(f"{attr}_{suffix}", getattr(sub, sub_node.target).detach().clone())
                    env[sub_node] = gm.graph.get_attr(f"{attr}_{suffix}")
                    env[sub_node].meta.update(sub_node.meta)
                elif sub_node.op == "output":
                    result = env[sub_node.args[0]]
                elif sub_node.target is torch.ops.aten.lift_fresh_copy.default:
                    env[sub_node] = env[sub_node.args[0]]  # a copy of a constant nothing writes to
                else:
                    env[sub_node] = gm.graph.node_copy(sub_node, lambda n: env[n])
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


# ----------------------------------------------------------------------------------------
# References


def linear_attention_reference(q, k, v, key_mask=None, feature_map="elu1", params=None, causal=False, eps=1e-6,
                               seed=0, scale=None, num_features=0, power=3.0, dtype=torch.float64):
    """The op's math written out plainly, in ``dtype`` (default fp64; returns ``dtype``): the
    key/value heads repeated for the query heads, the kernel matrix ``A = phi(Q) phi(K)^T``
    with masked (and, causal, later) keys zeroed, ``O = A V / (A 1 + eps)``. Every form is
    tested against it."""
    pq, pk = feature_maps(q, k, key_mask, feature_map, params, causal=causal, seed=seed, scale=scale,
                          num_features=num_features, power=power, dtype=dtype)
    group = q.shape[1] // k.shape[1]
    pk = pk.repeat_interleave(group, dim=1)
    vv = v.to(dtype)
    if key_mask is not None:
        vv = torch.where(key_mask[:, None, :, None], vv, torch.zeros_like(vv))
    vv = vv.repeat_interleave(group, dim=1)
    a = pq @ pk.transpose(-1, -2)                                  # [B, Hq, L, S]
    keep = torch.ones(a.shape[-2:], dtype=torch.bool, device=a.device)
    if causal:
        keep = keep.tril()
    keep = keep.expand(a.shape[0], 1, *a.shape[-2:])
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]
    a = torch.where(keep, a, torch.zeros_like(a))
    return (a @ vv) / (a.sum(dim=-1, keepdim=True) + eps)


def linear_attention_causal_cumsum(q, k, v, key_mask=None, feature_map="elu1", params=None, eps=1e-6, seed=0,
                                   scale=None, num_features=0, power=3.0):
    """The causal form as a plain prefix sum, one state per position (``[B, Hk, L, F, Ev]``
    memory: small inputs only)::

        S_i = sum_{j <= i} phi(k_j)^T v_j,  z_i = sum_{j <= i} phi(k_j),  O_i = phi(q_i) S_i / (phi(q_i) z_i + eps)
    """
    b, hq, length, _ = q.shape
    hk = k.shape[1]
    pq, pk = feature_maps(q, k, key_mask, feature_map, params, causal=True, seed=seed, scale=scale,
                          num_features=num_features, power=power)
    vf = v.to(pq.dtype)
    if key_mask is not None:
        vf = torch.where(key_mask[:, None, :, None], vf, torch.zeros_like(vf))
    states = (pk[..., :, None] * vf[..., None, :]).cumsum(dim=2)    # [B, Hk, L, F, Ev]
    z = pk.cumsum(dim=2)                                           # [B, Hk, L, F]
    pq = pq.reshape(b, hk, hq // hk, length, -1)
    num = (pq[..., None, :] @ states[:, :, None]).squeeze(-2)
    den = (pq * z[:, :, None]).sum(dim=-1, keepdim=True)
    return (num / (den + eps)).reshape(b, hq, length, -1).to(q.dtype).contiguous()


def softmax_attention(q, k, v, key_mask=None, causal=False, scale=None, dtype=torch.float64):
    """``softmax(scale q k^T + mask) V`` with grouped heads, in ``dtype`` (what the linear
    attention replaces; a query that sees no key gets 0)."""
    group = q.shape[1] // k.shape[1]
    qq = q.to(dtype)
    kk = k.to(dtype).repeat_interleave(group, dim=1)
    vv = v.to(dtype).repeat_interleave(group, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (qq @ kk.transpose(-1, -2)) * scale
    keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        keep = keep.tril()
    keep = keep.expand(scores.shape[0], 1, *scores.shape[-2:])
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ vv
