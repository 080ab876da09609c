"""Differential fuzzing: random small models from the op vocabulary the passes rewrite.

:func:`model_specs` is a hypothesis strategy for :class:`ModelSpec`, a plain description
of a model (an input shape and a list of blocks) that hypothesis can shrink and print;
:func:`build_model` turns one into an eval-mode ``nn.Module`` with random weights,
random BatchNorm statistics and a random input. :func:`differential_check` captures the
model once and runs every registered exact pass alone, and the default exact pipeline,
each on its own copy of the graph with ``verify=False`` (so that a wrong pass is not
hidden by rollback), and returns every disagreement with eager PyTorch.

The vocabulary: conv (1x1/kxk, strided, dilated, grouped, depthwise, padded or not,
transposed) with or without BatchNorm and activation; standalone BatchNorm; residual
blocks; multi-branch blocks (RepVGG kxk+1x1+identity, ACNet kxk+1xk+kx1, DBB 1x1->avg-pool
branch, concatenated branches); constant scale/shift and SLAB RepBN; pooling; linear
heads; token streams with linear (+ token BatchNorm), layer_norm, MLPs, token mixing,
reshapes/transposes, and attention in several idioms (``q @ k.transpose * scale ->
softmax -> @ v``, ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) with and
without masks.

A failure is printed as a ``ModelSpec(...)`` that can be pasted into a regression test.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optcc
from optcc.compile import default_passes
from optcc.pass_base import registered_passes
from optcc.pass_manager import PassManager, output_error, snapshot

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu",
               "relu6", "identity")
ATTENTION_IDIOMS = ("matmul", "matmul_fused_qkv", "sdpa", "mha")
MASKS = ("none", "causal", "additive", "bool", "key_padding")


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "identity":
        return x
    if name == "leaky_relu":
        return F.leaky_relu(x, 0.1)
    return getattr(F, name)(x)


@dataclass(frozen=True)
class Block:
    kind: str
    options: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, key: str) -> Any:
        for name, value in object.__getattribute__(self, "options"):
            if name == key:
                return value
        raise AttributeError(key)

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.options)
        return f"block({self.kind!r}{args})"


def block(kind: str, **options: Any) -> Block:
    return Block(kind, tuple(options.items()))


@dataclass(frozen=True)
class ModelSpec:
    """A random model: input shape ([N, C, H, W] image or [N, L, D] tokens), blocks, seed."""

    input_shape: tuple[int, ...]
    blocks: tuple[Block, ...]
    seed: int = 0
    two_outputs: bool = False

    def __repr__(self) -> str:
        blocks = ", ".join(map(repr, self.blocks))
        return (f"ModelSpec(input_shape={self.input_shape}, blocks=({blocks},), seed={self.seed}, "
                f"two_outputs={self.two_outputs})")


# ----------------------------------------------------------------------------------------
# Image blocks (x: [N, C, H, W])


class ConvBlock(nn.Module):
    def __init__(self, b: Block, cin: int):
        super().__init__()
        groups = {"1": 1, "dw": cin, "2": 2}[b.groups]
        cout = cin if b.groups == "dw" else b.cout
        padding = (b.k // 2) * b.dilation if b.padded else 0
        self.conv = nn.Conv2d(cin, cout, b.k, b.stride, padding, b.dilation, groups=groups, bias=b.bias)
        self.bn = nn.BatchNorm2d(cout) if b.bn else nn.Identity()
        self.bn_first = b.bn_first
        self.pre_bn = nn.BatchNorm2d(cin) if b.bn_first else nn.Identity()
        self.act = b.act

    def forward(self, x):
        return activation(self.act, self.bn(self.conv(self.pre_bn(x))))


class ConvTransposeBlock(nn.Module):
    def __init__(self, b: Block, cin: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, b.cout, b.k, b.stride, groups=b.groups, bias=b.bias)
        self.bn = nn.BatchNorm2d(b.cout)
        self.act = b.act

    def forward(self, x):
        return activation(self.act, self.bn(self.conv(x)))


def conv_bn(cin: int, cout: int, kernel: tuple[int, int] | int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (kernel[0] // 2, kernel[1] // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Residual(nn.Module):
    def __init__(self, b: Block, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c, 3), nn.ReLU(), conv_bn(c, c, b.k))
        self.act = b.act

    def forward(self, x):
        return activation(self.act, x + self.body(x))


class RepVGG(nn.Module):
    """kxk+BN + 1x1+BN (+ identity BN) summed: a training-time RepVGG / MobileOne block."""

    def __init__(self, b: Block, cin: int):
        super().__init__()
        groups = cin if b.depthwise else 1
        cout = cin if b.depthwise else b.cout
        self.kxk = conv_bn(cin, cout, b.k, b.stride, groups)
        self.one = conv_bn(cin, cout, 1, b.stride, groups) if b.one_by_one else None
        self.identity = nn.BatchNorm2d(cout) if b.identity and cin == cout and b.stride == 1 else None
        self.act = b.act

    def forward(self, x):
        y = self.kxk(x)
        if self.one is not None:
            y = y + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return activation(self.act, y)


class ACNet(nn.Module):
    def __init__(self, b: Block, c: int):
        super().__init__()
        self.square, self.hor, self.ver = conv_bn(c, c, 3), conv_bn(c, c, (1, 3)), conv_bn(c, c, (3, 1))
        self.act = b.act

    def forward(self, x):
        return activation(self.act, self.square(x) + self.hor(x) + self.ver(x))


class DBBAvg(nn.Module):
    """Diverse Branch Block: kxk, 1x1, and 1x1 -> BN -> avg-pool -> BN branches."""

    def __init__(self, b: Block, c: int):
        super().__init__()
        self.kxk = conv_bn(c, c, 3)
        self.one = conv_bn(c, c, 1)
        self.pool_branch = nn.Sequential(conv_bn(c, c, 1), nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(c))
        self.plain_pool = b.plain_pool
        self.act = b.act

    def forward(self, x):
        pooled = F.avg_pool2d(x, 3, 1, 1) if self.plain_pool else self.pool_branch(x)
        return activation(self.act, self.kxk(x) + self.one(x) + pooled)


class RepMLP(nn.Module):
    """RepMLP's channel + local perceptrons: a grouped FC (+BN per share set) over each
    window x window patch, plus conv+BN branches over the same patches (optionally through
    a nonlinearity, which must keep them apart)."""

    def __init__(self, b: Block, c: int):
        super().__init__()
        self.win, self.sets, self.nonlinear, self.act = b.window, b.sharesets, b.nonlinear, b.act
        features = b.window * b.window * b.sharesets
        self.fc = nn.Conv2d(features, features, 1, groups=b.sharesets, bias=False)
        self.bn = nn.BatchNorm2d(b.sharesets)
        self.convs = nn.ModuleList(conv_bn(b.sharesets, b.sharesets, k, groups=b.sharesets) for k in b.kernels)

    def forward(self, x):
        n, c, h, w = x.shape
        win, sets = self.win, self.sets
        patches = x.reshape(n, c, h // win, win, w // win, win).permute(0, 2, 4, 1, 3, 5)
        fc = self.bn(self.fc(patches.reshape(-1, sets * win * win, 1, 1)).reshape(-1, sets, win, win))
        local = patches.reshape(-1, sets, win, win)
        local = sum(conv(local) for conv in self.convs)
        if self.nonlinear:
            local = F.relu(local)
        out = (fc + local).reshape(n, h // win, w // win, c, win, win).permute(0, 3, 1, 4, 2, 5)
        return activation(self.act, out.reshape(n, c, h, w))


class Branches(nn.Module):
    """Two parallel conv branches joined by concatenation (an Inception-style block)."""

    def __init__(self, b: Block, c: int):
        super().__init__()
        self.a, self.b = conv_bn(c, b.cout, 1), conv_bn(c, b.cout, 3)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)


class Affine(nn.Module):
    """Constant per-channel scale/shift, standalone BN, or SLAB's RepBN ``BN(x) + a * x``."""

    def __init__(self, b: Block, c: int):
        super().__init__()
        self.kind = b.form
        self.bn = nn.BatchNorm2d(c)
        self.scale = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, c, 1, 1))
        self.alpha = nn.Parameter(torch.rand(1) + 0.5)

    def forward(self, x):
        if self.kind == "scale_shift":
            return x * self.scale + self.shift
        if self.kind == "scalar":
            return x * 1.5 - 0.25
        if self.kind == "repbn":
            return self.bn(x) + self.alpha * x
        return self.bn(x)


