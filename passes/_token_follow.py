"""Making the graph after a token reduction follow the shorter token axis.

The canonical IR is static: a reshape downstream of a reduction still names the captured
token count. After a reduction ``N -> N'`` is inserted, :func:`follow` visits every node
in graph order that reads a value whose token axis shrank (a *changed* value, with its
token dim and, when known, its batch dim) and makes it consistent:

* data movement: ``view``/``reshape`` sizes are re-derived (the dim or merged block holding
  the tokens scales by ``N'/N``; a split of the token axis names the part of size ``N``),
  ``expand`` sizes follow the input, ``slice`` keeps a range that ends past the tokens,
  ``select`` of a protected token reads the same token (it never moves);
* per-token ops (pointwise with every other operand broadcast along the tokens, ``linear``,
  ``layer_norm``, softmax over another axis, ...) are re-run on the new shapes;
* ``mean``/``sum`` over the token axis weigh every token by its size (``sum_j s_j x_j``):
  the mean over the input tokens;
* SDPA over reduced tokens gets the mask of the new tokens: the key-padding bias of each
  token's representative plus ``log(size)`` (proportional attention) along the keys;
* an op whose meaning over the tokens is not known (a grid reshape, a cat, a convolution,
  an operand computed before the reduction with all ``N`` tokens, a graph output) reads
  the tokens *unmerged* back to ``N`` (every source token gets its merged token's value):
  the exact consumer of an approximate value, never a wrong shape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map_only

from optcc import graph_utils as gu
from optcc.ir import _fake_mode_of
from optcc.kernels import token_merge as ops
from optcc.kernels.int8_linear import int8_linear

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
INT_MAX = 2 ** 63 - 1

#: ops that act on each token alone when their other tensor operands broadcast along the tokens
PER_TOKEN = {
    aten.linear.default, aten.layer_norm.default, aten.gelu.default, aten.relu.default, aten.silu.default,
    aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
    int8_linear, aten._to_copy.default, aten.to.dtype,
}
SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList}


class NotFollowable(Exception):
    """The graph after a reduction cannot be made to follow the tokens; names the node."""

    def __init__(self, node: fx.Node, why: str):
        super().__init__(f"{why} at %{node.name}")
        self.node = node


class ProtectMore(Exception):
    """A token that may be merged away is read by index: protect tokens up to it."""

    def __init__(self, count: int, node: fx.Node):
        super().__init__(f"token {count - 1} is read by index at %{node.name}")
        self.count = count


@dataclass
class Tokens:
    """The token axis of a changed value."""

    dim: int
    batch_dim: int | None
    start: int = 0          # the value holds tokens [start, start + size) of the reduced set


@dataclass
class Generation:
    """One reduction: ``before -> after`` tokens, its plan and the sizes after it."""

    before: int
    after: int
    batch: int
    dest: fx.Node           # [B, before] -> position in [0, after)
    keep_total: fx.Node     # [B, after]: the representative's index among the captured tokens
    sizes: fx.Node          # [B, after], float32
    protected: int


@dataclass
class Context:
    key_bias: fx.Node | None        # [B, captured tokens] additive key mask, or None
    proportional: bool
    masks: dict                     # SDPA node -> HeadLayout of its query (layouts found on blocks)
    padding_masks: set              # the captured masks ``key_bias`` was read from
    unmerged: list                  # (node name, reason) where tokens were unmerged


class Inserter:
    """``graph.call_function`` before a node, with ``meta["val"]`` derived at once."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.mode = _fake_mode_of(graph)

    def __call__(self, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs or {})
        rerun(node, self.mode)
        return node


