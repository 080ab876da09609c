"""bn_reparam's multi-branch rules (passes/_reparam_branches.py): RepVGG, ACNet, MobileOne,
avg-pool branches, 1x1 -> kxk; negative cases; real timm models; a property test."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from helpers import assert_left_alone, count, randomize_bn, run_pipeline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import optcc
from optcc.dump import graph_text
from optcc.pass_manager import output_error

BN_OP = "aten._native_batch_norm_legit_no_training"
CONV_OP = "aten.convolution"
aten = torch.ops.aten


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1, dilation=1, bn=True, bias=False):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, dilation=dilation, bias=bias)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if bn else conv


class Branches(nn.Module):
    """``act(sum(branch(x)))``; ``None`` in ``branches`` stands for the identity ``x``."""

    def __init__(self, branches, act=True):
        super().__init__()
        self.branches = nn.ModuleList([nn.Identity() if b is None else b for b in branches])
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return self.act(out)


def repvgg_block():
    return Branches([conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1), nn.BatchNorm2d(4)])


def acnet_block():
    return Branches([conv_bn(4, 6, 3, padding=1), conv_bn(4, 6, (3, 1), padding=(1, 0)),
                     conv_bn(4, 6, (1, 3), padding=(0, 1))])


def mobileone_dw_block():
    # k=3 over-parameterized depthwise 3x3 branches + the 1x1 "scale" branch + identity BN
    return Branches([conv_bn(4, 4, 3, padding=1, groups=4) for _ in range(3)]
                    + [conv_bn(4, 4, 1, groups=4), nn.BatchNorm2d(4)])


def mobileone_pw_block():
    return Branches([conv_bn(4, 4, 1) for _ in range(3)] + [nn.BatchNorm2d(4)])


def avgpool_block():
    # DBB's average branch (avg-pool + BN), expressed at the grouped conv's groups
    return Branches([conv_bn(4, 4, 3, padding=1, groups=2), conv_bn(4, 4, 1, groups=2),
                     nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4))])


def strided_block():
    # RepVGG's downsampling block: 3x3/s2 + 1x1/s2, no identity
    return Branches([conv_bn(4, 8, 3, stride=2, padding=1), conv_bn(4, 8, 1, stride=2)])


def seq_1x1_3x3():
    return nn.Sequential(conv_bn(4, 6, 1, bias=True), conv_bn(6, 5, 3), nn.ReLU())


def seq_1x1_3x3_padded_nobias():
    return nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU())


def seq_1x1_3x3_grouped_strided():
    return nn.Sequential(nn.Conv2d(4, 6, 1, groups=2), nn.Conv2d(6, 4, 3, stride=2, groups=2))


class DbbBlock(nn.Module):
    """DBB-style kxk + (1x1 -> kxk) + avg-pool, unpadded so that the 1x1 -> kxk branch is legal."""

    def __init__(self):
        super().__init__()
        self.kxk = conv_bn(4, 4, 3)
        self.seq = nn.Sequential(conv_bn(4, 4, 1, bias=True), conv_bn(4, 4, 3))
        self.avg = nn.Sequential(nn.AvgPool2d(3, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.kxk(x) + self.seq(x) + self.avg(x)


# (case, model factory, input shape, expected matches per rule)
POSITIVE = [
    ("branches_repvgg", repvgg_block, (2, 4, 7, 7), {"conv_bn": 2, "merge_branches": 2}),
    ("branches_repvgg_strided", strided_block, (1, 4, 8, 8), {"conv_bn": 2, "merge_branches": 1}),
    ("branches_acnet", acnet_block, (1, 4, 6, 7), {"conv_bn": 3, "merge_branches": 2}),
    ("branches_mobileone_dw", mobileone_dw_block, (1, 4, 6, 6), {"conv_bn": 4, "merge_branches": 4}),
    ("branches_mobileone_pw", mobileone_pw_block, (1, 4, 5, 5), {"conv_bn": 3, "merge_branches": 3}),
    ("branches_avgpool", avgpool_block, (1, 4, 6, 6), {"conv_bn": 2, "merge_branches": 2}),
    ("branches_dbb", DbbBlock, (1, 4, 7, 7), {"conv_bn": 3, "conv1x1_kxk": 1, "merge_branches": 2}),
    ("branches_1x1_3x3", seq_1x1_3x3, (1, 4, 7, 7), {"conv_bn": 2, "conv1x1_kxk": 1}),
    ("branches_1x1_3x3_padded_nobias", seq_1x1_3x3_padded_nobias, (1, 4, 6, 6), {"conv1x1_kxk": 1}),
    ("branches_1x1_3x3_grouped_strided", seq_1x1_3x3_grouped_strided, (1, 4, 7, 7), {"conv1x1_kxk": 1}),
]


@pytest.mark.parametrize("case,factory,shape,rules", POSITIVE, ids=[c[0] for c in POSITIVE])
def test_merges_block(case, factory, shape, rules, golden):
    model = randomize_bn(factory()).eval()
    gm, report, error = run_pipeline(model, (torch.randn(shape),), ["bn_reparam"])
    record = report["bn_reparam"]
    assert record.status == "applied"
    assert record.stats["rules"] == rules
    assert record.matches == sum(rules.values())
    assert record.stats["missed"] == {}
    assert count(gm, CONV_OP) == 1
    assert count(gm, BN_OP) == 0 and count(gm, "aten.add.Tensor") == 0
    assert error <= 1e-5, f"relative error {error:.2e} vs eager"
    golden("bn_reparam", case, graph_text(gm))


def test_repvgg_block_float64_exactly():
    model = randomize_bn(repvgg_block()).eval().double()
    _, _, error = run_pipeline(model, (torch.randn(1, 4, 6, 6, dtype=torch.float64),), ["bn_reparam"])
    assert error <= 1e-12


# ----------------------------------------------------------------------------------------
# Negative cases: the pattern is there, the rewrite is not legal


class NonlinearBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.a(x) + torch.relu(self.b(x))


class BranchUsedElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.b(x)
        return self.a(x) + y, y


class MismatchedStrides(nn.Module):
    """3x3/s1 unpadded and 1x1/s2 give the same 3x3 output from a 5x5 input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


