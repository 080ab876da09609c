"""optcc::linear_attention: every form against the plain reference (odd sizes, grouped heads,
key padding, causal, fp32 / bf16), the matmul-order choice, the feature maps' formulas,
FAVOR+ approaching softmax attention as it gets more features, graphs (one node, the
decompositions for export, ONNX), autograd, and the Triton kernels in the interpreter and built
ahead of time for sm_80 / sm_90.

Shapes are tiny (the interpreter's cost is per program and per operation); the ahead-of-time
builds run in a clean process started with the module, beside the other tests.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers import BackgroundBuild
import torch
from test_flash_attention import _value_roots

import optcc.kernels.linear_attention_triton as triton_module
from optcc.kernels.linear_attention import (
    DECOMPOSITIONS, FEATURE_MAPS, cosine_features, decompose_linear_attention, favor_projection, feature_dim,
    feature_maps, focused_features, hedgehog_features, hedgehog_init, linear_attention,
    linear_attention_causal_cumsum, linear_attention_reference, linear_attention_torch, matmul_order,
    softmax_attention)
from optcc.kernels.linear_attention_triton import linear_attention_triton

OP = torch.ops.optcc.linear_attention.default
B, HQ, HK, E, EV = 2, 4, 2, 5, 3  # GQA 2:1, head dims not powers of two
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread (on a busy 2-core machine, thread hand-offs cost more
    than these ops); the setting is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(seq_q, seq_k, dtype=torch.float32, padded=True, e=E, ev=EV):
    q = torch.randn(B, HQ, seq_q, e).to(dtype)
    k = torch.randn(B, HK, seq_k, e).to(dtype)
    v = torch.randn(B, HK, seq_k, ev).to(dtype)
    mask = None
    if padded:  # the second row's last three keys are padding
        mask = torch.ones(B, seq_k, dtype=torch.bool)
        mask[1, -3:] = False
    return q, k, v, mask


def params_for(feature_map, e=E, features=4):
    if feature_map != "hedgehog":
        return None
    return hedgehog_init(HQ, e, features, HK) + 0.3 * torch.randn(HQ + HK, e + 1, features)


def check(out, want, dtype=torch.float32):
    # the op returns SDPA's layout ([B, L, H, Ev] in memory), the torch forms row-major
    assert out.dtype == dtype and (out.is_contiguous() or out.transpose(1, 2).is_contiguous())
    torch.testing.assert_close(out.double(), want.double(), **TOL[dtype])


# ----------------------------------------------------------------------------------------
# The op's forms against the reference


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_non_causal_orders_match_reference(feature_map):
    q, k, v, mask = make_inputs(7, 9)
    params = params_for(feature_map)
    want = linear_attention_reference(q, k, v, mask, feature_map, params)
    assert want.shape == (B, HQ, 7, EV)
    for order in ("auto", "linear", "quadratic"):
        check(linear_attention(q, k, v, mask, feature_map, params, order=order), want)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_causal_chunked_and_cumsum_match_reference(feature_map):
    q, k, v, mask = make_inputs(11, 11)
    params = params_for(feature_map)
    want = linear_attention_reference(q, k, v, mask, feature_map, params, causal=True)
    check(linear_attention_causal_cumsum(q, k, v, mask, feature_map, params), want)
    for chunk in (1, 4, 11, 64):  # one position, a ragged last chunk, one chunk, longer than L
        check(linear_attention(q, k, v, mask, feature_map, params, causal=True, chunk_size=chunk), want)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_blocked_cpu_form_matches_reference(feature_map, causal, monkeypatch):
    """Long-sequence CPU calls run in blocks of positions (``linear_attention_cpu``): here
    blocks of 8 positions (a ragged last one, chunks of 4 inside) against the fp64 reference;
    FAVOR, whose shifts span every key, must stay in the whole form and still be right."""
    import optcc.kernels.linear_attention_cpu as cpu

    monkeypatch.setattr(cpu, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(cpu, "BLOCK_ELEMENTS", B * HQ * E * 8)
    calls = []
    blocked = cpu.linear_attention_blocked
    monkeypatch.setattr(cpu, "linear_attention_blocked", lambda *a: calls.append(a) or blocked(*a))
    q, k, v, mask = make_inputs(29, 29)
    params = params_for(feature_map)
    want = linear_attention_reference(q, k, v, mask, feature_map, params, causal=causal)
    check(linear_attention(q, k, v, mask, feature_map, params, causal=causal, chunk_size=4, order="linear"), want)
    assert len(calls) == (feature_map != "favor")
    assert cpu.block_rows(B, HQ, E, 4) == 8


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature_map", ["elu1", "favor", "hedgehog"])
def test_bf16_inputs_accumulate_in_fp32(feature_map, causal):
    q, k, v, mask = make_inputs(10, 10, torch.bfloat16)
    params = params_for(feature_map)
    out = linear_attention(q, k, v, mask, feature_map, params, causal=causal, chunk_size=4)
    check(out, linear_attention_reference(q, k, v, mask, feature_map, params, causal=causal), torch.bfloat16)


def test_matmul_order_choice():
    assert matmul_order(4, 4, 64, 64) == "quadratic"  # short sequences, wide heads
    assert matmul_order(1024, 1024, 64, 64) == "linear"
    assert matmul_order(64, 64, 64, 64) == "quadratic"  # 2 L F Ev = L^2 (F + Ev): a tie is quadratic
    assert matmul_order(96, 96, 64, 64) == "linear"
    # queries sharing a key/value head share its state: grouping favours the linear order
    assert matmul_order(40, 40, 64, 64, group=1) == "quadratic"
    assert matmul_order(40, 40, 64, 64, group=8) == "linear"


def test_key_mask_is_dropping_the_keys():
    """Padding is as if the keys were not there, whatever the padded values (NaN included);
    a query with every key masked gets 0."""
    q, k, v, mask = make_inputs(6, 9)
    k[1, :, -3:] = float("nan")
    v[1, :, -3:] = float("inf")
    for feature_map in FEATURE_MAPS:
        params = params_for(feature_map)
        out = linear_attention(q, k, v, mask, feature_map, params)
        alone = linear_attention(q[1:], k[1:, :, :-3], v[1:, :, :-3], None, feature_map, params)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[1:], alone, **TOL[torch.float32])
    none = torch.zeros(B, 9, dtype=torch.bool)
    assert torch.equal(linear_attention(q, k.nan_to_num(), v, none, "relu"), torch.zeros(B, HQ, 6, EV))


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_causal_never_sees_later_keys(feature_map):
    q, k, v, _ = make_inputs(9, 9, padded=False)
    params = params_for(feature_map)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] = 3 * torch.randn_like(k2[:, :, 5:])
    v2[:, :, 5:] = 3 * torch.randn_like(v2[:, :, 5:])
    before = linear_attention(q, k, v, None, feature_map, params, causal=True, chunk_size=4)
    after = linear_attention(q, k2, v2, None, feature_map, params, causal=True, chunk_size=4)
    # FAVOR: the shifts of the later keys cancel up to rounding
    torch.testing.assert_close(after[:, :, :5], before[:, :, :5], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[:, :, 5:], before[:, :, 5:])


# ----------------------------------------------------------------------------------------
# Feature maps


def test_feature_map_formulas():
    x, y = torch.randn(2, 3, 6, 5, dtype=torch.float64), torch.randn(2, 3, 6, 5, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert torch.allclose((cosine_features(x) * cosine_features(y)).sum(-1), 1 + cos)

    r = torch.relu(x)
    want = (r.norm(dim=-1, keepdim=True) * r**3 / (r**3).norm(dim=-1, keepdim=True)).nan_to_num()  # 0 / 0 -> 0
    assert torch.allclose(focused_features(x), want)
    assert torch.allclose(focused_features(x).norm(dim=-1), r.norm(dim=-1))  # keeps ||relu(x)||
    assert torch.allclose(focused_features(x, power=1.0), r)
    assert torch.equal(focused_features(-x.abs()), torch.zeros_like(x))  # relu(x) = 0: no 0 / 0
    assert torch.isfinite(focused_features(1e15 * x.float())).all()  # relu(x)^p does not overflow

    # Hedgehog at the identity init: [softmax(x), softmax(-x)]; queries and keys use their own rows
    params = hedgehog_init(3, 5, kv_heads=3, dtype=torch.float64)
    assert params.shape == (6, 6, 5)
    assert torch.allclose(hedgehog_features(x, params[:3]), torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))
    pq, pk = feature_maps(x, y, None, "hedgehog", params)
    assert pq.shape == pk.shape == (2, 3, 6, 10)
    for name in ("relu", "elu1", "cosine", "focused", "favor", "hedgehog"):
        given = params if name == "hedgehog" else None
        pq, pk = feature_maps(x, y, None, name, given)
        assert (pq @ pk.transpose(-1, -2) >= 0).all(), name  # non-negative kernels everywhere
        assert pq.shape[-1] == pk.shape[-1] == feature_dim(name, 5, given, 0), name


def test_hedgehog_params_shape():
    params = hedgehog_init(HQ, E, 7, HK)
    assert params.shape == (HQ + HK, E + 1, 7)
    assert torch.equal(params[:, :E, :E], torch.eye(E).expand(HQ + HK, E, E)) and not params[:, E:].any()
    assert hedgehog_init(2, 4).shape == (4, 5, 4)  # F = E, kv_heads = heads by default
    assert feature_dim("hedgehog", E, params) == 14
    q, k, v, _ = make_inputs(4, 4)
    assert linear_attention(q, k, v, None, "hedgehog", params).shape == (B, HQ, 4, EV)
    with pytest.raises(ValueError, match=r"hedgehog needs params \[Hq \+ Hk, E \+ 1, F\]"):
        linear_attention(q, k, v, None, "hedgehog", hedgehog_init(HQ, E, 7))  # kv rows missing
    with pytest.raises(ValueError, match="hedgehog needs params"):
        linear_attention(q, k, v, None, "hedgehog", None)


def test_favor_projection_is_deterministic_orthogonal_gaussian():
    w = favor_projection(6, 15, seed=3)
    assert w.shape == (15, 6) and w.dtype == torch.float32
    assert torch.equal(w, favor_projection(6, 15, seed=3)) and not torch.equal(w, favor_projection(6, 15, seed=4))
    for block in (w[:6], w[6:12]):  # rows orthogonal within a block of E
        gram = block.double() @ block.double().t()
        assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-5)
    assert favor_projection(64).shape == (266, 64)  # m = int(E ln E)
    q, k, v, _ = make_inputs(4, 4)
    out = linear_attention(q, k, v, None, "favor", seed=3, num_features=15)
    torch.testing.assert_close(out, linear_attention(q, k, v, None, "favor", favor_projection(E, 15, seed=3)))


def test_favor_approaches_softmax_attention_as_features_grow():
    """The relative error to softmax(q k^T / sqrt(E)) V, averaged over 8 projections, falls
    with m (Monte-Carlo: ~1 / sqrt(m)); the other maps are no approximation of it."""
    torch.manual_seed(1)
    q, k, v = (0.7 * torch.randn(1, 2, 16, 8) for _ in range(3))
    for causal in (False, True):
        exact = softmax_attention(q, k, v, causal=causal)

        def error(m):
            errors = [(linear_attention(q, k, v, None, "favor", causal=causal, seed=seed, num_features=m).double()
                       - exact).norm() / exact.norm() for seed in range(8)]
            return float(sum(errors) / len(errors))

        few, some, many = error(8), error(64), error(512)
        assert many < some < few and many < 0.5 * few, (causal, few, some, many)
        assert many < 0.25, many
        elu1 = linear_attention(q, k, v, None, "elu1", causal=causal).double()
        assert ((elu1 - exact).norm() / exact.norm()) > many


# ----------------------------------------------------------------------------------------
# Checks, autograd, graphs


def test_bad_inputs_are_refused():
    q, k, v, mask = make_inputs(5, 6)
    with pytest.raises(ValueError, match="unknown feature map"):
        linear_attention(q, k, v, mask, "softmax")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        linear_attention(q[:, :3], k, v, mask)
    with pytest.raises(ValueError, match="causal needs as many queries as keys"):
        linear_attention(q, k, v, mask, causal=True)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        linear_attention(q, k, v, mask.float())
    with pytest.raises(ValueError, match="takes no params"):
        linear_attention(q, k, v, mask, "relu", torch.ones(1))
    with pytest.raises(ValueError, match="order must be"):
        linear_attention(q, k, v, mask, order="fast")


@pytest.mark.parametrize("feature_map", ["hedgehog", "favor"])
def test_autograd_recomputes_the_torch_form(feature_map):
    q, k, v, mask = make_inputs(6, 6)
    k = 10 * k  # FAVOR: every key exponent far below 0, where a padded key's would be
    k[1, :, -3:] = float("nan")  # padding: no NaN gets into any gradient
    params = params_for(feature_map) if feature_map == "hedgehog" else favor_projection(E, 8)
    leaves = [t.requires_grad_() for t in (q, k, v, params)]
    out = linear_attention(q, k, v, mask, feature_map, params, causal=True, chunk_size=4)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    want = linear_attention_torch(q, k, v, mask, feature_map, params, causal=True, chunk_size=4)
    want = torch.autograd.grad(want.square().sum(), leaves)
    for got, expected in zip(grads, want):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected)
    assert params.grad is None and grads[3].abs().sum() > 0


def _targets(graph):
    return [node.target for node in graph.nodes if node.op == "call_function"]


def test_graph_keeps_one_node_and_decomposes_in_place():
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v, mask = make_inputs(7, 9)

    def attend(q, k, v, mask):
        return linear_attention(q, k, v, mask, "favor", num_features=12, seed=5) + 1

    gm = make_fx(attend, tracing_mode="fake")(q, k, v, mask)
    assert _targets(gm.graph).count(OP) == 1 and len(_targets(gm.graph)) == 2
    want = attend(q, k, v, mask)
    assert decompose_linear_attention(gm) == 1
    assert OP not in _targets(gm.graph)
    assert torch.ops.aten.exp.default in _targets(gm.graph)
    constants = [node for node in gm.graph.nodes if node.op == "get_attr"]
    assert len(constants) == 1 and torch.equal(getattr(gm, constants[0].target), favor_projection(E, 12, seed=5))
    assert all("val" in node.meta for node in gm.graph.nodes if node.op == "call_function")
    torch.testing.assert_close(gm(q, k, v, mask), want)


def test_export_keeps_the_op_and_decomposes_to_onnx():
    """torch.export keeps the op; run_decompositions(DECOMPOSITIONS) leaves aten ops only (FAVOR's
    projection a lifted constant), which export to ONNX and run the same in ONNX Runtime."""
    import onnxruntime

    class Block(torch.nn.Module):
        def forward(self, q, k, v, mask):
            causal = linear_attention(q, k, v, mask, "favor", causal=True, num_features=10, chunk_size=4)
            return causal + linear_attention(q, k, v, mask, "elu1")

    q, k, v, mask = make_inputs(8, 8)
    want = Block()(q, k, v, mask)
    program = torch.export.export(Block(), (q, k, v, mask))
    assert _targets(program.graph).count(OP) == 2
    decomposed = program.run_decompositions(DECOMPOSITIONS)
    assert OP not in _targets(decomposed.graph) and torch.ops.aten.cumsum.default in _targets(decomposed.graph)
    torch.testing.assert_close(decomposed.module()(q, k, v, mask), want)

    onnx_program = torch.onnx.export(decomposed, dynamo=True, optimize=False, verbose=False, report=False)
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString())
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), (q, k, v, mask))}
    torch.testing.assert_close(torch.from_numpy(session.run(None, feeds)[0]), want, rtol=1e-5, atol=1e-5)


def test_traced_cuda_tensors_keep_one_node():
    """Fake CUDA tensors (torch.compile / torch.export) are not real: the fake implementation
    answers, no kernel is launched, the graph has the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        q, k, v = torch.randn(2, 4, 8, 5, device="cuda"), torch.randn(2, 2, 8, 5, device="cuda"), \
            torch.randn(2, 2, 8, 3, device="cuda")
        gm = make_fx(lambda q, k, v: linear_attention(q, k, v, None, "relu", causal=True))(q, k, v)
    assert _targets(gm.graph) == [OP]
    assert tuple(next(n for n in gm.graph.nodes if n.target is OP).meta["val"].shape) == (2, 4, 8, 3)