class Pool(nn.Module):
    def __init__(self, b: Block, c: int):
        super().__init__()
        self.kind = b.form

    def forward(self, x):
        return F.max_pool2d(x, 2) if self.kind == "max" else F.avg_pool2d(x, 2)


class Act(nn.Module):
    def __init__(self, b: Block, _: int):
        super().__init__()
        self.act = b.act

    def forward(self, x):
        return activation(self.act, x)


class ImageHead(nn.Module):
    """Global pooling or flattening, then a linear classifier (optionally BN1d after it)."""

    def __init__(self, b: Block, c: int, h: int, w: int):
        super().__init__()
        self.flatten = b.form == "flatten"
        features = c * h * w if self.flatten else c
        self.bn_before = nn.BatchNorm1d(features) if b.bn_before else None
        self.linear = nn.Linear(features, b.classes)
        self.bn_after = nn.BatchNorm1d(b.classes) if b.bn_after else None

    def forward(self, x):
        x = torch.flatten(x, 1) if self.flatten else x.mean((2, 3))
        if self.bn_before is not None:
            x = self.bn_before(x)
        x = self.linear(x)
        return self.bn_after(x) if self.bn_after is not None else x


class ToTokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------
# Token blocks (x: [N, L, D])


class TokenLinear(nn.Module):
    def __init__(self, b: Block, d: int):
        super().__init__()
        self.linear = nn.Linear(d, b.dout, bias=b.bias)
        # LeViT's token BatchNorm: BN1d over the flattened tokens, folded into the linear
        self.bn = nn.BatchNorm1d(b.dout) if b.token_bn else None
        self.act = b.act

    def forward(self, x):
        y = self.linear(x)
        if self.bn is not None:
            y = self.bn(y.flatten(0, 1)).reshape_as(y)
        return activation(self.act, y)


