"""Passes on real weights: bn_reparam on a real ImageNet classifier (efficientnet_lite0) and
real photos; int8_decomposition on a real decoder LM (SmolLM2-135M) and real text."""

import pytest
import torch
from helpers import count

import optcc
from optcc import evaluation, zoo
from optcc.kernels.int8_linear import collect_stats
from optcc.pass_manager import output_error


@pytest.mark.slow
def test_efficientnet_lite0_real_weights_fold_exactly():
    model = zoo.efficientnet_lite0()
    images = zoo.sample_images()
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(images,), target="eager", verify=True)
    gm = compiled.graph_module
    assert count(gm, "aten._native_batch_norm_legit_no_training") == 0
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert batch_norms > 40 and compiled.report["bn_reparam"].stats["rules"]["conv_bn"] == batch_norms
    with torch.no_grad():
        expected = model(images)
        got = compiled(images)
    assert output_error([expected], [got]) <= 1e-5
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    # the classifier is real: it is confident on real photos, so top-1 agreement means something
    assert expected.softmax(-1).max(-1).values.max() > 0.3


@pytest.mark.slow
def test_smollm2_int8_decomposition_keeps_perplexity():
    """LLM.int8() at threshold 6 on SmolLM2-135M: every linear (30 layers x 7 + the tied LM head)
    becomes optcc::int8_linear, the real outlier features are found and kept out of int8, and
    the perplexity on the first 256 tokens of optcc's text stays within 2% of fp32."""
    model, tokenizer = evaluation.load_smollm2()
    lm = evaluation.LogitsOnly(model).eval()
    chunks = evaluation.token_chunks(tokenizer, window=256, max_tokens=256)
    assert len(chunks) == 1 and chunks[0].shape == (1, 256)
    compiled = optcc.compile(lm, [("int8_decomposition", {"threshold": 6.0})], example_inputs=(chunks[0],),
                             target="eager")
    gm = compiled.graph_module
    assert count(gm, "optcc.int8_linear") == 30 * 7 + 1
    assert count(gm, "aten.linear") == 0
    reference = evaluation.perplexity(lm, chunks)
    with collect_stats() as stats:
        got = evaluation.perplexity(compiled, chunks)
    assert 5 < reference < 100  # a real LM on real English (not a broken load)
    assert abs(got / reference - 1) < 0.02, (got, reference)
    summary = evaluation.int8_summary(stats)
    assert summary["layers"] == 211
    # real outliers: the decomposition was exercised (e.g. feature 247 of the residual stream)
    assert any(summary["outlier_columns"].values())
    assert 0.9 < summary["int8_fraction"] < 1.0
