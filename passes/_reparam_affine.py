"""bn_reparam rules for per-channel affine maps next to conv/linear (RepBN, constants).

A per-channel affine map ``A(y)_c = s_c * y_c + t_c`` (``s``, ``t`` constants, or scalars
broadcast to every channel) commutes with the neighbouring conv/linear:

``affine_into_producer``  ``A(op(x))`` for ``op`` a conv or linear whose output is read only
    by ``A``: ``W'[o] = s_o W[o]``, ``b' = s * b + t`` (for a linear ``W' = diag(s) W``; for a
    transposed conv the output channel is dim 1 of each weight group). ``A`` is one of
    ``y * c``, ``y / c``, ``y + c``, ``y - c``, ``c - y``, ``c + alpha * y``, with ``c`` a
    Python number or a frozen constant that varies at most along the producer's channel
    dimension (dim 1 of a conv output, the last dim of a linear output) and does not change
    the output's shape or dtype.

``affine_into_consumer``  ``op(A(x))``: ``W * (s x + t) + b``. Linear: ``W' = W diag(s)``,
    ``b' = b + W t``. Conv (not transposed): ``W'[o, i] = W[o, i] s_{g(o), i}``,
    ``b'_o = b_o + sum_{i,k} W[o, i, k] t_{g(o), i}`` - the shift only when the conv does not
    pad (a padded border sees 0, not ``t``); a pure scale is legal with any padding.

Both see through a chain of ``permute`` / ``view`` nodes between ``A`` and ``op`` (each
read only by the next): an elementwise map commutes with a permutation or reshape once the
channel dimension is followed through it. A reshape that splits or merges the channel
dimension ends the chain (the constant would no longer be per channel).

``token_bn``  eval BatchNorm reached from a conv/linear through such a chain, e.g. LeViT's
    ``Linear -> flatten(0, 1) -> BatchNorm1d -> reshape`` on ``[B, N, C]`` tokens, or
    ``Linear -> transpose(1, 2) -> BatchNorm1d``: BN is the affine map
    ``s = gamma / sqrt(var + eps)``, ``t = beta - s * mu`` on its dim 1, folded as above
    when dim 1 of the BN input is the op's channel (after ``op``) or input feature
    (before a linear / unpadded conv). Chains of length 0 belong to ``conv_bn`` etc.
    After ``op``, a reshape may also split op's channels into BN channels times other
    dims (RepMLP's ``fc3 -> reshape(-1, S, h, w) -> BatchNorm2d(S)``): each BN channel
    then covers a block of op's channels, ``s`` and ``t`` are written out at the BN input's
    shape, carried back through the inverse views and folded when they vary along op's
    channel dim only (``s_f = s_{c(f)}``).

``rep_bn``  SLAB's RepBN ``BN(x) + alpha * x`` where BN runs on a permuted/reshaped view
    of ``x`` (``x.transpose(1, 2) -> BatchNorm1d -> transpose(1, 2)`` on ``[B, N, C]``
    tokens) and ``alpha`` is a scalar constant: ``BN(x) + alpha x = (s + alpha) x + t``
    per channel, rewritten to ``x * (s + alpha) + t`` in ``x``'s own layout (legal when
    the views around BN compose to the identity); the two constant ops then fold into the
    neighbouring linear through the rules above.

Never matched: non-constant operands, constants varying along a non-channel dimension (or
along several), intermediates read by other nodes, dtype promotion. Folding is done in
float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.ir import add_constant
from optcc.rewrite import NOT_ANCHOR, Match, NoMatch, Rule

from ._batchnorm import BATCH_NORM, bn_affine, bn_output
from ._fold import fold_after, fold_before
from ._weights import weight_and_bias

aten = torch.ops.aten
CONV = aten.convolution.default
LINEAR = aten.linear.default
MUL = (aten.mul.Tensor, aten.mul.Scalar)
ADD = (aten.add.Tensor, aten.add.Scalar)
SUB = (aten.sub.Tensor, aten.sub.Scalar)
DIV = (aten.div.Tensor, aten.div.Scalar)
AFFINE_OPS = MUL + ADD + SUB + DIV
# The views the rules see through: an elementwise map commutes with them once the channel
# is followed (optcc.graph_utils' walker; clone, squeeze, expand, ... end a chain here).
TRANSPARENT = gu.PERMUTES + gu.VIEWS
SPLITS_CHANNELS = "a reshape splits or merges the channel dimension"


# ----------------------------------------------------------------------------------------
# Reading the graph


def _reason(stop: gu.Stop) -> str:
    """The near miss of a walk that could not follow the channel through ``stop.node``."""
    return "unknown shapes" if stop.kind == "unknown" else SPLITS_CHANNELS


def _up(node: fx.Node, d: int | None) -> gu.Walk:
    """From ``node`` up through single-user permutes/views (the values a fold removes)."""
    return gu.walk_up(node, d, through=TRANSPARENT, single_user=True)


def _down(node: fx.Node, d: int | None) -> gu.Walk:
    """From ``node`` down to its single consumer through single-user permutes/views."""
    return gu.walk_down(node, d, through=TRANSPARENT)


def _as_affine(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor, torch.Tensor] | str | None:
    """``node = s * x + t`` with constant ``s``, ``t``: (x, s, t); a reason; or None (not affine)."""
    if node.op != "call_function" or node.target not in AFFINE_OPS or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    ca, cb = gu.constant64(gm, a), gu.constant64(gm, b)
    if (ca is None) == (cb is None):
        return "the other operand is not a constant" if ca is None else None
    x, c = (b, ca) if ca is not None else (a, cb)
    if not isinstance(x, fx.Node):
        return None
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    alpha = node.kwargs.get("alpha", 1)
    if node.target in MUL:
        return x, c, zero
    if node.target in DIV:
        if x is not a:
            return "a constant divided by a tensor is not affine"
        if bool((c == 0).any()):
            return "division by zero"
        return x, 1.0 / c, zero
    if node.target in ADD:
        return (x, one, alpha * c) if x is a else (x, one * alpha, c)
    # sub: a - alpha * b
    return (x, one, -alpha * c) if x is a else (x, -alpha * one, c)


def _channel_vector(c: torch.Tensor, shape: tuple[int, ...]) -> tuple[int | None, torch.Tensor] | str:
    """Where a constant broadcast against ``shape`` varies: (dim or None, values)."""
    if c.dim() > len(shape):
        return "the constant has more dimensions than the tensor"
    full = (1,) * (len(shape) - c.dim()) + tuple(c.shape)
    varying = [d for d, n in enumerate(full) if n != 1]
    if not varying:
        return None, c.reshape(())
    if len(varying) > 1:
        return "the constant varies along more than one dimension"
    d = varying[0]
    if full[d] != shape[d]:
        return "the constant broadcasts the tensor to a larger shape"
    return d, c.reshape(-1)


def _channel_dim(op: fx.Node, *, output: bool) -> int | None:
    shape = gu.shape(op) if output else gu.shape(op.args[0])
    if shape is None:
        return None
    if op.target is LINEAR:
        return len(shape) - 1
    return 1


# ----------------------------------------------------------------------------------------
# When a fold into a conv / linear is legal (the fold itself: _fold.py)


def _check_producer(gm, op: fx.Node, d: int | None) -> str | None:
    if op.target not in (CONV, LINEAR):
        return "not a conv/linear"
    if len(op.users) != 1:
        return f"the {_kind(op)} output has other users"
    if d is not None and d != _channel_dim(op, output=True):
        return "the constant varies along a non-channel dimension"
    params = weight_and_bias(gm, op)
    return params if isinstance(params, str) else None


def _check_consumer(gm, op: fx.Node, data: fx.Node, d: int | None, shifts: bool) -> str | None:
    if op.args[0] is not data or data in op.args[1:] or data in op.kwargs.values():
        return f"the value is not the {_kind(op)}'s data input"
    if d is not None and d != _channel_dim(op, output=False):
        return "the constant varies along a non-channel dimension"
    if op.target is CONV:
        if op.args[6]:
            return "transposed convolution (border outputs see fewer taps)"
        if shifts and any(p != 0 for p in op.args[4]):
            return "the convolution pads its input with zeros, not with the shift"
    params = weight_and_bias(gm, op)
    return params if isinstance(params, str) else None


def _kind(op: fx.Node) -> str:
    return "linear" if op.target is LINEAR else "convolution"


def _is_op(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (CONV, LINEAR)


# ----------------------------------------------------------------------------------------
# Rules


def _per_channel(s: torch.Tensor, t: torch.Tensor, shape) -> tuple[int | None, torch.Tensor, torch.Tensor] | str:
    """(channel dim or None for scalars, s, t) of a scale/shift pair, or why it is not per-channel."""
    per = [_channel_vector(c, shape) for c in (s, t)]
    for p in per:
        if isinstance(p, str):
            return p
    dims = {p[0] for p in per if p[0] is not None}
    if len(dims) > 1:
        return "the constant varies along more than one dimension"
    return (dims.pop() if dims else None), per[0][1], per[1][1]


def _bypass(gm: fx.GraphModule, m: Match) -> None:
    """The affine op is folded away: its users read its input instead."""
    m.nodes["anchor"].replace_all_uses_with(m.nodes["x"])
    gm.graph.erase_node(m.nodes["anchor"])


class AffineIntoProducer(Rule):
    """``A(op(x))`` -> ``op'(x)``: W' = diag(s) W, b' = s b + t."""

    name = "affine_into_producer"

    def match(self, gm, node):
        affine = _as_affine(gm, node)
        if affine is None:
            return NOT_ANCHOR
        if isinstance(affine, str):
            # a near miss only when a conv/linear output (read by nothing else) is scaled
            direct = [a for a in node.args[:2] if _is_op(a) and len(a.users) == 1]
            return NoMatch(affine) if direct and node.target in MUL else NOT_ANCHOR
        x, s, t = affine
        op = _up(x, None).node
        if not _is_op(op):
            return NOT_ANCHOR
        if not gu.same_type(node, x):
            return NoMatch("the constant changes the output's shape or dtype")
        per_channel = _per_channel(s, t, gu.shape(x))
        if isinstance(per_channel, str):
            return NoMatch(per_channel)
        d, s, t = per_channel
        traced = _up(x, d)
        if traced.stop:
            return NoMatch(_reason(traced.stop))
        reason = _check_producer(gm, op, traced.dim)
        if reason:
            return NoMatch(reason)
        return Match(nodes={"anchor": node, "x": x, "op": op}, values={"s": s, "t": t})

    def rewrite(self, gm, m):
        fold_after(gm, m.nodes["op"], m.values["s"], m.values["t"], "_affine")
        _bypass(gm, m)


