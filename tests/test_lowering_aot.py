"""Every kernel kind the lowering tests generate builds ahead of time for sm_80 and sm_90,
and its TTIR has the promised shape: one tt.dot per matmul, one store per region result."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_bn, run_pipeline
from test_lowering_end_to_end import SmallCNN
from test_lowering_gemm import ConvBlock, Linears
from test_lowering_pointwise import CASES as POINTWISE
from test_lowering_pointwise import Chain
from test_lowering_reduction import CASES as REDUCTION
from test_lowering_reduction import Net

from optcc.lowering.aot import DEFAULT_ARCHS, compile_files_for_targets
from optcc.lowering.cache import write_source
from optcc.lowering.gemm import GemmKernel
from optcc.lowering.runtime import VendorAnchorLaunch, _gemm_launch, GENERATORS
from optcc.regions import REGION_KEY, region_module, regions

REGIONS = ("block_fusion", {"attention": False})


def _plans(model, inputs):
    gm, _, _ = run_pipeline(model.eval(), inputs, [REGIONS])
    for node in regions(gm):
        kind, region = node.meta[REGION_KEY].kind, region_module(gm, node)
        name = f"{node.name}_kernel"
        if kind == "gemm":
            launch = _gemm_launch(region, name)
            if isinstance(launch, VendorAnchorLaunch):
                if launch.epilogue is not None:
                    yield launch.epilogue.plan, 1
                continue
            yield launch.plan, 1
        else:
            plan = GENERATORS[kind][0](region, name)
            yield plan, len(plan.outputs)


def _all_plans():
    def t(*shape, dtype=torch.float16):
        return torch.randn(*shape).to(dtype)

    for fn in POINTWISE.values():
        yield from _plans(Chain(fn).half(), (t(64), t(64)))
    for fn in REDUCTION.values():
        yield from _plans(Net(fn, 96).half(), (t(4, 96), t(4, 96)))
    for dtype in (torch.float32, torch.float16):  # fp32 matmuls take the IEEE (not TF32) dot
        yield from _plans(Linears(32, 48).to(dtype), (t(16, 32, dtype=dtype), t(2, 16, 32, dtype=dtype)))
    yield from _plans(ConvBlock().half(), (t(1, 4, 6, 6),))
    yield from _plans(randomize_bn(SmallCNN()).half(), (t(1, 3, 8, 8),))


@pytest.mark.parametrize("arch", DEFAULT_ARCHS)
def test_every_generated_kernel_builds(arch):
    plans = list(_all_plans())
    assert len(plans) > 25
    jobs = [(write_source(p.name, p.source), p.name, p.signature, p.constexprs, arch) for p, _ in plans]
    results = compile_files_for_targets(jobs)
    failures = [f"{p.name}: {ir['error']}" for (p, _), ir in zip(plans, results) if "error" in ir]
    assert not failures, "\n".join(failures[:5])
    for (plan, stores), ir in zip(plans, results):
        ttir = ir["ttir"]
        assert ttir.count("tt.dot") == (1 if isinstance(plan, GemmKernel) else 0), plan.name
        assert ttir.count("tt.store") == stores, plan.name  # no intermediate leaves a region
        if not isinstance(plan, GemmKernel):  # one load per input
            inputs = sum(n.startswith("in") and n.endswith("_ptr") for n in plan.signature)
            assert ttir.count("tt.load") == inputs, plan.name
        assert f"sm_{arch}" in ir["ptx"] or f".target sm_{arch}" in ir["ptx"]
