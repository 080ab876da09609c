"""bn_reparam's conv -> FC rule (passes/_reparam_conv_fc.py) and BatchNorm on a reshaped FC
output (token_bn's channel-block case): RepMLP blocks written as the paper's reference
code writes them, a linear-FC variant, and the cases that must be left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_left_alone, count, randomize_bn, run_pipeline

from optcc.dump import graph_text

CONV_OP = "aten.convolution"
BN_OP = "aten._native_batch_norm_legit_no_training"


def conv_bn(cin, cout, k, groups):
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class GlobalPerceptron(nn.Module):
    def __init__(self, c, internal):
        super().__init__()
        self.fc1 = nn.Conv2d(c, internal, 1)
        self.fc2 = nn.Conv2d(internal, c, 1)
        self.c = c

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, output_size=(1, 1))
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x)))).view(-1, self.c, 1, 1)


class RepMLPBlock(nn.Module):
    """RepMLPNet's block (Ding et al., 2022) in training form, as its reference code has it:
    partition into h x w windows, a grouped FC over each window ("channel perceptron",
    ``fc3`` + BN per share set), parallel conv+BN branches over the same windows ("local
    perceptron") added to it in place, times an SE-like global vector."""

    def __init__(self, channels, h, w, num_sharesets=1, reparam_conv_k=(1, 3), inplace=True):
        super().__init__()
        self.C, self.S, self.h, self.w, self.inplace = channels, num_sharesets, h, w, inplace
        self.gp = GlobalPerceptron(channels, max(channels // 4, 1))
        self.fc3 = nn.Conv2d(h * w * num_sharesets, h * w * num_sharesets, 1, 1, 0, bias=False,
                             groups=num_sharesets)
        self.fc3_bn = nn.BatchNorm2d(num_sharesets)
        self.reparam_conv_k = reparam_conv_k
        for k in reparam_conv_k:
            setattr(self, f"repconv{k}", conv_bn(num_sharesets, num_sharesets, k, num_sharesets))

    def partition(self, x, h_parts, w_parts):
        x = x.reshape(-1, self.C, h_parts, self.h, w_parts, self.w)
        return x.permute(0, 2, 4, 1, 3, 5)

    def partition_affine(self, x, h_parts, w_parts):
        fc_inputs = x.reshape(-1, self.S * self.h * self.w, 1, 1)
        out = self.fc3(fc_inputs)
        out = out.reshape(-1, self.S, self.h, self.w)
        out = self.fc3_bn(out)
        return out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)

    def forward(self, inputs):
        global_vec = self.gp(inputs)
        origin_shape = inputs.size()
        h_parts, w_parts = origin_shape[2] // self.h, origin_shape[3] // self.w
        partitions = self.partition(inputs, h_parts, w_parts)
        fc3_out = self.partition_affine(partitions, h_parts, w_parts)
        conv_inputs = partitions.reshape(-1, self.S, self.h, self.w)
        conv_out = 0
        for k in self.reparam_conv_k:
            conv_out += getattr(self, f"repconv{k}")(conv_inputs)
        conv_out = conv_out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)
        if self.inplace:
            fc3_out += conv_out
        else:
            fc3_out = fc3_out + conv_out
        fc3_out = fc3_out.permute(0, 3, 1, 4, 2, 5)
        return fc3_out.reshape(*origin_shape) * global_vec


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
