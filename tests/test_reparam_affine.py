"""bn_reparam, per-channel affine rules (passes/_reparam_affine.py): constants folded into
conv/linear, SLAB's RepBN, BatchNorm on tokens; goldens, numerics, match counts, negatives,
and two real timm models against timm's own ``reparameterize_model``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from helpers import assert_left_alone, count, randomize_bn, run_pipeline

import optcc
from optcc.dump import graph_text

BN_OP = "aten._native_batch_norm_legit_no_training"
AFFINE_OPS = ("aten.mul.Tensor", "aten.add.Tensor", "aten.sub.Tensor", "aten.div.Tensor")


def n_affine(gm) -> int:
    return sum(count(gm, op) for op in AFFINE_OPS)


class ConvMulAdd(nn.Module):
    """conv -> * per-channel constant [C, 1, 1] -> + constant [1, C, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("scale", torch.rand(8, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(1, 8, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.scale + self.shift


class LinearMulScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 6)

    def forward(self, x):
        return self.fc(x) * 0.125


class MulAddLinear(nn.Module):
    """(x * s + t) -> linear, s and t per input feature."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.rand(10) + 0.5)
        self.register_buffer("shift", torch.randn(1, 1, 10))
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        return self.fc(x * self.scale + self.shift)


class RepBN(nn.Module):
    """SLAB's RepBN: BatchNorm1d over the channels of [B, N, C] tokens plus alpha * x."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([0.7]))
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x):
        x = x.transpose(1, 2)
        x = self.bn(x) + self.alpha * x
        return x.transpose(1, 2)


class RepBNBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = RepBN(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class RepBNInput(nn.Module):
    """RepBN written the other way round (alpha * x outside the transposes), on the input,
    so it can only fold into the linear that consumes it."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([0.3]))
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.bn(x.transpose(1, 2)).transpose(1, 2) + self.alpha * x)


class LinearNorm(nn.Module):
    """LeViT's LinearNorm: Linear, then BatchNorm1d on the flattened [B * N, C] tokens."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 12, bias=False)
        self.bn = nn.BatchNorm1d(12)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenBNLinear(nn.Module):
    """transpose -> BatchNorm1d -> transpose on [B, N, C] tokens, then a linear."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(self.bn(x.transpose(1, 2)).transpose(1, 2))


# (case, factory, input shape, {rule: matches}, BN nodes before)
POSITIVE = [
    ("affine_conv_mul_add", ConvMulAdd, (2, 3, 7, 7), {"affine_into_producer": 2}, 0),
    ("affine_linear_mul_scalar", LinearMulScalar, (3, 10), {"affine_into_producer": 1}, 0),
    ("affine_mul_add_linear", MulAddLinear, (2, 5, 10), {"affine_into_consumer": 2}, 0),
    ("affine_repbn_block", RepBNBlock, (2, 7, 8), {"rep_bn": 1, "affine_into_producer": 2}, 1),
    ("affine_repbn_input", RepBNInput, (2, 7, 8), {"rep_bn": 1, "affine_into_consumer": 2}, 1),
    ("affine_levit_linear_norm", LinearNorm, (2, 5, 8), {"token_bn": 1}, 1),
    ("affine_token_bn_linear", TokenBNLinear, (2, 5, 8), {"token_bn": 1}, 1),
]


@pytest.mark.parametrize("case,factory,shape,rules,bns", POSITIVE, ids=[c[0] for c in POSITIVE])
def test_folds(case, factory, shape, rules, bns, golden):
    model = randomize_bn(factory()).eval()
    inputs = (torch.randn(shape),)
    captured = optcc.capture(model, inputs)
    assert count(captured, BN_OP) == bns
    gm, report, error = run_pipeline(model, inputs, ["bn_reparam"])
    record = report["bn_reparam"]
    assert record.status == "applied"
    assert record.stats["rules"] == rules
    assert count(gm, BN_OP) == 0
    assert n_affine(gm) == 0, graph_text(gm)
    assert count(gm, "aten.permute") == 0
    assert error <= 1e-5, f"relative error {error:.2e} vs eager"
    golden("bn_reparam", case, graph_text(gm))


class MulByInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, gate):
        return self.conv(x) * gate


class MulAlongSpatial(nn.Module):
    """The constant varies along H, not along the channels: not a per-channel affine."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("scale", torch.rand(1, 1, 4, 1) + 0.5)

    def forward(self, x):
        return self.conv(x) * self.scale


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("scale", torch.rand(4, 1, 1) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        return y * self.scale + y


class ShiftBeforePaddedConv(nn.Module):
    """x * s + t before a zero-padded conv: the border would see 0 instead of t."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.rand(3, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x * self.scale + self.shift)


NEGATIVE = [
    ("affine_negative_mul_by_input", MulByInput, [(1, 3, 6, 6), (1, 4, 4, 4)],
     "affine_into_producer: the other operand is not a constant"),
    ("affine_negative_spatial_constant", MulAlongSpatial, [(1, 3, 6, 6)],
     "affine_into_producer: the constant varies along a non-channel dimension"),
    ("affine_negative_conv_used_twice", ConvUsedTwice, [(1, 3, 6, 6)],
     "affine_into_producer: the convolution output has other users"),
    ("affine_negative_shift_before_padded_conv", ShiftBeforePaddedConv, [(1, 3, 6, 6)],
     "affine_into_consumer: the convolution pads its input with zeros, not with the shift"),
]


@pytest.mark.parametrize("case,factory,shapes,reason", NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_leaves_illegal_folds_alone(case, factory, shapes, reason, golden):
    model = factory().eval()
    inputs = tuple(torch.randn(s) for s in shapes)
    gm = assert_left_alone(model, inputs, "bn_reparam", reason)
    golden("bn_reparam", case, graph_text(gm))


def test_scale_before_padded_conv_folds():
    """A pure scale is legal before a padded conv (0 * s = 0 at the border)."""

    class ScaleConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.rand(1, 3, 1, 1) + 0.5)
            self.conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)

        def forward(self, x):
            return self.conv(x * self.scale)

    gm, report, error = run_pipeline(ScaleConv().eval(), (torch.randn(2, 3, 6, 6),), ["bn_reparam"])
    assert report["bn_reparam"].stats["rules"] == {"affine_into_consumer": 1}
    assert n_affine(gm) == 0 and error <= 1e-5


class RepBNOverWidth(nn.Module):
    """RepBN whose BatchNorm reads a permute of ``x`` while ``x`` is itself a permute of the
    conv output: BN's channel is followed through both chains, nearest the BN first. It
    normalizes the width, which has the channels' size, so the wrong order folded s and t
    along the channels and gave a wrong output without an error."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(5)
        self.alpha = nn.Parameter(torch.tensor([0.7]))

    def forward(self, x):
        x0 = self.conv(x)
        x = x0.permute(0, 2, 3, 1)                                   # [B, H, W, C]
        y = self.bn(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)       # BN over W
        return (y + self.alpha * x).permute(0, 3, 1, 2)


def test_rep_bn_follows_the_channel_through_both_view_chains():
    model = randomize_bn(RepBNOverWidth()).eval()
    inputs = (torch.randn(2, 3, 4, 5),)
    gm = optcc.capture(model, inputs)
    gm, report = optcc.PassManager(["bn_reparam"], verify=False, example_inputs=inputs).run(gm)
    assert report["bn_reparam"].stats["rules"].get("rep_bn") == 1
    assert count(gm, BN_OP) == 0
    with torch.no_grad():
        assert torch.allclose(gm(*inputs)[0], model(*inputs), atol=1e-5)


# ----------------------------------------------------------------------------------------
# Real models: timm LeViT / EfficientViT (MSRA), random weights and BN statistics.

# (model, smallest input it accepts that still has more than one token in stage 1)
TIMM_MODELS = [("levit_128s", 224), ("efficientvit_m0", 32)]


def _counts(gm) -> dict:
    ops = optcc.op_counts(gm)
    return {k: ops.get(k, 0) for k in (BN_OP, "aten.convolution", "aten.linear")}


@pytest.mark.parametrize("name,size", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_timm_model_matches_reparameterize_model(name, size):
    timm = pytest.importorskip("timm")
    from timm.utils import reparameterize_model

    model = randomize_bn(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager")
        with torch.no_grad():
            got, expected = compiled(x), model(x)
        fused = reparameterize_model(model)
        reference = _counts(optcc.capture(fused, (x,)))
    record = compiled.report["bn_reparam"]
    before, after = record.ops_before, _counts(compiled.graph_module)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale
    assert before[BN_OP] > 0 and after[BN_OP] == 0
    # the same conv/linear count as timm's hand-written fuse(), and no BN left in either
    assert after == reference, (name, dict(before), after, reference)
