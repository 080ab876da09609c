"""int8_decomposition: LLM.int8() vector-wise int8 linears with outlier decomposition.

Each selected ``y = x W^T + b`` (``aten.linear``, or ``aten.mm`` / ``aten.addmm`` whose
weight is a constant, possibly transposed) becomes ``optcc::int8_linear``. With rows
``X = x.reshape(-1, K)``, the constant weight is quantized once per output channel::

    s_j = max_k |W[j, k]| / 127,     Wq[j, k] = round(W[j, k] / s_j)  in [-127, 127]

and stored as new constants (int8 ``Wq`` and fp32 ``s``); the fp32 weight leaves the
graph, so its linear weights take ``(N K + 4 N) / (4 N K)`` ~ 0.25x the bytes. At run
time the activations are quantized per row, after the outlier feature columns are taken
out::

    O        = { k : max_i |X[i, k]| >= threshold }
    a_i      = max_{k not in O} |X[i, k]| / 127,   Xq[i, k] = round(X[i, k] / a_i)   (k not in O)
    y[i, j]  = a_i s_j sum_{k not in O} Xq[i, k] Wq[j, k]       int8 x int8 -> int32
             + sum_{k in O} X[i, k] s_j Wq[j, k]                  fp32
             + b_j

The outlier columns multiply the fp32 activations with the dequantized int8 weight
columns (as bitsandbytes' ``Linear8bitLt`` does once its fp16 weight is dropped): the
fp32 weight is gone, and it is the outlier *activations* that int8 cannot hold - one
value of magnitude 60 in a row would round every value below 0.24 in that row to 0.
The error left is the rounding of ``Xq`` (half a step of ``a_i``) and of ``Wq`` (half a
step of ``s_j``). ``threshold`` 0 or None quantizes every column (plain vector-wise int8);
``weight_only`` keeps the activations in fp32 and uses ``Wq s`` as the weight.

Approximate: never runs unless named. Selection: ``include`` / ``skip`` are fnmatch
patterns tried against the node's name, its weight constant's name and the path of the
module it came from (``node.meta["nn_module_stack"]``, e.g. ``encoder.layer.0.output.dense``);
``min_weight_elements`` leaves small layers in fp32. ``cpu_kernel`` forces one of the CPU
integer GEMMs of :mod:`optcc.kernels.int8_cpu` (default ``auto``: the first exact one in
the order measured for this CPU); the stats name the kernel and why. Left alone: matmuls whose weight is
not a constant (``x @ y`` of two activations) and weights that are not 2-d floats.
"""

from __future__ import annotations

import fnmatch
import typing
from dataclasses import dataclass

import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.ir import add_constant, drop_unused_constants, get_constant
from optcc.kernels.int8_cpu import choose as choose_cpu_kernel
from optcc.kernels.int8_linear import int8_linear, quantize_weight
from optcc.pass_base import Knob, Pass, PassResult, register_pass
from optcc.rewrite import NOT_ANCHOR, Match, NoMatch, Rule, apply_rules

aten = torch.ops.aten
LINEAR = aten.linear.default
MM = aten.mm.default
ADDMM = aten.addmm.default
PERMUTE = aten.permute.default

Patterns = typing.Union[str, tuple, list]


