"""Flash attention forward kernel: against torch's scaled_dot_product_attention and the fp32
reference in the Triton interpreter, and built ahead of time for sm_80 / sm_90.

Interpreter runs use few heads and the launcher's large interpreter blocks (the
interpreter's cost is per program and per operation); a few tests force 16-wide blocks to
run the online-softmax rescaling over many key blocks.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers import BackgroundBuild
import torch
import torch.nn.functional as F
from optcc.kernels.flash_attention import (
    MAX_HEAD_DIM,
    flash_attention,
    reference_attention,
)

# Max abs error allowed against the fp32 reference, by input dtype. fp16 rounds P to fp16
# for P V and the output to fp16 (2^-11 relative); bf16 keeps 8 bits of mantissa.
ATOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def qkv(batch=1, heads=2, seq_q=7, seq_k=7, head_dim=64, dtype=torch.float32, head_dim_v=None, kv_heads=None):
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, seq_q, head_dim).to(dtype)
    k = torch.randn(batch, kv_heads, seq_k, head_dim).to(dtype)
    v = torch.randn(batch, kv_heads, seq_k, head_dim_v or head_dim).to(dtype)
    return q, k, v


def check(q, k, v, *, against_sdpa=True, **kwargs):
    """Run the kernel, compare with the reference (and with torch SDPA); return the output."""
    out = flash_attention(q, k, v, **kwargs)
    math_kwargs = {key: value for key, value in kwargs.items() if not key.startswith(("block_", "num_"))}
    expected = reference_attention(q, k, v, **math_kwargs)
    assert out.dtype == q.dtype
    assert out.shape == expected.shape
    tol = {"atol": ATOL[q.dtype], "rtol": RTOL[q.dtype]}
    torch.testing.assert_close(out.float(), expected, **tol)
    if against_sdpa:
        torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v, **math_kwargs).float(), **tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (7, 7), (127, 127), (300, 300), (1, 300), (300, 7), (7, 127)])
def test_sequence_lengths(seq_q, seq_k, is_causal, dtype):
    check(*qkv(heads=1, seq_q=seq_q, seq_k=seq_k, dtype=dtype), is_causal=is_causal)


@pytest.mark.parametrize("head_dim", [16, 64, 80, 96, 128, MAX_HEAD_DIM])
def test_head_dims(head_dim):
    """Non-powers of two (80, 96) run in a 128-wide tile with the padding columns masked."""
    check(*qkv(seq_q=127, seq_k=127, head_dim=head_dim, dtype=torch.float16), is_causal=True)


def test_head_dim_80_fp32():
    check(*qkv(seq_q=127, seq_k=300, head_dim=80))


def test_value_head_dim_differs_from_query_head_dim():
    check(*qkv(seq_q=33, seq_k=127, head_dim=64, head_dim_v=80, dtype=torch.float16))


def test_explicit_scale():
    check(*qkv(seq_q=7, seq_k=127), scale=0.3)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_small_blocks_rescale_over_many_key_blocks(dtype, is_causal):
    """16-key blocks: up to 13 key blocks per query block, rescaled by the running max."""
    q, k, v = qkv(heads=1, seq_q=127, seq_k=200, dtype=dtype)
    k[..., 100:, :] *= 4.0  # later key blocks raise the running max: earlier sums are rescaled
    check(q, k, v, is_causal=is_causal, block_m=32, block_n=16)


MASK_SHAPES = [(33, 127), (1, 127), (2, 1, 33, 127), (1, 2, 1, 127), (2, 2, 33, 127), (2, 2, 33, 1)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_additive_mask_broadcasts(shape, dtype):
    q, k, v = qkv(batch=2, heads=2, seq_q=33, seq_k=127, dtype=dtype)
    mask = (torch.randn(shape) * 2).to(dtype)
    check(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_boolean_mask_broadcasts(shape):
    q, k, v = qkv(batch=2, heads=2, seq_q=33, seq_k=127, dtype=torch.float16)
    mask = torch.rand(shape) < 0.7
    mask[..., 0] = True  # no fully masked rows here (tested below)
    check(q, k, v, attn_mask=mask)


def test_fp32_additive_mask_with_fp16_inputs():
    q, k, v = qkv(seq_q=127, seq_k=127, dtype=torch.float16)
    check(q, k, v, attn_mask=torch.randn(127, 127))


@pytest.mark.parametrize("kind", ["boolean", "additive"])
@pytest.mark.parametrize("blocks", [{}, {"block_m": 64, "block_n": 32}], ids=["large", "small"])
def test_fully_masked_rows_are_zero(kind, blocks):
    q, k, v = qkv(batch=2, heads=1, seq_q=127, seq_k=300, dtype=torch.float16)
    keep = torch.rand(2, 1, 127, 300) < 0.8
    keep[:, :, [3, 64, 126], :] = False  # rows with no key at all
    keep[1, 0] = False  # a whole head
    keep[:, :, 40, :200] = False  # masked in the first 6 key blocks only: -inf running max, then finite
    mask = keep if kind == "boolean" else torch.zeros(keep.shape, dtype=torch.float16).masked_fill(~keep, float("-inf"))
    out = check(q, k, v, attn_mask=mask, **blocks)
    fully_masked = ~keep.any(-1)
    assert fully_masked.sum() == 2 * 3 + 127 - 3
    assert torch.all(out[fully_masked] == 0)
    assert torch.all(out[~fully_masked].abs().amax(-1) > 0)


@pytest.mark.parametrize("kind", ["boolean", "additive"])
def test_mask_combined_with_causal(kind):
    """torch refuses a mask with is_causal=True; here both apply (checked against the reference)."""
    q, k, v = qkv(seq_q=127, seq_k=127)
    keep = torch.rand(127, 127) < 0.5
    mask = keep if kind == "boolean" else torch.randn(127, 127)
    out = check(q, k, v, attn_mask=mask, is_causal=True, against_sdpa=False, block_m=32, block_n=32)
    causal = torch.ones(127, 127, dtype=torch.bool).tril()
    # The same attention written as one mask, which torch accepts.
    one_mask = keep & causal if kind == "boolean" else mask.masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=one_mask),
                               atol=ATOL[q.dtype], rtol=RTOL[q.dtype])


def test_causal_never_loads_fully_masked_key_blocks():
    """Keys after a query block's last row are not read: NaN there cannot reach the output."""
    q, k, v = qkv(seq_q=16, seq_k=64)
    k[..., 16:, :] = float("nan")
    v[..., 16:, :] = float("nan")  # 0 * NaN would poison P V if these blocks were loaded
    out = flash_attention(q, k, v, is_causal=True, block_m=16, block_n=16)
    expected = reference_attention(q, k[..., :16, :], v[..., :16, :], is_causal=True)
    torch.testing.assert_close(out, expected, atol=ATOL[q.dtype], rtol=RTOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_non_contiguous_inputs(dtype):
    """[B, L, H, D] views, a key stored transposed and a value sliced from a wider tensor."""
    batch, heads, seq_q, seq_k, head_dim = 1, 3, 127, 300, 64
    q = torch.randn(batch, seq_q, heads, head_dim).to(dtype).transpose(1, 2)
    k = torch.randn(batch, heads, head_dim, seq_k).to(dtype).transpose(2, 3)
    v = torch.randn(batch, seq_k, heads, 2 * head_dim).to(dtype).transpose(1, 2)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = check(q, k, v, is_causal=True)
    assert out.transpose(1, 2).is_contiguous()  # laid out like the query


def test_grouped_query_attention():
    q, k, v = qkv(heads=4, kv_heads=2, seq_q=127, seq_k=127, dtype=torch.float16)
    check(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_bfloat16_inputs(is_causal):
    """bf16 loads, output and masks; the interpreter multiplies bf16 tiles wrongly, so there the
    tiles are cast to fp32 before the products (on GPUs the products take bf16)."""
    q, k, v = qkv(seq_q=127, seq_k=300, dtype=torch.bfloat16)
    mask = torch.randn(127, 300).to(torch.bfloat16)
    check(q, k, v, attn_mask=None if is_causal else mask, is_causal=is_causal)


def test_no_keys_gives_zeros_and_no_queries_gives_empty():
    q, k, v = qkv(seq_q=7, seq_k=0)
    out = flash_attention(q, k, v)
    assert out.shape == (1, 2, 7, 64) and torch.all(out == 0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    q, k, v = qkv(seq_q=0, seq_k=7)
    assert flash_attention(q, k, v).shape == (1, 2, 0, 64)


def test_reference_matches_sdpa_in_float64():
    q, k, v = qkv(batch=2, heads=2, seq_q=33, seq_k=50, dtype=torch.float64)
    keep = torch.rand(2, 1, 33, 50) < 0.5
    keep[:, :, 5] = False
    for kwargs in ({"is_causal": True}, {"attn_mask": keep}, {"attn_mask": torch.randn(33, 50, dtype=torch.float64)},
                   {"scale": 0.2}):
        torch.testing.assert_close(reference_attention(q, k, v, **kwargs).double(),
                                   F.scaled_dot_product_attention(q, k, v, **kwargs), atol=1e-6, rtol=1e-6)


def _error_cases():
    q, k, v = qkv()
    return {
        "dropout": (lambda: flash_attention(q, k, v, dropout_p=0.1), NotImplementedError, "dropout"),
        "head_dim": (lambda: flash_attention(*qkv(head_dim=320)), ValueError, "head dim 320 > 256"),
        "zero_head_dim": (lambda: flash_attention(*qkv(head_dim=0)), ValueError, "head dim is 0"),
        "value_head_dim": (lambda: flash_attention(*qkv(head_dim_v=512)), ValueError, "value head dim 512"),
        "dtype_mismatch": (lambda: flash_attention(q, k.half(), v), TypeError, "one dtype"),
        "float64": (lambda: flash_attention(q.double(), k.double(), v.double()), TypeError, "float64"),
        "rank": (lambda: flash_attention(q[0], k[0], v[0]), ValueError, "4-d"),
        "mask_dtype": (lambda: flash_attention(q, k, v, attn_mask=torch.ones(7, 7, dtype=torch.int32)),
                       TypeError, "attn_mask must be boolean"),
        "mask_shape": (lambda: flash_attention(q, k, v, attn_mask=torch.ones(5, 7)), ValueError, "does not broadcast"),
        "gqa": (lambda: flash_attention(*qkv(heads=4, kv_heads=2)), ValueError, "enable_gqa=True"),
        "gqa_ratio": (lambda: flash_attention(*qkv(heads=3, kv_heads=2), enable_gqa=True), ValueError, "multiple"),
        "block": (lambda: flash_attention(q, k, v, block_m=24), ValueError, "block_m=24"),
        "grad": (lambda: flash_attention(q.requires_grad_(), k, v), NotImplementedError, "forward only"),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_unsupported_inputs_raise_naming_the_problem(case):
    call, error, message = _error_cases()[case]
    with pytest.raises(error, match=re.escape(message)):
        call()


# --- ahead-of-time builds -------------------------------------------------------------------

AOT_VARIANTS = [(arch, "fp16", head_dim, causal, None)
                for arch in (80, 90) for head_dim in (64, 128) for causal in (False, True)]
AOT_VARIANTS.append((80, "bf16", 128, True, "u8"))  # bf16 products, boolean mask loads

# Compiled in a fresh interpreter without TRITON_INTERPRET: under the interpreter the standard
# library's @jit helpers (tl.zeros, tl.max, tl.sum) are interpreter functions, and the code
# generator would call them instead of inlining them.
_AOT_SCRIPT = r"""
import json, sys
import torch
from optcc.kernels.flash_attention import flash_attention_fwd_kernel, gpu_launch_config, kernel_signature
from optcc.lowering.aot import compile_for_target

results = []
for arch, dtype, head_dim, causal, mask_dtype in json.loads(sys.argv[1]):
    config = gpu_launch_config(head_dim, torch.float16)
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, IS_CAUSAL=causal,
                      MASK_KIND=0 if mask_dtype is None else 2, DOT_IN_FP32=False, INPUT_PRECISION="ieee",
                      BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=head_dim, BLOCK_DV=head_dim)
    ir = compile_for_target(flash_attention_fwd_kernel, kernel_signature(dtype, mask_dtype), constexprs=constexprs,
                            arch=arch, options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    results.append(dict(ttir=ir["ttir"], block_m=config.block_m, block_n=config.block_n,
                        wgmma="wgmma.mma_async" in ir["ptx"],
                        mma_sync="mma.sync.aligned.m16n8k16.row.col.f32.{0}.{0}.f32".format(dtype.replace("fp", "f")) in ir["ptx"]))
with open(sys.argv[2], "w") as file:
    json.dump(results, file)
"""


@pytest.fixture(scope="module")
def _aot_build_process(request, tmp_path_factory):
    """The ahead-of-time builds, in a clean process started by the first test that needs them
    (not in the background of other tests: nothing of it outlives this module's tests)."""
    build = BackgroundBuild(tmp_path_factory.mktemp("flash_attention_aot"), _AOT_SCRIPT, [json.dumps(AOT_VARIANTS)])
    yield build
    build.stop()


@pytest.fixture(scope="module")
def aot_builds(_aot_build_process):
    return dict(zip(AOT_VARIANTS, _aot_build_process.results()))


def _value_roots(ttir: str, value: str) -> set[str]:
    """The function arguments an SSA value of the TTIR is computed from."""
    definitions = {}
    for line in ttir.splitlines():
        found = re.match(r"\s*(%[\w.]+)(?::\d+)?\s*=\s*(.*)", line)
        if found:
            definitions[found.group(1)] = re.findall(r"%[\w.]+", found.group(2).split(" loc(")[0])
    signature = next(line for line in ttir.splitlines() if "tt.func public" in line)
    arguments = set(re.findall(r"(%\w+): ", signature))
    roots, seen, stack = set(), set(), [value]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in arguments:
            roots.add(name.lstrip("%"))
        stack.extend(definitions.get(name, []))
    return roots


@pytest.mark.parametrize("variant", AOT_VARIANTS, ids=lambda v: f"sm{v[0]}-{v[1]}-d{v[2]}-{'causal' if v[3] else 'full'}"
                         + ("-mask" if v[4] else ""))
def test_builds_for_gpus_with_two_products_and_one_store(aot_builds, variant):
    arch, dtype, head_dim, _, _ = variant
    build = aot_builds[variant]
    ttir = build["ttir"]
    element = {"fp16": "f16", "bf16": "bf16"}[dtype]
    dots = [line for line in ttir.splitlines() if re.search(r"= tt\.dot ", line)]
    assert len(dots) == 2, dots  # Q K^T and P V
    block_m, block_n = build["block_m"], build["block_n"]
    assert f"tensor<{block_m}x{head_dim}x{element}> * tensor<{head_dim}x{block_n}x{element}> -> tensor<{block_m}x{block_n}xf32>" in dots[0]
    assert f"tensor<{block_m}x{block_n}x{element}> * tensor<{block_n}x{head_dim}x{element}> -> tensor<{block_m}x{head_dim}xf32>" in dots[1]
    assert ttir.count("scf.for") == 1  # one key loop holds both products

    stores = [line for line in ttir.splitlines() if "tt.store" in line]
    assert len(stores) == 1, stores
    pointer = re.search(r"tt\.store (%[\w.]+),", stores[0]).group(1)
    assert _value_roots(ttir, pointer) >= {"out_ptr"}
    assert not _value_roots(ttir, pointer) & {"q_ptr", "k_ptr", "v_ptr", "mask_ptr"}
    assert f"tensor<{block_m}x{head_dim}x!tt.ptr<{element}>>" in stores[0]

    assert build["wgmma"] if arch == 90 else build["mma_sync"]  # tensor cores on both generations
