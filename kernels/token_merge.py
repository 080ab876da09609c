"""Token reduction ops: ``optcc::tome_plan``, ``optcc::topk_plan``, ``optcc::token_merge``,
``optcc::token_unmerge``, ``optcc::token_pool``.

Tokens are ``x [B, N, C]`` (batch, token, channel); every token has a *size* ``s [B, N]``
(how many input tokens it stands for, 1 at the start). A reduction is a *plan*: for every
input token its destination ``dest [B, N]`` in ``[0, N')`` (``N' < N``), and ``keep [B, N']``,
the input token each output token is written at (its representative: the output token's
own input position when it was not merged away, the destination token's when it was).

Plans

* ``tome_plan(metric, key_bias, r, protected)`` - ToMe's bipartite soft matching. ``metric
  [B, N, D]`` (the attention keys averaged over heads) is normalized; the tokens alternate
  into sets ``A = 0, 2, 4, ...`` and ``B = 1, 3, 5, ...``; each token of A points to its most
  cosine-similar token of B; the ``r`` edges of highest similarity are merged (an A token
  into its B token). The first ``protected`` tokens (class, distillation, register tokens)
  are never merged and take no merge (their scores are -inf, as ToMe does for the class
  token). With ``key_bias [B, N]`` (an attention key mask per key, e.g. 0 for real tokens and
  -inf for padding) tokens merge only into tokens of the same bias, so a padded token never
  merges into a real one: the tokens are first grouped by bias (protected tokens first, then by
  position), then alternate into A and B, so each group has partners in the other set;
  masked-out tokens (bias <= -1e4) merge among themselves before any other edge, so the
  choice of the real tokens to merge does not depend on the padding's values; an edge
  across groups is taken only when ``r`` exceeds every edge within them. Output order: the protected tokens, then A's unmerged tokens, then
  B's tokens, each in input order - for one protected class token this is ToMe's
  ``cat([unm, dst])`` with ``unm`` sorted, for class + distillation tokens ToMe's
  ``cat([unm[:1], dst[:1], unm[1:], dst[1:]])``.
* ``topk_plan(attention, keep_tokens, protected)`` - EViT: ``attention [B, N]`` is the
  class token's attention to every token (averaged over heads); the ``keep_tokens``
  unprotected tokens of highest attention are kept (in input order), every other
  unprotected token goes into one fused token placed last.

Merging (``token_merge(x, size, dest, n_out, weight)``)::

    x'[b, j] = sum_{i : dest[b, i] = j} w[b, i] x[b, i]  /  sum_{i : dest[b, i] = j} w[b, i]
    s'[b, j] = sum_{i : dest[b, i] = j} s[b, i]

(0 for a group whose weights are all 0), with ``w = s`` (a size-weighted average, ToMe's
``merge_wavg``) or the given weight
(``topk``: size x attention, so the fused token is the attention-weighted average of the
tokens it replaces). ``token_unmerge(x', dest)[b, i] = x'[b, dest[b, i]]`` copies every
merged token back to its sources (a dense output needs every input token);
``token_pool(x', s', start, mean) = sum_j s'_j x'_j / sum_j s'_j`` is the mean over the input
tokens (``mean=False``: the sum), for ``x'`` holding the tokens ``start, start + 1, ...`` of ``s'``.

Every op is computed with ``gather`` / ``scatter_add`` / ``topk`` only (no ``sort``, no
``scatter_reduce``), so the graph exports to ONNX (``ScatterElements`` with ``add``,
``GatherElements``, ``TopK``) and runs the same in ONNX Runtime and TensorRT. The ops are
registered as ``CompositeImplicitAutograd``: inside a captured graph they are single
nodes, and exporting the graph (``torch.onnx.export``, ``torch.export``) traces them into
those aten ops. The Triton kernel of the merge is :mod:`optcc.kernels.token_merge_triton`.
"""

from __future__ import annotations

import torch

__all__ = ["tome_plan", "topk_plan", "token_merge", "token_unmerge", "token_pool", "tome_plan_reference"]