# ----------------------------------------------------------------------------------------
# Triton kernels, in the interpreter


TRITON_MAPS = ["relu", "elu1", "cosine", "favor", "hedgehog"]  # fused, and features computed in torch


@pytest.mark.parametrize("feature_map", TRITON_MAPS)
def test_triton_non_causal_matches_reference(feature_map):
    """20 keys in 16-key tiles, FAVOR's 20 features in 16-feature tiles: ragged tiles on both loops."""
    q, k, v, mask = make_inputs(9, 20)
    params = params_for(feature_map)
    extra = dict(num_features=20) if feature_map == "favor" else {}
    out = linear_attention_triton(q, k, v, mask, feature_map, params, block_s=16, block_f=16, **extra)
    check(out, linear_attention_reference(q, k, v, mask, feature_map, params, **extra))


@pytest.mark.parametrize("feature_map", TRITON_MAPS)
def test_triton_causal_matches_reference(feature_map):
    """20 positions in 16-position chunks: the running state crosses a chunk boundary."""
    q, k, v, mask = make_inputs(20, 20)
    params = params_for(feature_map)
    out = linear_attention_triton(q, k, v, mask, feature_map, params, causal=True, block_c=16)
    check(out, linear_attention_reference(q, k, v, mask, feature_map, params, causal=True))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_triton_bf16_and_strided_inputs(causal):
    q, k, v, mask = make_inputs(12, 12, torch.bfloat16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # a [B, L, H, E] layout
    v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = linear_attention_triton(q, k, v, mask, "elu1", causal=causal)
    check(out, linear_attention_reference(q, k, v, mask, "elu1", causal=causal), torch.bfloat16)


def test_triton_edge_cases():
    q, k, v, _ = make_inputs(4, 6)
    none = torch.zeros(B, 6, dtype=torch.bool)
    assert torch.equal(linear_attention_triton(q, k, v, none, "elu1"), torch.zeros(B, HQ, 4, EV))
    assert linear_attention_triton(q, k[:, :, :0], v[:, :, :0]).abs().sum() == 0  # no keys
    assert linear_attention_triton(q[:, :, :0], k, v).shape == (B, HQ, 0, EV)
    assert triton_module.supports(q, k, v, "elu1", None, False, order="linear")
    assert not triton_module.supports(q, k, v, "elu1", None, False, order="quadratic")
    assert not triton_module.supports(q.double(), k.double(), v.double(), "elu1", None, True)
    assert not triton_module.supports(q, k, v, "favor", None, True, num_features=300)


# ----------------------------------------------------------------------------------------
# Triton kernels, built ahead of time

AOT_BLOCK = 64
# (arch, kernel, dtype, feature dtype, FEATURE): the fused maps in fp16 on both generations, and
# bf16 values with fp32 features computed in torch
AOT_VARIANTS = [(arch, kernel, "fp16", "fp16", feature) for arch in (80, 90)
                for kernel, feature in (("state", 2), ("output", 2), ("causal", 1))] + \
               [(80, "state", "bf16", "fp32", 0)]
_KERNELS = {"state": "linear_attention_state_kernel", "output": "linear_attention_output_kernel",
            "causal": "linear_attention_causal_kernel"}
_BLOCKS = {"state": ("BLOCK_S", "BLOCK_F", "BLOCK_V"), "output": ("BLOCK_L", "BLOCK_F", "BLOCK_V"),
           "causal": ("BLOCK_C", "BLOCK_F", "BLOCK_V")}

_AOT_SCRIPT = r"""
import json, sys
from optcc.lowering.aot import compile_for_target
import optcc.kernels.linear_attention_triton as module
variants, kernels, blocks, block = json.loads(sys.argv[1])
path = sys.argv[2]
results = []
for arch, kernel, dtype, feature_dtype, feature in variants:
    constexprs = dict(FEATURE=feature, DOT_IN_FP32=False, INPUT_PRECISION="ieee", **{b: block for b in blocks[kernel]})
    if kernel != "output":
        constexprs["HAS_MASK"] = True
    ir = compile_for_target(getattr(module, kernels[kernel]), module.kernel_signature(kernel, dtype, feature_dtype),
                            constexprs=constexprs, arch=arch, options=dict(num_warps=4, num_stages=2))
    results.append(dict(ttir=ir["ttir"], ptx=ir["ptx"]))
with open(path, "w") as file:
    json.dump(results, file)
"""


@pytest.fixture(scope="module", autouse=True)
def _aot_build_process(tmp_path_factory):
    """The builds, in a clean process (no TRITON_INTERPRET) started with the module so that
    it compiles while the interpreter tests run; killed when the module's tests end."""
    build = BackgroundBuild(tmp_path_factory.mktemp("linear_attention_aot"), _AOT_SCRIPT,
                            [json.dumps([AOT_VARIANTS, _KERNELS, _BLOCKS, AOT_BLOCK])])
    yield build
    build.stop()


@pytest.fixture(scope="module")
def aot_builds(_aot_build_process):
    return dict(zip(AOT_VARIANTS, _aot_build_process.results()))


def _roots(ttir, line):
    pointer = re.search(r"tt\.(?:load|store) (%[\w.]+)", line).group(1)
    return {root for root in _value_roots(ttir, pointer) if root.endswith("_ptr")}


DOTS = {"state": 1, "output": 1, "causal": 4}  # causal: A, A V, Q state, the state update


@pytest.mark.parametrize("variant", AOT_VARIANTS, ids=lambda v: f"sm{v[0]}-{v[1]}-{v[2]}-feature{v[4]}")
def test_builds_for_gpus_with_tensor_core_products(aot_builds, variant):
    arch, kernel, dtype, feature_dtype, feature = variant
    ir = aot_builds[variant]
    ttir, ptx = ir["ttir"], ir["ptx"]
    assert f".target sm_{arch}" in ptx and "atom" not in ptx
    assert ttir.count("scf.for") == 1 and ttir.count("tt.dot ") == DOTS[kernel]
    head, loop = ttir.split("scf.for", 1)
    loop, tail = loop.split("scf.yield", 1)
    element = {"fp16": "f16", "bf16": "bf16"}[dtype]
    for line in (line for line in loop.splitlines() if "tt.dot " in line):
        assert f"x{element}>" in line and "xf32>" in line.split("->")[-1]  # 16-bit operands, fp32 accumulator
    if feature == 2:  # elu1 fused into the loop: exp of the loaded tile, no extra pass
        assert "math.exp" in loop
    elif feature == 1:
        assert "arith.maxnumf" in loop or "arith.maximumf" in loop
    loads = {frozenset(_roots(ttir, line)) for line in loop.splitlines() if "tt.load" in line}
    stores = [_roots(ttir, line) for line in (loop + tail).splitlines() if "tt.store" in line]
    if kernel == "state":
        assert loads == {frozenset({"mask_ptr"}), frozenset({"k_ptr"}), frozenset({"v_ptr"})}
        assert "tt.store" not in loop and stores == [{"state_ptr"}, {"z_ptr"}]
    elif kernel == "output":
        assert loads == {frozenset({"q_ptr"}), frozenset({"state_ptr"}), frozenset({"z_ptr"})}
        assert "tt.store" not in loop and stores == [{"out_ptr"}]
    else:  # the chunk's output is stored in the loop; the state never leaves registers
        assert stores == [{"out_ptr"}] and "tt.store" in loop
        assert {"q_ptr", "k_ptr", "v_ptr"} <= set().union(*loads)
    assert "ld.local" not in ptx  # no register spills
    if arch == 90:
        assert "wgmma.mma_async" in ptx
    else:
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{element}.{element}.f32" in ptx
