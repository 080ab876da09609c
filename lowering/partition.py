"""Region formation, the lowering's first step: which ops share one kernel.

It runs once every rewrite the user selected is done (``target="triton"``, ``optcc dump
--format triton``, or the ``block_fusion`` pass for a graph that shows its regions), so
no pass ever has to look inside a region.

Every region has one *iteration space* a kernel can walk once, and keeps its
intermediates in registers: a value leaves the region only if a node outside reads it.
Regions are chosen greedily in graph order, in three rounds:

``gemm``  an anchor ``convolution``/``linear``/``addmm``/``mm``/``bmm`` with its epilogue:
    the chain of single-user pointwise ops after it whose output has the anchor's shape
    and whose other operands broadcast to it (bias, scale, activation), plus at most one
    full-size residual operand. A residual ``add`` that feeds a row reduction is left to
    that reduction (the "add + layer_norm" kernel writes both the sum and the norm).

``reduction``  a reduction over the last dimension (``softmax``, ``log_softmax``,
    ``layer_norm`` over one dim, ``sum``/``mean``/``amax``/``amin`` over ``[-1]``) with
    its pointwise prologue (producers of the row, e.g. the residual add; a prologue value
    read outside is written out as an extra result) and its epilogue (as for gemm). Every
    tensor in it broadcasts to the row shape ``[*rows, N]``, so one program per row works.

``pointwise``  what is left: connected pointwise ops of one output shape (connected
    components, networkx), two or more of them.

A candidate group that would make the graph cyclic (a path leaving it and coming back)
is not fused. Data movement (view, permute, expand), SDPA (a hand-written kernel), and
everything else stay ordinary ops between regions.
"""

from __future__ import annotations

from collections import Counter

import networkx as nx
import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.ir import op_name
from optcc.regions import RegionInfo, can_fuse, finish, fuse_region

aten = torch.ops.aten

GEMM = {aten.convolution.default, aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default}
# Pointwise ops the Tag misses; ``clone`` (tagged pointwise) is data movement here.
_EXTRA_POINTWISE = {aten.hardswish.default}
_NOT_POINTWISE = {aten.clone.default}


def _shape(node) -> tuple | None:
    # SymInt sizes as they are: region formation only compares shapes, it never needs ints
    return gu.shape(node, symbolic=True)


def is_pointwise(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target in _NOT_POINTWISE or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return (torch.Tag.pointwise in target.tags or target in _EXTRA_POINTWISE) and gu.val(node) is not None


def _last_dim_only(dims, rank: int) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return len(dims) == 1 and dims[0] % rank == rank - 1


def is_row_reduction(node: fx.Node) -> bool:
    """A reduction over the last dimension only (one program per row can compute it)."""
    rows = _shape(node.args[0]) if node.op == "call_function" and node.args else None
    if rows is None or not rows:
        return False
    rank, target = len(rows), node.target
    if target in (aten.softmax.int, aten._softmax.default, aten._log_softmax.default, aten.log_softmax.int):
        return _last_dim_only(node.args[1], rank)
    if target is aten.layer_norm.default:
        return len(node.args[1]) == 1
    if target in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default):
        return _last_dim_only(node.args[1], rank)
    return False


def _broadcasts_to(node, shape: tuple) -> bool:
    return not isinstance(node, fx.Node) or gu.broadcasts_to(node, shape, symbolic=True)  # a Python scalar does


class RegionBuilder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.assigned: set[fx.Node] = set()
        self.kinds = Counter()
        self.fused_ops = 0
        self.skipped = Counter()

    def _free(self, node) -> bool:
        return isinstance(node, fx.Node) and node not in self.assigned and not node._erased

    def _epilogue(self, tail: fx.Node, shape: tuple, dtype) -> list[fx.Node]:
        chain, residual_used = [], False
        while len(tail.users) == 1:
            user = next(iter(tail.users))
            if not (self._free(user) and is_pointwise(user)) or _shape(user) != shape or gu.val(user).dtype != dtype:
                break
            others = [a for a in user.all_input_nodes if a is not tail]
            if tail not in user.all_input_nodes or not all(_broadcasts_to(a, shape) for a in others):
                break
            full = [a for a in others if _shape(a) == shape and a.op != "get_attr"]
            if full:
                if residual_used or len(full) > 1 or any(is_row_reduction(u) for u in user.users):
                    break
                residual_used = True
            chain.append(user)
            tail = user
        return chain

    def _prologue(self, reduction: fx.Node, limit: int = 8) -> list[fx.Node]:
        rows = _shape(reduction.args[0])
        dtype = gu.val(reduction.args[0]).dtype
        found, frontier = [], [reduction.args[0]]
        while frontier and len(found) < limit:
            node = frontier.pop()
            if not self._free(node) or node in found or not is_pointwise(node):
                continue
            if _shape(node) != rows or gu.val(node).dtype != dtype:
                continue
            if not all(_broadcasts_to(a, rows) for a in node.all_input_nodes):
                continue
            found.append(node)
            frontier.extend(node.all_input_nodes)
        return found

    def _add(self, nodes: list[fx.Node], info: RegionInfo) -> bool:
        # Fused at once, so the cycle check of a later group sees this one contracted.
        if not can_fuse(nodes):
            self.skipped[f"{info.kind}: grouping would create a cycle"] += 1
            return False
        self.assigned.update(nodes)
        self.kinds[info.kind] += 1
        self.fused_ops += len(nodes)
        fuse_region(self.gm, nodes, info)
        return True

    def build(self) -> None:
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            if node.target in GEMM and self._free(node) and gu.val(node) is not None:
                epilogue = self._epilogue(node, _shape(node), gu.val(node).dtype)
                self._add([node, *epilogue], RegionInfo("gemm", op_name(node)))
        for node in nodes:
            if self._free(node) and is_row_reduction(node):
                prologue = self._prologue(node)
                out = gu.val(node)
                epilogue = self._epilogue(node, tuple(out.shape), out.dtype) if out is not None else []
                group = [*prologue, node, *epilogue]
                if not self._add(group, RegionInfo("reduction", op_name(node))) and prologue:
                    self._add([node, *epilogue], RegionInfo("reduction", op_name(node)))
        self._pointwise_components()

    def _pointwise_components(self) -> None:
        nodes = list(self.gm.graph.nodes)
        graph = nx.Graph()
        for node in nodes:
            if self._free(node) and is_pointwise(node):
                graph.add_node(node)
                for user in node.users:
                    if self._free(user) and is_pointwise(user) and _shape(user) == _shape(node):
                        graph.add_edge(node, user)
        order = {n: i for i, n in enumerate(nodes)}
        for component in nx.connected_components(graph):
            if len(component) >= 2:
                group = sorted(component, key=order.__getitem__)
                self._add(group, RegionInfo("pointwise", None))


def form_regions(gm: fx.GraphModule) -> dict:
    """Group ``gm``'s ops into regions in place; returns counts by kind and skipped groups."""
    builder = RegionBuilder(gm)
    builder.build()
    if builder.kinds:
        finish(gm)
    return {"regions": dict(builder.kinds), "fused_ops": builder.fused_ops, "not_fused": dict(builder.skipped)}
