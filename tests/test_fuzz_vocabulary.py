"""The fuzzer's model generator covers the vocabulary the passes rewrite, and the passes
really act on what it builds (so the differential fuzz test is not vacuous). Minimized
failures found by fuzzing are kept here as regression cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import optcc
from optcc.pass_base import make_pass
from optcc.testing import fuzz
from optcc.testing.fuzz import ATTENTION_IDIOMS, MASKS, FuzzStats, ModelSpec, block, build_model, check_spec

BN = "aten._native_batch_norm_legit_no_training"
IMAGE = (2, 4, 6, 6)
TOKENS = (2, 5, 8)

# One spec per block kind (and per attention idiom and mask), each checked against eager.
SPECS = {
    "conv_bn_act": ModelSpec(IMAGE, (block("conv", cout=6, k=3, stride=2, groups="2", dilation=1, padded=True,
                                           bias=True, bn=True, bn_first=False, act="hardswish"),)),
    "bn_conv_unpadded_dilated": ModelSpec(IMAGE, (block("conv", cout=4, k=3, stride=1, groups="1", dilation=2,
                                                        padded=False, bias=False, bn=False, bn_first=True,
                                                        act="gelu"),)),
    "depthwise": ModelSpec(IMAGE, (block("conv", cout=4, k=3, stride=1, groups="dw", dilation=1, padded=True,
                                         bias=False, bn=True, bn_first=False, act="relu6"),)),
    "conv_transpose": ModelSpec((1, 2, 3, 3), (block("conv_transpose", cout=4, k=3, stride=2, groups=2,
                                                     bias=True, act="silu"),)),
    "residual": ModelSpec(IMAGE, (block("residual", k=3, act="relu"),)),
    "repvgg": ModelSpec(IMAGE, (block("repvgg", cout=4, k=3, stride=1, depthwise=False, one_by_one=True,
                                      identity=True, act="relu"),)),
    "repvgg_strided_dw": ModelSpec(IMAGE, (block("repvgg", cout=4, k=3, stride=2, depthwise=True,
                                                 one_by_one=True, identity=False, act="identity"),)),
    "acnet": ModelSpec(IMAGE, (block("acnet", act="leaky_relu"),)),
    "dbb": ModelSpec(IMAGE, (block("dbb", plain_pool=False, act="sigmoid"),)),
    "dbb_plain_pool": ModelSpec(IMAGE, (block("dbb", plain_pool=True, act="tanh"),)),
    "branches_concat": ModelSpec(IMAGE, (block("branches", cout=2),)),
    "repmlp": ModelSpec(IMAGE, (block("repmlp", window=3, kernels=(1, 3), sharesets=2, nonlinear=False,
                                      act="relu"),)),
    "repmlp_nonlinear_local": ModelSpec(IMAGE, (block("repmlp", window=2, kernels=(3,), sharesets=4,
                                                      nonlinear=True, act="identity"),)),
    "affine_forms": ModelSpec(IMAGE, tuple(block("affine", form=f) for f in ("scale_shift", "scalar", "repbn", "bn"))),
    "pool_head": ModelSpec(IMAGE, (block("pool", form="max"), block("head", form="flatten", classes=3,
                                                                     bn_before=True, bn_after=True)), two_outputs=True),
    "image_to_tokens": ModelSpec(IMAGE, (block("pool", form="avg"), block("to_tokens"),
                                         block("linear", dout=8, bias=True, token_bn=True, act="gelu_tanh"))),
    "token_blocks": ModelSpec(TOKENS, (block("channel_bn"), block("layer_norm", affine=True), block("token_mix"),
                                       block("head_shuffle", heads=2),
                                       block("mlp", hidden=16, pre_norm=True, residual=True, act="gelu"),
                                       block("head", pool="cls", classes=3))),
}
# every idiom and every mask at least once (the fuzzer draws the other pairs)
for idiom, mask, bias in [("matmul", "additive", True), ("matmul_fused_qkv", "causal", False),
                          ("sdpa", "key_padding", True), ("mha", "bool", True), ("sdpa", "none", False)]:
    SPECS[f"attention_{idiom}_{mask}"] = ModelSpec(TOKENS, (
        block("attention", idiom=idiom, heads=2, mask=mask, bias=bias, pre_norm=True, residual=True),))


# LayerNorm over two features of a re-parameterized block: the merged conv is exact, but
# the model turns last-bit differences into 1.1e-5 of its output (found by the fuzzer).
ILL_CONDITIONED = ModelSpec((2, 2, 5, 6), (
    block("repvgg", cout=2, k=3, stride=1, depthwise=True, one_by_one=False, identity=True, act="relu"),
    block("to_tokens"), block("act", act="tanh"), block("layer_norm", affine=True)), seed=2005)


def test_ill_conditioned_model_is_settled_in_float64_not_failed():
    model, inputs = build_model(ILL_CONDITIONED)
    stats = FuzzStats()
    check_spec(ILL_CONDITIONED, stats)
    assert stats.settled_in_float64 >= 1  # the fp32 comparison alone would have failed
    assert fuzz.float64_error(model, inputs, lambda: [make_pass("bn_reparam")]) < 1e-12


@pytest.mark.parametrize("name", SPECS)
def test_exact_passes_match_eager(name):
    check_spec(SPECS[name], FuzzStats())  # not counted with the random models


def test_every_idiom_and_mask_is_covered():
    covered = {(b.idiom, b.mask) for spec in SPECS.values() for b in spec.blocks if b.kind == "attention"}
    assert {idiom for idiom, _ in covered} == set(ATTENTION_IDIOMS)
    assert {mask for _, mask in covered} == set(MASKS)


@pytest.mark.parametrize("name", ["repvgg", "repvgg_strided_dw", "acnet", "dbb_plain_pool", "residual", "pool_head",
                                  "conv_transpose", "repmlp"])
def test_bn_reparam_folds_every_batchnorm_the_generator_builds(name):
    model, inputs = build_model(SPECS[name])
    gm = optcc.capture(model, inputs)
    assert optcc.op_counts(gm)[BN] > 0
    gm, report = optcc.PassManager(["bn_reparam"], fail_fast=True).run(gm)
    assert report["bn_reparam"].status == "applied"
    assert optcc.op_counts(gm).get(BN, 0) == 0


def test_generated_models_are_deterministic_and_in_eval_mode():
    spec = SPECS["repvgg"]
    (m1, (x1,)), (m2, (x2,)) = build_model(spec), build_model(spec)
    assert not m1.training and torch.equal(x1, x2)
    with torch.no_grad():
        assert torch.equal(m1(x1), m2(x2))
    # the BatchNorm statistics are not the identity a fresh BatchNorm would be
    bn = next(m for m in m1.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("factor", [1.001, 1 + 3e-5])
def test_a_wrong_pass_is_caught(monkeypatch, factor):
    """The check itself works: a pass that claims to be exact but changes a weight fails it,
    also when the change is just beyond the fp32 tolerance (the float64 re-check sees it)."""
    from optcc.ir import add_constant, get_constant

    class ScaleFirstConv(optcc.Pass):
        name = "scale_first_conv_for_test"
        exact = True

        def run(self, gm):
            conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default)
            new = add_constant(gm, "scaled", get_constant(gm, conv.args[1]) * factor, before=conv)
            conv.replace_input_with(conv.args[1], new)
            return optcc.PassResult(gm, True, {"matches": 1})

    monkeypatch.setattr(fuzz.oracle, "registered_passes", lambda: {"scale_first_conv_for_test": ScaleFirstConv})
    monkeypatch.setattr(fuzz.oracle, "default_passes", lambda: [ScaleFirstConv()])
    model, inputs = build_model(SPECS["conv_bn_act"])
    problems, _ = fuzz.differential_check(model, inputs)
    assert len(problems) == 1 and "scale_first_conv_for_test: outputs differ from eager" in problems[0]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(fuzz.model_specs())
def test_every_block_knows_its_output_shape(spec):
    """The shape each vocabulary class predicts is the shape its module returns."""
    model, (x,) = build_model(spec)
    domain, shape = fuzz.vocabulary.input_domain(spec.input_shape), tuple(spec.input_shape[1:])
    with torch.no_grad():
        for b, layer in zip(spec.blocks, model.layers):
            kind = fuzz.vocabulary.vocabulary_block(domain, b.kind)
            assert isinstance(layer, fuzz.VocabularyBlock) and layer.kind == b.kind
            x = layer(x)
            shape, domain = kind.output_shape(b, shape), kind.output_domain or domain
            assert tuple(x.shape[1:]) == shape, (b, shape)
