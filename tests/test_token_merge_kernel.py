"""optcc::token_merge's Triton kernel: against the torch implementation in the Triton
interpreter on ToMe / EViT plans, and built ahead of time for sm_80 / sm_90.

Interpreter runs use tiny shapes (its cost is per program and per operation); a few force
blocks narrower than C or n_out so that masked channel / token lanes are exercised.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_flash_attention import _value_roots

import optcc.kernels.token_merge_triton as token_merge_triton_module
from optcc.kernels.token_merge import _token_merge, token_merge, tome_plan, topk_plan
from optcc.kernels.token_merge_triton import inverse_plan, kernel_signature, token_merge_triton
from optcc.lowering.aot import DEFAULT_ARCHS, compile_files_for_targets

TOL = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def tome(b, n, r, protected, padded=False):
    key_bias = None
    if padded:  # the last two tokens of every row are padding
        key_bias = torch.zeros(b, n)
        key_bias[:, -2:] = float("-inf")
    dest, keep = tome_plan(torch.randn(b, n, 6), key_bias, r, protected)
    return dest, keep.shape[1]


def topk(b, n, keep_tokens, protected):
    dest, keep = topk_plan(torch.rand(b, n), keep_tokens, protected)
    return dest, keep.shape[1]


def check(x, size, dest, n_out, weight=None, **blocks):
    got_x, got_size = token_merge_triton(x, size, dest, n_out, weight, **blocks)
    want_x, want_size = _token_merge(x, size, dest, n_out, weight)
    assert got_x.dtype == x.dtype and got_x.shape == want_x.shape
    assert got_size.dtype == size.dtype and torch.equal(got_size, want_size)
    torch.testing.assert_close(got_x, want_x, equal_nan=True, **TOL[x.dtype])
    return got_x, got_size


PLANS = {
    "tome": lambda b, n: tome(b, n, n // 3, 0),
    "tome-cls": lambda b, n: tome(b, n, (n - 1) // 2, 1),  # every A token merged
    "tome-cls-distill-padded": lambda b, n: tome(b, n, 2, 2, padded=True),
    "topk-cls": lambda b, n: topk(b, n, (n - 1) // 2, 1),
    "topk-one-kept": lambda b, n: topk(b, n, 1, 0),
}
SHAPES = [(2, 9, 5, {}), (1, 12, 20, dict(block_c=8, block_j=2)), (3, 7, 1, {})]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])) + ("-small-blocks" if s[3] else ""))
@pytest.mark.parametrize("plan", list(PLANS))
def test_matches_torch_on_plans(plan, shape):
    b, n, c, blocks = shape
    dest, n_out = PLANS[plan](b, n)
    x = torch.randn(b, n, c)
    check(x, torch.rand(b, n) + 0.5, dest, n_out, **blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_accumulate_in_fp32(dtype):
    dest, n_out = topk(2, 10, 3, 1)
    x = (torch.randn(2, 10, 6) * 100).to(dtype)
    got, _ = check(x, torch.ones(2, 10), dest, n_out, torch.rand(2, 10))
    assert got.dtype == dtype


def test_attention_weight_and_integer_sizes():
    """EViT's use: weight = size x attention, sizes counted in int64 (summed in int64)."""
    dest, n_out = topk(2, 11, 4, 1)
    size = torch.randint(1, 5, (2, 11))
    weight = size * torch.rand(2, 11)
    _, got_size = check(torch.randn(2, 11, 7), size, dest, n_out, weight)
    assert got_size.dtype == torch.int64 and torch.equal(got_size.sum(1), size.sum(1))


@pytest.mark.parametrize("n", [1, 6])
def test_one_output_token(n):
    """n_out = 1: every token into one (a one-token row, EViT keeping nothing)."""
    dest, n_out = topk(2, n, 0, 0)
    assert n_out == 1
    got, size = check(torch.randn(2, n, 5), torch.rand(2, n) + 0.5, dest, 1)
    assert got.shape == (2, 1, 5) and size.shape == (2, 1)


def test_identity_plan_copies():
    dest, n_out = tome(2, 8, 0, 1)
    assert n_out == 8
    x = torch.randn(2, 8, 3)
    got, _ = check(x, torch.ones(2, 8), dest, n_out)  # x * 1 / 1: exact
    assert torch.equal(got.gather(1, dest[:, :, None].expand(2, 8, 3)), x)


def test_non_contiguous_x():
    dest, n_out = tome(2, 9, 3, 1)
    x = torch.randn(2, 6, 9).transpose(1, 2)  # channel stride 9
    check(x, torch.rand(2, 9) + 0.5, dest, n_out, block_c=4)