class AffineIntoConsumer(Rule):
    """``op(A(x))`` -> ``op'(x)``: W' = W diag(s), b' = b + W t."""

    name = "affine_into_consumer"

    def match(self, gm, node):
        affine = _as_affine(gm, node)
        if affine is None or isinstance(affine, str):
            return NOT_ANCHOR
        x, s, t = affine
        found = _down(node, None)
        if not _is_op(found.node):
            return NOT_ANCHOR
        op = found.node
        if not gu.same_type(node, x):
            return NoMatch("the constant changes the output's shape or dtype")
        per_channel = _per_channel(s, t, gu.shape(node))
        if isinstance(per_channel, str):
            return NoMatch(per_channel)
        d, s, t = per_channel
        traced = _down(node, d)
        if traced.stop:
            return NoMatch(_reason(traced.stop))
        shifts = bool((t != 0).any())
        reason = _check_consumer(gm, op, found.value, traced.dim, shifts)
        if reason:
            return NoMatch(reason)
        return Match(nodes={"anchor": node, "x": x, "op": op}, values={"s": s, "t": t})

    def rewrite(self, gm, m):
        fold_before(gm, m.nodes["op"], m.values["s"], m.values["t"], "_affine")
        _bypass(gm, m)


class TokenBatchNorm(Rule):
    """BN reached from/into a conv/linear through permutes/views (LeViT's LinearNorm)."""

    name = "token_bn"

    def match(self, gm, node):
        if node.target is not BATCH_NORM:
            return NOT_ANCHOR
        out = bn_output(node)
        inp = node.args[0]
        if out is None or not isinstance(inp, fx.Node):
            return NOT_ANCHOR
        # after a conv/linear
        up = _up(inp, 1) if len(inp.users) == 1 else None
        if up is not None and up.stop and _reason(up.stop) == SPLITS_CHANNELS:
            return self._match_after_split(gm, node, out, inp)
        if up is not None and not up.stop and up.chain and _is_op(up.node):
            op, d = up.node, up.dim
            reason = _check_producer(gm, op, d)
            if reason == "the constant varies along a non-channel dimension":
                reason = f"BatchNorm normalizes a dimension other than the {_kind(op)}'s channels"
            if reason is None:
                affine = bn_affine(gm, node)
                if isinstance(affine, str):
                    return NoMatch(affine)
                return Match(nodes={"bn": node, "out": out, "op": op}, values={"after": True, "st": affine})
            return NoMatch(reason)
        # before a linear / conv
        down = _down(out, 1)
        if not down.stop and down.chain and _is_op(down.node):
            op, d = down.node, down.dim
            reason = _check_consumer(gm, op, down.value, d, shifts=True)
            if reason == "the constant varies along a non-channel dimension":
                reason = f"BatchNorm normalizes a dimension other than the {_kind(op)}'s input channels"
            if reason is None:
                affine = bn_affine(gm, node)
                if isinstance(affine, str):
                    return NoMatch(affine)
                return Match(nodes={"bn": node, "out": out, "op": op}, values={"after": False, "st": affine})
            return NoMatch(reason)
        return NOT_ANCHOR

    def _match_after_split(self, gm, node, out, inp):
        """BN channels that are blocks of the producer's channels (RepMLP's ``fc3_bn``)."""
        walk = _up(inp, None)
        op, chain = walk.node, walk.chain
        if not chain or not _is_op(op):
            return NoMatch(SPLITS_CHANNELS)
        reason = _check_producer(gm, op, None)
        if reason:
            return NoMatch(reason)
        affine = bn_affine(gm, node)
        if isinstance(affine, str):
            return NoMatch(affine)
        per_channel = [_per_channel_through_views(chain, v, gu.shape(inp), op) for v in affine]
        for p in per_channel:
            if isinstance(p, str):
                return NoMatch(p)
        return Match(nodes={"bn": node, "out": out, "op": op}, values={"after": True, "st": tuple(per_channel)})

    def rewrite(self, gm, m):
        s, t = m.values["st"]
        (fold_after if m.values["after"] else fold_before)(gm, m.nodes["op"], s, t, "_affine")
        inp = m.nodes["bn"].args[0]
        m.nodes["out"].replace_all_uses_with(inp)
        gm.graph.erase_node(m.nodes["out"])
        gm.graph.erase_node(m.nodes["bn"])
        # the views that led into BN and out of it may now undo each other (LeViT's
        # flatten/reshape, transpose/transpose): read their source directly
        source, end, ups = _widen(inp, inp)
        if ups:
            end.replace_all_uses_with(source)


