"""block_fusion, job 2: fused regions (kinds, goldens, cycles refused, dumps, inlining)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_bn, run_pipeline
from test_bn_reparam import POSITIVE as BN_CASES

import optcc
from optcc.dump import graph_dot, graph_text
from optcc.regions import REGION_KEY, inline_regions, region_module, regions

REGIONS_ONLY = ("block_fusion", {"attention": False})


def kinds(gm):
    return sorted(str(n.meta[REGION_KEY]) for n in regions(gm))


def region_ops(gm, node):
    return [optcc.ir.op_name(n) for n in region_module(gm, node).graph.nodes if n.op == "call_function"]


class ConvBiasRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


class LinearGeluResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + F.gelu(self.fc(x)) * 0.5


class AddLayerNorm(nn.Module):  # the pre-norm transformer residual: both sum and norm are used
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x, y):
        h = x + y
        return self.fc(self.norm(h)) + h


class PointwiseChain(nn.Module):
    def forward(self, x, y):
        return torch.sigmoid(x * 2.0 + y) * torch.tanh(x)


class SoftmaxEpilogue(nn.Module):
    def forward(self, x):
        return torch.softmax(x * 0.5, dim=-1) * 3.0


class SharedConvOutput(nn.Module):  # the conv result is read twice: no epilogue to absorb
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y), y


class CycleIfGrouped(nn.Module):
    """``a`` feeds the layer_norm's prologue both directly and through a linear: grouping
    ``a`` with the norm would need the linear inside the region too (a cycle)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        a = x * 2.0
        return self.norm(a + self.fc(a))


# (case, factory, inputs, expected region kinds)
CASES = [
    ("conv_bias_relu", ConvBiasRelu, lambda: (torch.randn(2, 3, 8, 8),), ["gemm:aten.convolution"]),
    ("linear_gelu_residual", LinearGeluResidual, lambda: (torch.randn(4, 16),), ["gemm:aten.linear"]),
    ("add_layer_norm", AddLayerNorm, lambda: (torch.randn(2, 5, 16), torch.randn(2, 5, 16)),
     ["gemm:aten.linear", "reduction:aten.layer_norm"]),
    ("pointwise_chain", PointwiseChain, lambda: (torch.randn(3, 9), torch.randn(3, 9)), ["pointwise"]),
    ("softmax_epilogue", SoftmaxEpilogue, lambda: (torch.randn(4, 10),), ["reduction:aten.softmax.int"]),
    ("shared_conv_output", SharedConvOutput, lambda: (torch.randn(1, 4, 6, 6),), ["gemm:aten.convolution"]),
    ("cycle_if_grouped", CycleIfGrouped, lambda: (torch.randn(2, 16),),
     ["gemm:aten.linear", "reduction:aten.layer_norm"]),
]

EXPECTED_OPS = {
    "conv_bias_relu": [["aten.convolution", "aten.relu"]],
    "linear_gelu_residual": [["aten.linear", "aten.gelu", "aten.mul.Tensor", "aten.add.Tensor"]],
    "add_layer_norm": [["aten.linear", "aten.add.Tensor"], ["aten.add.Tensor", "aten.layer_norm"]],
    "pointwise_chain": [["aten.mul.Tensor", "aten.add.Tensor", "aten.sigmoid", "aten.tanh", "aten.mul.Tensor"]],
    "softmax_epilogue": [["aten.mul.Tensor", "aten.softmax.int", "aten.mul.Tensor"]],
    "shared_conv_output": [["aten.convolution"]],
    "cycle_if_grouped": [["aten.linear"], ["aten.layer_norm"]],
}


@pytest.mark.parametrize("case,factory,inputs,expected", CASES, ids=[c[0] for c in CASES])
def test_regions(case, factory, inputs, expected, golden):
    model = factory().eval()
    gm, report, error = run_pipeline(model, inputs(), [REGIONS_ONLY])
    assert kinds(gm) == sorted(expected)
    got_ops = sorted(sorted(region_ops(gm, n)) for n in regions(gm))
    assert got_ops == sorted(sorted(ops) for ops in EXPECTED_OPS[case])
    assert error == 0.0  # the same ops run in the same order
    golden("block_fusion", f"regions_{case}", graph_text(gm))


def test_add_layer_norm_region_writes_sum_and_norm():
    gm, _, _ = run_pipeline(AddLayerNorm().eval(), (torch.randn(2, 5, 16), torch.randn(2, 5, 16)), [REGIONS_ONLY])
    (norm,) = [n for n in regions(gm) if n.meta[REGION_KEY].kind == "reduction"]
    assert len(norm.meta["val"]) == 2  # the sum (read by the residual) and the norm


def test_cycle_is_refused_and_counted():
    _, report, _ = run_pipeline(CycleIfGrouped().eval(), (torch.randn(2, 16),), [REGIONS_ONLY])
    assert report["block_fusion"].stats["not_fused"] == {
        "reduction: grouping would create a cycle": 1,  # a + fc(a) -> layer_norm with a
        "pointwise: grouping would create a cycle": 1,  # then a with a + fc(a)
    }


def test_dumps_show_regions():
    gm, _, _ = run_pipeline(AddLayerNorm().eval(), (torch.randn(2, 5, 16), torch.randn(2, 5, 16)), [REGIONS_ONLY])
    text = graph_text(gm)
    assert "= region reduction:aten.layer_norm(" in text and "= region gemm:aten.linear(" in text
    dot = graph_dot(gm)
    assert dot.count("subgraph \"cluster_") == 2
    assert '"reduction_region_0/layer_norm"' in dot


def test_op_counts_see_inside_regions():
    gm, _, _ = run_pipeline(ConvBiasRelu().eval(), (torch.randn(1, 3, 8, 8),), [REGIONS_ONLY])
    counts = optcc.op_counts(gm)
    assert counts["region.gemm"] == 1 and counts["aten.convolution"] == 1 and counts["aten.relu"] == 1


def test_inline_regions_restores_a_flat_graph():
    inputs = (torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    gm, _, _ = run_pipeline(AddLayerNorm().eval(), inputs, [REGIONS_ONLY])
    flat = inline_regions(gm)
    assert not regions(flat) and regions(gm), "the original keeps its regions"
    assert all(n.op != "call_module" for n in flat.graph.nodes)
    for a, b in zip(flat(*inputs), gm(*inputs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case,factory,shape,matches", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_bn_reparam_cases_hold_with_block_fusion(case, factory, shape, matches):
    """Every folding case still matches eager with block_fusion after bn_reparam."""
    model = randomize_bn(factory()).eval()
    gm, report, error = run_pipeline(model, (torch.randn(shape),), ["bn_reparam", "block_fusion"])
    assert report["bn_reparam"].matches == matches
    assert optcc.op_counts(gm).get("aten._native_batch_norm_legit_no_training", 0) == 0
    assert regions(gm)
    assert error <= 1e-5
