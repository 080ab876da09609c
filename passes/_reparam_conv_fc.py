"""bn_reparam rule: a convolution added to a fully-connected layer of the same features (RepMLP).

RepMLP (Ding et al.) trains a fully-connected layer over a small feature map together with
parallel convolutions on the same map, and merges them for inference. A convolution over
an input of fixed size ``[C, h, w]`` is a linear map from the ``F_in = C h w`` input
features to the ``F_out = O h' w'`` output features, so it has a matrix::

    M[g, f] = conv(e_f)[g]        e_f: the f-th unit vector of R^{F_in}, reshaped to [C, h, w]

found by running the convolution (weight only) on the identity matrix. When the
fully-connected layer ``y = W v + b`` reads the same features as the convolution, in the
same order, and the two results are added element for element::

    A(W v + b) + alpha * B(conv(v') + c)  =  A((W + alpha M) v + b + alpha c_g)
    c_g = c_{g div (h' w')}                 (the conv bias of output feature g's channel)

where ``A``, ``B`` and the views from the common source to ``v`` and ``v'`` are reshapes
only. A reshape keeps the row-major order of the elements, so "the same features in the
same order" is a matter of sizes: each row of the FC input holds ``F_in = C h w`` values
(the conv input is ``[rows, C, h, w]``) and each row of the FC output ``F_out = O h' w'``.

``conv_fc``  ``add(A(fc(...)), B(conv(...)))`` (or ``sub``, or ``alpha``) as above -> the FC
    with ``W + alpha M`` and ``b + alpha c_g``; the convolution and its views are dropped.
    The FC is a ``linear`` or a 1x1 convolution (stride 1, no padding) over a ``1 x 1`` map,
    possibly grouped (RepMLP's ``fc3`` with ``groups = S`` share sets). Legal only when:

    * both chains from the common source are reshapes (``view``/``reshape``/``clone``/
      ``squeeze``/``unsqueeze``: a permute would reorder the features, reported as a near
      miss), and so are the chains from the FC and the convolution to the add (a
      nonlinearity on the convolution's side is a near miss);
    * the FC output and the values on its way to the add feed nothing else (they change),
      and the convolution's output feeds only the add (it is removed);
    * the merged matrix keeps the FC's groups (a convolution mixing features of two FC
      groups would densify it: refused);
    * ``F_in * F_out`` is at most 2^24 (the matrix is built in float64).

The FC does no more work after the merge than before, and the convolution's work is gone.
Folding is done in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.ir import op_name
from optcc.rewrite import NOT_ANCHOR, Match, NoMatch, Rule

from ._weights import replace_weight_and_bias, weight_and_bias

aten = torch.ops.aten
CONV = aten.convolution.default
LINEAR = aten.linear.default
ADD = aten.add.Tensor
SUB = aten.sub.Tensor
# ops that change the shape and never the row-major order of the elements
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
            aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default)
MAX_MATRIX_ELEMENTS = 1 << 24


def _up_through_reshapes(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The first non-reshape node above ``node`` and the reshapes passed (nearest first)."""
    walk = gu.walk_up(node, through=RESHAPES)
    return walk.node, walk.chain


def _share_source(a: fx.Node, b: fx.Node, through=RESHAPES) -> bool:
    """Whether ``a`` and ``b`` are ``through``-views of one value (one lies on the other's lineage)."""
    above_a = gu.walk_up(a, through=through).lineage
    return any(n in above_a for n in gu.walk_up(b, through=through).lineage)


def _nonlinear_conv(node: fx.Node) -> fx.Node | None:
    """The conv under a one-input op ``node`` (``relu(conv(x))``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.all_input_nodes) != 1:
        return None
    inner, _ = _up_through_reshapes(node.all_input_nodes[0])
    return inner if inner.target is CONV else None


def _fc_groups(op: fx.Node) -> int | None:
    """Groups of ``op`` when it is a fully-connected layer over each row, else None."""
    if op.target is LINEAR:
        return 1
    if op.target is not CONV or op.args[6]:
        return None
    x_shape, w_shape = gu.shape(op.args[0]), gu.shape(op.args[1])
    if x_shape is None or w_shape is None:
        return None
    if any(d != 1 for d in x_shape[2:]) or any(k != 1 for k in w_shape[2:]) or any(op.args[4]):
        return None
    return op.args[8]


def _dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A (grouped) FC weight ``[F_out, F_in/g, 1...]`` as a dense ``[F_out, F_in]`` matrix."""
    w = weight.reshape(weight.shape[0], weight.shape[1])
    if groups == 1:
        return w
    out_g, in_g = w.shape[0] // groups, w.shape[1]
    return torch.block_diag(*[w[i * out_g:(i + 1) * out_g] for i in range(groups)])


