"""token_pruning: ToMe token merging or EViT top-k token pruning inside any transformer graph.

Where: in every chosen transformer block (``_token_blocks``: the canonical SDPA node, the
residual add after its projection, the residual stream), between attention and MLP -
ToMe's place, so the MLP and every later block see fewer tokens. ``r`` tokens go per
chosen block; the schedule is a constant, a per-block list, ToMe's ``(r, inflection)``
(``r (1 - i)`` rising linearly to ``r (1 + i)``), or ``{"flops": f}``: the smallest
constant ``r`` that removes the fraction ``f`` of the blocks' attention + MLP FLOPs,
counted from the graph (``_token_blocks.BlockFlops``).

``method="tome"`` (bipartite soft matching, :mod:`optcc.kernels.token_merge`): metric
``K`` = the block's SDPA key averaged over heads; tokens alternate into sets A and B; each
A token's best B partner by cosine; the ``r`` best edges merge, ``x' = sum s x / sum s``
with sizes ``s`` (1 at the start) carried through the rest of the graph. Proportional
attention (``proportional_attention``, on by default; off for MAE-style models): every
later SDPA adds ``log s_j`` along its keys, so a merged token gets the attention of the
tokens it stands for: ``softmax(q k_j + log s_j) = s_j e^{q k_j} / sum_i s_i e^{q k_i}``.

``method="topk"`` (EViT): the class token's attention ``a = mean_h softmax(q_0 K^T s + M)``
(computed for the chosen blocks only); the ``N - P - r - 1`` unprotected tokens of
highest ``a`` are kept, the others fuse into one token, ``sum a s x / sum a s`` (EViT
sums ``a x`` unnormalized; it was trained with that, a training-free rewrite keeps the
fused token on the stream's scale).

Protected tokens (``P``, never merged, kept in front): the learned tokens concatenated
before the first block's tokens (class, distillation, register tokens), and every token a
readout selects by index (BERT's pooler reads token 0); ``protected=`` overrides.
Padding: an additive or boolean key-padding mask is read once per captured token; tokens
merge only with tokens of the same mask value, and the mask follows the representatives.

The graph after each reduction follows the shorter token axis (``_token_follow``):
reshapes are re-derived, mean/sum over tokens become size-weighted, and what cannot
follow (a dense output, a grid reshape for a decoder, an op that mixes in a value with
all tokens) reads the tokens unmerged back to where they came from, each listed in
``stats["unmerged"]``. A graph without a block the pass can follow is left unchanged
with the reason in ``stats["missed"]`` / ``near_misses`` (``--explain``).
"""

from __future__ import annotations

import math
import operator
import typing
from dataclasses import dataclass

import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.ir import drop_unused_constants, refresh_meta
from optcc.kernels import token_merge as ops
from optcc.pass_base import Knob, OptionError, Pass, PassResult, register_pass
from optcc.rewrite import NearMiss, source_line

from . import _key_padding as key_padding
from . import _token_blocks as tb
from . import _token_follow as tf

aten = torch.ops.aten

Schedule = typing.Union[int, list, tuple, dict]


def parse_r(schedule: Schedule, layers: int) -> list[int]:
    """ToMe's ``parse_r``: tokens removed per block from a constant, list or ``(r, inflection)``."""
    if isinstance(schedule, bool):
        raise OptionError("option 'r' of pass 'token_pruning' must be an int, a list, (r, inflection) or "
                          "{'flops': f}")
    if isinstance(schedule, int):
        return [schedule] * layers
    if isinstance(schedule, list):
        return [int(x) for x in schedule[:layers]] + [0] * max(0, layers - len(schedule))
    if isinstance(schedule, tuple) and len(schedule) == 2:
        r, inflect = schedule
        low = int(r * (1.0 - inflect))
        high = 2 * r - low
        step = (high - low) / max(layers - 1, 1)
        return [int(low + step * i) for i in range(layers)]
    raise OptionError(f"option 'r' of pass 'token_pruning': {schedule!r} is not an int, a list, "
                      f"(r, inflection) or {{'flops': f}}")


def _caps(blocks, schedule: list[int], protected: int, method: str) -> tuple[list[int], list[int]]:
    """Clamp each block's r to what its tokens allow; the token count entering each block."""
    tokens, result, entering = blocks[0].tokens, [], []
    for r in schedule:
        entering.append(tokens)
        free = tokens - protected
        cap = free // 2 if method == "tome" else free - 2
        r = max(0, min(int(r), cap))
        result.append(r)
        tokens -= r
    return result, entering