class IdentityChangesChannels(nn.Module):
    """``conv(x) + x`` with a 1-channel x broadcast over the conv's 4 output channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) + x


NEGATIVE = [
    ("branches_negative_nonlinear_branch", NonlinearBranch, (1, 4, 6, 6),
     "merge_branches: a branch applies aten.relu before the add"),
    ("branches_negative_output_used_elsewhere", BranchUsedElsewhere, (1, 4, 6, 6),
     "merge_branches: a branch output is used elsewhere"),
    ("branches_negative_mismatched_strides", MismatchedStrides, (1, 4, 5, 5),
     "merge_branches: the branches have different strides"),
    ("branches_negative_identity_channel_change", IdentityChangesChannels, (1, 1, 6, 6),
     "merge_branches: the identity branch changes the channel count (Cin != Cout)"),
    ("branches_negative_1x1_3x3_padded_bias",
     lambda: nn.Sequential(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 3, padding=1)), (1, 4, 6, 6),
     "conv1x1_kxk: the kxk convolution pads with zeros where the fused form would see the 1x1's bias"),
    ("branches_negative_1x1_bottleneck",  # legal but slower: 16*16*9 multiplies instead of 16*4 + 4*16*9
     lambda: nn.Sequential(nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 3)), (1, 16, 6, 6),
     "conv1x1_kxk: fusing would cost more multiplies than the two convolutions (a bottleneck)"),
]


@pytest.mark.parametrize("case,factory,shape,reason", NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_leaves_illegal_merges_alone(case, factory, shape, reason, golden):
    model = factory().eval()
    inputs = (torch.randn(shape),)
    gm = assert_left_alone(model, inputs, "bn_reparam", reason)
    golden("bn_reparam", case, graph_text(gm))


def test_training_mode_branch_is_left_alone(golden):
    model = randomize_bn(repvgg_block()).train()
    inputs = (torch.randn(4, 4, 6, 6),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture warns that running-stat updates are dropped
        gm = optcc.capture(model, inputs)
    before = graph_text(gm)
    gm, report = optcc.PassManager(["bn_reparam"], fail_fast=True).run(gm)
    record = report["bn_reparam"]
    assert record.matches == 0
    assert record.stats["missed"] == {
        "merge_branches: a branch is a training-mode BatchNorm (batch statistics)": 1}
    assert graph_text(gm) == before
    assert count(gm, CONV_OP) == 2
    golden("bn_reparam", "branches_negative_training_mode", graph_text(gm))


def test_residual_add_is_not_a_near_miss():
    """A ResNet-style ``x + conv(relu(conv(x)))`` is not reported as a missed merge."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    model = Residual().eval()
    gm, report, error = run_pipeline(model, (torch.randn(1, 4, 5, 5),), ["bn_reparam"])
    assert report["bn_reparam"].stats["missed"] == {}
    assert count(gm, CONV_OP) == 2