MAX_PROBE_ELEMENTS = 1 << 24


def _per_channel_through_views(chain: list[fx.Node], v: torch.Tensor, shape, op: fx.Node) -> torch.Tensor | str:
    """``v`` (one value per dim 1 of ``shape``) seen from ``op``'s output through ``chain``.

    The views may split a channel of ``op`` into several dimensions (``[N, S*h*w, 1, 1] ->
    [N, S, h, w]``), so the constant is written out at full size, carried back through the
    inverse of each view, and must then vary along ``op``'s channel dimension only. (Not
    the graph walker: a split dim has no one dim to follow, so the values are carried.)
    """
    if shape is None or math.prod(shape) > MAX_PROBE_ELEMENTS:
        return "the tensor is too large to follow the channels through its reshapes"
    full = v.reshape([-1 if d == 1 else 1 for d in range(len(shape))]).expand(shape)
    for node in chain:  # from the BN input up to the op's output
        if node.target in gu.PERMUTES:
            rank = full.dim()
            if node.target is aten.transpose.int:
                full = full.transpose(node.args[1] % rank, node.args[2] % rank)
            else:
                full = full.permute([[p % rank for p in node.args[1]].index(d) for d in range(rank)])
        else:
            full = full.reshape(gu.shape(node.args[0]))
    d = _channel_dim(op, output=True)
    rows = full.movedim(d, -1).reshape(-1, full.shape[d])
    if not bool((rows == rows[:1]).all()):
        return "BatchNorm's channels are not blocks of the producer's channels"
    return rows[0].clone()


