"""bn_reparam rules for multi-branch convolution blocks (structural re-parameterization).

Every branch below is linear in the one input ``x`` it reads, so it can be written as a
convolution ``y = W * x + b`` (stride s, padding p, dilation d, groups g). Eval BatchNorm
after a conv has already been folded into it by ``conv_bn`` (the fixed point runs the fold
rules first); a BatchNorm that is left sits directly on ``x`` or on an avg-pool and is the
per-channel affine map ``BN(y)_c = s_c y_c + t_c``. The branch forms recognised::

    conv(x)            W, b as they are (not transposed; constant weight and bias)
    x                  identity: W[c, c mod (C/g), centre] = 1, b = 0   (needs Cin == Cout)
    avg_pool2d(x, k)   W[c, c mod (C/g), :, :] = 1/(kh kw) (or 1/divisor_override), b = 0;
                       zero padding only with count_include_pad=True, never ceil_mode
    BN(branch)         W'[o] = s_o W[o], b'_o = s_o b_o + t_o   (RepVGG's identity ``bn(x)``)

Identity and avg-pool kernels are diagonal (depthwise), so they can be written for
whatever group count the other branch uses (a depthwise conv merged from diagonal branches
only, e.g. ``avg_pool(x) + x``, stays diagonal: it is flagged in ``node.meta``). Two
pointwise diagonal branches (``BN(x) + x``) are left to the affine rules.

``merge_branches``  ``add(A, B)`` (``A + alpha B``; ``sub`` is ``alpha = -1``, as in FastViT's
    RepMixer ``mixer(x) - norm(x)``) of two branches reading the SAME x ->
    one convolution with ``W = pad(W_A) + alpha pad(W_B)``, ``b = b_A + alpha b_B``, where
    ``pad`` zero-pads a smaller kernel, centred, to the elementwise-largest kernel size K.
    Chains ``add(add(A, B), C)`` merge pairwise to a fixed point (RepVGG 3x3 + 1x1 +
    identity-BN; ACNet/DBB kxk + 1xk + kx1 + avg-pool; MobileOne's k parallel convs + 1x1
    + identity-BN). Legal only when:

    * both branch outputs have the same shape (no broadcasting) and feed nothing but the
      add (otherwise the branch value is still needed);
    * the strides are equal, and the dilations of the branches whose kernel is larger
      than 1 in a dimension are equal (a 1-tap dimension does not care);
    * kernels are centred in K: ``K - k`` is even and ``p + (K - k)/2 * d`` is the same
      for every branch, so each output position reads the same input window (that sum is
      the padding of the merged conv);
    * an identity branch has Cin == Cout; two convolutions have the same groups (merging
      different groups is exact but would densify the kernel, so it is not done);
    * no branch is a training-mode BatchNorm (batch statistics are not a constant map).

    A branch that applies a nonlinearity (``relu(conv(x))``) before the add is reported
    as a near miss.

``conv1x1_kxk``  ``conv2(conv1(x))`` with conv1 a 1x1 convolution (every kernel dim 1,
    stride 1, padding 0) whose output only feeds conv2, both with the same groups g
    (per group: W1 [M/g, Cin/g], W2 [Cout/g, M/g, k]) ->::

        W[o, i, k] = sum_m W2[o, m, k] W1[m, i]        (m over o's group)
        b_o        = b2_o + sum_{m, k} W2[o, m, k] b1_m

    Legal only when conv2 has zero padding or conv1 has no (or an all-zero) bias: a padded
    border of conv2 sees 0 where the fused form would see ``b1``. conv2 may be strided,
    dilated, any kernel size; neither may be transposed.

``add_zero``  ``add(y, 0)`` with a scalar 0 (and the output's shape and dtype those of
    ``y``) -> ``y`` (timm's MobileOne writes ``out = scale_out + 0`` when a branch is
    absent). Exact up to the sign of a zero.

All folding is done in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.ir import add_constant, get_constant, op_name
from optcc.rewrite import NOT_ANCHOR, Match, NoMatch, Rule

from ._batchnorm import bn_affine
from ._fold import affine_after

aten = torch.ops.aten
CONV = aten.convolution.default
ADD = aten.add.Tensor
SUB = aten.sub.Tensor
AVG_POOL = aten.avg_pool2d.default
BN_EVAL = aten._native_batch_norm_legit_no_training.default
BN_TRAIN = aten._native_batch_norm_legit_functional.default
DIAGONAL = "optcc_diagonal_kernel"  # node.meta flag: a depthwise conv merged from diagonal branches


# ----------------------------------------------------------------------------------------
# A branch written as a convolution of its source


@dataclass
class Branch:
    """``out = conv(source, weight, bias)``; ``groups=None``: a diagonal (depthwise) kernel."""

    source: fx.Node
    weight: torch.Tensor                 # [Cout, Cin/g, *k] (diagonal: [C, 1, *k]), float64
    bias: torch.Tensor                   # [Cout], float64
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int | None
    kind: str
    nodes: list = field(default_factory=list)   # nodes computing the branch, output last

    @property
    def kernel(self) -> tuple:
        return tuple(self.weight.shape[2:])


@dataclass
class Rejected:
    """A branch-shaped value that cannot be merged (``reason``), reading ``source``."""

    source: fx.Node
    reason: str


def _tuple(v, n):
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


def _identity(node: fx.Node) -> Branch | None:
    val = gu.val(node)
    if val is None or val.dim() < 3:
        return None
    c, n = val.shape[1], val.dim() - 2
    return Branch(node, torch.ones(c, 1, *[1] * n, dtype=torch.float64), torch.zeros(c, dtype=torch.float64),
                  (1,) * n, (0,) * n, (1,) * n, None, "identity", [])


def _resolve(gm, node) -> Branch | Rejected | None:
    """``node`` as a branch of some source, a rejected branch, or None (not branch-shaped)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is CONV:
        x, w, b, stride, padding, dilation, transposed, _out_pad, groups = node.args
        if not isinstance(x, fx.Node):
            return None
        if transposed:
            return Rejected(x, "a branch is a transposed convolution")
        weight = get_constant(gm, w)
        bias = get_constant(gm, b) if b is not None else None
        if weight is None or (b is not None and bias is None):
            return Rejected(x, "a branch's weight or bias is not a constant")
        n = weight.dim() - 2
        bias64 = bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
        # a merge of identity/pooling branches only is still diagonal: any groups will do
        diagonal = node.meta.get(DIAGONAL, False) and weight.shape[1] == 1
        return Branch(x, weight.double(), bias64, _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n),
                      None if diagonal else groups, "diagonal" if diagonal else "conv", [node])
    if node.target is AVG_POOL:
        args = list(node.args) + [None] * (7 - len(node.args))
        x, kernel, stride, padding, ceil_mode, count_include_pad, divisor = args
        kw = node.kwargs
        ceil_mode = kw.get("ceil_mode", ceil_mode or False)
        count_include_pad = kw.get("count_include_pad", True if count_include_pad is None else count_include_pad)
        divisor = kw.get("divisor_override", divisor)
        stride = kw.get("stride", stride)
        padding = kw.get("padding", padding)
        val = gu.val(x)
        if not isinstance(x, fx.Node) or val is None or val.dim() != 4:
            return None
        kernel = _tuple(kernel, 2)
        stride = _tuple(stride, 2) if stride else kernel
        padding = _tuple(padding if padding is not None else 0, 2)
        if ceil_mode:
            return Rejected(x, "an avg_pool2d branch uses ceil_mode")
        if any(padding) and not count_include_pad and divisor is None:
            return Rejected(x, "a padded avg_pool2d branch excludes the padding from its count")
        c = val.shape[1]
        weight = torch.full((c, 1, *kernel), 1.0 / (divisor or math.prod(kernel)), dtype=torch.float64)
        return Branch(x, weight, torch.zeros(c, dtype=torch.float64), stride, padding, (1, 1), None,
                      "avg_pool", [node])
    if node.target is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], fx.Node):
        bn = node.args[0]
        if bn.target is BN_TRAIN:
            inner = _resolve(gm, bn.args[0])
            source = inner.source if inner is not None else bn.args[0]
            return Rejected(source, "a branch is a training-mode BatchNorm (batch statistics)")
        if bn.target is not BN_EVAL:
            return None
        inner = _resolve(gm, bn.args[0])
        if inner is None:
            inner = _identity(bn.args[0])
            if inner is None:
                return None
        if isinstance(inner, Rejected):
            return inner
        if len(bn.users) != 1:
            return Rejected(inner.source, "BatchNorm's saved statistics are used")
        if inner.nodes and len(inner.nodes[-1].users) != 1:
            return Rejected(inner.source, "a branch output is used elsewhere")
        affine = bn_affine(gm, bn)
        if isinstance(affine, str):
            return Rejected(inner.source, affine)
        s, t = affine
        if s.numel() != inner.weight.shape[0]:
            return None
        weight, bias = affine_after(inner.weight, inner.bias, s, t)
        kind = "bn" if inner.kind == "identity" else f"{inner.kind}+bn"
        return Branch(inner.source, weight, bias, inner.stride, inner.padding, inner.dilation,
                      inner.groups, kind, inner.nodes + [bn, node])
    return None