def flops_kept(flops: list[tb.BlockFlops], schedule: list[int], entering: list[int]) -> float:
    total = sum(f.total for f in flops)
    kept = sum(f.at(n, n - r) for f, r, n in zip(flops, schedule, entering))
    return kept / total if total else 1.0


def _flops_schedule(target: float, blocks, flops, protected, method) -> list[int]:
    best = None
    for r in range(0, blocks[0].tokens):
        schedule, entering = _caps(blocks, [r] * len(blocks), protected, method)
        best = schedule
        if 1.0 - flops_kept(flops, schedule, entering) >= target:
            return schedule
    return best


@register_pass
class TokenPruning(Pass):
    """Insert ToMe token merging or EViT top-k pruning between attention and MLP of transformer blocks (approximate)."""

    name = "token_pruning"
    exact = False
    run_after = ("canonicalize_attention", "bn_reparam")
    requires = ("canonicalize_attention",)  # it matches the canonical SDPA node alone
    run_before = ("int8_decomposition", "block_fusion")

    @dataclass
    class Options:
        r: Schedule = 8
        method: str = "tome"
        proportional_attention: bool = True
        protected: typing.Optional[int] = None

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if o.method not in ("tome", "topk"):
            raise OptionError(f"token_pruning: method must be 'tome' or 'topk', got {o.method!r}")
        if isinstance(o.r, dict):
            if set(o.r) != {"flops"}:
                raise OptionError(f"token_pruning: r as a dict takes one key, 'flops', got {sorted(o.r)}")
            if not 0.0 < float(o.r["flops"]) < 1.0:
                raise OptionError(f"token_pruning: r={{'flops': {o.r['flops']}}} must be a fraction of the "
                                  f"FLOPs to remove, in (0, 1)")
        else:
            parse_r(o.r, 1)

    def run(self, gm: fx.GraphModule) -> PassResult:
        o = self.options
        blocks, missed = tb.find_blocks(gm)
        if not blocks:
            why = missed or ["the graph has no attention (scaled_dot_product_attention node, which "
                             "canonicalize_attention makes of every softmax attention it recognises)"]
            return self._unchanged(gm, why, [n for n in gm.graph.nodes if n.target is tb.SDPA])
        protected = o.protected if o.protected is not None else tb.protected_prefix(blocks[0])
        for _ in range(8):
            backup = _copy_graph(gm.graph)
            try:
                stats = self._rewrite(gm, blocks, protected)
            except tf.ProtectMore as more:
                gm.graph = backup
                blocks, _ = tb.find_blocks(gm)
                if o.protected is not None:
                    return self._unchanged(gm, [f"{more}, but only {protected} tokens are protected"], [])
                protected = more.count
                continue
            except tf.NotFollowable as why:
                gm.graph = backup
                gm.recompile()
                drop_unused_constants(gm)  # constants the attempt added
                return self._unchanged(gm, [str(why)], [why.node])
            stats["missed"] = {f"token_pruning: {m}": 1 for m in missed}
            return PassResult(gm, stats["matches"] > 0, stats)
        raise AssertionError("protected token count did not settle")

    #: tokens a block may remove, as fractions of the first block's tokens, for a budget search
    SEARCH_FRACTIONS = (1 / 24, 1 / 12, 1 / 6)

    def knobs(self, gm: fx.GraphModule) -> list[Knob]:
        """One knob per block: r, a fraction of the first block's (unprotected) tokens.

        ``flops_saved`` is that block's r alone, counted with :class:`_token_blocks.BlockFlops`;
        the knob's name is the block index, as the per-block ``r`` list takes it.
        """
        blocks, _ = tb.find_blocks(gm)
        if not blocks:
            return []
        protected = self.options.protected if self.options.protected is not None else tb.protected_prefix(blocks[0])
        flops = tb.block_flops(gm, blocks)
        total = sum(f.total for f in flops)
        free = blocks[0].tokens - protected
        candidates = sorted({max(1, round(free * f)) for f in self.SEARCH_FRACTIONS})
        knobs = []
        for i, block in enumerate(blocks):
            settings, saved = [], []
            for r in candidates:
                schedule, entering = _caps(blocks, [0] * i + [r] + [0] * (len(blocks) - i - 1), protected,
                                           self.options.method)
                if schedule[i] != r:
                    continue
                settings.append(r)
                saved.append(total * (1.0 - flops_kept(flops, schedule, entering)))
            if settings:
                knobs.append(Knob(f"block {block.index}", tuple(settings), tuple(saved), flops[i].total))
        return knobs

    def configure(self, choices: dict) -> list[Pass]:
        if not choices:
            return []
        last = max(int(layer.split()[-1]) for layer in choices)
        schedule = [int(choices.get(f"block {i}", 0)) for i in range(last + 1)]
        options = {**vars(self.options), "r": schedule}
        return [TokenPruning(**options)]

    def _unchanged(self, gm, reasons: list[str], nodes: list[fx.Node]) -> PassResult:
        near = [NearMiss("token_pruning", r, n.name if hasattr(n, "name") else "", source_line(n))
                for r, n in zip(reasons, nodes + [None] * len(reasons)) if n is not None]
        near += [NearMiss("token_pruning", r, "") for r, n in zip(reasons, nodes + [None] * len(reasons))
                 if n is None]
        stats = {"matches": 0, "missed": {f"token_pruning: {r}": 1 for r in reasons}, "near_misses": near,
                 "message": "left unchanged: " + "; ".join(reasons)}
        return PassResult(gm, False, stats)

    def _schedule(self, gm, blocks, protected):
        flops = tb.block_flops(gm, blocks)
        r = self.options.r
        if isinstance(r, dict):
            schedule = _flops_schedule(float(r["flops"]), blocks, flops, protected, self.options.method)
        else:
            schedule = parse_r(r, len(blocks))
        schedule, entering = _caps(blocks, schedule, protected, self.options.method)
        return schedule, entering, flops

    def _rewrite(self, gm, blocks, protected) -> dict:
        o = self.options
        schedule, entering, flops = self._schedule(gm, blocks, protected)
        graph = gm.graph
        insert = tf.Inserter(graph)
        ctx = tf.Context(key_bias=None, proportional=o.proportional_attention and o.method == "tome",
                         masks={b.sdpa: b.query_layout for b in blocks}, padding_masks=set(), unmerged=[])
        first = next((i for i, r in enumerate(schedule) if r > 0), None)
        if first is not None:
            self._read_key_padding(gm, insert, blocks[first:], ctx)
        gen = None
        layers = []
        for block, r in zip(blocks, schedule):
            if r <= 0:
                continue
            gen = self._reduce(graph, insert, block, r, protected, gen, ctx)
            layers.append({"block": block.index, "r": r, "tokens": gen.before, "after": gen.after})
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        refresh_meta(gm)
        kept = flops_kept(flops, schedule, entering)
        tokens = [blocks[0].tokens] + [entering[i] - schedule[i] for i in range(len(blocks))]
        message = (f"{o.method}: {len(layers)} of {len(blocks)} blocks reduce tokens, {tokens[0]} -> {tokens[-1]}; "
                   f"{1.0 - kept:.0%} of the blocks' attention + MLP FLOPs removed")
        if ctx.unmerged:
            message += "; tokens unmerged at " + ", ".join(f"%{n} ({why})" for n, why in ctx.unmerged)
        return {"matches": len(layers), "message": message, "method": o.method, "blocks": len(blocks), "schedule": schedule,
                "protected": protected, "layers": layers, "tokens": tokens,
                "flops_removed": 1.0 - kept, "unmerged": [f"%{n}: {why}" for n, why in ctx.unmerged],
                "near_misses": []}

    def _read_key_padding(self, gm, insert, blocks, ctx) -> None:
        """``ctx.key_bias [B, N]`` from the attention masks of the blocks that see reduced
        tokens, when they are one key-padding mask (constant along the queries)."""
        masks = {b.sdpa.args[3] for b in blocks if len(b.sdpa.args) > 3 and b.sdpa.args[3] is not None}
        if not masks:
            return
        graph = gm.graph
        sources = {}
        for mask in masks:
            src = key_padding.source(gm, mask)
            if src is None:
                return  # SDPA nodes with such masks read unmerged tokens (the follow says so)
            sources[mask] = src
        distinct = {id(s) for s in sources.values()}
        if len(distinct) != 1:
            return
        src = next(iter(sources.values()))
        batch = blocks[0].batch
        with graph.inserting_before(src.next):
            bias = key_padding.bias_rows(insert, src, batch)
        if bias is None:
            return
        ctx.key_bias = bias
        ctx.padding_masks = set(masks)

    def _reduce(self, graph, insert, block: tb.Block, r: int, protected: int, gen, ctx) -> tf.Generation:
        o = self.options
        x = block.residual
        users = list(x.users)
        batch, before = block.batch, gu.shape(x)[block.token_dim]
        if gen is not None and before != gen.after:
            where = f" at {ctx.unmerged[-1][0]} ({ctx.unmerged[-1][1]})" if ctx.unmerged else ""
            raise tf.NotFollowable(x, f"the tokens were unmerged{where} before {block.name}")
        with graph.inserting_before(x.next):
            stream = x if block.token_dim == 1 else insert(aten.transpose.int, (x, 0, 1))
            bias = None
            if ctx.key_bias is not None:
                bias = ctx.key_bias if gen is None else insert(aten.gather.default, (ctx.key_bias, 1, gen.keep_total))
            sizes = gen.sizes if gen is not None else insert(aten.new_ones.default, (x, [batch, before]),
                                                               {"dtype": torch.float32})
            weight = None
            if o.method == "tome":
                k4 = block.key_layout.to_bhle(graph, block.sdpa.args[1], batch, insert)
                metric = insert(aten.mean.dim, (k4, [1]))
                plan = insert(ops.tome_plan, (metric, bias, r, protected))
            else:
                if protected < 1:
                    raise tf.NotFollowable(block.sdpa, "topk needs a class token (a protected first token)")
                attention = _class_attention(insert, block, batch, gen, ctx)
                plan = insert(ops.topk_plan, (attention, before - r - protected - 1, protected))
                weight = insert(aten.mul.Tensor, (sizes, attention))
            dest = insert(operator.getitem, (plan, 0))
            keep = insert(operator.getitem, (plan, 1))
            merged = insert(ops.token_merge, (stream, sizes, dest, before - r, weight))
            tokens = insert(operator.getitem, (merged, 0))
            new_sizes = insert(operator.getitem, (merged, 1))
            keep_total = keep if gen is None else insert(aten.gather.default, (gen.keep_total, 1, keep))
            out = tokens if block.token_dim == 1 else insert(aten.transpose.int, (tokens, 0, 1))
        for user in users:
            user.replace_input_with(x, out)
        new_gen = tf.Generation(before, before - r, batch, dest, keep_total, new_sizes, protected)
        tf.follow(graph, out, tf.Tokens(block.token_dim, block.batch_dim), new_gen, ctx)
        return new_gen


