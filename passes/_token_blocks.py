"""Transformer blocks in the canonical graph, as token reduction sees them.

A block is found from its attention: the canonical SDPA node, the *residual add* after
its output projection (``stream + f(proj(SDPA))``, ``f`` a chain of single-user ops such
as layer scale), and the *stream* - the add's other operand, an ancestor of the SDPA
(the residual stream entering the block). The stream is a rank-3 ``[B, N, C]`` or
``[N, B, C]`` tensor; its token axis is the one of the SDPA's query length.

How an SDPA operand's leading dims split into batch and heads is read from index labels:
the operand's data-movement chain up to its source (the q/k/v projection, rank 3 like the
stream) is replayed on ``arange`` labels of the source's shape, so every element of the
operand names the source element it is; the batch index of each element then says which
dim (4-d operands) or which factor of the flattened ``B*H`` dim (3-d) is the batch.

Protected tokens are the learned ones concatenated in front of the first block's tokens
(class, distillation, register tokens): constants (``get_attr`` ancestry only) leading a
``cat`` along the token axis on the way up from the first stream. FLOPs are counted per
block from its ``linear`` and SDPA nodes (``2 M K N`` and ``4 B H Lq Lk D``), as a
function of the tokens the block's attention and MLP see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from torch.utils._pytree import tree_map_only

from optcc import graph_utils as gu
from optcc.ir import get_constant

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
ADD = aten.add.Tensor
CAT = aten.cat.default
LINEAR = aten.linear.default


class NotABlock(Exception):
    """Why an SDPA node is not a block token reduction can follow."""


@dataclass(frozen=True)
class HeadLayout:
    """How an SDPA operand ``[*lead, L, E]`` maps onto ``[B, H, L, E]``."""

    kind: str      # "bhle" (4-d, batch first), "hble" (4-d, heads first), "flat_bh" / "flat_hb" (3-d)
    heads: int

    def to_bhle(self, graph: fx.Graph, node: fx.Node, batch: int, insert) -> fx.Node:
        shape = gu.shape(node)
        length, width = shape[-2], shape[-1]
        if self.kind == "bhle":
            return node
        if self.kind == "hble":
            return insert(aten.transpose.int, (node, 0, 1))
        if self.kind == "flat_bh":
            return insert(aten.reshape.default, (node, [batch, self.heads, length, width]))
        split = insert(aten.reshape.default, (node, [self.heads, batch, length, width]))
        return insert(aten.transpose.int, (split, 0, 1))

    def mask_shape(self, batch: int, keys: int) -> list[int]:
        """The shape of a per-batch key mask ``[B, keys]`` laid out for this operand's SDPA."""
        return {"bhle": [batch, 1, 1, keys], "hble": [1, batch, 1, keys]}.get(self.kind, [])


@dataclass
class Block:
    index: int
    sdpa: fx.Node
    stream: fx.Node        # the residual stream entering the block
    residual: fx.Node      # stream + attention branch: where tokens are reduced
    token_dim: int
    batch_dim: int
    tokens: int
    batch: int
    query_layout: HeadLayout
    key_layout: HeadLayout

    @property
    def name(self) -> str:
        return f"block {self.index} (%{self.sdpa.name})"


def _ancestors(node: fx.Node, limit: set[fx.Node] | None = None) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _residual_after(sdpa: fx.Node, ancestors: set[fx.Node]) -> tuple[fx.Node, fx.Node]:
    """``(add, stream)``: the first add on the single-user path from the SDPA output whose
    other operand is an ancestor of the SDPA."""
    node = sdpa
    for _ in range(16):
        if len(node.users) != 1:
            raise NotABlock(f"the attention output of %{sdpa.name} is read by {len(node.users)} ops "
                            f"before the residual add (%{node.name})")
        user = next(iter(node.users))
        if user.target is ADD and len(user.args) == 2:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(other, fx.Node) and other in ancestors:
                return user, other
        node = user
    raise NotABlock(f"no residual add of the attention output of %{sdpa.name} and the stream it reads")


def _source(operand: fx.Node) -> gu.Walk:
    return gu.walk_up(operand, through=gu.MOVES)


