"""optcc.graph_utils: values, constants, and the walker that follows a tensor or one of its
dims through data movement (the contract is in the module docstring).

Every kept dim is checked against an oracle, not just against expected numbers: the chain
the walker passed is replayed on a real tensor whose elements are their index along the
followed dim; after the chain that index must be the index along the dim the walker names.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optcc
from optcc import graph_utils as gu

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LINEAR = aten.linear.default
B, N, H, D = 2, 5, 3, 4
C = H * D


def nodes(gm, target):
    return [n for n in gm.graph.nodes if n.target is target]


def replay(chain, tensor):
    """Run the movement ops of ``chain`` (in data-flow order) on a real tensor: values only,
    so a view is replayed as a reshape (the tensor's layout need not be the graph's)."""
    for node in chain:
        if node.target in gu.VIEWS:
            tensor = tensor.reshape(node.args[1])
        else:
            tensor = node.target(tensor, *node.args[1:], **node.kwargs)
    return tensor


def index_labels(shape, d):
    """A tensor of ``shape`` whose elements are their index along ``d``."""
    view = [1] * len(shape)
    view[d] = shape[d]
    return torch.arange(shape[d]).reshape(view).expand(shape).contiguous()


def assert_kept(chain, in_shape, d_in, d_out):
    """Replaying ``chain`` (data-flow order) carries the index along ``d_in`` to ``d_out``."""
    out = replay(chain, index_labels(in_shape, d_in))
    assert out.shape[d_out] == in_shape[d_in]
    assert torch.equal(out, index_labels(tuple(out.shape), d_out))


# ----------------------------------------------------------------------------------------
# Values and constants


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("one", torch.tensor([2.5]))

    def forward(self, x):
        return self.bn(self.fc(x)) * self.one


def test_values_and_constants():
    gm = optcc.capture(Small().eval(), (torch.randn(2, 4),))
    fc = nodes(gm, LINEAR)[0]
    bn = nodes(gm, aten._native_batch_norm_legit_no_training.default)[0]
    assert gu.shape(fc) == (2, 3) and gu.dtype(fc) == torch.float32 and gu.rank(fc) == 2
    assert gu.val(bn) is None and gu.shape(bn) is None      # BatchNorm's result is a tuple
    assert gu.val(3.0) is None and gu.shape(None) is None
    assert gu.same_type(fc, fc) and not gu.same_type(fc, fc.args[1])

    assert gu.number(2) == 2.0 and gu.number(True) is None and gu.number("2") is None
    one = next(n for n in gm.graph.nodes if n.op == "get_attr" and gu.shape(n) == (1,))
    assert gu.scalar_value(gm, one) == 2.5 and gu.scalar_value(gm, 0.5) == 0.5
    assert gu.scalar_value(gm, fc) is None and gu.scalar_value(gm, fc.args[1]) is None  # [3, 4]
    c = gu.constant64(gm, fc.args[1])
    assert c.dtype == torch.float64 and c.shape == (3, 4)
    assert gu.constant64(gm, 3).item() == 3.0 and gu.constant64(gm, True) is None
    assert gu.constant64(gm, fc) is None


def test_scalar_tensor_is_a_scalar_value():
    graph = torch.fx.Graph()
    node = graph.call_function(aten.scalar_tensor.default, (-1.5,))
    assert gu.scalar_value(torch.fx.GraphModule({}, graph), node) == -1.5


# ----------------------------------------------------------------------------------------
# Head reshapes: the token axis into SDPA's q/k/v and back out (token pruning, linear attention)


class SplitHeads(nn.Module):
    """q, k, v from three linears, ``[B, N, C] -> [B, N, H, D] -> permute -> [B, H, N, D]``."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(C, C) for _ in range(4))

    def heads(self, t):
        return t.reshape(B, N, H, D).permute(0, 2, 1, 3)

    def forward(self, x):
        o = F.scaled_dot_product_attention(self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x)))
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class FusedQKV(nn.Module):
    """timm's ViT: one qkv linear, ``[B, N, 3C] -> [B, N, 3, H, D] -> permute -> unbind``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


@pytest.fixture(scope="module", params=[SplitHeads, FusedQKV], ids=["split_heads", "fused_qkv"])
def attention(request):
    return optcc.capture(request.param().eval(), (torch.randn(B, N, C),))


def test_token_axis_reaches_q_k_v(attention):
    gm = attention
    sdpa = nodes(gm, SDPA)[0]
    *projections, proj = nodes(gm, LINEAR)
    uses = [u for linear in projections for u in gu.dim_uses(linear, 1)]
    assert sorted((u.node, u.index, u.dim) for u in uses if u.node is sdpa) == [(sdpa, i, 2) for i in range(3)]
    assert all(u.node is sdpa and u.stop is None for u in uses)
    for u in uses:  # the token axis, index for index
        assert_kept(u.chain, gu.shape(u.chain[0].args[0]), 1, 2)
        assert u.dims[-1] == 2 and len(u.dims) == len(u.chain)
    # producer-ward from q: back to the projection, token axis at dim 1
    for i in range(3):
        up = gu.walk_up(sdpa.args[i], 2)
        assert up.node in projections and up.dim == 1 and up.stop is None
        assert up.chain[0] is sdpa.args[i] and up.lineage[-1] is up.node
        assert up.dims[0] == 2 and len(up.dims) == len(up.chain)


def test_token_axis_leaves_through_the_output_projection(attention):
    gm = attention
    sdpa = nodes(gm, SDPA)[0]
    proj = nodes(gm, LINEAR)[-1]
    down = gu.walk_down(sdpa, 2)
    assert down.node is proj and down.dim == 1 and down.stop is None
    assert down.value is proj.args[0] and down.dims[-1] == 1
    assert [n.target for n in down.chain] in ([aten.permute.default, aten.view.default],
                                              [aten.transpose.int, aten.view.default])
    assert_kept(down.chain, gu.shape(sdpa), 2, 1)
    # the head axis leaves through the same reshape merged with the head dim
    heads = gu.walk_down(sdpa, 1)
    assert heads.stop is not None and heads.stop.kind == "merge"
    assert heads.node is down.chain[-1] and heads.dim == 2
    assert heads.stop.in_dims == (2, 3) and heads.stop.out_dims == (2,)
    [use] = gu.dim_uses(sdpa, 1)
    assert use.node is heads.node and use.stop == heads.stop


def test_channel_split_into_heads_stops_the_walk():
    """A reshape that splits the followed dim ends the walk AT the reshape, naming the block."""
    gm = optcc.capture(FusedQKV().eval(), (torch.randn(B, N, C),))
    qkv = nodes(gm, LINEAR)[0]
    down = gu.walk_down(qkv, 2)
    view = next(iter(qkv.users))
    assert down.chain == [] and down.node is view and down.dim == 2
    assert down.stop == gu.Stop(view, "split", (2,), (2, 3, 4))
    assert "splits" in down.stop.reason
    # restarting from the split dims: the 3 is the q/k/v index, H and D stay apart
    assert {u.dim for u in gu.dim_uses(view, 3)} == {1} and {u.dim for u in gu.dim_uses(view, 4)} == {3}
    assert {u.stop.kind for u in gu.dim_uses(view, 2)} == {"sliced"}


def test_merge_and_split_going_up():
    """[B, H, N, D] -> [B*H, N, D] (the bmm idiom): N kept, H merged; kinds are input -> output."""

    class Flatten(nn.Module):
        def forward(self, x):
            return (x.reshape(B * H, N, D) * 2).reshape(B, H, N, D)

    gm = optcc.capture(Flatten(), (torch.randn(B, H, N, D),))
    flat, unflat = nodes(gm, aten.view.default)
    assert gu.map_dim(flat, 2, up=False) == 1 and gu.map_dim(flat, 1, up=True) == 2
    assert gu.map_dim(flat, 1, up=False) == gu.Stop(flat, "merge", (0, 1), (0,))
    assert gu.map_dim(flat, 0, up=True) == gu.Stop(flat, "merge", (0, 1), (0,))
    assert gu.map_dim(unflat, 0, up=False) == gu.Stop(unflat, "split", (0,), (0, 1))
    assert gu.map_dim(unflat, 1, up=True) == gu.Stop(unflat, "split", (0,), (0, 1))
    up = gu.walk_up(flat, 0)
    assert up.node is flat and up.chain == [] and up.stop.kind == "merge"


@pytest.mark.parametrize("src,dst,d,expected", [
    ((6, 4), (6, 4), 1, 1),
    ((6, 4), (2, 3, 4), 1, 2),
    ((2, 3, 4), (6, 4), 2, 1),
    ((1, 3, 5), (3, 5), 1, 0),
    ((2, 1, 3), (2, 3), 2, 1),
    ((6, 4), (4, 6), 0, ("regroup", (0, 1), (0, 1))),
    ((2, 1, 3), (2, 3), 1, ("gone", (1,), ())),
    ((2, 1, 3), (6,), 1, ("many-to-one", (0, 1, 2), (0,))),
    ((2, 12), (2, 3, 4), 1, ("one-to-many", (1,), (1, 2))),
    ((4, 3, 2), (2, 6, 2), 1, ("regroup", (0, 1), (0, 1))),
])
def test_reshape_blocks(src, dst, d, expected):
    assert gu.reshape_dim(src, dst, d) == expected
    if isinstance(expected, int):
        labels = index_labels(src, d).reshape(dst)
        assert torch.equal(labels, index_labels(dst, expected))


# ----------------------------------------------------------------------------------------
# Permute / transpose / squeeze / unsqueeze / expand / select, against the oracle


class Moves(nn.Module):
    def forward(self, x):                                    # [2, 3, 4, 5]
        y = x.permute(0, 2, 3, 1)                            # [2, 4, 5, 3]
        y = y.transpose(1, 3)                                # [2, 3, 5, 4]
        y = y.unsqueeze(2)                                   # [2, 3, 1, 5, 4]
        y = y.expand(7, 2, 3, 1, 5, 4)                       # [7, 2, 3, 1, 5, 4]
        y = y.squeeze(3)                                     # [7, 2, 3, 5, 4]
        return y.select(0, 1) + 1                            # [2, 3, 5, 4]


@pytest.fixture(scope="module")
def moves():
    gm = optcc.capture(Moves(), (torch.randn(2, 3, 4, 5),))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return gm, x


@pytest.mark.parametrize("d", range(4))
def test_every_dim_through_moves_and_back(moves, d):
    gm, x = moves
    down = gu.walk_down(x, d)
    assert down.stop is None and down.node.target is aten.add.Tensor
    assert [n.target for n in down.chain][:2] in ([aten.permute.default, aten.transpose.int],
                                                  [aten.permute.default, aten.permute.default])
    assert_kept(down.chain, (2, 3, 4, 5), d, down.dim)
    assert [gu.map_dim(n, dd, up=True) for n, dd in zip(down.chain, down.dims)] == [d, *down.dims[:-1]]
    up = gu.walk_up(down.value, down.dim)
    assert up.node is x and up.dim == d and up.chain == down.chain[::-1]


def test_created_and_broadcast_dims_stop_going_up(moves):
    gm, x = moves
    squeeze = nodes(gm, aten.squeeze.dims)[0] if nodes(gm, aten.squeeze.dims) else nodes(gm, aten.squeeze.dim)[0]
    expand = nodes(gm, aten.expand.default)[0]
    unsqueeze = nodes(gm, aten.unsqueeze.default)[0]
    assert gu.walk_up(squeeze, 0).stop == gu.Stop(expand, "created", (), (0,))
    assert gu.walk_up(unsqueeze, 2).stop == gu.Stop(unsqueeze, "created", (), (2,))
    assert gu.map_dim(squeeze, 3, up=False) == gu.Stop(squeeze, "dropped", (3,), ())
    select = nodes(gm, aten.select.int)[0]
    assert gu.map_dim(select, 0, up=False) == gu.Stop(select, "dropped", (0,), ())
    assert gu.map_dim(select, 0, up=True) == 1


def test_broadcast_and_slice_stop():
    class M(nn.Module):
        def forward(self, x):                                # [2, 1, 4]
            return x.expand(2, 3, 4)[:, :, 1:] * 2

    gm = optcc.capture(M(), (torch.randn(2, 1, 4),))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    expand = nodes(gm, aten.expand.default)[0]
    assert gu.walk_down(x, 1).stop == gu.Stop(expand, "broadcast", (1,), (1,))
    walk = gu.walk_down(x, 2)
    assert walk.stop.kind == "sliced" and walk.chain == [expand] and walk.dim == 2
    assert gu.walk_down(x, 0).stop is None


def test_tensor_only_walks_and_options(moves):
    gm, x = moves
    add = nodes(gm, aten.add.Tensor)[0]
    up = gu.walk_up(add.args[0])                             # dim=None: nothing can stop it
    assert up.node is x and up.dim is None and len(up.chain) == 6 and up.lineage[-1] is x
    only_permutes = gu.walk_up(add.args[0], 0, through=gu.PERMUTES)
    assert only_permutes.chain == [] and only_permutes.node is add.args[0]
    # a predicate passes other ops too, when they keep the shape (``x * c``)
    double = gu.walk_down(x, 1, through=lambda n: n.target in gu.MOVES or n.target is aten.add.Tensor)
    assert double.node is not None and double.node.op == "output" and double.dim == 1


def test_single_user_and_fan_out():
    class Twice(nn.Module):
        def forward(self, x):                                # [2, 6]
            y = x.reshape(2, 2, 3)
            return y.permute(0, 2, 1) + 1, y.sum(1)

    gm = optcc.capture(Twice(), (torch.randn(2, 6),))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    view = nodes(gm, aten.view.default)[0]
    permute = nodes(gm, aten.permute.default)[0]
    assert gu.walk_up(permute, 0).node is x
    assert gu.walk_up(permute, 0, single_user=True).node is view   # the view is read twice
    assert gu.walk_up(permute, 1).stop.kind == "split"             # [2, 6] -> [2, 2, 3] on the 6
    down = gu.walk_down(x, 0)
    assert down.node is None and down.chain == [view]               # it has two users: no single consumer
    uses = gu.dim_uses(x, 0)
    assert {(u.node.target, u.index, u.dim) for u in uses} == {(aten.add.Tensor, 0, 0), (aten.sum.dim_IntList, 0, 0)}


def test_until_and_broadcasts_to(moves):
    gm, x = moves
    add = nodes(gm, aten.add.Tensor)[0]
    unsqueeze = nodes(gm, aten.unsqueeze.default)[0]
    walk = gu.walk_up(add.args[0], 1, until=unsqueeze)
    assert walk.node is unsqueeze and walk.dim == 1 and len(walk.chain) == 3
    assert gu.broadcasts_to(unsqueeze, (4, 2, 3, 1, 5, 4)) and not gu.broadcasts_to(unsqueeze, (2, 3, 5, 4))
    assert not gu.broadcasts_to(2.0, (2,)) and gu.shape(x, symbolic=True) == (2, 3, 4, 5)


def test_shape_of_a_constant_added_mid_pass():
    """``add_constant``'s fake value has symbolic sizes backed by the real ones: read as ints."""
    from optcc.ir import add_constant

    gm = optcc.capture(Small().eval(), (torch.randn(2, 4),))
    fc = nodes(gm, LINEAR)[0]
    new = add_constant(gm, "w", torch.randn(3, 4), before=fc)
    assert gu.shape(new) == (3, 4) and gu.rank(new) == 2
    assert len(gu.shape(new, symbolic=True)) == 2