_lib = torch.library.Library("optcc", "FRAGMENT")

_lib.define("tome_plan(Tensor metric, Tensor? key_bias, int r, int protected) -> (Tensor, Tensor)")
_lib.define("topk_plan(Tensor attention, int keep_tokens, int protected) -> (Tensor, Tensor)")
_lib.define("token_merge(Tensor x, Tensor size, Tensor dest, int n_out, Tensor? weight=None) -> (Tensor, Tensor)")
_lib.define("token_unmerge(Tensor x, Tensor dest) -> Tensor")
_lib.define("token_pool(Tensor x, Tensor size, int start=0, bool mean=True) -> Tensor")


_TINY = torch.finfo(torch.float32).tiny

#: an attention bias at or below this masks its key out (softmax weight e^-10000 = 0)
MASKED = -1e4


def _ascending(values: torch.Tensor, count: int) -> torch.Tensor:
    """``values`` sorted along the last dim with ``topk`` (ONNX ``TopK``; ``sort`` has no ONNX form)."""
    return values.topk(count, dim=-1, largest=False).values


def _positions(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device, dtype=torch.int64)


def _plan_from_order(order: torch.Tensor, dest_of_merged: torch.Tensor | None, merged: torch.Tensor | None,
                     n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep`` = the input tokens in output order ``[B, N']``; ``dest`` maps every input token
    to its output position, the ``merged`` ones (input positions) to ``dest_of_merged``
    (input positions of their destination tokens)."""
    b, n_out = order.shape
    dest = torch.zeros(b, n, dtype=torch.int64, device=order.device)
    dest = dest.scatter_add(1, order, _positions(n_out, order).expand(b, n_out).contiguous())
    if merged is not None:
        dest = dest.scatter_add(1, merged, dest.gather(1, dest_of_merged))
    return dest, order


def _tome_plan(metric, key_bias, r, protected):
    b, n, _ = metric.shape
    idx = _positions(n, metric)
    perm = None
    if key_bias is not None:
        # group the tokens by their mask value (protected first, then in order) before they
        # alternate into A and B, so every group has partners of its own in the other set
        bias = key_bias.float().expand(b, n)
        group = (bias > MASKED).to(torch.int64) + (idx[None] < protected).to(torch.int64) * 2
        perm = (group * (n + 1) + (n - idx)).topk(n, dim=-1).indices  # by group, then position
        metric = metric.gather(1, perm[:, :, None].expand_as(metric))
        bias = bias.gather(1, perm)
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_idx, b_idx = idx[0::2], idx[1::2]
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)          # [B, Na, Nb]
    blocked = (a_idx < protected)[:, None] | (b_idx < protected)[None, :]
    scores = scores.masked_fill(blocked[None], float("-inf"))
    if key_bias is not None:
        # masked-out tokens (padding) merge among themselves first, whatever their values, so
        # which real tokens merge never depends on the padding; an edge across mask values is
        # below every cosine (and above the protected tokens' -inf): taken only when r leaves
        # no other edge
        masked = bias <= MASKED
        both_masked = masked[:, 0::2, None] & masked[:, None, 1::2]
        scores = scores.masked_fill(both_masked, 2.0)
        differs = bias[:, 0::2, None] != bias[:, None, 1::2]
        scores = scores.masked_fill(differs, -1e4)
    node_max, node_idx = scores.max(dim=-1)                              # best B partner per A token
    edge = node_max.topk(node_max.shape[-1], dim=-1).indices             # A tokens, most similar first
    merged_a, unmerged_a = edge[:, :r], _ascending(edge[:, r:], edge.shape[-1] - r)
    n_prot = min(protected, n)
    prot = idx[:n_prot].expand(b, n_prot)
    # the protected A tokens are never merged and have the lowest positions: they lead ``unm``
    unm = a_idx[unmerged_a][:, (n_prot + 1) // 2:]
    dst = b_idx[n_prot // 2:].expand(b, -1)
    order = torch.cat([prot, unm, dst], dim=1)
    merged = a_idx[merged_a]
    partner = b_idx[node_idx.gather(1, merged_a)]
    dest, keep = _plan_from_order(order, partner, merged, n)
    if perm is not None:  # back from grouped positions to the tokens' own
        dest = torch.zeros_like(dest).scatter(1, perm, dest)
        keep = perm.gather(1, keep)
    return dest, keep


def _topk_plan(attention, keep_tokens, protected):
    b, n = attention.shape
    n_prot = min(protected, n)
    free = attention[:, n_prot:].float()
    kept = _ascending(free.topk(keep_tokens, dim=-1).indices, keep_tokens) + n_prot
    prot = _positions(n_prot, attention).expand(b, n_prot)
    order = torch.cat([prot, kept], dim=1)
    n_out = n_prot + keep_tokens + 1
    # every token not in ``order`` goes to the fused token (last); its representative is the
    # first such token, so ``keep`` stays a list of input positions
    in_order = torch.zeros(b, n, dtype=torch.bool, device=attention.device).scatter(1, order, True)
    # the fused token's representative: the pruned token of highest attention (a real token
    # whenever one was pruned, so its key mask is a real token's)
    best_pruned = attention.float().masked_fill(in_order, float("-inf")).argmax(dim=-1, keepdim=True)
    keep = torch.cat([order, best_pruned], dim=1)
    dest = torch.full((b, n), n_out - 1, dtype=torch.int64, device=attention.device)
    dest = dest.scatter(1, order, _positions(n_out - 1, attention).expand(b, n_out - 1).contiguous())
    return dest, keep


def _token_merge(x, size, dest, n_out, weight=None):
    # real CUDA tensors only: fake / functional tensors of a trace are subclasses and keep the
    # torch ops below (exported graphs decompose into scatter_add); the kernel has no backward
    if type(x) is torch.Tensor and x.is_cuda and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, size, weight))):
        from .token_merge_triton import token_merge_triton

        return token_merge_triton(x, size, dest, n_out, weight)
    b, n, c = x.shape
    w = (size if weight is None else weight).to(torch.float32)
    index = dest[:, :, None].expand(b, n, c)
    total = x.new_zeros(b, n_out, c, dtype=torch.float32).scatter_add(1, index, x.float() * w[:, :, None])
    w_sum = w.new_zeros(b, n_out).scatter_add(1, dest, w)
    size_out = size.new_zeros(b, n_out).scatter_add(1, dest, size)
    # a group whose weights are all 0 (topk fusing only padding, which has no attention) is 0
    return (total / w_sum.clamp_min(_TINY)[:, :, None]).to(x.dtype), size_out


def _token_unmerge(x, dest):
    b, n = dest.shape
    return x.gather(1, dest[:, :, None].expand(b, n, x.shape[-1]))


def _token_pool(x, size, start=0, mean=True):
    w = size[:, start:start + x.shape[1]].to(x.dtype)[:, :, None]
    total = (x * w).sum(dim=1)
    return total / w.sum(dim=1) if mean else total


for _name, _fn in [("tome_plan", _tome_plan), ("topk_plan", _topk_plan), ("token_merge", _token_merge),
                   ("token_unmerge", _token_unmerge), ("token_pool", _token_pool)]:
    _lib.impl(_name, _fn, "CompositeImplicitAutograd")

tome_plan = torch.ops.optcc.tome_plan.default
topk_plan = torch.ops.optcc.topk_plan.default
token_merge = torch.ops.optcc.token_merge.default
token_unmerge = torch.ops.optcc.token_unmerge.default
token_pool = torch.ops.optcc.token_pool.default


def tome_plan_reference(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` as its authors wrote them
    (facebookresearch/ToMe, ``tome/merge.py``), returned as a function ``(x, size) -> (x', size')``;
    the tests check :func:`tome_plan` + :func:`token_merge` against it."""
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -float("inf")
    if distill_token:
        scores[..., :, 0] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    def merge_wavg(x, size):
        x = merge(x * size, "sum")
        size = merge(size, "sum")
        return x / size, size

    return merge_wavg