def _conv_matrix(conv: fx.Node, weight: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """``M[g, f]``: the convolution as a matrix over one row's features (float64)."""
    features = math.prod(in_shape[1:])
    basis = torch.eye(features, dtype=torch.float64).reshape(features, *in_shape[1:])
    out = CONV(basis, weight.double(), None, *conv.args[3:])
    return out.reshape(features, -1).T


class ConvIntoFullyConnected(Rule):
    """``A(fc(v)) + alpha * B(conv(v'))`` with v, v' reshapes of one value -> ``A(fc'(v))``."""

    name = "conv_fc"

    def match(self, gm, node):
        if node.target not in (ADD, SUB) or len(node.args) != 2:
            return NOT_ANCHOR
        alpha = node.kwargs.get("alpha", 1)
        if not all(isinstance(a, fx.Node) for a in node.args) or not isinstance(alpha, (int, float)):
            return NOT_ANCHOR
        for fc_side, conv_side, sign in ((node.args[0], node.args[1], 1), (node.args[1], node.args[0], -1)):
            fc, fc_chain = _up_through_reshapes(fc_side)
            conv, conv_chain = _up_through_reshapes(conv_side)
            groups = _fc_groups(fc)
            if groups is None or not isinstance(fc.args[0], fx.Node):
                continue
            hidden = _nonlinear_conv(conv)
            if hidden is not None and _share_source(fc.args[0], hidden.args[0]):
                return NoMatch(f"the convolution branch applies {op_name(conv)} before the add")
            if conv.target is not CONV or conv is fc or conv.args[6] or not isinstance(conv.args[0], fx.Node):
                continue
            if not _share_source(fc.args[0], conv.args[0]):
                if _share_source(fc.args[0], conv.args[0], through=RESHAPES + gu.PERMUTES):
                    return NoMatch("the convolution reads the FC's features in another order (a permute)")
                continue
            # add(a, b, alpha) = a + alpha b and sub(a, b, alpha) = a - alpha b: the FC side
            # must keep a factor 1, the conv side takes the other one
            if sign > 0:
                scale = alpha if node.target is ADD else -alpha
            elif node.target is ADD and alpha == 1:
                scale = 1
            else:
                return NoMatch("the FC side is scaled or subtracted")
            return self._check(gm, node, fc, fc_chain, conv, conv_chain, groups, scale)
        return NOT_ANCHOR

    def _check(self, gm, add, fc, fc_chain, conv, conv_chain, groups, scale):
        fc_in, fc_out = gu.shape(fc.args[0]), gu.shape(fc)
        conv_in, conv_out = gu.shape(conv.args[0]), gu.shape(conv)
        a, b = gu.shape(add.args[0]), gu.shape(add.args[1])
        if None in (fc_in, fc_out, conv_in, conv_out, a, b):
            return NoMatch("a value has no static shape")
        if a != b or gu.shape(add) != a:
            return NoMatch("the two sides have different shapes (broadcasting add)")
        if len({gu.dtype(n) for n in (fc, conv, add)}) != 1:
            return NoMatch("the FC, the convolution and the sum differ in dtype")
        fc_rows_in = math.prod(fc_in) // (fc_in[1] if fc.target is CONV else fc_in[-1])
        f_in = math.prod(conv_in[1:])
        f_out = math.prod(conv_out[1:])
        fc_f_in = math.prod(fc_in) // fc_rows_in
        fc_f_out = math.prod(fc_out) // fc_rows_in
        if conv_in[0] != fc_rows_in or f_in != fc_f_in:
            return NoMatch("the convolution does not read the FC's input features in their order")
        if conv_out[0] != fc_rows_in or f_out != fc_f_out:
            return NoMatch("the convolution's output features do not line up with the FC's")
        if any(len(n.users) != 1 for n in [fc, *fc_chain]):
            return NoMatch("the FC output is used elsewhere")
        if any(len(n.users) != 1 for n in [conv, *conv_chain]):
            return NoMatch("a branch output is used elsewhere")
        if f_in * f_out > MAX_MATRIX_ELEMENTS:
            return NoMatch("the convolution's matrix would be too large")
        fc_params, conv_params = weight_and_bias(gm, fc), weight_and_bias(gm, conv)
        for params in (fc_params, conv_params):
            if isinstance(params, str):
                return NoMatch(params)
        (fc_w, fc_b), (conv_w, conv_b) = fc_params, conv_params
        merged = _dense(fc_w.double(), groups) + scale * _conv_matrix(conv, conv_w, conv_in)
        if groups > 1:
            blocks = _dense(torch.ones(fc_w.shape[0], fc_w.shape[1], dtype=torch.float64), groups)
            if bool((merged[blocks == 0] != 0).any()):
                return NoMatch("the convolution mixes features of different FC groups")
        bias = fc_b.double() if fc_b is not None else torch.zeros(f_out, dtype=torch.float64)
        if conv_b is not None:
            bias = bias + scale * conv_b.double().repeat_interleave(f_out // conv_out[1])
        return Match(nodes={"add": add, "fc": fc, "fc_side": fc_chain[0] if fc_chain else fc},
                     values={"weight": merged, "bias": bias, "groups": groups, "dtype": fc_w.dtype,
                             "weight_shape": tuple(fc_w.shape)})

    def rewrite(self, gm, m):
        fc, groups, shape = m.nodes["fc"], m.values["groups"], m.values["weight_shape"]
        merged = m.values["weight"]
        if groups > 1:  # back to the grouped layout [F_out, F_in/g, 1, 1]
            out_g, in_g = shape[0] // groups, shape[1]
            merged = torch.cat([merged[i * out_g:(i + 1) * out_g, i * in_g:(i + 1) * in_g] for i in range(groups)])
        dtype = m.values["dtype"]
        replace_weight_and_bias(gm, fc, merged.reshape(shape).to(dtype), m.values["bias"].to(dtype), "_conv_fc")
        add = m.nodes["add"]
        add.replace_all_uses_with(m.nodes["fc_side"])
        gm.graph.erase_node(add)


RULES: list[Rule] = [ConvIntoFullyConnected()]
