"""Attention canonicalization: every softmax attention becomes one SDPA node.

Whatever idiom wrote it (``q @ k.transpose(-2, -1) * scale``, ``einsum``, ``bmm`` on
flattened heads, ``nn.MultiheadAttention``, transformers' eager attention), softmax
attention is, in the canonical IR, a chain

    S = view(bmm(flatten(s_q Q), flatten(s_k K)^T))          scores, [*b, L, S]
    S' = s S  (+ M  |  masked_fill(C, f))                    scale, then one mask
    O = view(bmm(flatten(softmax(S', -1)), flatten(V)))      [*b, L, Dv]

which equals ``scaled_dot_product_attention(Q, K, V, attn_mask=M', dropout_p=0,
is_causal=False, scale=s * s_q * s_k)`` with ``M' = M`` for an additive mask,
``M' = not C`` (boolean) for a ``-inf`` fill and ``M' = where(C, f, 0)`` for a finite
fill. Where a ``-inf`` fill can mask a whole row, the original's softmax gives NaN for
that query and SDPA gives 0, so the NaN is put back: ``where(all(C, -1), nan, O)`` -
unless the probabilities are ``where(isnan(P), 0, P)`` (what torch.onnx writes after a
masked softmax, as torch's SDPA does), which is SDPA's 0. The softmax is the rule's anchor;
the match is legal only when

* the softmax runs over the key axis (the last one),
* every intermediate (scores, scaled scores, probabilities) has exactly one user — a
  score tensor read elsewhere must still be computed, so nothing would be saved,
* the scale is applied before the mask (a mask added first would be scaled too),
* the data-movement ops (view, permute, expand, clone, ...) between a bmm operand and
  the tensor we hand to SDPA only flatten the batch dimensions. This is checked exactly,
  not by pattern: the chain is replayed on a strided *meta* tensor whose strides are the
  row-major index labels of the source; the operand is a batch-flatten of the source
  iff the replayed strides equal those of ``source.reshape(operand.shape)``. Scalar
  ``mul``/``div`` ops met on the way commute with data movement and fold into the scale.

Every SDPA node (written by the model or by the rule above) is then put in one form:
positional ``(q, k, v, attn_mask, dropout_p, is_causal)`` and an explicit ``scale``
(``1/sqrt(E)`` when it was left to the default). A mask computed from constants alone
is evaluated once: an all-true / all-zero mask is dropped, and a lower-triangular one
(top-left aligned, the same for every batch and head) becomes ``is_causal=True``. Each
of these is an identity of the math, so the canonicalization is exact (up to the order
of floating-point accumulation inside the kernel).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.ir import get_constant, insert_call, op_name
from optcc.rewrite import NOT_ANCHOR, Match, NoMatch, Rule

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SOFTMAX = aten.softmax.int
BMM = aten.bmm.default

# Data-movement ops: how each one maps an index-label tensor (see the module docstring).
# optcc.graph_utils' walker collects the chains; whether a chain as a whole is a batch
# flatten of its source is a question about every index at once (a layout), not about one
# dim, so it is answered by replaying labels. ``view`` here, unlike a reshape, fails where
# the labels would have to be copied: such a chain is not a view of the source.
_MOVE: dict[Any, Callable[[torch.Tensor, fx.Node], torch.Tensor]] = {
    aten.view.default: lambda t, n: t.view(n.args[1]),
    aten._unsafe_view.default: lambda t, n: t.view(n.args[1]),
    aten.reshape.default: lambda t, n: t.view(n.args[1]),
    aten.permute.default: lambda t, n: t.permute(n.args[1]),
    aten.transpose.int: lambda t, n: t.transpose(n.args[1], n.args[2]),
    aten.unsqueeze.default: lambda t, n: t.unsqueeze(n.args[1]),
    aten.squeeze.dim: lambda t, n: t.squeeze(n.args[1]),
    aten.squeeze.dims: lambda t, n: t.squeeze(tuple(n.args[1])),
    aten.squeeze.default: lambda t, n: t.squeeze(),
    aten.expand.default: lambda t, n: t.expand(n.args[1]),
    aten.clone.default: lambda t, n: t,
    aten.alias.default: lambda t, n: t,
}
_SCALE_OPS = {aten.mul.Tensor: lambda c: c, aten.div.Tensor: lambda c: 1.0 / c}


def _labels(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def _replay(chain: list[fx.Node], shape: tuple[int, ...]) -> torch.Tensor | None:
    """Index labels after ``chain`` (source first) from a row-major source of ``shape``."""
    labels = _labels(shape)
    try:
        for node in chain:
            if node.target in _MOVE:
                labels = _MOVE[node.target](labels, node)
    except RuntimeError:  # a view that is not affine in the source's indices
        return None
    return labels


def _same_labels(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    if a is None or a.shape != b.shape or a.storage_offset() != b.storage_offset():
        return False
    return all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.shape[d] > 1)


def _scalar_factor(node: fx.Node) -> float | None:
    """``c`` when ``node`` is ``x * c`` or ``x / c`` with a Python number ``c`` or a frozen
    one-element tensor (ONNX files hold the scale as a constant) that leaves the shape and
    dtype of ``x`` as they are."""
    if node.target in _SCALE_OPS and len(node.args) == 2:
        c = gu.scalar_value(node.graph.owning_module, node.args[1])
        if isinstance(node.args[1], fx.Node) and (
                gu.shape(node) != gu.shape(node.args[0]) or gu.dtype(node) != gu.dtype(node.args[0])):
            return None
        if c is not None and c != 0:
            return _SCALE_OPS[node.target](c)
    return None


def find_source(
    operand: fx.Node,
    want: tuple[int, ...],
    relate: Callable[[torch.Tensor], torch.Tensor],
    allow_scale: bool,
) -> tuple[fx.Node, float] | None:
    """The node furthest up ``operand``'s data-movement chain of shape ``want`` with
    ``operand == factor * relate(node)`` exactly; returns ``(node, factor)``."""

    def passable(node: fx.Node) -> bool:
        return node.target in _MOVE or (allow_scale and _scalar_factor(node) is not None)

    lineage = gu.walk_up(operand, through=passable).lineage  # operand first
    factor, best = 1.0, None
    for i, candidate in enumerate(lineage):
        if gu.shape(candidate) == want and _same_labels(_replay(lineage[:i][::-1], want), relate(_labels(want))):
            best = (candidate, factor)
        c = _scalar_factor(candidate) if allow_scale and candidate.target not in _MOVE else None
        if c is not None:
            factor *= c
    return best


def _is_move(node: fx.Node) -> bool:
    return node.target in _MOVE


class AttentionFromMatmuls(Rule):
    """softmax(s Q K^T + M) V written with bmm/matmul/einsum -> one SDPA node."""

    name = "attention"

    def match(self, gm: fx.GraphModule, softmax: fx.Node) -> Match | NoMatch:
        if softmax.target is not SOFTMAX:
            return NOT_ANCHOR
        # Walk back from the softmax over mask and scale ops to the scores' bmm.
        ops, node = [], softmax.args[0]
        while isinstance(node, fx.Node) and node.target is not BMM and not _is_move(node):
            ops.append(node)
            node = self._score_input(gm, node)
            if node is None:
                return NoMatch(f"{op_name(ops[-1])} between the scores and the softmax")
        walk = gu.walk_up(node, through=_MOVE) if isinstance(node, fx.Node) else None
        moves, node = (walk.chain, walk.node) if walk else ([], node)
        if not isinstance(node, fx.Node) or node.target is not BMM:
            return NOT_ANCHOR  # a softmax that is not attention
        scores_mm = node
        scores = moves[0] if moves else scores_mm
        shape = gu.shape(scores)
        mm_shape = gu.shape(scores_mm)
        if shape is None or mm_shape is None:
            return NoMatch("symbolic or unknown shapes")
        dim = softmax.args[1] % len(shape)
        if dim != len(shape) - 1:
            return NoMatch("softmax is not over the key axis")
        dtype = softmax.args[2] if len(softmax.args) > 2 else softmax.kwargs.get("dtype")
        if dtype is not None and dtype != scores.meta["val"].dtype:
            return NoMatch("softmax changes the dtype")
        if not _same_labels(_replay(list(reversed(moves)), mm_shape), _labels(mm_shape).reshape(shape)):
            return NoMatch("the scores are not the bmm result with its batch unflattened")
        for n in [scores_mm, *reversed(moves), *reversed(ops)]:
            if len(n.users) != 1:
                return NoMatch("the attention scores are used elsewhere")

        # Scale and mask, in graph order (the scale must come before the mask).
        scale, mask = 1.0, None
        for op in reversed(ops):
            c = _scalar_factor(op)
            if c is not None:
                if mask is not None:
                    return NoMatch("the scores are scaled after the mask is added")
                scale *= c
                continue
            if mask is not None:
                return NoMatch("more than one mask")
            mask = self._mask_of(gm, op, shape, scores)
            if isinstance(mask, NoMatch):
                return mask

        # From the probabilities to the second bmm.
        guard = _nan_guard(gm, softmax)
        probabilities = guard if guard is not None else softmax
        p_moves = gu.walk_down(probabilities, through=_MOVE).chain
        if guard is None and len(softmax.users) != 1:
            return NoMatch("the attention probabilities are used elsewhere")
        last = p_moves[-1] if p_moves else probabilities
        users = list(last.users)
        if len(users) != 1 or users[0].target is not BMM or users[0].args[0] is not last:
            return NoMatch("the probabilities do not feed a bmm with the values")
        out_mm = users[0]
        bh, length, keys = mm_shape
        if not _same_labels(_replay(p_moves, shape), _labels(shape).reshape(mm_shape)):
            return NoMatch("the probabilities are reordered before the bmm with the values")

        batch = shape[:-2]
        q_arg, kt_arg, v_arg = scores_mm.args[0], scores_mm.args[1], out_mm.args[1]
        head_dim = gu.shape(q_arg)[-1]
        value_dim = gu.shape(out_mm)[-1]
        q = find_source(q_arg, (*batch, length, head_dim), lambda t: t.reshape(bh, length, head_dim), True)
        k = find_source(
            kt_arg, (*batch, keys, head_dim), lambda t: t.reshape(bh, keys, head_dim).transpose(1, 2), True
        )
        v = find_source(v_arg, (*batch, keys, value_dim), lambda t: t.reshape(bh, keys, value_dim), False)

        out_moves = gu.walk_down(out_mm, through=_MOVE).chain
        out_shape = (*batch, length, value_dim)
        replaced = out_mm
        for i, n in enumerate(out_moves):
            if gu.shape(n) == out_shape and _same_labels(
                _replay(out_moves[: i + 1], (bh, length, value_dim)), _labels((bh, length, value_dim)).reshape(out_shape)
            ):
                replaced = n
        return Match(
            nodes={"softmax": softmax, "out_mm": out_mm, "replaced": replaced, "q_arg": q_arg, "kt_arg": kt_arg, "v_arg": v_arg},
            values={"q": q, "k": k, "v": v, "scale": scale, "mask": mask, "batch": batch,
                    "dims": (bh, length, keys, head_dim, value_dim), "nan_guard": guard is not None},
        )

    @staticmethod
    def _score_input(gm: fx.GraphModule, op: fx.Node) -> fx.Node | None:
        """The scores operand of a scale or mask op, or None if ``op`` is neither."""
        if _scalar_factor(op) is not None:
            return op.args[0]
        if op.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in op.args[:2]):
            # which side is the scores: the one whose chain reaches a bmm (checked by the caller)
            a, b = op.args[:2]
            return a if _reaches_bmm(a) else b
        if op.target is aten.where.self:
            _, x, y = op.args
            if gu.scalar_value(gm, x) is not None and isinstance(y, fx.Node):
                return y
            if gu.scalar_value(gm, y) is not None and isinstance(x, fx.Node):
                return x
        return None

    @staticmethod
    def _mask_of(gm, op: fx.Node, shape: tuple[int, ...], scores: fx.Node):
        """``("add", M)`` or ``("fill", C, f, keep_where_true)``; NoMatch when illegal."""
        if op.target is aten.add.Tensor:
            a, b = op.args[:2]
            mask = b if _reaches_bmm(a) else a
            if not gu.broadcasts_to(mask, shape):
                return NoMatch("the mask does not broadcast to the scores")
            if mask.meta["val"].dtype != scores.meta["val"].dtype:
                return NoMatch("the additive mask has another dtype than the scores")
            return ("add", mask)
        cond, x, y = op.args
        keep = gu.scalar_value(gm, x) is None  # where(C, scores, f) keeps the scores where C holds
        fill = gu.scalar_value(gm, y if keep else x)
        if not isinstance(cond, fx.Node) or cond.meta["val"].dtype != torch.bool or not gu.broadcasts_to(cond, shape):
            return NoMatch("the masked_fill condition does not broadcast to the scores")
        return ("fill", cond, fill, keep)

    def rewrite(self, gm: fx.GraphModule, m: Match) -> None:
        graph = gm.graph
        bh, length, keys, head_dim, value_dim = m.values["dims"]
        batch = m.values["batch"]
        replaced = m.nodes["replaced"]
        dtype = replaced.meta["val"].dtype
        with graph.inserting_before(replaced):

            def operand(found, arg, want, transpose):
                if found is not None:
                    return found
                node = insert_call(graph, aten.transpose.int, (arg, 1, 2)) if transpose else arg
                if gu.shape(node) != want:
                    node = insert_call(graph, aten.reshape.default, (node, list(want)))
                return node, 1.0

            q, q_scale = operand(m.values["q"], m.nodes["q_arg"], (*batch, length, head_dim), False)
            k, k_scale = operand(m.values["k"], m.nodes["kt_arg"], (*batch, keys, head_dim), True)
            v, _ = operand(m.values["v"], m.nodes["v_arg"], (*batch, keys, value_dim), False)
            attn_mask, all_masked = None, None
            mask = m.values["mask"]
            if mask is not None and mask[0] == "add":
                attn_mask = mask[1]
            elif mask is not None:
                _, cond, fill, keep = mask
                if fill == -math.inf:
                    attn_mask = cond if keep else insert_call(graph, aten.logical_not.default, (cond,))
                    if not _every_row_keeps_a_key(gm, cond, keep):
                        some = insert_call(graph, aten.any.dim, (attn_mask, -1, True))
                        all_masked = insert_call(graph, aten.logical_not.default, (some,))
                else:
                    fill_node = insert_call(graph, aten.scalar_tensor.default, (fill,), {"dtype": dtype})
                    zero = insert_call(graph, aten.scalar_tensor.default, (0.0,), {"dtype": dtype})
                    args = (cond, zero, fill_node) if keep else (cond, fill_node, zero)
                    attn_mask = insert_call(graph, aten.where.self, args)
            scale = m.values["scale"] * q_scale * k_scale
            out = insert_call(graph, SDPA, (q, k, v, attn_mask, 0.0, False), {"scale": scale})
            if all_masked is not None and not m.values["nan_guard"]:
                # softmax of a row of -inf is NaN in the original; SDPA returns 0 there.
                nan = insert_call(graph, aten.scalar_tensor.default, (math.nan,), {"dtype": dtype})
                out = insert_call(graph, aten.where.self, (all_masked, nan, out))
            if gu.shape(replaced) != gu.shape(out):
                out = insert_call(graph, aten.reshape.default, (out, list(gu.shape(replaced))))
        replaced.replace_all_uses_with(out)


def _nan_guard(gm: fx.GraphModule, softmax: fx.Node) -> fx.Node | None:
    """The ``where(isnan(P), 0, P)`` node on the probabilities ``P``, or None. torch.onnx
    writes it after every masked softmax: torch's SDPA gives 0 for a query that sees no key
    (the NaN of a softmax over -inf only), and so does the SDPA node that replaces both."""
    users = list(softmax.users)
    isnan = next((u for u in users if u.target is aten.isnan.default), None)
    where = next((u for u in users if u.target is aten.where.self), None)
    if len(users) != 2 or isnan is None or where is None or len(isnan.users) != 1:
        return None
    if where.args[0] is not isnan or where.args[2] is not softmax or gu.scalar_value(gm, where.args[1]) != 0.0:
        return None
    if gu.shape(where) != gu.shape(softmax) or gu.dtype(where) != gu.dtype(softmax):
        return None
    return where


def _every_row_keeps_a_key(gm: fx.GraphModule, cond: fx.Node, keep: bool) -> bool:
    """Whether a constant masked_fill condition leaves every query at least one key."""
    value = constant_value(gm, cond)
    if value is None:
        return False
    kept = value if keep else ~value
    return bool(kept.any(-1).all())


def _reaches_bmm(node: Any) -> bool:
    """Whether ``node`` is the scores side: scale/mask/data-movement ops down to a bmm."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 64:
        if node.target is BMM:
            return True
        if _is_move(node) or _scalar_factor(node) is not None:
            node = node.args[0]
        elif node.target in (aten.add.Tensor, aten.where.self):
            return any(_reaches_bmm(a) for a in node.args[:3] if isinstance(a, fx.Node))
        else:
            return False
        seen += 1
    return False


