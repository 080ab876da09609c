"""Eval BatchNorm as the per-channel affine map the bn_reparam rules fold.

    BN(y)_c = s_c * y_c + t_c,   s_c = gamma_c / sqrt(sigma^2_c + eps),   t_c = beta_c - s_c * mu_c
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from optcc.ir import get_constant

BATCH_NORM = torch.ops.aten._native_batch_norm_legit_no_training.default


def bn_affine(gm: fx.GraphModule, bn: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(s, t) of an eval BatchNorm node in float64, or the reason it cannot be folded."""
    _, weight, bias, mean, var, _momentum, eps = bn.args
    mean_t, var_t = get_constant(gm, mean), get_constant(gm, var)
    if mean_t is None or var_t is None:
        return "running statistics are not constants"
    gamma = get_constant(gm, weight) if weight is not None else torch.ones_like(mean_t)
    beta = get_constant(gm, bias) if bias is not None else torch.zeros_like(mean_t)
    if gamma is None or beta is None:
        return "affine parameters are not constants"
    scale = gamma.double() / torch.sqrt(var_t.double() + eps)
    return scale, beta.double() - scale * mean_t.double()


def bn_output(bn: fx.Node) -> fx.Node | None:
    """The single ``getitem(bn, 0)`` reading the normalized tensor (None if the saved statistics are used)."""
    users = list(bn.users)
    if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
        return None
    return users[0]
