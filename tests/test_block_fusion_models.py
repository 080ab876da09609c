"""block_fusion on real model code: timm and transformers attention, every implementation."""

from __future__ import annotations

import pytest
import torch

import optcc
from optcc.dump import graph_text
from optcc.regions import regions

SDPA = torch.ops.aten.scaled_dot_product_attention.default
LAYERS = 2


def _sdpa(gm):
    nodes = [n for n in gm.graph.nodes if n.target is SDPA]
    for region in regions(gm):  # attention is never inside a region, but be sure
        assert not any(n.target is SDPA for n in gm.get_submodule(region.target).graph.nodes)
    return nodes


def _compile_and_compare(model, inputs, golden=None, case=None):
    compiled = optcc.compile(model, passes=["block_fusion"], example_inputs=inputs, target="eager", verify=True)
    record = compiled.report["block_fusion"]
    assert record.status == "applied", record.message
    with torch.no_grad():
        expected, got = model(*inputs), compiled(*inputs)
    if not isinstance(expected, torch.Tensor):
        expected, got = expected[0], got[0]
    error = ((expected - got).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, f"relative error {error:.2e}"
    if golden is not None:
        golden("block_fusion", case, graph_text(compiled.graph_module))
    return compiled.graph_module, record


@pytest.mark.parametrize("fused_attn", [False, True], ids=["hand_written", "fused_attn"])
def test_timm_vit(fused_attn, golden):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=LAYERS, img_size=64).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attn
    case = "timm_vit_fused_attn" if fused_attn else "timm_vit_hand_written"
    gm, record = _compile_and_compare(model, (torch.randn(2, 3, 64, 64),), golden, case)
    nodes = _sdpa(gm)
    assert len(nodes) == LAYERS
    assert all(n.args[3] is None and n.kwargs["scale"] == 64**-0.5 for n in nodes)
    assert record.stats["rules"].get("attention", 0) == (0 if fused_attn else LAYERS)
    assert optcc.op_counts(gm).get("aten.softmax.int", 0) == 0


def _transformers(kind, implementation):
    transformers = pytest.importorskip("transformers")
    common = dict(num_hidden_layers=LAYERS, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                  attn_implementation=implementation)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**common))
        inputs = (torch.randint(0, 100, (2, 12)),)
    elif kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **common))
        inputs = (torch.randn(2, 3, 32, 32),)
    else:
        config = transformers.GPT2Config(n_layer=LAYERS, n_head=4, n_embd=32, use_cache=False,
                                         attn_implementation=implementation)
        model = transformers.GPT2Model(config)
        inputs = (torch.randint(0, 100, (2, 12)),)
    return model.eval(), inputs


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2"])
def test_transformers_attention(kind, implementation, golden):
    model, inputs = _transformers(kind, implementation)
    gm, _ = _compile_and_compare(model, inputs, golden, f"transformers_{kind}_{implementation}")
    nodes = _sdpa(gm)
    assert len(nodes) == LAYERS
    for node in nodes:
        assert node.kwargs["scale"] == pytest.approx(8**-0.5, rel=1e-12)
        # no padding mask was given: BERT's all-pass mask is dropped, GPT-2's is causal
        assert node.args[3] is None
        assert node.args[5] is (kind == "gpt2")
    assert optcc.op_counts(gm).get("aten.softmax.int", 0) == 0


def test_bert_with_padding_mask_keeps_it():
    model, (ids,) = _transformers("bert", "eager")
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    compiled = optcc.compile(model, passes=["block_fusion"], example_inputs=(ids, mask), target="eager")
    nodes = _sdpa(compiled.graph_module)
    assert len(nodes) == LAYERS and all(n.args[3] is not None for n in nodes)
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
        got = compiled(ids, mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
