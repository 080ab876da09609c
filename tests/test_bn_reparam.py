"""bn_reparam (BatchNorm folding): golden graphs, numerics, match counts, negative cases."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from helpers import assert_left_alone, count, randomize_bn, run_pipeline

import optcc
from optcc.dump import graph_text

BN_OP = "aten._native_batch_norm_legit_no_training"


class Seq(nn.Sequential):
    pass


# (case, model factory, input shape, expected matches, expected BN nodes left)
POSITIVE = [
    ("conv2d_bn", lambda: Seq(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), (2, 3, 9, 9), 1),
    ("conv2d_nobias_bn_noaffine",
     lambda: Seq(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False)), (2, 3, 9, 9), 1),
    ("conv1d_bn", lambda: Seq(nn.Conv1d(4, 6, 5, padding=2), nn.BatchNorm1d(6)), (2, 4, 17), 1),
    ("conv3d_bn", lambda: Seq(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (1, 2, 6, 6, 6), 1),
    ("conv_grouped_dilated_strided_bn",
     lambda: Seq(nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4), nn.BatchNorm2d(12)),
     (2, 8, 11, 11), 1),
    ("depthwise_conv_bn", lambda: Seq(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6)),
     (1, 6, 8, 8), 1),
    ("conv_transpose2d_grouped_bn",
     lambda: Seq(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)), (1, 4, 5, 5), 1),
    ("linear_bn", lambda: Seq(nn.Linear(10, 7), nn.BatchNorm1d(7)), (4, 10), 1),
    ("bn_conv_unpadded_grouped", lambda: Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)), (2, 4, 7, 7), 1),
    ("bn_linear", lambda: Seq(nn.BatchNorm1d(10), nn.Linear(10, 3, bias=False)), (4, 10), 1),
    ("conv_bn_relu_chain",
     lambda: Seq(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                 nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()), (1, 3, 8, 8), 2),
]


@pytest.mark.parametrize("case,factory,shape,matches", POSITIVE, ids=[c[0] for c in POSITIVE])
def test_folds(case, factory, shape, matches, golden):
    model = randomize_bn(factory()).eval()
    gm, report, error = run_pipeline(model, (torch.randn(shape),), ["bn_reparam"])
    assert report["bn_reparam"].matches == matches
    assert report["bn_reparam"].status == "applied"
    assert count(gm, BN_OP) == 0
    assert error <= 1e-5, f"relative error {error:.2e} vs eager"
    golden("bn_reparam", case, graph_text(gm))


@pytest.mark.parametrize("case,factory,shape,matches", POSITIVE[:3], ids=[c[0] for c in POSITIVE[:3]])
def test_folds_in_float64_exactly(case, factory, shape, matches):
    model = randomize_bn(factory()).eval().double()
    _, _, error = run_pipeline(model, (torch.randn(shape, dtype=torch.float64),), ["bn_reparam"])
    assert error <= 1e-12


class ConvUsedTwice(nn.Module):
    """The conv output feeds the BN *and* a residual: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class LinearOnTokens(nn.Module):
    """BatchNorm1d over dim 1 of [N, L, C]: normalizes tokens, not the linear's features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


NEGATIVE = [
    ("negative_conv_output_used_twice", ConvUsedTwice, (1, 4, 6, 6),
     "conv_bn: the input of BatchNorm has other users"),
    ("negative_bn_before_padded_conv", lambda: Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)), (1, 4, 6, 6),
     "bn_conv: the convolution pads its input with zeros, not with the BatchNorm shift"),
    ("negative_linear_on_tokens", LinearOnTokens, (2, 5, 6),
     "linear_bn: BatchNorm normalizes a dimension other than the linear's features"),
]


@pytest.mark.parametrize("case,factory,shape,reason", NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_leaves_illegal_folds_alone(case, factory, shape, reason, golden):
    model = randomize_bn(factory()).eval()
    inputs = (torch.randn(shape),)
    gm = assert_left_alone(model, inputs, "bn_reparam", reason)  # untouched, and says why
    assert count(gm, BN_OP) == 1
    golden("bn_reparam", case, graph_text(gm))


def test_training_mode_batchnorm_is_left_alone(golden):
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    inputs = (torch.randn(4, 3, 6, 6),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture warns that running-stat updates are dropped
        gm = optcc.capture(model, inputs)
    before = graph_text(gm)
    gm, report = optcc.PassManager(["bn_reparam"]).run(gm)
    assert report["bn_reparam"].matches == 0
    assert graph_text(gm) == before
    assert count(gm, "aten._native_batch_norm_legit_functional") == 1
    golden("bn_reparam", "negative_training_mode", graph_text(gm))


def test_compile_folds_and_matches_eager():
    model = randomize_bn(Seq(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())).eval()
    x = torch.randn(2, 3, 10, 10)
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager")
    assert count(compiled.graph_module, BN_OP) == 0
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