def _class_attention(insert, block: tb.Block, batch: int, gen, ctx) -> fx.Node:
    """``mean_h softmax(s q_0 K^T + M)``: the first token's attention over the keys, [B, N]."""
    sdpa = block.sdpa
    q4 = block.query_layout.to_bhle(sdpa.graph, sdpa.args[0], batch, insert)
    k4 = block.key_layout.to_bhle(sdpa.graph, sdpa.args[1], batch, insert)
    q0 = insert(aten.slice.Tensor, (q4, 2, 0, 1))
    scores = insert(aten.matmul.default, (q0, insert(aten.transpose.int, (k4, -2, -1))))
    scale = sdpa.kwargs.get("scale") or 1.0 / math.sqrt(gu.shape(q4)[-1])
    scores = insert(aten.mul.Tensor, (scores, scale))
    mask = sdpa.args[3] if len(sdpa.args) > 3 else None
    if mask is not None:
        if gu.dtype(mask) == torch.bool:
            mask = insert(aten.where.Scalar, (mask, 0.0, float("-inf")))
        if gu.rank(mask) == 3:  # a flat [B*H, Lq, Lk] mask
            mask = insert(aten.reshape.default, (mask, [batch, -1] + list(gu.shape(mask)[-2:])))
        mask = insert(aten.slice.Tensor, (mask, -2, 0, 1)) if gu.shape(mask)[-2] > 1 else mask
        scores = insert(aten.add.Tensor, (scores, mask))
    probs = insert(aten.softmax.int, (scores, -1))
    heads = insert(aten.mean.dim, (probs, [1, 2]))
    return heads


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph(owning_module=graph.owning_module)
    out = copy.graph_copy(graph, {})
    copy.output(out)
    return copy
