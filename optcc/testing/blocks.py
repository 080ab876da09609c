"""Training-time blocks of published architectures that timm does not ship, written as
their authors' reference code writes them, for tests and examples of what ``bn_reparam``
finds in a graph without help from the model's classes."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