def _views_compose_to_identity(nodes: list[fx.Node], shape: tuple[int, ...]) -> bool:
    """Do these permute/view nodes (applied in order) map a tensor of ``shape`` onto itself?

    A question about every element at once, not about one dim (a transpose of two equal
    dims keeps every size), so the chain is replayed on an index probe rather than walked."""
    probe = torch.arange(int(torch.Size(shape).numel())).reshape(shape)
    value = probe
    for n in nodes:
        if n.target is aten.transpose.int:
            value = value.transpose(n.args[1], n.args[2])
        elif n.target in gu.PERMUTES:
            value = value.permute(n.args[1])
        else:
            value = value.reshape(n.args[1])
    return tuple(value.shape) == tuple(shape) and torch.equal(value, probe)


def _widen(x: fx.Node, out: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """The widest ``U`` (views above ``x``) and ``V`` (single-user views below ``out``)
    with ``V(U(.))`` the identity: (input of U, output of V, U's nodes from x upwards)."""
    ups = gu.walk_up(x, through=TRANSPARENT).chain
    downs = gu.walk_down(out, through=TRANSPARENT).chain
    for i in range(len(ups), 0, -1):
        shape = gu.shape(ups[i - 1].args[0])
        if shape is None:
            continue
        for j in range(len(downs), 0, -1):
            if _views_compose_to_identity(ups[:i][::-1] + downs[:j], shape):
                return ups[i - 1].args[0], downs[j - 1], ups[:i]
    return x, out, []


class RepBatchNorm(Rule):
    """SLAB RepBN: ``V^-1(BN(V(x))) + alpha * x`` -> ``x * (s + alpha) + t``."""

    name = "rep_bn"

    def match(self, gm, node):
        if node.target not in (aten.add.Tensor,) or node.kwargs.get("alpha", 1) != 1:
            return NOT_ANCHOR
        for a, mul in (node.args[:2], node.args[1::-1]):
            if not (isinstance(mul, fx.Node) and mul.target in MUL and isinstance(a, fx.Node)):
                continue
            # a = chain_after(getitem(BN(chain_before(x))))
            walk = gu.walk_up(a, through=TRANSPARENT)
            after, g = walk.chain, walk.node
            if g.target is not operator.getitem or g.args[1] != 0 or g.args[0].target is not BATCH_NORM:
                continue
            bn = g.args[0]
            for x, alpha_arg in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
                if not isinstance(x, fx.Node):
                    continue
                walk = gu.walk_up(bn.args[0], through=TRANSPARENT, until=x)
                if walk.node is not x:
                    continue
                before_bn = walk.chain
                alpha = gu.constant64(gm, alpha_arg)
                if alpha is None or alpha.numel() != 1:
                    return NoMatch("alpha is not a scalar constant")
                alpha = alpha.reshape(())
                shape = gu.shape(x)
                if shape is None or not gu.same_type(node, x) or not gu.same_type(mul, x):
                    return NoMatch("the sum does not have x's shape and dtype")
                if not _views_compose_to_identity(before_bn[::-1] + after[::-1], shape):
                    return NoMatch("the views around BatchNorm do not undo each other")
                if bn_output(bn) is not g or any(len(n.users) != 1 for n in [g, *after, mul]):
                    return NoMatch("an intermediate of the RepBN block has other users")
                # x = U(x0) and the sum is read through V, with V(U(.)) the identity
                # (transpose -> RepBN -> transpose): work on x0 and replace V's output.
                x0, out, _ = _widen(x, node)
                channel = gu.walk_up(bn.args[0], 1, through=TRANSPARENT, until=x0)  # BN's dim 1 in x0
                if channel.stop:
                    return NoMatch(_reason(channel.stop))
                d = channel.dim
                affine = bn_affine(gm, bn)
                if isinstance(affine, str):
                    return NoMatch(affine)
                s, t = affine
                return Match(nodes={"add": out, "x": x0},
                             values={"s": s + alpha, "t": t, "dim": d, "rank": len(gu.shape(x0))})
        return NOT_ANCHOR

    def rewrite(self, gm, m):
        add, x = m.nodes["add"], m.nodes["x"]
        dtype = gu.dtype(x)
        shape = [1] * m.values["rank"]
        shape[m.values["dim"]] = -1
        s = add_constant(gm, "rep_bn_scale", m.values["s"].to(dtype).reshape(shape), before=add)
        t = add_constant(gm, "rep_bn_shift", m.values["t"].to(dtype).reshape(shape), before=add)
        with gm.graph.inserting_before(add):
            scaled = gm.graph.call_function(aten.mul.Tensor, (x, s))
            shifted = gm.graph.call_function(aten.add.Tensor, (scaled, t))
        scaled.meta["val"] = shifted.meta["val"] = add.meta["val"]
        add.replace_all_uses_with(shifted)


RULES: list[Rule] = [RepBatchNorm(), TokenBatchNorm(), AffineIntoProducer(), AffineIntoConsumer()]