# ----------------------------------------------------------------------------------------
# The canonical SDPA form


_MAX_CONSTANT_MASK = 1 << 22


def constant_value(gm: fx.GraphModule, node: fx.Node, limit: int = _MAX_CONSTANT_MASK) -> torch.Tensor | None:
    """Evaluate ``node`` when it depends on constants only (no inputs, nothing random)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() > limit:
        return None
    needed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        if n.op == "placeholder" or n.op not in ("get_attr", "call_function"):
            return None
        if n.op == "call_function":
            if not isinstance(n.target, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded in n.target.tags:
                return None
            out = n.meta.get("val")
            if isinstance(out, torch.Tensor) and out.numel() > limit:
                return None
        needed.add(n)
        stack.extend(n.all_input_nodes)
    env: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n not in needed:
            continue
        if n.op == "get_attr":
            env[n] = get_constant(gm, n)
            if env[n] is None:
                return None
        else:
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
    return env[node]


def _mask_simplification(gm, mask: fx.Node, q_shape, k_shape) -> str | None:
    """``"drop"`` for a mask that masks nothing, ``"causal"`` for a top-left causal one."""
    value = constant_value(gm, mask)
    if value is None:
        return None
    if value.dtype == torch.bool:
        allowed = value
    elif value.is_floating_point():
        if bool((value == 0).all()):
            return "drop"
        allowed = None
    else:
        return None
    if allowed is not None and bool(allowed.all()):
        return "drop"
    length, keys = q_shape[-2], k_shape[-2]
    if value.shape[-2:] != (length, keys):
        return None
    causal = torch.ones(length, keys, dtype=torch.bool).tril()
    if allowed is None:
        # Additive: 0 where allowed, and -inf or the dtype's lowest value where not, whose
        # exp underflows to exactly 0 next to the (always allowed) diagonal.
        lowest = torch.finfo(value.dtype).min
        if not bool(((value == 0) == causal).all()) or not bool((value[..., ~causal] <= lowest).all()):
            return None
        return "causal"
    return "causal" if bool((allowed == causal).all()) else None


def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class CanonicalSDPA(Rule):
    """Explicit scale and positional args; constant masks dropped or turned into is_causal."""

    name = "sdpa_canonical"

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | NoMatch:
        if node.target is not SDPA:
            return NOT_ANCHOR
        args = list(node.args[:3])
        attn_mask = _argument(node, 3, "attn_mask", None)
        dropout_p = _argument(node, 4, "dropout_p", 0.0)
        is_causal = _argument(node, 5, "is_causal", False)
        q_shape, k_shape = gu.shape(args[0]), gu.shape(args[1])
        if q_shape is None or k_shape is None:
            return NoMatch("symbolic or unknown shapes")
        scale = node.kwargs.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(q_shape[-1])
        if isinstance(attn_mask, fx.Node) and not is_causal:
            simplified = _mask_simplification(gm, attn_mask, q_shape, k_shape)
            if simplified is not None:
                attn_mask = None
                is_causal = simplified == "causal"
        kwargs = {"scale": float(scale)}
        if node.kwargs.get("enable_gqa"):
            kwargs["enable_gqa"] = True
        new_args = (*args, attn_mask, float(dropout_p), bool(is_causal))
        if new_args == tuple(node.args) and kwargs == dict(node.kwargs):
            return NOT_ANCHOR  # already canonical
        return Match(nodes={"sdpa": node}, values={"args": new_args, "kwargs": kwargs})

    def rewrite(self, gm: fx.GraphModule, m: Match) -> None:
        node = m.nodes["sdpa"]
        node.args = m.values["args"]
        node.kwargs = m.values["kwargs"]


RULES = [AttentionFromMatmuls(), CanonicalSDPA()]