def _patterns(value: Patterns) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module ``node`` was traced from ('' at the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def _weight_of(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor, bool] | None:
    """``(get_attr node, tensor, transposed)`` where ``node`` reads a constant, or its ``permute(.., [1, 0])``."""
    if not isinstance(node, fx.Node):
        return None
    tensor = get_constant(gm, node)
    if tensor is not None:
        return node, tensor, False
    if node.target is PERMUTE and list(node.args[1]) == [1, 0]:
        tensor = get_constant(gm, node.args[0])
        if tensor is not None:
            return node.args[0], tensor, True
    return None


class QuantizeLinear(Rule):
    """``linear`` / ``mm`` / ``addmm`` with a constant weight -> ``optcc::int8_linear``."""

    name = "int8_linear"

    def __init__(self, options):
        self.options = options
        self.include = _patterns(options.include)
        self.skip = _patterns(options.skip)
        self.layer_names: list[str] = []
        self.bytes_before = 0
        self.bytes_after = 0

    def match(self, gm, node):
        if node.target is LINEAR:
            x, w_arg = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else None
            # linear's weight is [N, K]; mm's second operand is [K, N] = W^T
            found, out_major = _weight_of(gm, w_arg), True
        elif node.target in (MM, ADDMM):
            if node.target is ADDMM:
                if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                    return NoMatch("addmm with beta or alpha other than 1")
                bias, x, w_arg = node.args[0], node.args[1], node.args[2]
                if gu.rank(bias) != 1:
                    return NoMatch("addmm whose bias is not a vector")
            else:
                x, w_arg, bias = node.args[0], node.args[1], None
            found, out_major = _weight_of(gm, w_arg), False
        else:
            return NOT_ANCHOR
        if found is None:
            return NoMatch("the weight is not a constant")
        w_node, tensor, transposed = found
        if tensor.dim() != 2 or not tensor.is_floating_point():
            return NoMatch("the weight is not a 2-d float tensor")
        # [N, K] orientation: linear reads W directly, mm reads W^T (stored either way)
        weight = tensor if out_major != transposed else tensor.t()
        path = module_path(node)
        names = [node.name, w_node.name, str(w_node.target)] + ([path] if path else [])
        if self.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.include):
            return NoMatch("not selected by include")
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in self.skip):
            return NoMatch("matches a skip pattern")
        if weight.numel() < self.options.min_weight_elements:
            return NoMatch("weight smaller than min_weight_elements")
        layer = path or str(w_node.target)
        if layer in self.layer_names:
            layer = f"{layer}:{node.name}"
        return Match(nodes={"op": node, "x": x, "weight": w_node},
                     values={"weight": weight, "bias": bias, "layer": layer})

    def rewrite(self, gm, m):
        node, weight = m.nodes["op"], m.values["weight"]
        q, scale = quantize_weight(weight)
        base = str(m.nodes["weight"].target)
        q_node = add_constant(gm, f"{base}_int8", q, before=node)
        s_node = add_constant(gm, f"{base}_scale", scale, before=node)
        threshold = float(self.options.threshold or 0.0)
        # the kernel argument is written only when forced, so graphs read as before
        kwargs = {} if self.options.cpu_kernel == "auto" else {"cpu_kernel": self.options.cpu_kernel}
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                int8_linear,
                (m.nodes["x"], q_node, s_node, m.values["bias"], threshold,
                 bool(self.options.weight_only), m.values["layer"]),
                kwargs,
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        self.layer_names.append(m.values["layer"])
        self.bytes_before += weight.numel() * weight.element_size()
        self.bytes_after += q.numel() * q.element_size() + scale.numel() * scale.element_size()


@register_pass
class Int8Decomposition(Pass):
    """LLM.int8(): int8 linears with per-row/per-channel scales and fp32 outlier columns (approximate)."""

    name = "int8_decomposition"
    exact = False
    run_after = ("bn_reparam",)
    run_before = ("block_fusion",)  # its regions would hide the linears

    @dataclass
    class Options:
        threshold: typing.Optional[float] = 6.0
        include: Patterns = ()
        skip: Patterns = ()
        min_weight_elements: int = 0
        weight_only: bool = False
        cpu_kernel: str = "auto"

    def knobs(self, gm: fx.GraphModule) -> list[Knob]:
        """One knob per linear this pass would quantize: ``threshold`` as given (outlier
        columns kept in fp32), then 0 (every column int8: faster, less exact).

        int8 removes no FLOPs; ``work`` (``2 M N K``) shares a measured speed-up among layers.
        """
        rule = QuantizeLinear(self.options)
        given = float(self.options.threshold or 0.0)
        settings = (given, 0.0) if given else (0.0,)
        knobs, self._knob_nodes = [], {}
        for node in list(gm.graph.nodes):
            m = rule.match(gm, node)
            if not isinstance(m, Match):
                continue
            weight = m.values["weight"]
            rows = gu.shape(m.nodes["x"])
            rows = float(torch.tensor(rows[:-1]).prod()) if rows else 1.0
            layer = m.values["layer"]
            rule.layer_names.append(layer)  # the next linear of the same module gets its node's name
            self._knob_nodes[layer] = node.name
            knobs.append(Knob(layer, settings, (0.0,) * len(settings), 2.0 * rows * weight.numel()))
        return knobs

    def configure(self, choices: dict) -> list[Pass]:
        by_threshold: dict[float, list[str]] = {}
        for layer, threshold in choices.items():
            by_threshold.setdefault(float(threshold), []).append(self._knob_nodes[layer])
        return [Int8Decomposition(**{**vars(self.options), "threshold": threshold, "include": sorted(nodes)})
                for threshold, nodes in sorted(by_threshold.items(), reverse=True)]

    def run(self, gm: fx.GraphModule) -> PassResult:
        kernel = choose_cpu_kernel(self.options.cpu_kernel)  # an unknown or inexact kernel fails here, by name
        rule = QuantizeLinear(self.options)
        stats = apply_rules(gm, [rule])
        if stats["matches"]:
            gm.graph.eliminate_dead_code()
            drop_unused_constants(gm)  # the fp32 weights go now, not only at the next cleanup
        stats.update(layers=list(rule.layer_names), weight_bytes_fp32=rule.bytes_before,
                     weight_bytes_int8=rule.bytes_after)
        if stats["matches"]:
            stats.update(cpu_kernel="fp32 (weight only)" if self.options.weight_only else kernel.kernel.name,
                         cpu_kernel_reason=kernel.reason)
        return PassResult(gm, stats["matches"] > 0, stats)
