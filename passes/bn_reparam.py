"""bn_reparam: fold eval-mode BatchNorm into the neighbouring convolution or linear.

Eval BatchNorm is a per-channel affine map. With running statistics mu, sigma^2, the
affine parameters gamma, beta (1 and 0 when the BN has no affine part) and eps::

    BN(y)_c = s_c * y_c + t_c,    s_c = gamma_c / sqrt(sigma^2_c + eps),   t_c = beta_c - s_c * mu_c

Rules (applied to a fixed point; each leaves the graph alone when its check fails):

``conv_bn``  BN after ``y = W * x + b`` (any conv: 1d/2d/3d, strided, dilated, grouped,
    transposed): BN is per output channel, so ``W'[o] = s_o W[o]`` and
    ``b'_o = s_o b_o + t_o``. For a transposed conv the output channel of weight
    ``[Cin, Cout/g, k...]`` is dimension 1 within each group. Illegal when the conv's
    output has another user (it would still need the un-normalized value).

``linear_bn``  BN1d after ``y = x W^T + b`` with ``y`` of shape ``[N, C]`` (channels =
    features): ``W' = diag(s) W``, ``b' = s * b + t``. Illegal for ``[N, C, L]`` inputs,
    where BN normalizes dim 1 but the linear mixes the last dim.

``bn_conv``  BN before a conv: ``W * (s x + t) + b``. The scale moves into the weight's
    input channels, ``W'[o, i] = W[o, i] s_{g(o), i}``, and the shift into the bias,
    ``b'_o = b_o + sum_{i,k} W[o, i, k] t_{g(o), i}`` - but only where every output sees
    ``t`` at every tap, i.e. with zero padding: a padded border would see 0 instead of
    ``t``. Transposed convs are left alone for the same reason (uneven tap counts).

``bn_linear``  BN1d on ``[N, C]`` before a linear: ``W' = W diag(s)``, ``b' = b + W t``.

Never matched: training-mode BatchNorm (batch statistics; it is
``_native_batch_norm_legit_functional`` in the canonical IR) and BN whose statistics or
affine parameters are not constants. Folding is done in float64 and cast back to the
weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.pass_base import Pass, PassResult, register_pass
from optcc.rewrite import NOT_ANCHOR, Match, NoMatch, Rule, apply_rules

from . import _reparam_affine, _reparam_branches, _reparam_conv_fc
from ._batchnorm import BATCH_NORM, bn_affine, bn_output
from ._weights import replace_weight_and_bias, weight_and_bias

aten = torch.ops.aten
CONV = aten.convolution.default
LINEAR = aten.linear.default


# ----------------------------------------------------------------------------------------
# Shared parts of the rules


def _match_producer_then_bn(gm: fx.GraphModule, node: fx.Node, producer_op) -> Match | NoMatch:
    """Common check of conv_bn / linear_bn: ``node`` is a BN whose input is ``producer_op``."""
    if node.target is not BATCH_NORM:
        return NOT_ANCHOR
    producer = node.args[0]
    if not isinstance(producer, fx.Node) or producer.target is not producer_op:
        return NOT_ANCHOR
    if len(producer.users) != 1:
        return NoMatch("the input of BatchNorm has other users")
    out = bn_output(node)
    if out is None:
        return NoMatch("BatchNorm's saved statistics are used")
    affine = bn_affine(gm, node)
    if isinstance(affine, str):
        return NoMatch(affine)
    return Match(nodes={"bn": node, "out": out, "op": producer}, values={"s": affine[0], "t": affine[1]})


def _match_bn_then_consumer(gm: fx.GraphModule, node: fx.Node, consumer_op) -> Match | NoMatch:
    """Common check of bn_conv / bn_linear: ``node`` is a BN feeding only ``consumer_op``."""
    if node.target is not BATCH_NORM:
        return NOT_ANCHOR
    out = bn_output(node)
    if out is None:
        return NOT_ANCHOR
    users = list(out.users)
    if not users or any(u.target is not consumer_op for u in users):
        return NOT_ANCHOR
    if len(users) != 1:
        return NoMatch("the BatchNorm output has other users")
    consumer = users[0]
    if consumer.args[0] is not out:
        return NoMatch("the BatchNorm output is not the data input")
    affine = bn_affine(gm, node)
    if isinstance(affine, str):
        return NoMatch(affine)
    return Match(nodes={"bn": node, "out": out, "op": consumer}, values={"s": affine[0], "t": affine[1]})


def _per_channel(v: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


# ----------------------------------------------------------------------------------------
# Rules


class ConvThenBatchNorm(Rule):
    name = "conv_bn"

    def match(self, gm, node):
        m = _match_producer_then_bn(gm, node, CONV)
        if not m:
            return m
        params = weight_and_bias(gm, m.nodes["op"])
        if isinstance(params, str):
            return NoMatch(params)
        m.values["weight"], m.values["bias"] = params
        return m

    def rewrite(self, gm, m):
        conv, s, t = m.nodes["op"], m.values["s"], m.values["t"]
        weight = m.values["weight"].double()
        bias = m.values["bias"].double() if m.values["bias"] is not None else torch.zeros_like(s)
        transposed, groups = conv.args[6], conv.args[8]
        if transposed:  # weight [Cin, Cout/g, k...]: output channels sit in dim 1 of each group
            cin, cout_per_group, *kernel = weight.shape
            grouped = weight.reshape(groups, cin // groups, cout_per_group, *kernel)
            folded = grouped * s.reshape(groups, 1, cout_per_group, *[1] * len(kernel))
            folded = folded.reshape(weight.shape)
        else:
            folded = weight * _per_channel(s, weight.dim(), 0)
        dtype = m.values["weight"].dtype
        replace_weight_and_bias(gm, conv, folded.to(dtype), (s * bias + t).to(dtype), "_bn")
        m.nodes["out"].replace_all_uses_with(conv)


class LinearThenBatchNorm(Rule):
    name = "linear_bn"

    def match(self, gm, node):
        m = _match_producer_then_bn(gm, node, LINEAR)
        if not m:
            return m
        if gu.rank(m.nodes["op"]) != 2:
            return NoMatch("BatchNorm normalizes a dimension other than the linear's features")
        params = weight_and_bias(gm, m.nodes["op"])
        if isinstance(params, str):
            return NoMatch(params)
        m.values["weight"], m.values["bias"] = params
        return m

    def rewrite(self, gm, m):
        linear, s, t = m.nodes["op"], m.values["s"], m.values["t"]
        weight = m.values["weight"]
        bias = m.values["bias"].double() if m.values["bias"] is not None else torch.zeros_like(s)
        folded = weight.double() * s[:, None]
        replace_weight_and_bias(gm, linear, folded.to(weight.dtype), (s * bias + t).to(weight.dtype), "_bn")
        m.nodes["out"].replace_all_uses_with(linear)


class BatchNormThenConv(Rule):
    name = "bn_conv"

    def match(self, gm, node):
        m = _match_bn_then_consumer(gm, node, CONV)
        if not m:
            return m
        conv = m.nodes["op"]
        if conv.args[6]:
            return NoMatch("transposed convolution (border outputs see fewer taps)")
        if any(p != 0 for p in conv.args[4]):
            return NoMatch("the convolution pads its input with zeros, not with the BatchNorm shift")
        params = weight_and_bias(gm, conv)
        if isinstance(params, str):
            return NoMatch(params)
        m.values["weight"], m.values["bias"] = params
        return m

    def rewrite(self, gm, m):
        conv, s, t = m.nodes["op"], m.values["s"], m.values["t"]
        weight = m.values["weight"]
        w64 = weight.double()
        groups = conv.args[8]
        cout, cin_per_group, *kernel = weight.shape
        # input channel i of output o is channel g(o) * cin_per_group + i of the BN
        s_in = s.reshape(groups, cin_per_group).repeat_interleave(cout // groups, dim=0)
        t_in = t.reshape(groups, cin_per_group).repeat_interleave(cout // groups, dim=0)
        expand = (cout, cin_per_group, *[1] * len(kernel))
        folded = w64 * s_in.reshape(expand)
        shift = (w64 * t_in.reshape(expand)).flatten(1).sum(1)
        bias = m.values["bias"].double() if m.values["bias"] is not None else torch.zeros(cout, dtype=torch.float64)
        conv.replace_input_with(m.nodes["out"], m.nodes["bn"].args[0])
        replace_weight_and_bias(gm, conv, folded.to(weight.dtype), (bias + shift).to(weight.dtype), "_bn")


class BatchNormThenLinear(Rule):
    name = "bn_linear"

    def match(self, gm, node):
        m = _match_bn_then_consumer(gm, node, LINEAR)
        if not m:
            return m
        if gu.rank(m.nodes["out"]) != 2:
            return NoMatch("BatchNorm normalizes a dimension other than the linear's features")
        params = weight_and_bias(gm, m.nodes["op"])
        if isinstance(params, str):
            return NoMatch(params)
        m.values["weight"], m.values["bias"] = params
        return m

    def rewrite(self, gm, m):
        linear, s, t = m.nodes["op"], m.values["s"], m.values["t"]
        weight = m.values["weight"]
        w64 = weight.double()
        bias = m.values["bias"].double() if m.values["bias"] is not None else torch.zeros(w64.shape[0], dtype=torch.float64)
        linear.replace_input_with(m.nodes["out"], m.nodes["bn"].args[0])
        replace_weight_and_bias(gm, linear, (w64 * s[None, :]).to(weight.dtype), (bias + w64 @ t).to(weight.dtype), "_bn")


FOLD_RULES = [ConvThenBatchNorm(), LinearThenBatchNorm(), BatchNormThenConv(), BatchNormThenLinear()]
RULES = FOLD_RULES + _reparam_branches.RULES + _reparam_conv_fc.RULES + _reparam_affine.RULES


@register_pass
class BatchNormReparam(Pass):
    """Fold eval-mode BatchNorm into the neighbouring conv/linear (exact)."""

    name = "bn_reparam"
    exact = True
    run_before = ("block_fusion",)  # its regions would hide the conv/linear + BatchNorm pairs

    @dataclass
    class Options:
        pass

    @classmethod
    def documentation(cls) -> str:
        parts = [super().documentation(), *(m.__doc__ or "" for m in (_reparam_branches, _reparam_conv_fc,
                                                                       _reparam_affine))]
        return "\n\n".join(p.strip() for p in parts if p.strip())

    def run(self, gm: fx.GraphModule) -> PassResult:
        stats = apply_rules(gm, RULES)
        return PassResult(gm, stats["matches"] > 0, stats)