def _labels_through(chain: list[fx.Node], source_shape: tuple[int, ...]) -> torch.Tensor | None:
    """Replay ``chain`` (source first) on ``arange`` labels: each element's source index."""
    labels = torch.arange(int(torch.tensor(source_shape).prod()), dtype=torch.int64).reshape(source_shape)
    try:
        for node in chain:
            t = node.target
            if t in gu.VIEWS:
                labels = labels.reshape(node.args[1])
            elif t is aten.permute.default:
                labels = labels.permute(node.args[1])
            elif t is aten.transpose.int:
                labels = labels.transpose(node.args[1], node.args[2])
            elif t is aten.unsqueeze.default:
                labels = labels.unsqueeze(node.args[1])
            elif t in gu.SQUEEZES:
                labels = labels.squeeze(*node.args[1:2]) if t is not aten.squeeze.dims else labels.squeeze(tuple(node.args[1]))
            elif t is aten.expand.default:
                labels = labels.expand(node.args[1])
            elif t is aten.slice.Tensor:
                args = list(node.args[1:]) + [None] * (4 - len(node.args[1:]))
                dim, start, end, step = (args[0] or 0), args[1], args[2], args[3] or 1
                labels = labels[(slice(None),) * (dim % labels.dim()) + (slice(start, end, step),)]
            elif t is aten.select.int:
                labels = labels.select(node.args[1], node.args[2])
            elif t in gu.IDENTITIES:
                pass
            else:
                return None
    except (RuntimeError, IndexError, TypeError):
        return None
    return labels