class ChannelBN(nn.Module):
    """BN1d over the feature dimension of tokens, through a transpose ([N, D, L])."""

    def __init__(self, b: Block, d: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class LayerNorm(nn.Module):
    def __init__(self, b: Block, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=b.affine)
        with torch.no_grad():
            if b.affine:
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.norm(x)


class MLP(nn.Module):
    def __init__(self, b: Block, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d) if b.pre_norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(d, b.hidden), nn.Linear(b.hidden, d)
        self.act, self.residual = b.act, b.residual

    def forward(self, x):
        y = self.fc2(activation(self.act, self.fc1(self.norm(x))))
        return x + y if self.residual else y


class TokenMix(nn.Module):
    """An MLP-Mixer token-mixing linear: transpose, mix along the token axis, transpose back."""

    def __init__(self, b: Block, d: int, length: int):
        super().__init__()
        self.mix = nn.Linear(length, length)

    def forward(self, x):
        return self.mix(x.transpose(1, 2)).transpose(1, 2)


class HeadShuffle(nn.Module):
    """Split the features into heads, swap the head and token axes, and merge again."""

    def __init__(self, b: Block, d: int):
        super().__init__()
        self.heads = b.heads

    def forward(self, x):
        n, length, d = x.shape
        return x.reshape(n, length, self.heads, d // self.heads).transpose(1, 2).reshape(n, length, d)


class Attention(nn.Module):
    def __init__(self, b: Block, d: int, length: int):
        super().__init__()
        self.idiom, self.heads, self.mask_kind = b.idiom, b.heads, b.mask
        self.residual = b.residual
        self.norm = nn.LayerNorm(d) if b.pre_norm else nn.Identity()
        self.head_dim = d // b.heads
        if self.idiom == "mha":
            self.mha = nn.MultiheadAttention(d, b.heads, batch_first=True, bias=b.bias)
        elif self.idiom == "matmul_fused_qkv":
            self.qkv = nn.Linear(d, 3 * d, bias=b.bias)
        else:
            self.q, self.k, self.v = (nn.Linear(d, d, bias=b.bias) for _ in range(3))
        if self.idiom != "mha":
            self.proj = nn.Linear(d, d)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        self.register_buffer("causal", causal)
        self.register_buffer("additive", torch.randn(length, length))
        # every query keeps the first key, so no softmax row is empty
        padding = torch.zeros(1, length, dtype=torch.bool)
        padding[:, 1:] = torch.rand(length - 1) < 0.4
        self.register_buffer("key_padding", padding)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        n, length, _ = t.shape
        return t.view(n, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        y = self.norm(x)
        n, length, d = y.shape
        if self.idiom == "mha":
            kwargs = {}
            if self.mask_kind in ("causal", "bool"):
                kwargs["attn_mask"] = ~self.causal  # nn.MultiheadAttention: True = masked out
            elif self.mask_kind == "additive":
                kwargs["attn_mask"] = self.additive
            elif self.mask_kind == "key_padding":
                kwargs["key_padding_mask"] = self.key_padding.expand(n, length)
            out = self.mha(y, y, y, need_weights=False, **kwargs)[0]
        else:
            if self.idiom == "matmul_fused_qkv":
                q, k, v = self.qkv(y).chunk(3, dim=-1)
            else:
                q, k, v = self.q(y), self.k(y), self.v(y)
            q, k, v = self._split(q), self._split(k), self._split(v)
            if self.idiom == "sdpa":
                if self.mask_kind == "causal":
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                elif self.mask_kind == "none":
                    o = F.scaled_dot_product_attention(q, k, v)
                else:
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._matmul_mask(n, length))
            else:
                scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
                if self.mask_kind in ("causal", "bool"):
                    scores = scores.masked_fill(~self.causal, float("-inf"))
                elif self.mask_kind == "additive":
                    scores = scores + self.additive
                elif self.mask_kind == "key_padding":
                    scores = scores.masked_fill(self.key_padding[:, None, None, :], float("-inf"))
                o = scores.softmax(dim=-1) @ v
            out = self.proj(o.transpose(1, 2).reshape(n, length, d))
        return x + out if self.residual else out

    def _matmul_mask(self, n: int, length: int) -> torch.Tensor:
        if self.mask_kind == "additive":
            return self.additive
        if self.mask_kind == "key_padding":
            return ~self.key_padding[:, None, None, :]  # SDPA: True = attend
        return self.causal


class TokenHead(nn.Module):
    def __init__(self, b: Block, d: int):
        super().__init__()
        self.pool = b.pool
        self.linear = nn.Linear(d, b.classes)

    def forward(self, x):
        return self.linear(x[:, 0] if self.pool == "cls" else x.mean(1))


# ----------------------------------------------------------------------------------------
# Model assembly


class FuzzModel(nn.Module):
    def __init__(self, layers: list[nn.Module], two_outputs: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.two_outputs = two_outputs

    def forward(self, x):
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        if self.two_outputs and len(outputs) > 1:
            return x, outputs[0].sum(dim=1) * 0.5
        return x


IMAGE_BLOCKS = {"conv": ConvBlock, "conv_transpose": ConvTransposeBlock, "residual": Residual,
                "repvgg": RepVGG, "acnet": ACNet, "dbb": DBBAvg, "branches": Branches, "repmlp": RepMLP,
                "affine": Affine, "pool": Pool, "act": Act}
TOKEN_BLOCKS = {"linear": TokenLinear, "channel_bn": ChannelBN, "layer_norm": LayerNorm,
                "mlp": MLP, "head_shuffle": HeadShuffle, "act": Act}


def _image_out(b: Block, c: int, h: int, w: int) -> tuple[int, int, int]:
    """Output channels and size of an image block (mirrors the modules above)."""
    if b.kind == "conv":
        cout = c if b.groups == "dw" else b.cout
        pad = (b.k // 2) * b.dilation if b.padded else 0
        span = b.dilation * (b.k - 1) + 1
        return cout, (h + 2 * pad - span) // b.stride + 1, (w + 2 * pad - span) // b.stride + 1
    if b.kind == "conv_transpose":
        return b.cout, (h - 1) * b.stride + b.k, (w - 1) * b.stride + b.k
    if b.kind == "repvgg":
        cout = c if b.depthwise else b.cout
        pad = b.k // 2
        return cout, (h + 2 * pad - b.k) // b.stride + 1, (w + 2 * pad - b.k) // b.stride + 1
    if b.kind == "branches":
        return 2 * b.cout, h, w
    if b.kind == "pool":
        return c, h // 2, w // 2
    return c, h, w


def build_model(spec: ModelSpec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The eval-mode model and input a spec describes; weights and statistics from ``spec.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        layers: list[nn.Module] = []
        image = len(spec.input_shape) == 4
        if image:
            _, c, h, w = spec.input_shape
        else:
            _, length, d = spec.input_shape
        for b in spec.blocks:
            if b.kind == "head":
                layers.append(ImageHead(b, c, h, w) if image else TokenHead(b, d))
                break
            if b.kind == "to_tokens":
                layers.append(ToTokens())
                image, length, d = False, h * w, c
            elif image:
                layers.append(IMAGE_BLOCKS[b.kind](b, c))
                c, h, w = _image_out(b, c, h, w)
            elif b.kind == "attention":
                layers.append(Attention(b, d, length))
            elif b.kind == "token_mix":
                layers.append(TokenMix(b, d, length))
            else:
                layers.append(TOKEN_BLOCKS[b.kind](b, d))
                if b.kind == "linear":
                    d = b.dout
        model = FuzzModel(layers, spec.two_outputs)
        randomize_state(model)
        x = torch.randn(spec.input_shape)
    return model.eval(), (x,)


def randomize_state(model: nn.Module) -> None:
    """Trained-looking BatchNorm statistics and affine parameters, so a wrong fold shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.25, 4)
                if m.affine:
                    m.weight.uniform_(0.25, 2).mul_(torch.where(torch.rand_like(m.weight) < 0.2, -1.0, 1.0))
                    m.bias.uniform_(-1, 1)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)


# ----------------------------------------------------------------------------------------
# Strategies


def _activations() -> st.SearchStrategy[str]:
    return st.sampled_from(ACTIVATIONS)


@st.composite
def image_block(draw, c: int, h: int, w: int) -> Block:
    kinds = ["conv", "conv", "residual", "repvgg", "repvgg", "acnet", "dbb", "branches", "affine", "act"]
    if min(h, w) >= 2:
        kinds.append("pool")
    if max(h, w) <= 4:
        kinds.append("conv_transpose")
    windows = [d for d in (2, 3, 4) if h % d == 0 and w % d == 0]
    if windows:
        kinds.append("repmlp")
    kind = draw(st.sampled_from(kinds))
    small = min(h, w)
    act = draw(_activations())
    if kind == "conv":
        k = draw(st.sampled_from([1, 3] if small >= 3 else [1]))
        dilation = draw(st.sampled_from([1, 2])) if k == 3 and small >= 5 else 1
        groups = draw(st.sampled_from(["1", "dw", "2"] if c % 2 == 0 else ["1", "dw"]))
        cout = draw(st.sampled_from([2, 4, 6]))
        return block("conv", cout=cout, k=k, stride=draw(st.sampled_from([1, 2])), groups=groups,
                     dilation=dilation, padded=draw(st.booleans()), bias=draw(st.booleans()),
                     bn=draw(st.booleans()), bn_first=draw(st.booleans()), act=act)
    if kind == "conv_transpose":
        return block("conv_transpose", cout=draw(st.sampled_from([2, 4])), k=draw(st.sampled_from([1, 2, 3])),
                     stride=draw(st.sampled_from([1, 2])), groups=draw(st.sampled_from([1, 2] if c % 2 == 0 else [1])),
                     bias=draw(st.booleans()), act=act)
    if kind == "residual":
        return block("residual", k=draw(st.sampled_from([1, 3])), act=act)
    if kind == "repvgg":
        return block("repvgg", cout=draw(st.sampled_from([c, 2, 4])), k=draw(st.sampled_from([3, 5] if small >= 5 else [3])),
                     stride=draw(st.sampled_from([1, 1, 2])), depthwise=draw(st.booleans()),
                     one_by_one=draw(st.booleans()), identity=draw(st.booleans()), act=act)
    if kind in ("acnet",):
        return block(kind, act=act)
    if kind == "dbb":
        return block("dbb", plain_pool=draw(st.booleans()), act=act)
    if kind == "branches":
        return block("branches", cout=draw(st.sampled_from([1, 2, 3])))
    if kind == "repmlp":
        kernels = draw(st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3, unique=True))
        return block("repmlp", window=draw(st.sampled_from(windows)), kernels=tuple(kernels),
                     sharesets=draw(st.sampled_from(sorted({1, c} | ({2} if c % 2 == 0 else set())))),
                     nonlinear=draw(st.booleans()), act=act)
    if kind == "affine":
        return block("affine", form=draw(st.sampled_from(["scale_shift", "scalar", "repbn", "bn"])))
    if kind == "pool":
        return block("pool", form=draw(st.sampled_from(["max", "avg"])))
    return block("act", act=act)


@st.composite
def token_block(draw, d: int, length: int) -> Block:
    kind = draw(st.sampled_from(["linear", "linear", "channel_bn", "layer_norm", "mlp", "attention",
                                 "attention", "token_mix", "head_shuffle", "act"]))
    act = draw(_activations())
    if kind == "linear":
        return block("linear", dout=draw(st.sampled_from([4, 8])), bias=draw(st.booleans()),
                     token_bn=draw(st.booleans()), act=act)
    if kind == "layer_norm":
        return block("layer_norm", affine=draw(st.booleans()))
    if kind == "mlp":
        return block("mlp", hidden=draw(st.sampled_from([4, 8, 16])), pre_norm=draw(st.booleans()),
                     residual=draw(st.booleans()), act=act)
    if kind == "attention":
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
        return block("attention", idiom=draw(st.sampled_from(ATTENTION_IDIOMS)), heads=heads,
                     mask=draw(st.sampled_from(MASKS)), bias=draw(st.booleans()),
                     pre_norm=draw(st.booleans()), residual=draw(st.booleans()))
    if kind == "head_shuffle":
        return block("head_shuffle", heads=draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0])))
    if kind in ("channel_bn", "token_mix"):
        return block(kind)
    return block("act", act=act)


@st.composite
def model_specs(draw, max_blocks: int = 4) -> ModelSpec:
    """Random small models: an image stream (optionally turned into tokens) or a token stream."""
    batch = draw(st.integers(1, 2))
    blocks: list[Block] = []
    n_blocks = draw(st.integers(1, max_blocks))
    if draw(st.booleans()):
        c, h, w = draw(st.sampled_from([1, 2, 3, 4])), draw(st.integers(2, 7)), draw(st.integers(2, 7))
        shape: tuple[int, ...] = (batch, c, h, w)
        while len(blocks) < n_blocks and min(h, w) >= 1:
            b = draw(image_block(c, h, w))
            c2, h2, w2 = _image_out(b, c, h, w)
            if min(h2, w2) < 1:
                continue
            blocks.append(b)
            c, h, w = c2, h2, w2
        ending = draw(st.sampled_from(["none", "head", "tokens"] if h * w > 1 else ["none", "head"]))
        if ending == "head":
            blocks.append(block("head", form=draw(st.sampled_from(["mean", "flatten"])),
                                classes=draw(st.sampled_from([3, 5])), bn_before=draw(st.booleans()),
                                bn_after=draw(st.booleans())))
        elif ending == "tokens":
            blocks.append(block("to_tokens"))
            d, length = c, h * w
            for _ in range(draw(st.integers(1, 2))):
                b = draw(token_block(d, length))
                blocks.append(b)
                d = b.dout if b.kind == "linear" else d
    else:
        length, d = draw(st.integers(1, 6)), draw(st.sampled_from([4, 8]))
        shape = (batch, length, d)
        for _ in range(n_blocks):
            b = draw(token_block(d, length))
            blocks.append(b)
            d = b.dout if b.kind == "linear" else d
        if draw(st.booleans()):
            blocks.append(block("head", pool=draw(st.sampled_from(["cls", "mean"])), classes=3))
    return ModelSpec(shape, tuple(blocks), seed=draw(st.integers(0, 2**16)), two_outputs=draw(st.booleans()))


# ----------------------------------------------------------------------------------------
# The differential check


@dataclass
class FuzzStats:
    """Counters a test session prints at the end (see tests/conftest.py)."""

    examples: int = 0
    pass_runs: int = 0
    triton_runs: int = 0  # models whose default-pipeline graph also ran as Triton kernels
    settled_in_float64: int = 0  # fp32 differences of ill-conditioned models, exact in float64
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    blocks: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, spec: ModelSpec, pass_runs: int, seconds: float, cpu_seconds: float) -> None:
        with self.lock:
            self.examples += 1
            self.pass_runs += pass_runs
            self.seconds += seconds
            self.cpu_seconds += cpu_seconds
            for b in spec.blocks:
                name = f"attention:{b.idiom}" if b.kind == "attention" else b.kind
                self.blocks[name] = self.blocks.get(name, 0) + 1


    def merge(self, other: dict) -> None:
        with self.lock:
            self.examples += other["examples"]
            self.pass_runs += other["pass_runs"]
            self.triton_runs += other.get("triton_runs", 0)
            self.settled_in_float64 += other.get("settled_in_float64", 0)
            self.seconds += other["seconds"]
            self.cpu_seconds += other["cpu_seconds"]
            for name, n in other["blocks"].items():
                self.blocks[name] = self.blocks.get(name, 0) + n

    def as_dict(self) -> dict:
        return {"examples": self.examples, "pass_runs": self.pass_runs, "triton_runs": self.triton_runs,
                "settled_in_float64": self.settled_in_float64,
                "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds, "blocks": dict(self.blocks)}


#: What this process fuzzed (tests/conftest.py prints it at the end of a session).
STATS = FuzzStats()


@contextlib.contextmanager
def cheaper_captures():
    """Memoize torch.export's scan of the operator registry while fuzzing.

    ``run_decompositions`` walks every CompositeImplicitAutograd operator on each call
    (about a quarter of a tiny model's capture time). The result only changes when an
    operator is registered, so it is cached under the dispatcher's registration count.
    """
    try:
        from torch.export import exported_program
        original = exported_program._collect_all_valid_cia_ops
    except (ImportError, AttributeError):  # another torch: capture at full cost
        yield
        return
    cache: dict[int, Any] = {}

    def collect():
        key = len(torch._C._dispatch_get_registrations_for_dispatch_key("CompositeImplicitAutograd"))
        if key not in cache:
            cache[key] = original()
        return cache[key]

    exported_program._collect_all_valid_cia_ops = collect
    try:
        yield
    finally:
        exported_program._collect_all_valid_cia_ops = original


TRITON_EVERY = 10


def _triton_problem(gm, inputs: tuple, expected: list, tolerance: float) -> str | None:
    """The default pipeline's graph with every region lowered to its generated Triton
    kernel (run in the interpreter when ``TRITON_INTERPRET=1``) must match eager too."""
    from optcc.lowering.runtime import lower_regions

    try:
        lowered, _ = lower_regions(gm)
        error = output_error(expected, list(lowered(*inputs)))
    except Exception as exc:  # a generator or a kernel that fails is a finding
        return f"target triton raised {type(exc).__name__}: {exc}"
    if error > tolerance:
        return f"target triton: outputs differ from eager by {error:.3g} (relative; tolerance {tolerance:g})"
    return None


#: An exact rewrite run in float64 agrees with float64 eager to ~1e-14 (relative).
FLOAT64_TOLERANCE = 1e-9


def float64_error(model: nn.Module, inputs: tuple, make_passes) -> float:
    """The relative output difference of the passes on a float64 copy of the model."""
    model64 = copy.deepcopy(model).double()
    inputs64 = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    expected = model64(*inputs64)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    gm, _ = PassManager(make_passes(), verify=False).run(optcc.capture(model64, inputs64))
    return output_error(expected, list(gm(*inputs64)))


def differential_check(model: nn.Module, inputs: tuple, tolerance: float = 1e-5,
                       triton: bool = False, stats: FuzzStats | None = None) -> tuple[list[str], int]:
    """Run each exact pass alone, and the default pipeline, against eager; return (problems, runs).

    The passes come from the registry on every call, so a pass registered later is
    fuzzed without any change here.

    Each run starts from its own copy of one captured graph and runs with ``verify=False``
    so that nothing is rolled back. A problem is a pass that raised, an output beyond
    ``tolerance`` (relative, :func:`optcc.pass_manager.output_error`), or a captured
    graph whose outputs changed after the passes ran on copies of it (a pass that wrote
    into a shared constant).

    Some models amplify rounding: a LayerNorm over two nearly equal features turns the
    last-bit differences of a re-associated sum into 1e-5 of its output (eager itself moves
    by 7e-6 for a 1e-7 input perturbation on such a model). An fp32 difference beyond
    ``tolerance`` is therefore re-checked on a float64 copy of the model, inputs and
    passes, where an exact rewrite agrees with eager to ~1e-14: it is a problem unless
    that difference is within :data:`FLOAT64_TOLERANCE` (counted in ``stats``). Such a
    model's graph is not run as Triton kernels (they compute in fp32).
    """
    with torch.no_grad():
        expected = model(*inputs)
        expected = list(expected) if isinstance(expected, tuple) else [expected]
        captured = optcc.capture(model, inputs)
        problems = []
        baseline = list(captured(*inputs))
        error = output_error(expected, baseline)
        if error > tolerance:
            problems.append(f"capture alone changed the outputs by {error:.3g}")
        ill_conditioned = False
        exact = {name: cls for name, cls in registered_passes().items() if cls.exact}
        pipelines = [(name, lambda cls=cls: [cls()]) for name, cls in sorted(exact.items())]
        if len(exact) > 1:  # with one exact pass the default pipeline is that pass alone
            pipelines.append(("default pipeline", default_passes))
        for label, make_passes in pipelines:
            gm, report = PassManager(make_passes(), verify=False).run(snapshot(captured))
            for record in report.records:
                if record.status == "failed":
                    problems.append(f"{label}: pass {record.name} raised: {record.message}")
            error = output_error(expected, list(gm(*inputs)))
            if error > tolerance and float64_error(model, inputs, make_passes) <= FLOAT64_TOLERANCE:
                ill_conditioned = True
                if stats is not None:
                    stats.settled_in_float64 += 1
            elif error > tolerance:
                applied = [r.name for r in report.records if r.status == "applied"]
                problems.append(f"{label}: outputs differ from eager by {error:.3g} (relative; "
                                f"tolerance {tolerance:g}); applied: {applied}")
            # fp32 kernels cannot be held to the tolerance on a model that amplifies rounding
            if triton and label == pipelines[-1][0] and not ill_conditioned:
                if stats is not None:
                    stats.triton_runs += 1
                problem = _triton_problem(gm, inputs, expected, tolerance)
                if problem:
                    problems.append(problem)
        error = output_error(baseline, list(captured(*inputs)))
        if error != 0.0:
            problems.append(f"a pass changed a constant shared with the captured graph (outputs moved by {error:.3g})")
    return problems, len(pipelines)


def check_spec(spec: ModelSpec, stats: FuzzStats | None = None) -> None:
    """Build ``spec``'s model and assert that every exact pass reproduces eager on it."""
    start, cpu_start = time.perf_counter(), time.process_time()
    model, inputs = build_model(spec)
    stats = stats or STATS
    # Every TRITON_EVERY-th model also runs the default pipeline's graph as generated
    # Triton kernels (in the interpreter: slow, so not every model).
    triton = os.environ.get("TRITON_INTERPRET") == "1" and stats.examples % TRITON_EVERY == 0
    problems, runs = differential_check(model, inputs, triton=triton, stats=stats)
    stats.count(spec, runs, time.perf_counter() - start, time.process_time() - cpu_start)
    assert not problems, f"{spec!r}\n" + "\n".join(problems)


def run_examples(examples: int, max_blocks: int = 3) -> dict:
    """Fuzz ``examples`` random models in this process; return counts and the first failure.

    Meant to run in worker processes (one per core): a failure is shrunk by hypothesis
    here and comes back as text that names the minimal ``ModelSpec``.
    """
    torch.set_num_threads(1)  # tiny tensors: a thread pool costs more than the ops
    stats = FuzzStats()

    @settings(max_examples=examples, deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(spec=model_specs(max_blocks=max_blocks))
    def fuzz(spec: ModelSpec) -> None:
        check_spec(spec, stats)

    failure = None
    with cheaper_captures():
        try:
            fuzz()
        except Exception as exc:  # the shrunk failure, with hypothesis' notes
            failure = "".join(traceback.format_exception(exc))
    return {**stats.as_dict(), "failure": failure}