def test_empty_or_weightless_group_is_zero_like_torch_and_empty_inputs():
    dest = torch.tensor([[0, 0, 2, 2, 2]])  # output token 1 has no source
    got, size = check(torch.randn(1, 5, 3), torch.ones(1, 5), dest, 3)
    assert (got[0, 1] == 0).all() and size.tolist() == [[2, 0, 3]]
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])  # group 2: only weightless tokens (fused padding)
    got, _ = check(torch.randn(1, 5, 3), torch.ones(1, 5), dest, 3, weight=weights)
    assert (got[0, 2] == 0).all() and torch.isfinite(got).all()
    got, size = check(torch.randn(1, 5, 0), torch.ones(1, 5), dest, 3)  # C = 0 still sums sizes
    assert got.shape == (1, 3, 0) and size.tolist() == [[2, 0, 3]]
    got, size = token_merge_triton(torch.randn(0, 5, 3), torch.ones(0, 5), torch.zeros(0, 5, dtype=torch.int64), 2)
    assert got.shape == (0, 2, 3) and size.shape == (0, 2)


def test_inverse_plan_lists_sources_in_input_order():
    dest = torch.tensor([[2, 0, 2, 1, 0, 2]])
    order, start, count = inverse_plan(dest, 3)
    assert order.tolist() == [[1, 4, 3, 0, 2, 5]]
    assert start.tolist() == [[0, 2, 3]] and count.tolist() == [[2, 1, 3]]


def test_traced_cuda_tensors_keep_the_torch_ops():
    """Fake CUDA tensors (as under torch.compile / torch.export) are not real tensors: the
    op still decomposes into scatter_add instead of launching the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        x = torch.randn(2, 9, 5, device="cuda")
        size = torch.ones(2, 9, device="cuda")
        dest = torch.zeros(2, 9, dtype=torch.int64, device="cuda")
        graph = make_fx(lambda x, s, d: token_merge(x, s, d, 1))(x, size, dest).graph
    targets = {node.target for node in graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.scatter_add.default in targets


AOT_VARIANTS = [(arch, "fp16", "fp32", False) for arch in DEFAULT_ARCHS] + [(80, "bf16", "i64", True)]
BLOCK_J, BLOCK_C = 4, 256


@pytest.fixture(scope="module")
def aot_builds():
    jobs = [(token_merge_triton_module.__file__, "token_merge_kernel", kernel_signature(dtype, size_dtype),
             dict(SIZE_IS_INT=size_is_int, BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C), arch)
            for arch, dtype, size_dtype, size_is_int in AOT_VARIANTS]
    results = compile_files_for_targets(jobs)
    failures = [ir["error"] for ir in results if "error" in ir]
    assert not failures, failures
    return dict(zip(AOT_VARIANTS, results))


def _pointer_args(ttir: str, line: str) -> set[str]:
    pointer = re.search(r"tt\.(?:load|store) (%[\w.]+)", line).group(1)
    return {root for root in _value_roots(ttir, pointer) if root.endswith("_ptr")}


@pytest.mark.parametrize("variant", AOT_VARIANTS, ids=lambda v: f"sm{v[0]}-{v[1]}-size-{v[2]}")
def test_builds_for_gpus_as_a_gather_without_atomics(aot_builds, variant):
    arch, dtype, size_dtype, _ = variant
    ir = aot_builds[variant]
    ttir = ir["ttir"]
    element = {"fp16": "f16", "bf16": "bf16"}[dtype]
    size_element = {"fp32": "f32", "i64": "i64"}[size_dtype]
    assert "atomic" not in ttir and "atom." not in ir["ptx"]  # deterministic: no atomics
    assert ttir.count("scf.for") == 1
    head, loop = ttir.split("scf.for", 1)
    loop, tail = loop.split("scf.yield", 1)

    # before the loop: this block's start / count; in it: source index, weight, size, x tile
    before = [line for line in head.splitlines() if "tt.load" in line]
    assert [_pointer_args(ttir, line) for line in before] == [{"start_ptr"}, {"count_ptr"}]
    inside = {frozenset(_pointer_args(ttir, line) - {"start_ptr", "count_ptr"}): line
              for line in loop.splitlines() if "tt.load" in line}
    assert set(inside) == {frozenset(p) for p in ({"order_ptr"}, {"order_ptr", "w_ptr"},
                                                  {"order_ptr", "size_ptr"}, {"order_ptr", "x_ptr"})}
    x_load = inside[frozenset({"order_ptr", "x_ptr"})]
    assert f"tensor<{BLOCK_J}x{BLOCK_C}x!tt.ptr<{element}>>" in x_load  # a gathered [J, C] tile
    assert "tt.load" not in tail

    stores = [line for line in tail.splitlines() if "tt.store" in line]
    assert [_pointer_args(ttir, line) for line in stores] == [{"out_ptr"}, {"size_out_ptr"}]
    assert f"tensor<{BLOCK_J}x{BLOCK_C}x!tt.ptr<{element}>>" in stores[0]
    assert f"tensor<{BLOCK_J}x!tt.ptr<{size_element}>>" in stores[1]
    assert f".target sm_{arch}" in ir["ptx"]