def _expand(branch: Branch, groups: int, kernel: tuple) -> torch.Tensor:
    """The branch's weight as a ``groups``-grouped kernel of size ``kernel`` (centred)."""
    w = branch.weight
    if branch.groups is None:  # diagonal: output channel c reads input channel c
        c = w.shape[0]
        per_group = c // groups
        full = torch.zeros(c, per_group, *w.shape[2:], dtype=w.dtype)
        full[torch.arange(c), torch.arange(c) % per_group] = w[:, 0]
        w = full
    pads = []
    for k_big, k in reversed(list(zip(kernel, w.shape[2:]))):
        pads += [(k_big - k) // 2, (k_big - k) // 2]
    return torch.nn.functional.pad(w, pads) if any(pads) else w


def _single_output(branch: Branch, add: fx.Node) -> bool:
    if not branch.nodes:
        return True
    out = branch.nodes[-1]
    if set(out.users) != {add}:
        return False
    return all(len(n.users) == 1 for n in branch.nodes[:-1])


def _nonlinear_branch(gm, node, source) -> str | None:
    """The op name when ``node`` is a unary op applied to a branch of ``source``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    inputs = [a for a in node.all_input_nodes]
    if len(inputs) != 1:
        return None
    inner = _resolve(gm, inputs[0])
    if isinstance(inner, (Branch, Rejected)) and inner.source is source:
        return op_name(node)
    return None


def _feeds(a: fx.Node, b: fx.Node, depth: int = 4) -> bool:
    """Whether ``b`` is a BatchNorm of ``a`` (``getitem(BN(a), 0)``, possibly repeated)."""
    node = b
    for _ in range(depth):
        if node.target not in (operator.getitem, BN_EVAL, BN_TRAIN) or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
        if node is a:
            return True
    return False


class MergeParallelBranches(Rule):
    """``add(A, B)`` or ``sub(A, B)`` of two linear branches of the same input -> one convolution."""

    name = "merge_branches"

    def match(self, gm, node):
        if node.target not in (ADD, SUB) or len(node.args) != 2:
            return NOT_ANCHOR
        a, b = node.args
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return NOT_ANCHOR
        alpha = node.kwargs.get("alpha", 1)
        if not isinstance(alpha, (int, float)):
            return NOT_ANCHOR
        if node.target is SUB:  # A - alpha B = A + (-alpha) B
            alpha = -alpha
        if _feeds(a, b) or _feeds(b, a):
            return NOT_ANCHOR  # ``f(y) + y``: one value, not two parallel branches
        ra, rb = _resolve(gm, a), _resolve(gm, b)
        if ra is None and rb is not None and a is rb.source:
            ra = _identity(a)
        if rb is None and ra is not None and b is ra.source:
            rb = _identity(b)
        if ra is None or rb is None:
            known = ra if ra is not None else rb
            other = b if ra is not None else a
            if known is not None:
                op = _nonlinear_branch(gm, other, known.source)
                if op is not None:
                    return NoMatch(f"a branch applies {op} before the add")
            return NOT_ANCHOR
        if ra.source is not rb.source:
            return NOT_ANCHOR  # e.g. a residual add around a block: not parallel branches
        for r in (ra, rb):
            if isinstance(r, Rejected):
                return NoMatch(r.reason)
        if all(r.kind in ("identity", "bn") for r in (ra, rb)):
            return NOT_ANCHOR  # a per-channel affine map of x (e.g. RepBN): _reparam_affine's
        if not (_single_output(ra, node) and _single_output(rb, node)):
            return NoMatch("a branch output is used elsewhere")
        va, vb, vx = gu.val(a), gu.val(b), gu.val(ra.source)
        if va is None or vb is None or vx is None:
            return NoMatch("a branch has no shape information")
        if va.shape != vb.shape or va.dtype != vb.dtype:
            if any(r.kind in ("identity", "bn") for r in (ra, rb)) and va.shape[1] != vb.shape[1]:
                return NoMatch("the identity branch changes the channel count (Cin != Cout)")
            return NoMatch("the branches' outputs have different shapes (broadcasting add)")
        if any(r.groups is None for r in (ra, rb)) and vx.shape[1] != va.shape[1]:
            return NoMatch("the identity branch changes the channel count (Cin != Cout)")
        if ra.stride != rb.stride:
            return NoMatch("the branches have different strides")
        if len(ra.kernel) != len(rb.kernel):
            return NoMatch("the branches have different spatial ranks")
        dilation = []
        for da, db, ka, kb in zip(ra.dilation, rb.dilation, ra.kernel, rb.kernel):
            if ka > 1 and kb > 1 and da != db:
                return NoMatch("the branches have different dilations")
            dilation.append(da if ka > 1 else db)
        kernel = tuple(max(ka, kb) for ka, kb in zip(ra.kernel, rb.kernel))
        padding = []
        for i, d in enumerate(dilation):
            offsets = [(kernel[i] - r.kernel[i]) for r in (ra, rb)]
            if any(o % 2 for o in offsets):
                return NoMatch("the kernel sizes differ by an odd amount (centres do not align)")
            pads = {r.padding[i] + (kernel[i] - r.kernel[i]) // 2 * d for r in (ra, rb)}
            if len(pads) != 1:
                return NoMatch("the smaller kernel's padding does not centre it in the larger one")
            padding.append(pads.pop())
        if ra.groups is not None and rb.groups is not None and ra.groups != rb.groups:
            return NoMatch("the convolutions have different groups")
        groups = ra.groups if ra.groups is not None else rb.groups if rb.groups is not None else None
        if groups is None:  # two diagonal branches: stay depthwise
            groups = va.shape[1]
        return Match(nodes={"add": node, "source": ra.source},
                     values={"branches": (ra, rb), "alpha": alpha, "groups": groups, "kernel": kernel,
                             "padding": padding, "dilation": dilation, "stride": ra.stride,
                             "dtype": va.dtype})

    def rewrite(self, gm, m):
        add, x = m.nodes["add"], m.nodes["source"]
        ra, rb = m.values["branches"]
        alpha, groups, kernel = m.values["alpha"], m.values["groups"], m.values["kernel"]
        weight = _expand(ra, groups, kernel) + alpha * _expand(rb, groups, kernel)
        bias = ra.bias + alpha * rb.bias
        dtype = m.values["dtype"]
        w_node = add_constant(gm, f"{add.name}_reparam_weight", weight.to(dtype), before=add)
        b_node = add_constant(gm, f"{add.name}_reparam_bias", bias.to(dtype), before=add)
        n = len(kernel)
        with gm.graph.inserting_before(add):
            conv = gm.graph.create_node("call_function", CONV, (
                x, w_node, b_node, list(m.values["stride"]), list(m.values["padding"]),
                list(m.values["dilation"]), False, [0] * n, groups), name="convolution")
        conv.meta["val"] = add.meta.get("val")
        if ra.groups is None and rb.groups is None:
            conv.meta[DIAGONAL] = True
        add.replace_all_uses_with(conv)
        _erase_dead(gm, [add, *reversed(ra.nodes), *reversed(rb.nodes)])


def _erase_dead(gm, nodes):
    for n in nodes:
        if not getattr(n, "_erased", False) and not n.users:
            gm.graph.erase_node(n)


class Conv1x1ThenConv(Rule):
    """``conv_kxk(conv_1x1(x))`` with nothing between -> one convolution.

    Only where the fused kernel needs no more multiplies per output than the pair:
    ``Cout * Cin/g * k^2 <= M * Cin/g + Cout * M/g * k^2`` (M = the 1x1's output channels).
    """

    name = "conv1x1_kxk"

    def match(self, gm, node):
        if node.target is not CONV:
            return NOT_ANCHOR
        first = node.args[0]
        if not isinstance(first, fx.Node) or first.target is not CONV:
            return NOT_ANCHOR
        _, w1, b1, stride1, pad1, _dil1, transposed1, _op1, groups1 = first.args
        x2, w2, b2, stride2, pad2, dil2, transposed2, _op2, groups2 = node.args
        if transposed1 or transposed2:
            return NoMatch("a transposed convolution")
        weight1, weight2 = get_constant(gm, w1), get_constant(gm, w2)
        bias1 = get_constant(gm, b1) if b1 is not None else None
        bias2 = get_constant(gm, b2) if b2 is not None else None
        if weight1 is None or weight2 is None or (b1 is not None and bias1 is None) or (
                b2 is not None and bias2 is None):
            return NoMatch("a weight or bias is not a constant")
        n = weight1.dim() - 2
        if any(k != 1 for k in weight1.shape[2:]) or any(s != 1 for s in _tuple(stride1, n)) or any(
                _tuple(pad1, n)):
            return NoMatch("the first convolution is not 1x1 with stride 1 and no padding")
        if len(first.users) != 1:
            return NoMatch("the 1x1 convolution's output has other users")
        if groups1 != groups2:
            return NoMatch("the convolutions have different groups")
        # Exact either way, but a 1x1 that narrows the channels (a bottleneck) is cheaper
        # than the fused kernel: only fuse when it does not add multiplies per output.
        taps = math.prod(weight2.shape[2:])
        fused_cost = weight2.shape[0] * weight1.shape[1] * taps
        separate_cost = weight1.shape[0] * weight1.shape[1] + weight2.shape[0] * weight2.shape[1] * taps
        if fused_cost > separate_cost:
            return NoMatch("fusing would cost more multiplies than the two convolutions (a bottleneck)")
        if any(_tuple(pad2, n)) and bias1 is not None and bool((bias1 != 0).any()):
            return NoMatch("the kxk convolution pads with zeros where the fused form would see "
                           "the 1x1's bias")
        return Match(nodes={"first": first, "second": node},
                     values={"w1": weight1, "b1": bias1, "w2": weight2, "b2": bias2, "groups": groups1})

    def rewrite(self, gm, m):
        first, second = m.nodes["first"], m.nodes["second"]
        w1, w2, g = m.values["w1"].double(), m.values["w2"].double(), m.values["groups"]
        mid, cin_g = w1.shape[0], w1.shape[1]
        cout, mid_g, *kernel = w2.shape
        w1g = w1.reshape(g, mid // g, cin_g)                      # [g, M/g, Cin/g]
        w2g = w2.reshape(g, cout // g, mid_g, *kernel)            # [g, Cout/g, M/g, k...]
        fused = torch.einsum("gom...,gmi->goi...", w2g, w1g).reshape(cout, cin_g, *kernel)
        b1 = m.values["b1"].double() if m.values["b1"] is not None else torch.zeros(mid, dtype=torch.float64)
        b2 = m.values["b2"].double() if m.values["b2"] is not None else torch.zeros(cout, dtype=torch.float64)
        shift = torch.einsum("gom,gm->go", w2g.flatten(3).sum(-1), b1.reshape(g, mid // g)).reshape(cout)
        dtype = m.values["w2"].dtype
        old = second.args[1]
        w_node = add_constant(gm, f"{old.name}_1x1", fused.to(dtype), before=second)
        b_node = add_constant(gm, f"{old.name}_1x1_bias", (b2 + shift).to(dtype), before=second)
        args = list(second.args)
        args[0], args[1], args[2] = first.args[0], w_node, b_node
        second.args = tuple(args)
        _erase_dead(gm, [first])


class AddZero(Rule):
    """``add(y, 0)`` -> ``y``."""

    name = "add_zero"

    def match(self, gm, node):
        if node.target is not ADD or len(node.args) != 2:
            return NOT_ANCHOR
        y, zero = node.args
        if isinstance(y, (int, float)) and isinstance(zero, fx.Node):
            y, zero = zero, y
        if not isinstance(y, fx.Node) or isinstance(zero, (fx.Node, bool)) or not isinstance(zero, (int, float)):
            return NOT_ANCHOR
        if zero != 0:
            return NOT_ANCHOR
        vy, vout = gu.val(y), gu.val(node)
        if vy is None or vout is None or vy.shape != vout.shape or vy.dtype != vout.dtype:
            return NOT_ANCHOR
        return Match(nodes={"add": node, "y": y})

    def rewrite(self, gm, m):
        m.nodes["add"].replace_all_uses_with(m.nodes["y"])
        _erase_dead(gm, [m.nodes["add"]])


RULES: list[Rule] = [AddZero(), Conv1x1ThenConv(), MergeParallelBranches()]
