"""Triton lowering of pointwise regions: generated kernels vs their reference subgraphs
(Triton interpreter), ahead-of-time builds for sm_80/sm_90, the kernel cache, the runtime."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.nn.functional as F
from helpers import run_pipeline

from optcc import lowering
from optcc.lowering.cache import source_path, write_source
from optcc.lowering.pointwise import EXPRESSIONS
from optcc.lowering.runtime import PointwiseLaunch, lower_regions
from optcc.regions import region_module, regions

aten = torch.ops.aten
REGIONS = ("block_fusion", {"attention": False})


class Chain(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, y):
        return self.fn(x, y)


# Each case: a chain of two or more pointwise ops (a region needs two), one per op family.
CASES = {
    "add_mul_alpha": lambda x, y: torch.add(x, y, alpha=0.5) * 3.0,
    "sub_div_neg": lambda x, y: -((x - y) / 1.5),
    "relu_gelu": lambda x, y: F.gelu(torch.relu(x) + y),
    "gelu_tanh": lambda x, y: F.gelu(x + y, approximate="tanh"),
    "sigmoid_silu": lambda x, y: torch.sigmoid(x) * F.silu(y),
    "tanh_exp": lambda x, y: torch.tanh(x) + torch.exp(y * 0.1),
    "log_sqrt_rsqrt_abs": lambda x, y: torch.log(x.abs() + 1.0) + torch.sqrt(y.abs()) * torch.rsqrt(x * x + 1.0),
    "erf_reciprocal": lambda x, y: torch.erf(x) + torch.reciprocal(y.abs() + 1.0),
    "clamp_hardtanh": lambda x, y: torch.clamp(x + y, -0.5, 0.75) + F.hardtanh(x),
    "hardswish_hardsigmoid": lambda x, y: F.hardswish(x) * F.hardsigmoid(y),
    "leaky_relu_pow": lambda x, y: F.leaky_relu(x + y, 0.2) + (x * y) ** 2,
    "where_relu": lambda x, y: torch.where(x > 0, x, y) * 2.0,
    "compare_scalar": lambda x, y: ((x < 0.5) & (x >= -0.5)).logical_not() * (y <= 0.1) * (x != 0.0) + (y == 1.0),
    "compare_tensor": lambda x, y: torch.where((x > y) | (x == y), x, y) * ((x < y) + (x <= y) + (x >= y) + (x != y)),
    "logical_and_or": lambda x, y: torch.logical_or(torch.logical_and(x > 0, y > 0), x < -1.0) * x,
}


def _lowered(fn, *inputs):
    gm, _, _ = run_pipeline(Chain(fn).eval(), inputs, [REGIONS])
    lowered, left = lower_regions(gm)
    return gm, lowered, left


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("size", [1, 1500])  # one element; two blocks of 1024 with a ragged tail
def test_pointwise_kernels_match_reference(case, size):
    x, y = torch.randn(size), torch.randn(size)
    gm, lowered, left = _lowered(CASES[case], x, y)
    launches = [m for m in lowered.modules() if isinstance(m, PointwiseLaunch)]
    assert launches, f"no pointwise region lowered ({left})"
    torch.testing.assert_close(lowered(x, y), gm(x, y), rtol=1e-5, atol=1e-5)


def test_every_expression_is_exercised():
    used = set()
    for case, fn in CASES.items():
        x, y = torch.randn(8), torch.randn(8)
        gm, _, _ = run_pipeline(Chain(fn).eval(), (x, y), [REGIONS])
        for node in regions(gm):
            used |= {n.target for n in region_module(gm, node).graph.nodes if n.op == "call_function"}
    assert set(EXPRESSIONS) - used == set(), "an op the generator claims is never tested"


def test_broadcast_and_non_contiguous_inputs():
    fn = CASES["relu_gelu"]
    x = torch.randn(9, 5).t()  # [5, 9], column-major
    y = torch.randn(1, 9)  # broadcast over rows
    gm, lowered, _ = _lowered(fn, x.contiguous(), y)
    torch.testing.assert_close(lowered(x, y)[0], fn(x, y), rtol=1e-5, atol=1e-5)


def test_half_precision_computes_in_float32():
    fn = CASES["sigmoid_silu"]
    x, y = torch.randn(300, dtype=torch.float16), torch.randn(300, dtype=torch.float16)
    gm, lowered, _ = _lowered(fn, x, y)
    expected = fn(x.float(), y.float())
    (got,) = lowered(x, y)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)


def test_triton_target_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    gm, _, _ = run_pipeline(Chain(CASES["relu_gelu"]).eval(), (torch.randn(4), torch.randn(4)), [REGIONS])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(lowering.LoweringNotAvailable, match="TRITON_INTERPRET=1"):
        lowering.lower(gm, [torch.randn(4), torch.randn(4)])


def _write(args):
    directory, source = args
    import os

    os.environ["OPTCC_CACHE_DIR"] = directory
    from optcc.lowering.cache import write_source

    return str(write_source("race_kernel", source))


def test_kernel_cache_is_reused_and_atomic_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTCC_CACHE_DIR", str(tmp_path))
    source = "# a kernel\n" + "x = 1\n" * 20000
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_write, [(str(tmp_path), source)] * 4)
    assert len(set(paths)) == 1
    assert source_path("race_kernel", source).read_text() == source
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    assert write_source("race_kernel", source) == source_path("race_kernel", source)
