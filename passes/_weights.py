"""Reading and replacing the constant weight and bias of a conv or linear node."""

from __future__ import annotations

import torch
import torch.fx as fx

from optcc.ir import add_constant, get_constant


def _bias_arg(op: fx.Node):
    return op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")


def weight_and_bias(gm: fx.GraphModule, op: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """The constant (weight, bias or None) of ``op``, or the reason they are not constants."""
    weight = get_constant(gm, op.args[1])
    if weight is None or not weight.is_floating_point():
        return "weight is not a constant"
    bias_arg = _bias_arg(op)
    bias = None
    if bias_arg is not None:
        bias = get_constant(gm, bias_arg)
        if bias is None:
            return "bias is not a constant"
    return weight, bias


def replace_weight_and_bias(gm: fx.GraphModule, op: fx.Node, weight: torch.Tensor, bias: torch.Tensor,
                            suffix: str) -> None:
    """Point ``op`` at new constants named after the old ones plus ``suffix`` (added once)."""
    weight_name = op.args[1].name.removesuffix(suffix)
    new_weight = add_constant(gm, f"{weight_name}{suffix}", weight, before=op)
    bias_arg = _bias_arg(op)
    bias_name = bias_arg.name.removesuffix(suffix) if isinstance(bias_arg, fx.Node) else f"{weight_name}_bias"
    new_bias = add_constant(gm, f"{bias_name}{suffix}", bias, before=op)
    args = list(op.args)
    while len(args) < 3:
        args.append(None)
    args[1], args[2] = new_weight, new_bias
    op.args = tuple(args)
    op.kwargs = {k: v for k, v in op.kwargs.items() if k != "bias"}
