"""Triton lowering of reduction regions (prologue + row reduction + epilogue) in the
interpreter against their reference subgraphs, and ahead-of-time builds."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from helpers import run_pipeline

from optcc.lowering.aot import DEFAULT_ARCHS, compile_file_for_target
from optcc.lowering.cache import write_source
from optcc.lowering.reduction import generate_reduction
from optcc.lowering.runtime import ReductionLaunch, lower_regions
from optcc.regions import REGION_KEY, region_module, regions

REGIONS = ("block_fusion", {"attention": False})


class Net(torch.nn.Module):
    def __init__(self, fn, n):
        super().__init__()
        self.fn = fn
        self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(n))

    def forward(self, x, y):
        return self.fn(self, x, y)


def _add_layer_norm(m, x, y):
    h = x + y  # the residual sum is read twice: the region writes it and the norm
    return h, F.layer_norm(h, x.shape[-1:], m.weight, m.bias)


CASES = {
    "add_layer_norm": _add_layer_norm,
    "layer_norm_no_affine": lambda m, x, y: F.layer_norm(x * 2.0, x.shape[-1:]) + y,
    "softmax_scale_epilogue": lambda m, x, y: torch.softmax(x * 0.5 + y, dim=-1) * 3.0,
    "log_softmax": lambda m, x, y: torch.log_softmax(x - y, dim=-1),
    "sum_keepdim": lambda m, x, y: (x * y).sum(-1, keepdim=True) * 2.0,
    "mean_no_keepdim": lambda m, x, y: (x + y).mean(-1),
    "amax_amin": lambda m, x, y: torch.amax(x + y, -1, keepdim=True) - 1.0,
    "rms_norm_by_hand": lambda m, x, y: (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)) * m.weight,
}


def _lower(case, x, y):
    model = Net(CASES[case], x.shape[-1]).eval()
    gm, _, _ = run_pipeline(model, (x, y), [REGIONS])
    assert any(n.meta[REGION_KEY].kind == "reduction" for n in regions(gm))
    lowered, left = lower_regions(gm)
    assert not [r for r in left.values() if r.startswith("reduction")], left
    assert any(isinstance(m, ReductionLaunch) for m in lowered.modules())
    return gm, lowered


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [1, 127, 1000])  # one lane; ragged rows below a power of two
def test_reduction_kernels_match_reference(case, n):
    x, y = torch.randn(3, 2, n), torch.randn(3, 2, n)
    gm, lowered = _lower(case, x, y)
    for got, expected in zip(lowered(x, y), gm(x, y)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_broadcast_and_non_contiguous_rows():
    x = torch.randn(20, 6).t()  # rows of 20 elements, stride 6 apart
    y = torch.randn(20)  # broadcast over rows
    gm, lowered = _lower("add_layer_norm", x.contiguous(), y.expand(6, 20).contiguous())
    for got, expected in zip(lowered(x, y.expand(6, 20)), gm(x, y.expand(6, 20))):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_half_precision_layer_norm():
    x, y = torch.randn(4, 96, dtype=torch.float16), torch.randn(4, 96, dtype=torch.float16)
    model = Net(CASES["layer_norm_no_affine"], 96).eval()
    gm, _, _ = run_pipeline(model, (x, y), [REGIONS])
    lowered, _ = lower_regions(gm)
    (got,) = lowered(x, y)
    expected = F.layer_norm(x.float() * 2.0, (96,)) + y.float()
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=4e-3)


@pytest.mark.parametrize("arch", DEFAULT_ARCHS)
def test_reduction_kernel_builds_for_gpus(arch):
    x, y = torch.randn(8, 384), torch.randn(8, 384)
    gm, _, _ = run_pipeline(Net(CASES["add_layer_norm"], 384).eval(), (x, y), [REGIONS])
    (node,) = [n for n in regions(gm) if n.meta[REGION_KEY].kind == "reduction"]
    plan = generate_reduction(region_module(gm, node), "add_layer_norm_kernel")
    ir = compile_file_for_target(write_source(plan.name, plan.source), plan.name, plan.signature,
                                 constexprs=plan.constexprs, arch=arch)
    ttir = ir["ttir"]
    assert ttir.count("tt.load") == 4  # x, y, weight, bias: once each
    assert ttir.count("tt.store") == 2  # the sum and the norm, nothing else
    assert ttir.count("tt.reduce") >= 2  # mean and variance
