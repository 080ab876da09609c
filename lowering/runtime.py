"""Running a graph whose regions are generated Triton kernels (``target="triton"``).

:func:`lower_regions` replaces the submodule of every region the generators support by a
launch module (:class:`PointwiseLaunch`, :class:`ReductionLaunch`: allocate the outputs,
pass every tensor's strides - broadcast inputs expanded with stride 0 - and launch one
kernel) and every canonical SDPA node by the hand-written flash attention kernel
(``optcc.kernels.flash_attention``); every other region keeps its reference subgraph and
every other op stays a torch op. Each region left on its reference is reported with the reason, so nothing is
silently slower or different.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import triton

from optcc.regions import REGION_KEY, region_module, regions

from optcc.kernels.flash_attention import flash_attention

from .cache import load_kernel
from .pointwise import PointwiseKernel, Unsupported, generate_pointwise
from .reduction import ReductionKernel, generate_reduction


class PointwiseLaunch(torch.nn.Module):
    def __init__(self, plan: PointwiseKernel):
        super().__init__()
        self.plan = plan
        self.kernel = load_kernel(plan.name, plan.source)

    def forward(self, *inputs: torch.Tensor):
        shape = self.plan.shape
        device = inputs[0].device
        expanded = [x.expand(shape) for x in inputs]
        outputs = [torch.empty(shape, dtype=dtype, device=device) for dtype in self.plan.outputs]
        numel = max(1, torch.Size(shape).numel())
        strides = [s for t in expanded + outputs for s in (t.stride() if shape else ())]
        grid = (triton.cdiv(numel, self.plan.block),)
        self.kernel[grid](*expanded, *outputs, numel, *shape, *strides, BLOCK=self.plan.block)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class ReductionLaunch(torch.nn.Module):
    def __init__(self, plan: ReductionKernel):
        super().__init__()
        self.plan = plan
        self.kernel = load_kernel(plan.name, plan.source)

    def forward(self, *inputs: torch.Tensor):
        plan = self.plan
        device = inputs[0].device
        expanded = [x.expand(plan.row_shape) for x in inputs]
        outputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in zip(plan.output_shapes, plan.outputs)]
        rank = len(plan.row_shape)
        # a result reduced without keepdim is addressed as [*R, 1]
        strides = [s for t in expanded + outputs for s in (t if t.dim() == rank else t.unsqueeze(-1)).stride()]
        rows = torch.Size(plan.row_shape[:-1]).numel()
        if rows:
            self.kernel[(rows,)](*expanded, *outputs, *plan.row_shape, *strides, BLOCK_N=plan.block)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


GENERATORS = {
    "pointwise": (generate_pointwise, PointwiseLaunch),
    "reduction": (generate_reduction, ReductionLaunch),
}


def _attention_kernel_refusal(node: fx.Node) -> str | None:
    """Why the hand-written flash attention kernel cannot take this SDPA node (or None)."""
    q, k, v = (a.meta.get("val") for a in node.args[:3])
    if any(t is None or t.dim() != 4 for t in (q, k, v)):
        return "attention on tensors that are not [batch, heads, seq, head_dim]"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"attention in {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > 256:
        return "attention head dim above 256"
    if len(node.args) > 4 and node.args[4]:
        return "attention with dropout"
    if q.shape[0] * q.shape[1] > 65535:
        return "attention with more than 65535 batch x heads"
    return None


def lower_regions(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """Swap supported regions for kernel launches in a copy of ``gm``; returns it and, for
    each region left on its reference subgraph, why."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    lowered = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    lowered.meta.update(gm.meta)
    left: dict[str, str] = {}
    for node in regions(lowered):
        info = node.meta[REGION_KEY]
        if info.kind not in GENERATORS:
            left[node.name] = f"no {info.kind} kernel generator yet"
            continue
        generate, launch = GENERATORS[info.kind]
        try:
            plan = generate(region_module(lowered, node), f"{node.name}_kernel")
        except Unsupported as exc:
            left[node.name] = f"{info.kind}: {exc}"
            continue
        setattr(lowered, node.target, launch(plan))
    for node in lowered.graph.nodes:
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            refusal = _attention_kernel_refusal(node)
            if refusal is None:
                node.target = flash_attention
            else:
                left[node.name] = refusal
    lowered.recompile()
    return lowered, left
