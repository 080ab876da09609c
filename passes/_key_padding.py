"""Attention masks that are key-padding masks: one additive bias per key, the same for
every query.

SDPA reads a mask that broadcasts to ``[*batch, L, S]``. It is a key-padding mask when
it does not vary along the queries (axis -2). :func:`source` finds a value equal to the
mask with that axis of size 1: the mask itself when the axis already has size 1, the
input of an ``expand`` along it, or - for masks built in the graph from the attention
mask input and constant index arithmetic, as transformers' mask builders do - the same
pointwise ops re-applied to query-free operands, where each constant operand is evaluated
at compile time and kept only if it is the same for every query. :func:`bias_rows` turns
it into ``[B, S]`` float biases (a boolean mask ``m`` as ``where(m, 0, -inf)``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.ir import add_constant

from ._token_blocks import constant_only, evaluate
from ._token_follow import Inserter

aten = torch.ops.aten


def source(gm: fx.GraphModule, mask: fx.Node) -> fx.Node | None:
    """A value equal to ``mask`` with its query axis (-2) of size 1, or None when the mask may
    vary along the queries. Constant parts (an ``arange >= 0`` of a mask builder) are evaluated
    and kept when they are the same for every query; expands along the queries are dropped."""
    memo: dict = {}

    def query_free(node):
        if not isinstance(node, fx.Node):
            return node
        shape = gu.shape(node)
        if shape is None:
            return None
        if len(shape) < 2 or shape[-2] == 1:
            return node
        if constant_only(node):
            value = evaluate(gm, node, memo)
            first = value.narrow(-2, 0, 1)
            if not torch.equal(value, first.expand_as(value)):
                return None
            return add_constant(gm, f"{node.name}_per_key", first.contiguous(), before=mask)
        if node.target is aten.expand.default:
            return query_free(node.args[0])  # SDPA broadcasts the mask again
        if torch.Tag.pointwise in getattr(node.target, "tags", ()):
            args = [query_free(a) for a in node.args]
            if any(a is None for a in args):
                return None
            with mask.graph.inserting_before(mask):
                return Inserter(mask.graph)(node.target, tuple(args), dict(node.kwargs))
        return None

    source = query_free(mask)
    if source is None:
        return None
    s = gu.shape(source)
    return source if s and s[-1] == gu.shape(mask)[-1] else None


def bias_rows(insert, src: fx.Node, batch: int) -> fx.Node | None:
    """``src [.., 1, N]`` (every leading dim but one of size 1 or the batch) as ``[B, N]`` floats."""
    shape = gu.shape(src)
    lead = shape[:-1]
    if any(s not in (1, batch) for s in lead) or sum(1 for s in lead if s == batch) > 1:
        return None
    rows = insert(aten.reshape.default, (src, [max(lead) if lead else 1, shape[-1]]))
    if gu.dtype(src) == torch.bool:
        rows = insert(aten.where.Scalar, (rows, 0.0, float("-inf")))
    elif gu.dtype(src) != torch.float32:
        rows = insert(aten._to_copy.default, (rows,), {"dtype": torch.float32})
    if gu.shape(rows)[0] != batch:
        rows = insert(aten.expand.default, (rows, [batch, shape[-1]]))
    return rows
