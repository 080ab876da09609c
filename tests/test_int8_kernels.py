"""optcc::int8_linear kernels: every CPU integer GEMM this machine can run (which one is
exact, and which one ``auto`` picks, follow from the detected CPU), the Triton kernel in the
interpreter and compiled ahead of time for sm_80/sm_90, the fake implementation, and
bitsandbytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from optcc.hardware import cpu
from optcc.kernels import int8_cpu
from optcc.kernels.int8_cpu import KERNELS, KernelUnavailable, fbgemm_int_matmul, full_scale_operands, probe
from optcc.kernels.int8_linear import (
    collect_stats,
    int8_linear,
    int8_linear_reference,
    quantize_weight,
)
from optcc.kernels.int8_matmul import KERNEL_SIGNATURE, int8_linear_triton, int8_matmul, int8_matmul_kernel
from optcc.lowering.aot import compile_for_target

# Large blocks: the interpreter's cost is per program, not per element.
INTERPRETER_BLOCKS = dict(block_m=128, block_n=128, block_k=256, block_o=16)


def layer(n=96, k=200, outlier_columns=(4, 50, 51), magnitude=25.0, rows=37):
    x = torch.randn(rows, k)
    x[:, list(outlier_columns)] *= magnitude
    wq, scale = quantize_weight(torch.randn(n, k) / k ** 0.5)
    return x, wq, scale, torch.randn(n)


def full_scale_integers(m, k, n):
    return full_scale_operands(m, k, n, seed=m * k + n)


def runnable_kernels():
    return [name for name in KERNELS if probe(name) is None]


def test_fbgemm_path_is_exact_integer_arithmetic():
    xq, wq = full_scale_integers(33, 96, 40)
    exact = (xq.double() @ wq.double().t()).float()  # |values| < 2^24: exact in fp32
    assert torch.equal(fbgemm_int_matmul(xq, wq), exact)


def test_one_pass_fbgemm_saturates_exactly_where_the_cpu_lacks_vnni():
    """Why the rows are split by sign: without VNNI, u8 x s8 pairs are summed in 16 bits."""
    xq, wq = full_scale_integers(33, 96, 40)
    exact = (xq.double() @ wq.double().t()).float()
    error = (fbgemm_int_matmul(xq, wq, split_signs=False) - exact).abs().max()
    if cpu().vnni:
        assert error == 0
        assert probe("fbgemm") is None
    else:
        assert error > 1000
        assert "not exact" in probe("fbgemm")


@pytest.mark.parametrize("name", list(KERNELS))
def test_every_runnable_cpu_kernel_is_exact_integer_arithmetic(name):
    if probe(name) is not None:
        with pytest.raises(KernelUnavailable, match=name):
            int8_cpu.choose(name)
        return
    xq, wq = full_scale_integers(29, 1000 if name != "fp32" else 96, 24)
    scale = torch.rand(24) + 0.5
    expected = (xq.double() @ wq.double().t() * scale.double()).float()
    torch.testing.assert_close(int8_cpu.run_kernel(KERNELS[name], xq, wq, scale), expected, rtol=1e-6, atol=0)


def test_auto_picks_by_the_detected_cpu_and_says_why():
    choice = int8_cpu.choose("auto")
    assert probe(choice.kernel.name) is None
    info = cpu()
    if info.vnni or info.amx:
        assert choice.kernel.name in ("onednn", "int_mm", "fbgemm")
    else:
        assert choice.kernel.name in ("fbgemm_split", "fp32")
    assert info.capability in choice.reason
    assert choice.kernel.name == next(n for n in int8_cpu.preference() if probe(n) is None)


def test_unknown_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown CPU int8 kernel 'mkl'.*auto, onednn"):
        int8_cpu.choose("mkl")


@pytest.mark.parametrize("name", ["auto", *KERNELS])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_op_matches_reference_with_every_kernel(name, threshold):
    x, wq, scale, bias = layer()
    if name != "auto" and probe(name) is not None:
        with pytest.raises(KernelUnavailable, match="use 'auto'"):
            int8_linear(x, wq, scale, bias, threshold, False, "layer", name)
        return
    expected = int8_linear_reference(x, wq, scale, bias, threshold)
    with collect_stats() as stats:
        got = int8_linear(x, wq, scale, bias, threshold, False, "layer", name)
    assert stats["layer"].kernels == {int8_cpu.choose(name).kernel.name}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_op_matches_reference(threshold, with_bias):
    x, wq, scale, bias = layer()
    bias = bias if with_bias else None
    expected = int8_linear_reference(x, wq, scale, bias, threshold)
    got = int8_linear(x.reshape(1, 37, 200), wq, scale, bias, threshold, False, "layer")
    torch.testing.assert_close(got.reshape(37, -1), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_cpu_op_edge_shapes():
    x, wq, scale, bias = layer(rows=1)
    torch.testing.assert_close(int8_linear(x, wq, scale, bias, 6.0, False, "l"),
                               int8_linear_reference(x, wq, scale, bias, 6.0), rtol=1e-5, atol=1e-4)
    empty = torch.zeros(0, 200)
    assert int8_linear(empty, wq, scale, bias, 6.0, False, "l").shape == (0, 96)
    zeros = torch.zeros(3, 200)  # all-zero rows: scale 0, output = bias
    torch.testing.assert_close(int8_linear(zeros, wq, scale, bias, 6.0, False, "l"), bias.expand(3, -1))


def test_reference_is_llm_int8():
    """The reference against a direct transcription of the paper's formulas in float64."""
    x, wq, scale, bias = layer()
    x64, w64 = x.double(), wq.double()
    outliers = (x64.abs() >= 6.0).any(0)
    inliers = x64.masked_fill(outliers, 0)
    a = inliers.abs().amax(1) / 127
    xq = torch.round(inliers / a[:, None])
    expected = (xq @ w64.t()) * a[:, None] * scale.double() + x64[:, outliers] @ (w64 * scale.double()[:, None])[:, outliers].t() + bias.double()
    torch.testing.assert_close(int8_linear_reference(x, wq, scale, bias, 6.0).double(), expected, rtol=1e-5, atol=1e-4)
    assert 0 < outliers.sum() <= 3


