"""Folding a per-channel affine map into the constant weight and bias of a conv / linear.

Every bn_reparam rule that removes a BatchNorm or a constant scale/shift ends here. With
``s``, ``t`` per channel (float64 vectors, or 0-d scalars: one value for every channel):

after, ``op(x) -> s * op(x) + t`` on op's output channels o::

    W'[o] = s_o W[o],   b' = s b + t
    linear W [Cout, Cin] and conv W [Cout, Cin/g, k...]: o is dim 0;
    transposed conv W [Cin, Cout/g, k...]: o = g * Cout/g + j is dim 1 (j) of group g's rows

before, ``op(x) -> op(s * x + t)`` on op's input channels (never a transposed conv)::

    linear:  W' = W diag(s),                     b' = b + W t
    conv:    W'[o, i, k] = W[o, i, k] s_c,       b'_o = b_o + sum_{i,k} W[o, i, k] t_c
             with c = g(o) Cin/g + i the BatchNorm channel that input channel i of o's group reads

"before" is legal only where every output sees ``t`` at every tap: the caller checks that
a conv that shifts does not pad with zeros. All arithmetic is float64; :func:`fold_after` /
:func:`fold_before` cast back to the weight's dtype and point the op at new constants.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ._weights import replace_weight_and_bias, weight_and_bias

LINEAR = torch.ops.aten.linear.default


def _per_channel(v: torch.Tensor, n: int) -> torch.Tensor:
    return v.expand(n).clone() if v.dim() == 0 else v


def _bias64(bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return bias.double() if bias is not None else torch.zeros(n, dtype=torch.float64)


def affine_after(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, t: torch.Tensor, *,
                 linear: bool = False, transposed: bool = False, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') in float64 for ``s * op(x) + t`` (see the module docstring)."""
    w64 = weight.double()
    if transposed and not linear:
        cin, cpg, *kernel = w64.shape
        cout = cpg * groups
        s, t = _per_channel(s, cout), _per_channel(t, cout)
        grouped = w64.reshape(groups, cin // groups, cpg, *kernel)
        folded = (grouped * s.reshape(groups, 1, cpg, *[1] * len(kernel))).reshape(w64.shape)
    else:
        cout = w64.shape[0]
        s, t = _per_channel(s, cout), _per_channel(t, cout)
        folded = w64 * s[:, None] if linear else w64 * s.reshape(cout, *[1] * (w64.dim() - 1))
    return folded, s * _bias64(bias, cout) + t


def affine_before(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor, t: torch.Tensor, *,
                  linear: bool = False, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') in float64 for ``op(s * x + t)`` (see the module docstring)."""
    w64 = weight.double()
    cout = w64.shape[0]
    b64 = _bias64(bias, cout)
    if linear:
        cin = w64.shape[1]
        s, t = _per_channel(s, cin), _per_channel(t, cin)
        return w64 * s[None, :], b64 + w64 @ t
    _, cpg, *kernel = w64.shape
    s, t = _per_channel(s, cpg * groups), _per_channel(t, cpg * groups)
    s_in = s.reshape(groups, cpg).repeat_interleave(cout // groups, dim=0)
    t_in = t.reshape(groups, cpg).repeat_interleave(cout // groups, dim=0)
    expand = (cout, cpg, *[1] * len(kernel))
    shift = (w64 * t_in.reshape(expand)).flatten(1).sum(1)
    return w64 * s_in.reshape(expand), b64 + shift


def _layout(op: fx.Node) -> dict:
    if op.target is LINEAR:
        return {"linear": True}
    return {"transposed": bool(op.args[6]), "groups": op.args[8]}


def fold_after(gm: fx.GraphModule, op: fx.Node, s: torch.Tensor, t: torch.Tensor, suffix: str) -> None:
    """``op``'s output y becomes ``s * y + t``; the new constants are named with ``suffix``."""
    weight, bias = weight_and_bias(gm, op)
    folded, shifted = affine_after(weight, bias, s, t, **_layout(op))
    replace_weight_and_bias(gm, op, folded.to(weight.dtype), shifted.to(weight.dtype), suffix)


def fold_before(gm: fx.GraphModule, op: fx.Node, s: torch.Tensor, t: torch.Tensor, suffix: str) -> None:
    """``op``'s data input x becomes ``s * x + t`` (not a transposed conv; see the module docstring)."""
    weight, bias = weight_and_bias(gm, op)
    layout = _layout(op)
    if layout.pop("transposed", False):
        raise ValueError("a shift before a transposed convolution does not fold into its bias")
    folded, shifted = affine_before(weight, bias, s, t, **layout)
    replace_weight_and_bias(gm, op, folded.to(weight.dtype), shifted.to(weight.dtype), suffix)
