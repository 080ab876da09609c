"""Pipeline stages: attention is canonicalized by its own pass, regions are formed by the
lowering after every rewrite, and a new pass slots in between without touching any other."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import optcc
from optcc.compiler import default_passes
from optcc.regions import has_regions

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class CountAttention(optcc.Pass):
    """Test-only: counts the canonical SDPA nodes and the regions it sees."""

    name = "count_attention"
    exact = True
    run_after = ("canonicalize_attention",)
    run_before = ("block_fusion",)

    def run(self, gm):
        nodes = list(gm.graph.nodes)
        self.seen = {"sdpa": sum(n.target is SDPA for n in nodes), "regions": int(has_regions(gm))}
        return optcc.PassResult(gm, False, {"matches": 0, **self.seen})


class HandWrittenAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.norm = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.norm(x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


def test_default_pipeline_canonicalizes_attention_and_forms_no_regions():
    names = [p.name for p in default_passes()]
    assert "canonicalize_attention" in names and "block_fusion" not in names
    model, x = HandWrittenAttention().eval(), torch.randn(2, 8, 32)
    compiled = optcc.compile(model, example_inputs=(x,), target="eager")
    assert compiled.report["canonicalize_attention"].stats["attention"] == 1
    assert not has_regions(compiled.graph_module)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["eager", "triton"])
def test_a_pass_between_canonicalization_and_regions_sees_sdpa_and_no_region(target):
    model, x = HandWrittenAttention().eval(), torch.randn(2, 8, 32)
    counter = CountAttention()
    compiled = optcc.compile(model, ["canonicalize_attention", counter], example_inputs=(x,), target=target)
    assert counter.seen == {"sdpa": 1, "regions": 0}
    if target == "triton":  # the lowering formed regions after the pass, and ran them
        from optcc.lowering import with_regions

        assert has_regions(with_regions(compiled.graph_module))
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_block_fusion_still_shows_regions_in_the_graph():
    model, x = HandWrittenAttention().eval(), torch.randn(2, 8, 32)
    compiled = optcc.compile(model, ["block_fusion"], example_inputs=(x,), target="eager")
    assert compiled.report["block_fusion"].stats["attention"] == 1
    assert has_regions(compiled.graph_module)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_run_before_and_run_after_are_both_checked():
    with pytest.raises(optcc.PassOrderError, match="'count_attention' must run before 'block_fusion'"):
        optcc.PassManager(["block_fusion", CountAttention()])
    with pytest.raises(optcc.PassOrderError, match="'count_attention' must run after 'canonicalize_attention'"):
        optcc.PassManager([CountAttention(), "canonicalize_attention"])
    with pytest.raises(optcc.PassOrderError, match="'int8_decomposition' must run before 'block_fusion'"):
        optcc.PassManager(["block_fusion", "int8_decomposition"])
    optcc.PassManager(["bn_reparam", "canonicalize_attention", CountAttention(), "int8_decomposition", "block_fusion"])
