"""attention_to_linear: canonical SDPA nodes become optcc::linear_attention.

Proven here: the rewrite computes exactly the linear attention of the layer's own q/k/v
(scale and layouts carried over); golden inserted ops on a timm ViT, BERT with a padding
mask and a causal Llama with grouped-query attention; padding and causality keep their
meaning; selection by layer and length; a mask that is not key padding stays softmax and
says why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import optcc
from optcc.dump import graph_text
from optcc.kernels import linear_attention as la
from optcc.passes.attention_to_linear import AttentionToLinear
from optcc.pass_base import OptionError


def linearize(model, inputs, **options):
    model.eval()
    compiled = optcc.compile(model, example_inputs=inputs, target="eager", fail_fast=True,
                             passes=["canonicalize_attention", ("attention_to_linear", options)])
    with torch.no_grad():
        out = compiled(*inputs)
    return compiled, out, compiled.report["attention_to_linear"]


def inserted(gm) -> str:
    return "\n".join(line for line in graph_text(gm).splitlines() if "optcc.linear_attention" in line) + "\n"


class OneAttention(nn.Module):
    def __init__(self, dim=24, heads=3, mask=None):
        super().__init__()
        self.qkv, self.heads, self.mask = nn.Linear(dim, 3 * dim), heads, mask

    def split(self, x):
        b, n, c = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):
        q, k, v = self.split(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=0.3)
        return out.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("feature_map", la.FEATURE_MAPS)
def test_rewrite_is_the_linear_attention_of_the_layer(feature_map):
    model = OneAttention().eval()
    x = torch.randn(2, 11, 24)
    compiled, out, record = linearize(model, (x,), feature_map=feature_map, seed=3)
    assert record.matches == 1
    (node,) = [n for n in compiled.graph_module.graph.nodes if n.target is la.linear_attention]
    params = node.kwargs["params"]
    params = getattr(compiled.graph_module, params.target) if params is not None else None
    q, k, v = model.split(x)
    expected = la.linear_attention_reference(q, k, v, feature_map=feature_map, params=params, seed=3, scale=0.3)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(x.shape).float(), rtol=1e-5, atol=1e-5)


def test_timm_vit_every_layer(golden):
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=10)
    compiled, out, record = linearize(model, (torch.randn(2, 3, 32, 32),), feature_map="favor")
    assert record.matches == 3 and record.message == "favor: 3 of 3 attention layers linear"
    assert record.error is not None and 0 < record.error < 1  # approximate, and reported
    golden("attention_to_linear", "timm_vit_favor", inserted(compiled.graph_module))


def test_bert_padding_mask_becomes_zero_key_features(golden):
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128)
    ids = torch.randint(1, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    compiled, out, record = linearize(transformers.BertModel(config), (ids, mask))
    assert record.matches == 2
    other = ids.clone()
    other[1, 7:] = 5  # only what the padding hides
    with torch.no_grad():
        again = compiled(other, mask)
    torch.testing.assert_close(again.last_hidden_state[:, :7], out.last_hidden_state[:, :7])
    golden("attention_to_linear", "transformers_bert_padding", inserted(compiled.graph_module))


def test_causal_llama_with_grouped_query_attention(golden):
    import transformers

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, use_cache=False)
    ids = torch.randint(1, 100, (2, 12))
    compiled, out, record = linearize(transformers.LlamaModel(config), (ids,))
    assert record.matches == 2
    later = ids.clone()
    later[:, 8:] = 3
    with torch.no_grad():
        again = compiled(later)
    torch.testing.assert_close(again.last_hidden_state[:, :8], out.last_hidden_state[:, :8])  # no peeking ahead
    assert all(n.kwargs["causal"] for n in compiled.graph_module.graph.nodes if n.target is la.linear_attention)
    golden("attention_to_linear", "transformers_llama_causal", inserted(compiled.graph_module))


def test_selection_by_layer_and_length():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    _, _, record = linearize(model, (x,), layers=[0, 2])
    assert record.matches == 2 and record.stats["layers"][0].startswith("0:")
    _, _, record = linearize(model, (x,), min_tokens=17)
    assert record.matches == 0 and record.stats["missed"] == {"linear_attention: 17 keys, not more than min_tokens=17": 3}


def test_a_mask_that_varies_along_queries_stays_softmax():
    bias = torch.randn(1, 3, 11, 11)  # a relative-position bias: not a key-padding mask
    model = OneAttention(mask=bias).eval()
    x = torch.randn(2, 11, 24)
    compiled, out, record = linearize(model, (x,))
    assert record.matches == 0
    assert record.stats["missed"] == {"linear_attention: an attention mask that is not a key-padding mask": 1}
    assert record.stats["near_misses"][0].node.startswith("scaled_dot_product_attention")
    torch.testing.assert_close(out, model(x))


def test_unknown_feature_map_is_a_clear_error():
    with pytest.raises(optcc.OptionError, match="feature_map must be one of relu, elu1"):
        AttentionToLinear(feature_map="softmax")


def test_exported_onnx_runs_in_onnx_runtime(tmp_path):
    import onnxruntime

    from optcc.onnx_io import export_onnx

    model = OneAttention().eval()
    x = torch.randn(2, 11, 24)
    compiled, out, _ = linearize(model, (x,), feature_map="favor")
    path = export_onnx(compiled, tmp_path / "linear.onnx", (x,))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), out, rtol=1e-4, atol=1e-5)


def test_calibration_trains_hedgehog_maps_toward_softmax():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()
    batches = [(torch.randn(2, 3, 32, 32),) for _ in range(2)]
    x = torch.randn(2, 3, 32, 32)
    _, out_init, identity = linearize(model, (x,), feature_map="hedgehog")
    compiled, out, record = linearize(model, (x,), feature_map="hedgehog", calibrate=batches, steps=25, lr=0.03)
    rows = record.stats["calibration"]
    assert [r["layer"].split(":")[0] for r in rows] == ["0", "1"]
    assert all(r["error_after"] < 0.8 * r["error_before"] for r in rows)  # each layer closer to its softmax
    assert "calibrated on 2 batches" in record.message
    assert record.error < identity.error  # and the whole model closer to the original, on unseen inputs


def test_finetune_trains_every_layer_together_on_the_graph_outputs():
    """The second stage: after layer-wise transfer, the maps of both layers together, so the
    model's output error (which layer-wise training cannot see compound) drops further."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()
    batches = [(torch.randn(2, 3, 32, 32),) for _ in range(2)]
    layerwise = dict(feature_map="hedgehog", calibrate=batches, steps=25, lr=0.03)
    _, _, alone = linearize(model, (batches[0][0],), **layerwise)
    compiled, _, record = linearize(model, (batches[0][0],), **layerwise, finetune_steps=30, finetune_lr=0.01)
    tuned = record.stats["finetune"]
    assert tuned["steps"] == 30 and tuned["error_after"] < 0.8 * tuned["error_before"]
    assert "fine-tuned together 30 steps" in record.message
    assert record.error < alone.error  # on the calibration batch the report measures
    gm = compiled.graph_module
    maps = [n for n in gm.graph.nodes if n.op == "get_attr" and "hedgehog" in n.target]
    assert len(maps) == 2 and not any(getattr(gm, n.target).requires_grad for n in maps)
    with pytest.raises(OptionError, match="finetune_steps trains on the calibration batches"):
        linearize(model, (batches[0][0],), feature_map="hedgehog", finetune_steps=5)


def test_calibrated_maps_are_saved_and_load_back_without_calibrating(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()
    batches = [(torch.randn(2, 3, 32, 32),)]
    path = tmp_path / "maps.pt"
    x = torch.randn(2, 3, 32, 32)
    trained, out, record = linearize(model, (x,), feature_map="hedgehog", calibrate=batches, steps=10, lr=0.03,
                                     maps=str(path))
    assert path.exists() and f"maps written to {path}" in record.message
    reloaded, again, record = linearize(model, (x,), feature_map="hedgehog", maps=str(path))
    assert "read from" in record.message and not record.stats["calibration"]
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    with pytest.raises(OptionError, match="does not exist; calibrate once"):
        linearize(model, (x,), feature_map="hedgehog", maps=str(tmp_path / "missing.pt"))
    deeper = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=10)
    with pytest.raises(OptionError, match="no maps for attention layer 2"):
        linearize(deeper, (x,), feature_map="hedgehog", maps=str(path))
    with pytest.raises(OptionError, match="maps holds calibrated Hedgehog maps"):
        linearize(model, (x,), feature_map="elu1", maps=str(path))
