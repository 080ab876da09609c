"""bn_reparam's conv -> FC rule (passes/_reparam_conv_fc.py) and BatchNorm on a reshaped FC
output (token_bn's channel-block case): RepMLP blocks written as the paper's reference
code writes them, a linear-FC variant, and the cases that must be left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import assert_left_alone, count, randomize_bn, run_pipeline

from optcc.dump import graph_text
from optcc.testing.blocks import RepMLPBlock

CONV_OP = "aten.convolution"
BN_OP = "aten._native_batch_norm_legit_no_training"


class LinearPlusConv(nn.Module):
    """An FC over a flattened [C, h, w] map plus a conv of the same map, viewed alike."""

    def __init__(self, c=3, o=2, h=4, w=5, k=3, act=False, share_fc=False, fc_groups=1):
        super().__init__()
        self.shape = (c, h, w)
        self.o = o
        if fc_groups == 1:
            self.fc = nn.Linear(c * h * w, o * h * w)
        else:
            self.fc = nn.Conv2d(c * h * w, o * h * w, 1, groups=fc_groups)
        self.conv = nn.Conv2d(c, o, k, padding=k // 2)
        self.act, self.share_fc, self.fc_groups = act, share_fc, fc_groups

    def forward(self, x):
        n = x.shape[0]
        flat = x.reshape(n, -1) if self.fc_groups == 1 else x.reshape(n, -1, 1, 1)
        y = self.fc(flat)
        conv = self.conv(x)
        if self.act:
            conv = torch.relu(conv)
        out = y.reshape(n, self.o, *self.shape[1:]) + conv
        return (out, y) if self.share_fc else out


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "out_of_place"])
def test_repmlp_block_becomes_one_fc(inplace, golden):
    model = randomize_bn(RepMLPBlock(8, 4, 4, num_sharesets=2, inplace=inplace)).eval()
    x = torch.randn(2, 8, 8, 8)
    gm, report, error = run_pipeline(model, (x,), ["bn_reparam"])
    assert error <= 1e-5
    stats = report["bn_reparam"].stats
    assert stats["rules"]["conv_fc"] == 1 and stats["rules"]["token_bn"] == 1
    # left: the global perceptron's two 1x1 convs and the merged fc3; no BN, no branch conv
    assert count(gm, CONV_OP) == 3 and count(gm, BN_OP) == 0
    if inplace:
        golden("bn_reparam", "conv_fc_repmlp", graph_text(gm))


@pytest.mark.parametrize("channels,h,w,sharesets,kernels", [
    (4, 4, 4, 1, (1, 3)),
    (8, 4, 4, 4, (1, 3, 5)),
    (6, 3, 5, 3, (3,)),
    (4, 7, 7, 2, (1, 3, 5, 7)),
])
def test_repmlp_configurations_match_eager(channels, h, w, sharesets, kernels):
    model = randomize_bn(RepMLPBlock(channels, h, w, sharesets, kernels)).eval()
    x = torch.randn(3, channels, 2 * h, 2 * w) * 3
    gm, report, error = run_pipeline(model, (x,), ["bn_reparam"])
    assert error <= 1e-5
    assert report["bn_reparam"].stats["rules"]["conv_fc"] == 1
    assert count(gm, CONV_OP) == 3 and count(gm, BN_OP) == 0


@pytest.mark.parametrize("fc_groups", [1, 2])
def test_conv_added_to_fc_folds_into_it(fc_groups):
    # groups 2 with a dense conv would mix groups, so use one output/input channel per group
    model = (LinearPlusConv() if fc_groups == 1 else LinearPlusConv(c=2, o=2, fc_groups=2)).eval()
    if fc_groups == 2:
        model.conv = nn.Conv2d(2, 2, 3, padding=1, groups=2)
    x = torch.randn(3, *model.shape)
    gm, report, error = run_pipeline(model, (x,), ["bn_reparam"])
    assert error <= 1e-5
    assert report["bn_reparam"].stats["rules"] == {"conv_fc": 1}
    assert count(gm, CONV_OP) == (0 if fc_groups == 1 else 1)


class PermutedConv(LinearPlusConv):
    """The conv reads the map transposed: the same values in another order."""

    def forward(self, x):
        n = x.shape[0]
        y = self.fc(x.reshape(n, -1))
        return y.reshape(n, self.o, self.shape[2], self.shape[1]) + self.conv(x.transpose(2, 3))


@pytest.mark.parametrize("case,factory,reason", [
    ("nonlinear_conv_branch", lambda: LinearPlusConv(act=True),
     "the convolution branch applies aten.relu before the add"),
    ("features_in_another_order", lambda: PermutedConv(h=4, w=5),
     "the convolution reads the FC's features in another order (a permute)"),
    ("fc_output_shared", lambda: LinearPlusConv(share_fc=True), "the FC output is used elsewhere"),
    ("conv_mixes_fc_groups", lambda: LinearPlusConv(c=2, o=2, fc_groups=2),
     "the convolution mixes features of different FC groups"),
])
def test_illegal_conv_fc_merges_are_left_alone(case, factory, reason):
    model = factory().eval()
    assert_left_alone(model, (torch.randn(2, *model.shape),), "bn_reparam", f"conv_fc: {reason}")
