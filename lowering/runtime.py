"""Running a graph whose regions are generated Triton kernels (``target="triton"``).

:func:`lower_regions` replaces the submodule of every region the generators support by a
:class:`PointwiseLaunch` (allocate the outputs, pass every tensor's strides - broadcast
inputs expanded to the iteration space with stride 0 - and launch one kernel); every
other region keeps its reference subgraph and every op outside regions stays a torch
op. Each region left on its reference is reported with the reason, so nothing is
silently slower or different.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import triton

from optcc.regions import REGION_KEY, region_module, regions

from .cache import load_kernel
from .pointwise import PointwiseKernel, Unsupported, generate_pointwise


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
        if info.kind != "pointwise":
            left[node.name] = f"no {info.kind} kernel generator yet"
            continue
        try:
            plan = generate_pointwise(region_module(lowered, node), f"{node.name}_kernel")
        except Unsupported as exc:
            left[node.name] = str(exc)
            continue
        setattr(lowered, node.target, PointwiseLaunch(plan))
    lowered.recompile()
    return lowered, left
