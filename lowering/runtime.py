"""Running a graph whose regions are generated Triton kernels (``target="triton"``).

:func:`lower_regions` replaces the submodule of every region the generators support by a
launch module (:class:`PointwiseLaunch`, :class:`ReductionLaunch`, :class:`GemmLaunch`: allocate the outputs,
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
from .gemm import GemmKernel, generate_gemm, row_strides, split_epilogue
from .pointwise import PointwiseKernel, generate_pointwise
from .reduction import ReductionKernel, generate_reduction
from .triton_types import Unsupported


class PointwiseLaunch(torch.nn.Module):
    def __init__(self, plan: PointwiseKernel):
        super().__init__()
        self.plan = plan
        self.kernel = load_kernel(plan.name, plan.source)

    def forward(self, *inputs: torch.Tensor):
        shape = self.plan.shape
        device = inputs[0].device
        expanded = [x.expand(shape) for x in inputs]
        # results laid out as the reference's: later views in the graph depend on it
        outputs = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                   for dtype, stride in zip(self.plan.outputs, self.plan.strides)]
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
        outputs = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                   for shape, stride, dtype in zip(plan.output_shapes, plan.output_strides, plan.outputs)]
        rank = len(plan.row_shape)
        # a result reduced without keepdim is addressed as [*R, 1]
        strides = [s for t in expanded + outputs for s in (t if t.dim() == rank else t.unsqueeze(-1)).stride()]
        rows = torch.Size(plan.row_shape[:-1]).numel()
        if rows:
            self.kernel[(rows,)](*expanded, *outputs, *plan.row_shape, *strides, BLOCK_N=plan.block)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class GemmLaunch(torch.nn.Module):
    def __init__(self, plan: GemmKernel):
        super().__init__()
        self.plan = plan
        self.kernel = load_kernel(plan.name, plan.source)

    def forward(self, *inputs: torch.Tensor):
        plan = self.plan
        batched = plan.kind == "aten.bmm.default"
        rows = len(plan.out_shape) - (2 if batched else 1)
        x, w = inputs[plan.operands[0]], inputs[plan.operands[1]]
        bias = inputs[plan.operands[2]] if plan.operands[2] >= 0 else x
        out = torch.empty_strided(plan.out_shape, plan.out_stride, dtype=plan.out_dtype, device=x.device)
        epilogue = [inputs[i].expand(plan.out_shape) for i in plan.epilogue_inputs]
        row_sizes = plan.out_shape[1:-1] if batched else plan.out_shape[:-1]
        if plan.kind == "aten.linear.default":
            w_strides = [w.stride(1), w.stride(0), 0]  # W is [N, K]
        else:
            w_strides = [w.stride(-2), w.stride(-1), w.stride(0) if batched else 0]
        strides = row_strides(x, rows, batched) + [x.stride(-1), x.stride(0) if batched else 0]
        strides += w_strides + [bias.stride(0) if plan.operands[2] >= 0 else 0]
        for t in epilogue + [out]:
            strides += row_strides(t, rows, batched) + [t.stride(-1), t.stride(0) if batched else 0]
        block_m, block_n, block_k = plan.blocks
        grid = (triton.cdiv(plan.m, block_m), triton.cdiv(plan.n, block_n), plan.batch)
        if plan.m and plan.n:
            self.kernel[grid](x, w, bias, *epilogue, out, plan.m, plan.n, plan.k, *row_sizes, *strides,
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        return out


class VendorAnchorLaunch(torch.nn.Module):
    """The anchor (a convolution) through torch's vendor kernel, then one generated
    pointwise kernel for the whole epilogue."""

    def __init__(self, region: fx.GraphModule, name: str):
        super().__init__()
        anchor, epilogue, self.epilogue_inputs = split_epilogue(region)
        placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
        index = {p: i for i, p in enumerate(placeholders)}
        self.anchor = anchor.target
        self.args = fx.map_arg(anchor.args, lambda a: ("input", index[a]))
        self.kwargs = dict(anchor.kwargs)
        self.epilogue = PointwiseLaunch(generate_pointwise(epilogue, name)) if epilogue is not None else None

    def forward(self, *inputs: torch.Tensor):
        def resolve(a):
            if isinstance(a, tuple) and len(a) == 2 and a[0] == "input":
                return inputs[a[1]]
            if isinstance(a, (list, tuple)):
                return type(a)(resolve(b) for b in a)
            return a

        result = self.anchor(*resolve(self.args), **self.kwargs)
        if self.epilogue is None:
            return result
        return self.epilogue(result, *(inputs[i] for i in self.epilogue_inputs))


def _gemm_launch(region: fx.GraphModule, name: str) -> torch.nn.Module:
    anchor = next(n for n in region.graph.nodes if n.op == "call_function")
    if anchor.target is torch.ops.aten.convolution.default:
        return VendorAnchorLaunch(region, name)
    return GemmLaunch(generate_gemm(region, name))


GENERATORS = {
    "gemm": (_gemm_launch, None),
    "pointwise": (generate_pointwise, PointwiseLaunch),
    "reduction": (generate_reduction, ReductionLaunch),
}


def attention_like_reference(stride: tuple[int, ...], *args, **kwargs) -> torch.Tensor:
    """The flash attention kernel, its result laid out as torch's SDPA lays out its own
    (later views in the graph were traced against that layout)."""
    out = flash_attention(*args, **kwargs)
    if out.stride() == tuple(stride):
        return out
    return torch.empty_strided(out.shape, stride, dtype=out.dtype, device=out.device).copy_(out)


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
        setattr(lowered, node.target, launch(plan) if launch is not None else plan)
    for node in lowered.graph.nodes:
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            refusal = _attention_kernel_refusal(node)
            if refusal is None:
                node.args = (tuple(node.meta["val"].stride()), *node.args)
                node.target = attention_like_reference
            else:
                left[node.name] = refusal
    lowered.recompile()
    return lowered, left


def region_sources(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(region name, generated Triton source)`` for every region of ``gm``; a region
    left on its reference ops gets a comment saying why instead."""
    sources = []
    for node in regions(gm):
        info = node.meta[REGION_KEY]
        region = region_module(gm, node)
        name = f"{node.name}_kernel"
        try:
            if info.kind == "gemm":
                launch = _gemm_launch(region, name)
                if isinstance(launch, GemmLaunch):
                    sources.append((node.name, launch.plan.source))
                elif launch.epilogue is not None:
                    sources.append((node.name, f"# {launch.anchor} runs as the vendor kernel, then:\n"
                                               + launch.epilogue.plan.source))
                else:
                    sources.append((node.name, f"# {launch.anchor} runs as the vendor kernel (no epilogue)\n"))
            elif info.kind in GENERATORS:
                sources.append((node.name, GENERATORS[info.kind][0](region, name).source))
            else:
                sources.append((node.name, f"# no {info.kind} kernel generator: runs its reference ops\n"))
        except Unsupported as exc:
            sources.append((node.name, f"# runs its reference ops: {exc}\n"))
    return sources
