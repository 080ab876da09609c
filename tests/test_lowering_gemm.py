"""Triton lowering of gemm regions: matmul + fused epilogue (interpreter vs reference),
convolutions as the vendor conv + one epilogue kernel, and ahead-of-time builds."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import run_pipeline

from optcc.lowering.runtime import GemmLaunch, VendorAnchorLaunch, lower_regions

REGIONS = ("block_fusion", {"attention": False})


class Linears(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.fc = nn.Linear(k, n)
        self.proj = nn.Linear(n, k, bias=False)
        self.weight = nn.Parameter(torch.randn(k, n) / k**0.5)  # GPT-2's Conv1D: addmm(b, x, W)
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x, y):
        h = F.gelu(self.fc(x))  # linear + bias + gelu
        r = self.proj(h) + x  # linear (no bias) + residual
        c = torch.addmm(self.bias, r.reshape(-1, r.shape[-1]), self.weight).relu()  # addmm + relu
        s = torch.bmm(y, y.transpose(1, 2)) * 0.125  # bmm + scale
        return c, s


def _lower(model, inputs):
    gm, _, _ = run_pipeline(model, inputs, [REGIONS])
    lowered, left = lower_regions(gm)
    assert not left, left
    return gm, lowered


@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (7, 24, 40), (127, 33, 5), (300, 64, 96)])
def test_matmul_regions_match_reference(m, k, n):
    model = Linears(k, n).eval()
    inputs = (torch.randn(m, k), torch.randn(2, m, k))
    gm, lowered = _lower(model, inputs)
    assert sum(isinstance(mod, GemmLaunch) for mod in lowered.modules()) == 4
    for got, expected in zip(lowered(*inputs), gm(*inputs)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_strided_rows_and_batched_linear():
    model = Linears(16, 24).eval()
    x = torch.randn(16, 3, 5).permute(1, 2, 0)  # [3, 5, 16] with scattered rows
    y = torch.randn(2, 9, 4).transpose(1, 2)  # non-contiguous bmm operand
    gm, lowered = _lower(model, (x.contiguous(), y.contiguous()))
    for got, expected in zip(lowered(x, y), gm(x, y)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_half_precision_matmul():
    model = Linears(32, 48).eval().half()
    inputs = (torch.randn(20, 32, dtype=torch.float16), torch.randn(2, 20, 32, dtype=torch.float16))
    gm, lowered = _lower(model, inputs)
    for got, expected in zip(lowered(*inputs), gm(*inputs)):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.plain = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        return F.relu(self.conv(x) + x), self.plain(x)


def test_conv_regions_use_the_vendor_conv_and_one_epilogue_kernel():
    x = torch.randn(2, 4, 9, 9)
    gm, lowered = _lower(ConvBlock().eval(), (x,))
    launches = [mod for mod in lowered.modules() if isinstance(mod, VendorAnchorLaunch)]
    assert len(launches) == 2
    assert sorted(launch.epilogue is not None for launch in launches) == [False, True]
    for got, expected in zip(lowered(x), gm(x)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


