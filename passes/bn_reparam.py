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
from ._fold import fold_after, fold_before
from ._weights import weight_and_bias

aten = torch.ops.aten
CONV = aten.convolution.default
LINEAR = aten.linear.default


# ----------------------------------------------------------------------------------------
# Rules: the match differs (BN after the op or before it), the fold is _fold.py's


class _BatchNormAfter(Rule):
    """conv_bn / linear_bn: ``node`` is a BN whose input is a ``producer`` read only by it."""

    producer = None

    def legal(self, m: Match) -> str | None:
        return None

    def match(self, gm, node):
        if node.target is not BATCH_NORM:
            return NOT_ANCHOR
        producer = node.args[0]
        if not isinstance(producer, fx.Node) or producer.target is not self.producer:
            return NOT_ANCHOR
        if len(producer.users) != 1:
            return NoMatch("the input of BatchNorm has other users")
        out = bn_output(node)
        if out is None:
            return NoMatch("BatchNorm's saved statistics are used")
        affine = bn_affine(gm, node)
        if isinstance(affine, str):
            return NoMatch(affine)
        m = Match(nodes={"bn": node, "out": out, "op": producer}, values={"s": affine[0], "t": affine[1]})
        reason = self.legal(m) or _constant_params(gm, producer)
        return NoMatch(reason) if reason else m

    def rewrite(self, gm, m):
        fold_after(gm, m.nodes["op"], m.values["s"], m.values["t"], "_bn")
        m.nodes["out"].replace_all_uses_with(m.nodes["op"])


class _BatchNormBefore(Rule):
    """bn_conv / bn_linear: ``node`` is a BN whose output only feeds a ``consumer``'s data input."""

    consumer = None

    def legal(self, m: Match) -> str | None:
        return None

    def match(self, gm, node):
        if node.target is not BATCH_NORM:
            return NOT_ANCHOR
        out = bn_output(node)
        if out is None:
            return NOT_ANCHOR
        users = list(out.users)
        if not users or any(u.target is not self.consumer for u in users):
            return NOT_ANCHOR
        if len(users) != 1:
            return NoMatch("the BatchNorm output has other users")
        consumer = users[0]
        if consumer.args[0] is not out:
            return NoMatch("the BatchNorm output is not the data input")
        affine = bn_affine(gm, node)
        if isinstance(affine, str):
            return NoMatch(affine)
        m = Match(nodes={"bn": node, "out": out, "op": consumer}, values={"s": affine[0], "t": affine[1]})
        reason = self.legal(m) or _constant_params(gm, consumer)
        return NoMatch(reason) if reason else m

    def rewrite(self, gm, m):
        op = m.nodes["op"]
        op.replace_input_with(m.nodes["out"], m.nodes["bn"].args[0])
        fold_before(gm, op, m.values["s"], m.values["t"], "_bn")


def _constant_params(gm: fx.GraphModule, op: fx.Node) -> str | None:
    params = weight_and_bias(gm, op)
    return params if isinstance(params, str) else None


class ConvThenBatchNorm(_BatchNormAfter):
    name = "conv_bn"
    producer = CONV


class LinearThenBatchNorm(_BatchNormAfter):
    name = "linear_bn"
    producer = LINEAR

    def legal(self, m):
        if gu.rank(m.nodes["op"]) != 2:
            return "BatchNorm normalizes a dimension other than the linear's features"
        return None


class BatchNormThenConv(_BatchNormBefore):
    name = "bn_conv"
    consumer = CONV

    def legal(self, m):
        conv = m.nodes["op"]
        if conv.args[6]:
            return "transposed convolution (border outputs see fewer taps)"
        if any(p != 0 for p in conv.args[4]):
            return "the convolution pads its input with zeros, not with the BatchNorm shift"
        return None


class BatchNormThenLinear(_BatchNormBefore):
    name = "bn_linear"
    consumer = LINEAR

    def legal(self, m):
        if gu.rank(m.nodes["out"]) != 2:
            return "BatchNorm normalizes a dimension other than the linear's features"
        return None


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