def rerun(node: fx.Node, mode) -> None:
    args, kwargs = tree_map_only(fx.Node, lambda n: n.meta["val"], (node.args, node.kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode is None:
            node.meta["val"] = node.target(*args, **kwargs)
        else:
            with mode:
                node.meta["val"] = node.target(*args, **kwargs)


def _move_tokens_first(insert: Inserter, value: fx.Node, tok: Tokens) -> tuple[fx.Node, list[int] | None]:
    """``value`` as ``[B, N, rest]`` and the permutation that was applied (None if none)."""
    rank = gu.rank(value)
    perm = [tok.batch_dim, tok.dim] + [d for d in range(rank) if d not in (tok.batch_dim, tok.dim)]
    if perm == list(range(rank)):
        moved = value
    else:
        moved = insert(aten.permute.default, (value, perm))
    shape = gu.shape(moved)
    if rank != 3:
        moved = insert(aten.reshape.default, (moved, [shape[0], shape[1], -1]))
    return moved, (perm if perm != list(range(rank)) else None)


def unmerge(insert: Inserter, value: fx.Node, tok: Tokens, gen: Generation, why: str) -> fx.Node:
    """``value``'s tokens copied back to the ``gen.before`` tokens they came from (those from
    ``tok.start`` on, when ``value`` holds the tokens after a slice of the protected ones)."""
    if tok.batch_dim is None:
        raise NotFollowable(value, f"the tokens must be unmerged ({why}) but their batch axis is not known")
    if tok.start > gen.protected or gu.shape(value)[tok.dim] != gen.after - tok.start:
        raise NotFollowable(value, f"the tokens must be unmerged ({why}) but they are a part of the tokens "
                                   f"that does not end with the last")
    shape = list(gu.shape(value))
    moved, perm = _move_tokens_first(insert, value, tok)
    dest = gen.dest
    if tok.start:  # protected tokens map to themselves: the rest map among the rest
        dest = insert(aten.sub.Tensor, (insert(aten.slice.Tensor, (dest, 1, tok.start, INT_MAX)), tok.start))
    full = insert(ops.token_unmerge, (moved, dest))
    before = gen.before - tok.start
    if gu.rank(value) != 3:
        permuted = [shape[p] for p in perm] if perm else shape
        full = insert(aten.reshape.default, (full, [permuted[0], before] + permuted[2:]))
    if perm:
        inverse = [perm.index(d) for d in range(len(perm))]
        full = insert(aten.permute.default, (full, inverse))
    return full


def rederive_view(old_in: tuple, new_in: tuple, old_out: tuple, tok: Tokens, gen: Generation) -> list[int] | None:
    """The sizes of a reshape of ``new_in`` that does what the captured reshape did."""
    d = tok.dim
    mapped = gu.reshape_dim(old_in, old_out, d)
    out = list(old_out)
    if isinstance(mapped, int):
        out[mapped] = new_in[d]
        return out
    kind, _src, dst = mapped
    if kind == "many-to-one" and len(dst) == 1:
        e = dst[0]
        if (out[e] * new_in[d]) % old_in[d]:
            return None
        out[e] = out[e] * new_in[d] // old_in[d]
        return out
    if kind == "one-to-many":
        # the part of the token axis that has the captured token count is the token axis
        holders = [e for e in dst if old_out[e] == gen.before]
        if len(holders) == 1 and old_in[d] % gen.before == 0:
            out[holders[0]] = gen.after
            return out
    return None


def _tokens_after_view(new_in: tuple, new_out: tuple, tok: Tokens, gen: Generation) -> Tokens:
    mapped = gu.reshape_dim(tuple(new_in), tuple(new_out), tok.dim)
    if isinstance(mapped, int):
        batch = None
        if tok.batch_dim is not None:
            b = gu.reshape_dim(tuple(new_in), tuple(new_out), tok.batch_dim)
            batch = b if isinstance(b, int) else None
        return Tokens(mapped, batch, tok.start)
    kind, _src, dst = mapped
    if kind == "one-to-many":
        holders = [e for e in dst if new_out[e] == gen.after]
        if holders:
            return Tokens(holders[0], None, tok.start)
    return Tokens(dst[0] if dst else 0, None, tok.start)


def token_mask(insert: Inserter, layout, gen: Generation, ctx: Context, dtype) -> fx.Node | None:
    """The additive key mask of SDPA over the tokens after ``gen``."""
    bias = None
    if ctx.key_bias is not None:
        bias = insert(aten.gather.default, (ctx.key_bias, 1, gen.keep_total))
    if ctx.proportional:
        log_size = insert(aten.log.default, (gen.sizes,))
        bias = log_size if bias is None else insert(aten.add.Tensor, (bias, log_size))
    if bias is None:
        return None
    batch, keys = gen.batch, gen.after
    if layout.kind in ("bhle", "hble"):
        mask = insert(aten.reshape.default, (bias, layout.mask_shape(batch, keys)))
    else:
        mask = insert(aten.reshape.default, (bias, [batch, 1, 1, keys]))
        mask = insert(aten.expand.default, (mask, [batch, layout.heads, 1, keys]))
        if layout.kind == "flat_hb":
            mask = insert(aten.transpose.int, (mask, 0, 1))
        mask = insert(aten.reshape.default, (mask, [batch * layout.heads, 1, keys]))
    mask = insert(aten._to_copy.default, (mask,), {"dtype": dtype})
    mask.meta["optcc_token_mask"] = True
    return mask


def _aligned(op_rank: int, value: fx.Node, dim: int) -> int | None:
    """``dim`` of an ``op_rank`` result as a dim of broadcast operand ``value`` (None: not covered)."""
    r = gu.rank(value)
    if r is None:
        return None
    k = dim - (op_rank - r)
    return k if k >= 0 else None


def follow(graph: fx.Graph, start: fx.Node, tok: Tokens, gen: Generation, ctx: Context) -> None:
    """Make every node after ``start`` (the reduced tokens) follow them (module docstring)."""
    insert = Inserter(graph)
    changed: dict[fx.Node, Tokens] = {start: tok}
    order = list(graph.nodes)
    begin = order.index(start) + 1
    old = {n: gu.shape(n) for n in order[begin:]}
    old[start] = tuple(gu.shape(start)[:tok.dim]) + (gen.before,) + tuple(gu.shape(start)[tok.dim + 1:])
    for node in order[begin:]:
        reads = [a for a in node.all_input_nodes if a in changed]
        if not reads:
            continue
        with graph.inserting_before(node):
            result = _visit(insert, node, reads, changed, gen, ctx, old)
        if result is not None:
            changed[node] = result


def _unmerge_inputs(insert, node, reads, changed, gen, why) -> None:
    for value in reads:
        full = unmerge(insert, value, changed[value], gen, why)
        node.replace_input_with(value, full)
    rerun(node, insert.mode)


def _visit(insert: Inserter, node: fx.Node, reads, changed, gen: Generation, ctx: Context,
           old: dict) -> Tokens | None:
    if node.op == "output":
        for value in reads:
            full = unmerge(insert, value, changed[value], gen, "a graph output")
            node.replace_input_with(value, full)
        return None
    if node.op != "call_function":
        raise NotFollowable(node, f"{node.op} reads merged tokens")
    target = node.target
    old_shape = gu.shape(node)
    src = node.args[0] if node.args else None
    tok = changed.get(src) if isinstance(src, fx.Node) else None

    def fall_back(why: str) -> None:
        ctx.unmerged.append((node.name, why))
        _unmerge_inputs(insert, node, reads, changed, gen, why)
        return None

    if target is ops.token_unmerge:
        full = unmerge(insert, src, tok, gen, "an earlier unmerge")
        node.replace_input_with(src, full)
        rerun(node, insert.mode)
        return None
    if target is ops.token_pool:
        node.args = (src, gen.sizes) + tuple(node.args[2:])
        rerun(node, insert.mode)
        return None
    if target is SDPA:
        return _visit_sdpa(insert, node, reads, changed, gen, ctx, fall_back)
    if tok is None or any(r is not src for r in reads):
        if target in PER_TOKEN or torch.Tag.pointwise in getattr(target, "tags", ()):
            return _visit_pointwise(insert, node, reads, changed, gen, fall_back)
        return fall_back(f"{_name(node)} reads merged tokens in an operand other than its first")

    in_old = old[src]
    new_in = gu.shape(src)
    rank = len(new_in)
    d = tok.dim
    if target in gu.VIEWS:
        sizes = rederive_view(in_old, new_in, old_shape, tok, gen)
        if sizes is None:
            return fall_back("a reshape splits or regroups the token axis")
        node.args = (src, sizes)
        rerun(node, insert.mode)
        return _tokens_after_view(new_in, tuple(sizes), tok, gen)
    if target in (aten.permute.default, aten.transpose.int, aten.unsqueeze.default) or target in gu.SQUEEZES:
        rerun(node, insert.mode)
        return _mapped(node, tok)
    if target is aten.expand.default:
        sizes = list(node.args[1])
        k = len(sizes) - rank
        sizes[d + k] = new_in[d]
        node.args = (src, sizes)
        rerun(node, insert.mode)
        return _mapped(node, tok)
    if target is aten.select.int:
        dim = node.args[1] % rank
        if dim != d:
            rerun(node, insert.mode)
            return _mapped(node, tok)
        index = node.args[2]
        if 0 <= index - 0 < gen.protected and tok.start == 0:
            rerun(node, insert.mode)
            return None
        if index >= 0 and tok.start == 0:
            raise ProtectMore(index + 1, node)
        return fall_back("a token is read by a negative index")
    if target is aten.slice.Tensor:
        args = list(node.args) + [None] * (5 - len(node.args))
        dim, start, end, step = (args[1] or 0) % rank, args[2] or 0, args[3], args[4] or 1
        if dim != d:
            rerun(node, insert.mode)
            return _mapped(node, tok)
        old_count = in_old[d]
        if step != 1 or start < 0 or (end is not None and end < old_count):
            return fall_back("a slice of the token axis that does not run to its end")
        if start > gen.protected:
            return fall_back("a slice of the token axis starting past the protected tokens")
        node.args = (src, args[1], start, INT_MAX) + tuple(node.args[4:5])
        rerun(node, insert.mode)
        return Tokens(d, tok.batch_dim, tok.start + start)
    if target in SOFTMAXES:
        if node.args[1] % rank == d:
            return fall_back("a softmax over the token axis")
        rerun(node, insert.mode)
        return Tokens(d, tok.batch_dim, tok.start)
    if target in REDUCTIONS:
        dims = [x % rank for x in (node.args[1] or range(rank))]
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        if d not in dims:
            rerun(node, insert.mode)
            return _mapped_reduce(tok, dims, keepdim)
        if node.kwargs.get("dtype") is not None:
            return fall_back("a token reduction with a dtype")
        if dims != [d] or tok.batch_dim is None:
            return fall_back("a reduction over the token axis and other axes")
        moved, perm = _move_tokens_first(insert, src, tok)
        pooled = insert(ops.token_pool, (moved, gen.sizes, tok.start, target is aten.mean.dim))
        rest = [new_in[p] for p in (perm or range(rank))][2:]
        if rank != 3:
            pooled = insert(aten.reshape.default, (pooled, [gen.batch] + rest))
        # [B, rest...] -> the reduction's own layout (batch where it was, the token dim kept as 1)
        kept = [p for p in (perm or range(rank)) if p != d]
        order = sorted(range(len(kept)), key=lambda i: kept[i])
        if order != list(range(len(kept))):
            pooled = insert(aten.permute.default, (pooled, order))
        if keepdim:
            pooled = insert(aten.unsqueeze.default, (pooled, d))
        node.replace_all_uses_with(pooled)
        return None  # the reduction is now dead; its users read ``total`` (shape unchanged)
    if target in PER_TOKEN or torch.Tag.pointwise in getattr(target, "tags", ()):
        return _visit_pointwise(insert, node, reads, changed, gen, fall_back)
    return fall_back(f"{_name(node)} is not known to act on each token alone")


def _name(node: fx.Node) -> str:
    from optcc.ir import op_name

    return op_name(node)


def _mapped(node: fx.Node, tok: Tokens) -> Tokens | None:
    d = gu.map_dim(node, tok.dim, up=False)
    if not isinstance(d, int):
        return None
    b = gu.map_dim(node, tok.batch_dim, up=False) if tok.batch_dim is not None else None
    return Tokens(d, b if isinstance(b, int) else None, tok.start)


def _mapped_reduce(tok: Tokens, dims: list[int], keepdim: bool) -> Tokens:
    if keepdim:
        return tok

    def shift(x):
        return None if x is None or x in dims else x - sum(1 for e in dims if e < x)

    return Tokens(shift(tok.dim), shift(tok.batch_dim), tok.start)


def _visit_pointwise(insert, node, reads, changed, gen, fall_back) -> Tokens | None:
    out_rank = gu.rank(node)
    if out_rank is None:
        return fall_back("an op with unknown shapes")
    first = changed[reads[0]]
    k = out_rank - gu.rank(reads[0])
    dim, batch = first.dim + k, (first.batch_dim + k if first.batch_dim is not None else None)
    for value in reads[1:]:
        other = changed[value]
        j = out_rank - gu.rank(value)
        if other.dim + j != dim or other.start != first.start:
            return fall_back(f"{_name(node)} combines tokens laid out differently")
    pointwise = torch.Tag.pointwise in getattr(node.target, "tags", ())
    if not pointwise and any(a is not node.args[0] for a in reads):
        return fall_back(f"{_name(node)} reads merged tokens in an operand other than its first")
    for arg in (node.all_input_nodes if pointwise else ()):
        if arg in changed:
            continue
        a = _aligned(out_rank, arg, dim)
        if a is not None and gu.shape(arg) and gu.shape(arg)[a] != 1:
            return fall_back(f"{_name(node)} combines the merged tokens with %{arg.name}, a value "
                             f"with all {gu.shape(arg)[a]} tokens")
    if node.target is aten.layer_norm.default and dim >= out_rank - len(node.args[1]):
        return fall_back("a layer norm over the token axis")
    if node.target is aten.linear.default and dim == out_rank - 1:
        return fall_back("a linear over the token axis")
    rerun(node, insert.mode)
    return Tokens(dim, batch, first.start)


def _visit_sdpa(insert, node, reads, changed, gen, ctx, fall_back) -> Tokens | None:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if not (q in changed and k in changed and v in changed):
        return fall_back("attention whose queries, keys and values are not all merged tokens")
    rank = gu.rank(q)
    if any(changed[t].dim != rank - 2 or changed[t].start for t in (q, k, v)):
        return fall_back("attention over another axis than the tokens")
    layout = ctx.masks.get(node)
    if (node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)):
        return fall_back("causal attention")
    if layout is None:
        return fall_back("attention outside the blocks that were found")
    if mask is not None and not (isinstance(mask, fx.Node) and mask.meta.get("optcc_token_mask")):
        if mask not in ctx.padding_masks:
            return fall_back("an attention mask that is not a key-padding mask")
    new_mask = token_mask(insert, layout, gen, ctx, gu.dtype(q))
    args = list(node.args) + [None] * (4 - len(node.args))
    args[3] = new_mask
    node.args = tuple(args)
    node.kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ != "attn_mask"}
    rerun(node, insert.mode)
    return Tokens(rank - 2, changed[q].batch_dim, 0)

