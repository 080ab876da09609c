"""Fused regions: groups of ops that a back end turns into one kernel.

A region is one ``call_module`` node in the canonical graph. Its submodule is a
``GraphModule`` holding the region's *reference subgraph* (the original ATen ops, with
the region's inputs as placeholders and its results as outputs), so every back end can
run it: ``target="eager"`` executes the reference ops, the Triton lowering generates a
kernel from them. ``node.meta["optcc_region"]`` is a :class:`RegionInfo` naming the kind
("gemm", "reduction", "pointwise", ...) and the anchor op. The core knows nothing of how
regions are chosen; a pass groups nodes and calls :func:`fuse_region`.

Regions are fused with torch.fx's own ``fuse_as_graphmodule``/``insert_subgm``, which
refuse partitions that would create a cycle. :func:`inline_regions` undoes the grouping:
back ends that schedule ops themselves (eager op by op, Inductor) run a flat copy and
save the Python call overhead of one submodule per region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch.fx.passes.tools_common import stable_topological_sort
from torch.fx.passes.utils.fuser_utils import erase_nodes, fuse_as_graphmodule, insert_subgm, validate_partition

REGION_KEY = "optcc_region"


@dataclass(frozen=True)
class RegionInfo:
    kind: str
    anchor: str | None = None

    def __str__(self) -> str:
        return self.kind if self.anchor is None else f"{self.kind}:{self.anchor}"


def is_region(node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(node.meta.get(REGION_KEY), RegionInfo)


def regions(gm: fx.GraphModule) -> list[fx.Node]:
    """The region nodes of ``gm``, in graph order."""
    return [n for n in gm.graph.nodes if is_region(n)]


def has_regions(gm: fx.GraphModule) -> bool:
    return any(is_region(n) for n in gm.graph.nodes)


def region_module(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    return gm.get_submodule(node.target)


def can_fuse(nodes: list[fx.Node]) -> bool:
    """Whether grouping ``nodes`` keeps the graph acyclic (no path leaves and re-enters)."""
    return validate_partition(nodes)


def fuse_region(gm: fx.GraphModule, nodes: list[fx.Node], info: RegionInfo) -> fx.Node:
    """Replace ``nodes`` by one region node; returns it. Call :func:`finish` after the last."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(nodes, key=order.__getitem__)
    taken = set(gm._modules)
    index = sum(1 for name in taken if name.startswith(f"{info.kind}_region_"))
    while f"{info.kind}_region_{index}" in taken:
        index += 1
    name = f"{info.kind}_region_{index}"
    sub, inputs, outputs = fuse_as_graphmodule(gm, nodes, name, dict.fromkeys(nodes))
    insert_subgm(gm, sub, inputs, outputs, nodes[-1])
    erase_nodes(gm, nodes)
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    node.meta[REGION_KEY] = info
    if len(outputs) == 1:
        node.meta["val"] = outputs[0].meta.get("val")
    return node


def finish(gm: fx.GraphModule) -> None:
    """Restore a valid node order after fusing (an early region output may have a user
    that sits before the region's last node)."""
    stable_topological_sort(gm)
    gm.graph.lint()
    gm.recompile()


def inline_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """A flat copy of ``gm``: every region node replaced by its reference ops (``gm`` is
    left as it is; tensors are shared)."""
    if not regions(gm):
        return gm
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    flat = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    flat.meta.update(gm.meta)
    for node in regions(flat):
        sub = region_module(flat, node)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            result = graph.graph_copy(sub.graph, dict(zip(placeholders, node.args)))
        if isinstance(result, (tuple, list)):
            for user in list(node.users):
                user.replace_all_uses_with(result[user.args[1]])
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(result)
        graph.erase_node(node)
        delattr(flat, node.target)
    graph.lint()
    flat.recompile()
    return flat