# ----------------------------------------------------------------------------------------
# Real models (random weights): the same number of convolutions as timm's own reparam


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timm_models_match_reparameterize_model(name):
    timm = pytest.importorskip("timm")
    from timm.utils import reparameterize_model

    model = randomize_bn(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager")
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    assert output_error((expected,), (got,)) <= 1e-5
    reference = reparameterize_model(model)  # works on a deep copy; `model` keeps its branches
    assert reference is not model
    ref_gm = optcc.capture(reference, (x,))
    gm = compiled.graph_module
    assert count(gm, BN_OP) == 0 and count(gm, "aten._native_batch_norm_legit_functional") == 0
    assert count(gm, CONV_OP) == count(ref_gm, CONV_OP)
    assert count(gm, "aten.add.Tensor") == count(ref_gm, "aten.add.Tensor")
    assert compiled.report["bn_reparam"].stats["missed"] == {}


# ----------------------------------------------------------------------------------------
# Property test: random legal multi-branch blocks merge into one exact convolution

KERNELS = [(1, 1), (3, 3), (5, 5), (3, 1), (1, 3), (5, 1), (1, 5)]


@st.composite
def blocks(draw):
    cin = draw(st.sampled_from([2, 4]))
    stride = draw(st.sampled_from([1, 2]))
    identity = stride == 1 and draw(st.booleans())
    cout = cin if identity else draw(st.sampled_from([2, 4]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if cin % g == 0 and cout % g == 0]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    kernels = draw(st.lists(st.sampled_from(KERNELS), min_size=1, max_size=3))
    avg = cin == cout and dilation == 1 and draw(st.booleans())
    if not identity and not avg and len(kernels) == 1:
        kernels.append(draw(st.sampled_from(KERNELS)))
    big = [max(k[i] for k in kernels + ([(3, 3)] if avg else [])) for i in (0, 1)]
    extra = (0, 0) if identity or avg else (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    pad = [(big[i] - 1) // 2 * dilation + extra[i] for i in (0, 1)]
    branches = []
    for k in kernels:
        p = tuple(pad[i] - (big[i] - k[i]) // 2 * dilation for i in (0, 1))
        branches.append(conv_bn(cin, cout, k, stride=stride, padding=p, groups=groups, dilation=dilation,
                                bn=draw(st.booleans()), bias=draw(st.booleans())))
    if avg:
        p = tuple(pad[i] - (big[i] - 3) // 2 for i in (0, 1))
        pool = nn.AvgPool2d(3, stride, p)
        branches.append(nn.Sequential(pool, nn.BatchNorm2d(cout)) if draw(st.booleans()) else pool)
    if identity:
        branches.append(nn.BatchNorm2d(cin) if draw(st.booleans()) else None)
    order = draw(st.permutations(range(len(branches))))
    size = draw(st.integers(max(big) * dilation, max(big) * dilation + 3))
    return Branches([branches[i] for i in order], act=draw(st.booleans())), (1, cin, size, size)


def canonical_graph(model: Branches, shape) -> fx.GraphModule:
    """The canonical IR of a ``Branches`` block, built directly (what ``optcc.capture`` gives,
    without torch.export's ~0.5 s per model, so that 200 examples stay fast)."""
    root, graph = nn.Module(), fx.Graph()
    x = graph.placeholder("x")

    def const(name, tensor):
        setattr(root, name, tensor.detach().clone())
        return graph.get_attr(name)

    def emit(mod, inp, prefix):
        if isinstance(mod, nn.Identity):
            return inp
        if isinstance(mod, nn.Sequential):
            for i, sub in enumerate(mod):
                inp = emit(sub, inp, f"{prefix}_{i}")
            return inp
        if isinstance(mod, nn.Conv2d):
            bias = const(f"{prefix}_bias", mod.bias) if mod.bias is not None else None
            return graph.call_function(aten.convolution.default, (
                inp, const(f"{prefix}_weight", mod.weight), bias, list(mod.stride), list(mod.padding),
                list(mod.dilation), False, [0, 0], mod.groups))
        if isinstance(mod, nn.BatchNorm2d):
            bn = graph.call_function(aten._native_batch_norm_legit_no_training.default, (
                inp, const(f"{prefix}_weight", mod.weight), const(f"{prefix}_bias", mod.bias),
                const(f"{prefix}_mean", mod.running_mean), const(f"{prefix}_var", mod.running_var),
                mod.momentum, mod.eps))
            return graph.call_function(operator.getitem, (bn, 0))
        if isinstance(mod, nn.AvgPool2d):
            return graph.call_function(aten.avg_pool2d.default, (
                inp, [mod.kernel_size] * 2, [mod.stride] * 2, [mod.padding[0], mod.padding[1]]))
        if isinstance(mod, nn.ReLU):
            return graph.call_function(aten.relu.default, (inp,))
        raise NotImplementedError(type(mod))

    out = emit(model.branches[0], x, "b0")
    for i, branch in enumerate(model.branches[1:], 1):
        out = graph.call_function(aten.add.Tensor, (out, emit(branch, x, f"b{i}")))
    graph.output((emit(model.act, out, "act"),))
    gm = fx.GraphModule(root, graph)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(torch.empty(shape))
    return gm


def check_random_block(model, shape, gm):
    x = torch.randn(shape)
    # no verify=True (it doubles the cost): the eager comparison below is the check
    gm, report = optcc.PassManager(["bn_reparam"], fail_fast=True).run(gm)
    record = report["bn_reparam"]
    with torch.no_grad():
        error = output_error((model(x),), gm(x))
    assert record.status == "applied" and record.stats["missed"] == {}
    assert error <= 1e-5, f"relative error {error:.2e} vs eager"
    assert count(gm, CONV_OP) == 1 and count(gm, BN_OP) == 0


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(blocks())
def test_random_blocks_merge_exactly(block):
    model, shape = block
    model = randomize_bn(model).eval()
    check_random_block(model, shape, canonical_graph(model, shape))


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(blocks())
def test_random_blocks_merge_exactly_after_capture(block):
    model, shape = block
    model = randomize_bn(model).eval()
    check_random_block(model, shape, optcc.capture(model, (torch.randn(shape),)))


class RepMixer(nn.Module):
    """FastViT's token mixer: ``x + layer_scale * (mixer(x) - norm(x))`` with both re-parameterizable."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.mixer_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.mixer_conv_bn = nn.BatchNorm2d(dim)
        self.mixer_identity = nn.BatchNorm2d(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def forward(self, x):
        mixed = self.mixer_conv_bn(self.mixer_conv(x)) + self.mixer_identity(x)
        return x + self.layer_scale * (mixed - self.norm(x))


def test_repmixer_subtraction_and_layer_scale_merge_into_one_conv(golden):
    model = randomize_bn(RepMixer()).eval()
    gm, report, error = run_pipeline(model, (torch.randn(2, 6, 7, 7),), ["bn_reparam"])
    ops = optcc.op_counts(gm)
    assert ops == {CONV_OP: 1}, ops  # no BatchNorm, sub, mul or add left
    assert report["bn_reparam"].stats["rules"]["merge_branches"] == 3
    assert error <= 1e-5
    golden("bn_reparam", "branches_repmixer", graph_text(gm))