def head_layout(operand: fx.Node, token_dim: int, batch_dim: int, batch: int) -> HeadLayout:
    """How ``operand`` (an SDPA q/k/v) splits into batch and heads (module docstring)."""
    walk = _source(operand)
    source = walk.node
    src_shape = gu.shape(source)
    op_shape = gu.shape(operand)
    if src_shape is None or op_shape is None or len(src_shape) != 3 or len(op_shape) not in (3, 4):
        raise NotABlock(f"the attention input %{operand.name} does not come from a rank-3 token tensor "
                        f"by data movement alone")
    labels = _labels_through(list(reversed(walk.chain)), src_shape)
    if labels is None or tuple(labels.shape) != op_shape:
        raise NotABlock(f"the moves from %{source.name} to the attention input %{operand.name} "
                        f"could not be replayed")
    strides = [int(torch.tensor(src_shape[i + 1:]).prod()) for i in range(3)]
    b_of = (labels // strides[batch_dim]) % src_shape[batch_dim]
    t_of = (labels // strides[token_dim]) % src_shape[token_dim]
    length = op_shape[-2]
    if not bool((t_of == torch.arange(length).view(length, 1)).all()):
        raise NotABlock(f"the tokens of %{operand.name} are not the tokens of %{source.name} in order")
    lead = b_of[(Ellipsis, 0, 0)]
    if len(op_shape) == 4:
        h0, h1 = op_shape[0], op_shape[1]
        if torch.equal(lead, torch.arange(h0).view(-1, 1).expand(h0, h1)) and h0 == batch:
            return HeadLayout("bhle", h1)
        if torch.equal(lead, torch.arange(h1).view(1, -1).expand(h0, h1)) and h1 == batch:
            return HeadLayout("hble", h0)
    else:
        n = op_shape[0]
        if n % batch == 0:
            heads = n // batch
            if torch.equal(lead, torch.arange(n) // heads):
                return HeadLayout("flat_bh", heads)
            if torch.equal(lead, torch.arange(n) % batch):
                return HeadLayout("flat_hb", heads)
    raise NotABlock(f"the batch of the attention input %{operand.name} could not be told from its heads")


def find_blocks(gm: fx.GraphModule) -> tuple[list[Block], list[str]]:
    """Every SDPA node that is a block, in graph order; and why the others are not."""
    blocks: list[Block] = []
    missed: list[str] = []
    for sdpa in [n for n in gm.graph.nodes if n.target is SDPA]:
        try:
            blocks.append(_block(sdpa, len(blocks)))
        except NotABlock as why:
            missed.append(str(why))
    return blocks, missed


def _block(sdpa: fx.Node, index: int) -> Block:
    q, k, v = sdpa.args[:3]
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        raise NotABlock(f"%{sdpa.name} has a constant query, key or value")
    q_shape, k_shape = gu.shape(q), gu.shape(k)
    if q_shape is None or k_shape is None:
        raise NotABlock(f"%{sdpa.name} has unknown shapes")
    is_causal = sdpa.args[5] if len(sdpa.args) > 5 else sdpa.kwargs.get("is_causal", False)
    if is_causal:
        raise NotABlock(f"%{sdpa.name} is causal attention: a merged token would see later tokens")
    if q_shape[-2] != k_shape[-2]:
        raise NotABlock(f"%{sdpa.name} is cross-attention ({q_shape[-2]} queries, {k_shape[-2]} keys)")
    residual, stream = _residual_after(sdpa, _ancestors(sdpa))
    s_shape = gu.shape(stream)
    if s_shape is None or len(s_shape) != 3 or gu.shape(residual) != s_shape:
        raise NotABlock(f"the residual stream %{stream.name} of %{sdpa.name} is not a [batch, tokens, "
                        f"channels] tensor")
    tokens = q_shape[-2]
    candidates = [d for d in (0, 1) if s_shape[d] == tokens]
    if len(candidates) != 1:
        raise NotABlock(f"the token axis of %{stream.name} {list(s_shape)} is ambiguous (the batch equals "
                        f"the token count {tokens}): capture with another batch size")
    token_dim = candidates[0]
    batch_dim = 1 - token_dim
    batch = s_shape[batch_dim]
    return Block(index, sdpa, stream, residual, token_dim, batch_dim, tokens, batch,
                 head_layout(q, token_dim, batch_dim, batch), head_layout(k, token_dim, batch_dim, batch))


def constant_only(node: fx.Node) -> bool:
    """``node`` is computed from frozen constants alone (no graph input)."""
    if node.op == "placeholder":
        return False
    return all(constant_only(a) for a in node.all_input_nodes)


def evaluate(gm: fx.GraphModule, node: fx.Node, memo: dict) -> torch.Tensor:
    """The value of a :func:`constant_only` node, computed from the frozen constants."""
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = get_constant(gm, node)
        else:
            args, kwargs = tree_map_only(fx.Node, lambda n: evaluate(gm, n, memo), (node.args, node.kwargs))
            memo[node] = node.target(*args, **kwargs)
    return memo[node]


def protected_prefix(first: Block) -> int:
    """Learned tokens concatenated in front of the first block's tokens (module docstring)."""
    node, dim = first.stream, first.token_dim

    def per_token(n: fx.Node) -> bool:  # ops that keep the shape of their first input
        return gu.shape(n) == gu.shape(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else False

    for _ in range(32):
        walk = gu.walk_up(node, dim, through=lambda n: n.target in gu.MOVES or per_token(n))
        node, dim = walk.node, walk.dim
        if walk.stop is not None or not isinstance(node, fx.Node) or node.target is not CAT:
            return 0
        cat_dim = node.args[1] if len(node.args) > 1 else 0
        if dim is None or cat_dim % len(gu.shape(node)) != dim:
            return 0
        count = 0
        for part in node.args[0]:
            if not constant_only(part):
                return count
            count += gu.shape(part)[dim]
        # every part constant: follow the last one (tokens built by nested cats)
        node = node.args[0][-1]
    return 0


@dataclass(frozen=True)
class BlockFlops:
    """A block's FLOPs at its captured token count ``tokens``: the linears before the
    residual add and the SDPA see the block's tokens, the rest (the MLP) those left after
    the reduction; linears scale linearly with tokens, the SDPA quadratically."""

    tokens: int
    attention_linear: float
    attention_sdpa: float
    mlp: float

    def at(self, tokens_in: int, tokens_after: int) -> float:
        f = tokens_in / self.tokens
        return self.attention_linear * f + self.attention_sdpa * f * f + self.mlp * tokens_after / self.tokens

    @property
    def total(self) -> float:
        return self.at(self.tokens, self.tokens)


def block_flops(gm: fx.GraphModule, blocks: list[Block]) -> list[BlockFlops]:
    """:class:`BlockFlops` of every block, from its nodes (between its stream and the next's)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    bounds = [order[b.stream] for b in blocks] + [len(order)]
    result = []
    for i, b in enumerate(blocks):
        attention = sdpa = mlp = 0.0
        for n in list(gm.graph.nodes)[bounds[i]:bounds[i + 1]]:
            if n.target is LINEAR:
                x, w = gu.shape(n.args[0]), gu.shape(n.args[1])
                if x is None or w is None:
                    continue
                flops = 2.0 * float(torch.tensor(x[:-1]).prod()) * w[0] * w[1]
                if order[n] < order[b.residual]:
                    attention += flops
                else:
                    mlp += flops
            elif n.target is SDPA:
                q, k = gu.shape(n.args[0]), gu.shape(n.args[1])
                lead = float(torch.tensor(q[:-2]).prod())
                sdpa += 4.0 * lead * q[-2] * k[-2] * q[-1]
        result.append(BlockFlops(b.tokens, attention, sdpa, mlp))
    return result