def test_statistics_count_int8_values_and_outlier_columns():
    x, wq, scale, bias = layer()
    with collect_stats() as stats:
        int8_linear(x, wq, scale, bias, 6.0, False, "a")
        int8_linear(x, wq, scale, bias, 0.0, False, "b")
    assert stats["a"].outlier_columns == {4, 50, 51}
    assert stats["a"].int8_values == 37 * (200 - 3)
    assert stats["b"].int8_values == stats["b"].values == 37 * 200


def test_fake_implementation_keeps_graphs_traceable():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, wq, scale, bias = layer()
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = int8_linear(torch.empty(2, 5, 200), wq, scale, bias, 6.0, False, "l")
    assert out.shape == (2, 5, 96) and out.dtype == torch.float32

    class Quantized(torch.nn.Module):
        def forward(self, x):
            return int8_linear(x, wq, scale, bias, 6.0, False, "l")

    program = torch.export.export(Quantized(), (x,))
    assert "optcc.int8_linear" in str(program.graph)


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_triton_kernel_matches_reference(threshold):
    x, wq, scale, bias = layer()
    expected = int8_linear_reference(x, wq, scale, bias, threshold)
    got, outliers = int8_linear_triton(x, wq, scale, bias, threshold, False, **INTERPRETER_BLOCKS)
    assert int(outliers.sum()) == (3 if threshold else 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_triton_kernel_accumulates_in_int32():
    xq, wq = full_scale_integers(40, 256, 48)
    ones = torch.ones(48)
    got = int8_matmul(xq.to(torch.int8), wq, torch.ones(40), ones, **INTERPRETER_BLOCKS)
    assert torch.equal(got, (xq.double() @ wq.double().t()).float())


# Built in a fresh interpreter without TRITON_INTERPRET: under the interpreter tl.zeros and
# friends are interpreter functions, which the code generator would call instead of inline
# (the build only worked here when Triton's on-disk cache already held the kernel).
_AOT_SCRIPT = r"""
import json, sys
from optcc.kernels.int8_matmul import KERNEL_SIGNATURE, int8_matmul_kernel
from optcc.lowering.aot import compile_for_target

constexprs = dict(HAS_BIAS=True, HAS_OUTLIERS=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_O=16)
ir = {arch: compile_for_target(int8_matmul_kernel, KERNEL_SIGNATURE, constexprs=constexprs, arch=arch)
      for arch in (80, 90)}
json.dump({arch: {"ttir": stages["ttir"], "ptx": stages["ptx"]} for arch, stages in ir.items()}, sys.stdout)
"""


@pytest.fixture(scope="module")
def aot_builds():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return {int(arch): stages for arch, stages in json.loads(result.stdout).items()}


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernel_compiles_for_gpus(arch, aot_builds):
    ir = aot_builds[arch]
    int8_dots = [line for line in ir["ttir"].splitlines() if "tt.dot" in line and "xi8" in line]
    assert len(int8_dots) == 1 and "xi32>" in int8_dots[0]
    assert sum("tt.dot" in line for line in ir["ttir"].splitlines()) == 2  # + the outlier dot
    tensor_core = "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" if arch == 80 else "wgmma.mma_async"
    assert tensor_core in ir["ptx"]


def test_aot_names_missing_parameters():
    with pytest.raises(ValueError, match="BLOCK_O"):
        compile_for_target(int8_matmul_kernel, {k: v for k, v in KERNEL_SIGNATURE.items() if k != "BLOCK_O"})


def test_agrees_with_bitsandbytes_linear8bitlt():
    """bitsandbytes' Linear8bitLt (threshold 6, its CPU build) on a layer with planted outliers.

    Both use bitsandbytes' int8 weight; bitsandbytes computes in fp16 (activations are cast)
    and its row scale also counts the below-threshold entries of outlier columns, so the
    two differ by far less than either differs from fp32.
    """
    import bitsandbytes as bnb

    torch.manual_seed(3)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(64, 256)
    x[:, [7, 130]] *= 30
    int8_layer = bnb.nn.Linear8bitLt(256, 128, has_fp16_weights=False, threshold=6.0)
    int8_layer.load_state_dict(linear.state_dict())
    int8_layer = int8_layer.to("cpu")
    weight = int8_layer.weight
    scale = (int8_layer.state.SCB if int8_layer.state.SCB is not None else weight.SCB).float() / 127
    with torch.no_grad():
        theirs = int8_layer(x).float()
        ours = int8_linear(x, weight.data.view(torch.int8), scale, linear.bias, 6.0, False, "l")
        fp32 = linear(x)
    scale_ref = fp32.abs().max()
    gap = (ours - theirs).abs().max() / scale_ref
    assert gap < 2e-3
    assert (ours - fp32).abs().max() / scale_ref > 2 * gap
