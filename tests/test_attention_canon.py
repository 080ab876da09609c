"""block_fusion, job 1: every softmax attention idiom becomes one canonical SDPA node."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_left_alone, count, run_pipeline

import optcc
from optcc.dump import graph_text

SDPA = "aten.scaled_dot_product_attention"
ATTENTION_ONLY = ("block_fusion", {"regions": False})
B, H, L, D = 2, 3, 7, 8


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]


class QKV(nn.Module):
    """Projections + heads split, so each idiom below only writes the attention itself."""

    def __init__(self, dim=H * D):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, c // H).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge(self, o):
        b, h, n, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, h * d))


class MatmulScale(QKV):
    def forward(self, x):
        q, k, v = self.heads(x)
        a = (q @ k.transpose(-2, -1)) * D**-0.5
        return self.merge(a.softmax(dim=-1) @ v)


class ScaledQuery(QKV):  # timm's fused_attn=False: q is scaled before the matmul
    def forward(self, x):
        q, k, v = self.heads(x)
        a = (q * D**-0.5) @ k.transpose(-2, -1)
        return self.merge(a.softmax(dim=-1) @ v)


class ScaledByConstantTensor(QKV):  # as ONNX files write it: q and k^T each times a stored sqrt(scale)
    def __init__(self):
        super().__init__()
        self.register_buffer("root_scale", torch.tensor(D**-0.25))

    def forward(self, x):
        q, k, v = self.heads(x)
        a = (q * self.root_scale) @ (k.transpose(-2, -1) * self.root_scale)
        return self.merge(a.softmax(dim=-1) @ v)


class DivSqrt(QKV):
    def forward(self, x):
        q, k, v = self.heads(x)
        a = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
        return self.merge(torch.matmul(F.softmax(a, dim=3), v))


class EinsumCausal(QKV):
    def __init__(self):
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(16, 16)))

    def forward(self, x):
        q, k, v = self.heads(x)
        n = x.shape[1]
        a = torch.einsum("bhld,bhsd->bhls", q, k) / math.sqrt(D)
        a = a.masked_fill(self.tril[:n, :n] == 0, float("-inf"))
        return self.merge(torch.einsum("bhls,bhsd->bhld", a.softmax(-1), v))


class AdditiveMask(QKV):
    def forward(self, x, mask):
        q, k, v = self.heads(x)
        a = q @ k.transpose(-2, -1) * D**-0.5 + mask
        return self.merge(a.softmax(-1) @ v)


class MaskedFillInf(QKV):
    def forward(self, x, padding):  # padding: [B, 1, 1, L] bool, True = masked out
        q, k, v = self.heads(x)
        a = (q @ k.transpose(-2, -1) * D**-0.5).masked_fill(padding, float("-inf"))
        return self.merge(a.softmax(-1) @ v)


class NanGuarded(QKV):  # torch.onnx's form: queries that see no key get 0, as from torch's SDPA
    def forward(self, x, padding):
        q, k, v = self.heads(x)
        p = (q @ k.transpose(-2, -1) * D**-0.5).masked_fill(padding, float("-inf")).softmax(-1)
        return self.merge(torch.where(torch.isnan(p), 0.0, p) @ v)


class MaskedFillFinite(QKV):
    def forward(self, x, padding):
        q, k, v = self.heads(x)
        a = (q @ k.transpose(-2, -1) * D**-0.5).masked_fill(padding, -1e9)
        return self.merge(a.softmax(-1) @ v)


class FlatHeadsBmm(nn.Module):  # heads folded into the batch, bmm on 3-d tensors
    def forward(self, q, k, v):
        a = torch.bmm(q * D**-0.5, k.transpose(1, 2))
        return torch.bmm(torch.softmax(a, -1), v)


class DefaultScaleSDPA(QKV):
    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v))


class MHA(nn.Module):
    def __init__(self, need_weights=True, masked=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(H * D, H, batch_first=True)
        self.need_weights, self.masked = need_weights, masked

    def forward(self, x):
        mask = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), 1) if self.masked else None
        return self.attn(x, x, x, attn_mask=mask, need_weights=self.need_weights)[0]


def _x():
    return torch.randn(B, L, H * D)


def _padding():
    pad = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    pad[0, ..., -2:] = True  # the first sequence has two padding tokens; no row is all masked
    return pad


# (case, model factory, inputs factory, expected (mask kind, is_causal), scale)
IDIOMS = [
    ("matmul_scale", MatmulScale, lambda: (_x(),), (None, False), D**-0.5),
    ("scaled_query", ScaledQuery, lambda: (_x(),), (None, False), D**-0.5),
    ("scaled_by_constant_tensor", ScaledByConstantTensor, lambda: (_x(),), (None, False),
     float(torch.tensor(D**-0.25)) ** 2),
    ("matmul_div_sqrt", DivSqrt, lambda: (_x(),), (None, False), 1 / math.sqrt(D)),
    ("einsum_causal_buffer", EinsumCausal, lambda: (_x(),), (None, True), 1 / math.sqrt(D)),
    ("additive_mask_input", AdditiveMask, lambda: (_x(), torch.randn(B, 1, L, L)), ("mask", False), D**-0.5),
    ("masked_fill_inf", MaskedFillInf, lambda: (_x(), _padding()), ("aten.logical_not", False), D**-0.5),
    ("masked_fill_finite", MaskedFillFinite, lambda: (_x(), _padding()), ("aten.where.self", False), D**-0.5),
    ("bmm_flat_heads", FlatHeadsBmm, lambda: tuple(torch.randn(B * H, L, D) for _ in range(3)), (None, False), D**-0.5),
    ("sdpa_default_scale", DefaultScaleSDPA, lambda: (_x(),), (None, False), 1 / math.sqrt(D)),
    ("mha_need_weights", lambda: MHA(True), lambda: (_x(),), (None, False), D**-0.5),
    ("mha_causal_mask", lambda: MHA(True, masked=True), lambda: (_x(),), (None, True), D**-0.5),
    ("mha_no_weights", lambda: MHA(False), lambda: (_x(),), (None, False), 1 / math.sqrt(D)),
]


@pytest.mark.parametrize("case,factory,inputs,mask,scale", IDIOMS, ids=[c[0] for c in IDIOMS])
def test_idiom_becomes_one_sdpa(case, factory, inputs, mask, scale, golden):
    model = factory().eval()
    gm, report, error = run_pipeline(model, inputs(), [ATTENTION_ONLY])
    (node,) = sdpa_nodes(gm)
    q, k, v, attn_mask, dropout_p, is_causal = node.args
    assert node.kwargs["scale"] == pytest.approx(scale, rel=1e-12)
    assert dropout_p == 0.0 and is_causal == mask[1]
    if mask[0] is None:
        assert attn_mask is None
    elif mask[0] == "mask":
        assert attn_mask.op == "placeholder"
    else:
        assert optcc.ir.op_name(attn_mask) == mask[0]
    assert count(gm, "aten.softmax.int") == 0 and count(gm, "aten.bmm") == 0
    assert report["block_fusion"].matches >= 1
    assert error <= 1e-5, f"relative error {error:.2e} vs eager"
    golden("block_fusion", case, graph_text(gm))


class SoftmaxOverQueries(QKV):
    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge((q @ k.transpose(-2, -1) * D**-0.5).softmax(dim=-2) @ v)


class ScoresReturned(QKV):
    def forward(self, x):
        q, k, v = self.heads(x)
        scores = q @ k.transpose(-2, -1) * D**-0.5
        return self.merge(scores.softmax(-1) @ v), scores


class ProbabilitiesReturned(QKV):
    def forward(self, x):
        q, k, v = self.heads(x)
        p = (q @ k.transpose(-2, -1) * D**-0.5).softmax(-1)
        return self.merge(p @ v), p


class ScaleAfterMask(QKV):
    def forward(self, x, mask):
        q, k, v = self.heads(x)
        return self.merge(((q @ k.transpose(-2, -1) + mask) * D**-0.5).softmax(-1) @ v)


class ReluOnScores(QKV):
    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(torch.relu(q @ k.transpose(-2, -1)).softmax(-1) @ v)


NEGATIVE = [
    ("softmax_over_queries", SoftmaxOverQueries, lambda: (_x(),), "softmax is not over the key axis"),
    ("scores_used_elsewhere", ScoresReturned, lambda: (_x(),), "the attention scores are used elsewhere"),
    ("probabilities_used_elsewhere", ProbabilitiesReturned, lambda: (_x(),),
     "the attention probabilities are used elsewhere"),
    ("scale_after_mask", ScaleAfterMask, lambda: (_x(), torch.randn(1, 1, L, L)),
     "the scores are scaled after the mask is added"),
    ("relu_on_scores", ReluOnScores, lambda: (_x(),), "aten.relu between the scores and the softmax"),
]


@pytest.mark.parametrize("case,factory,inputs,reason", NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_not_attention_is_left_alone(case, factory, inputs, reason):
    gm = assert_left_alone(factory().eval(), inputs(), ATTENTION_ONLY, f"attention: {reason}")
    assert not sdpa_nodes(gm) and count(gm, "aten.softmax.int") == 1


def test_nan_guarded_probabilities_become_sdpa_with_its_zero_rows():
    padding = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    padding[0] = True  # the first sequence has no key at all: every one of its queries sees none
    model = NanGuarded().eval()
    gm, report, _ = run_pipeline(model, (_x(), padding), [ATTENTION_ONLY])
    assert len(sdpa_nodes(gm)) == 1 and count(gm, "aten.isnan") == 0 and count(gm, "aten.softmax.int") == 0
    x = _x()
    with torch.no_grad():
        expected = model(x, padding)
        (got,) = gm(x, padding)
    assert not torch.isnan(expected).any() and not torch.isnan(got).any()
    torch.testing.assert_close(got, expected)


def test_fully_masked_rows_match_eager():
    """A -inf masked_fill that masks a whole row: eager's softmax gives NaN there; the
    canonical SDPA must give the same (not silently a different number)."""
    padding = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    padding[0] = True
    model = MaskedFillInf().eval()
    gm, _, _ = run_pipeline(model, (_x(), padding), [ATTENTION_ONLY])
    x = _x()
    with torch.no_grad():
        expected = model(x, padding)
        (got,) = gm(x, padding)
    assert torch.equal(torch.isnan(expected), torch.isnan(got))
    ok = ~torch.isnan(expected)
    torch.testing.assert_close(got[ok], expected[ok])
