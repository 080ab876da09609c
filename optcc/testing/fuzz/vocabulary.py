"""The fuzzer's vocabulary: model specs and the blocks they are built from.

A :class:`ModelSpec` is a plain description of a model (an input shape and a list of
:class:`Block` specs) that hypothesis can shrink and print; :func:`build_model` turns one
into an eval-mode ``nn.Module`` with random weights and BatchNorm statistics. Each kind of
block is one :class:`VocabularyBlock` subclass that knows the shape it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

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
# The vocabulary: one class per kind of block

Shape = tuple  # what a block receives without the batch dim: images (C, H, W), tokens (L, D)

VOCABULARY: dict[tuple[str, str], type["VocabularyBlock"]] = {}


class VocabularyBlock(nn.Module):
    """One kind of block. A new kind is one subclass: its ``kind`` (the name in
    :class:`Block` specs), the ``domains`` it applies to ("image": ``[N, C, H, W]``,
    "tokens": ``[N, L, D]``), a constructor, and :meth:`output_shape` if it changes the
    shape; defining the class registers it."""

    kind: ClassVar[str] = ""
    domains: ClassVar[tuple[str, ...]] = ()
    output_domain: ClassVar[str | None] = None  # the domain after the block, if it changes it

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for domain in cls.__dict__.get("domains", ()):
            VOCABULARY[domain, cls.kind] = cls

    @classmethod
    def build(cls, b: Block, shape: Shape) -> nn.Module:
        """The module for spec ``b`` on inputs of ``shape`` (channels or features first read)."""
        return cls(b, shape[0] if "image" in cls.domains and len(shape) == 3 else shape[-1])

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        return shape


class SequenceBlock(VocabularyBlock):
    """A token block whose constructor also needs the sequence length: ``cls(b, d, length)``."""

    @classmethod
    def build(cls, b: Block, shape: Shape) -> nn.Module:
        length, d = shape
        return cls(b, d, length)


def input_domain(input_shape: tuple[int, ...]) -> str:
    return "image" if len(input_shape) == 4 else "tokens"


def vocabulary_block(domain: str, kind: str) -> type[VocabularyBlock]:
    try:
        return VOCABULARY[domain, kind]
    except KeyError:
        raise ValueError(f"no {domain} block of kind {kind!r}; the vocabulary has: "
                         f"{', '.join(sorted(k for d, k in VOCABULARY if d == domain))}") from None

# ----------------------------------------------------------------------------------------
# Image blocks (x: [N, C, H, W])


class ConvBlock(VocabularyBlock):
    kind = "conv"
    domains = ("image",)

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

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        c, h, w = shape
        cout = c if b.groups == "dw" else b.cout
        pad = (b.k // 2) * b.dilation if b.padded else 0
        span = b.dilation * (b.k - 1) + 1
        return cout, (h + 2 * pad - span) // b.stride + 1, (w + 2 * pad - span) // b.stride + 1


class ConvTransposeBlock(VocabularyBlock):
    kind = "conv_transpose"
    domains = ("image",)

    def __init__(self, b: Block, cin: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, b.cout, b.k, b.stride, groups=b.groups, bias=b.bias)
        self.bn = nn.BatchNorm2d(b.cout)
        self.act = b.act

    def forward(self, x):
        return activation(self.act, self.bn(self.conv(x)))

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        _, h, w = shape
        return b.cout, (h - 1) * b.stride + b.k, (w - 1) * b.stride + b.k


def conv_bn(cin: int, cout: int, kernel: tuple[int, int] | int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (kernel[0] // 2, kernel[1] // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Residual(VocabularyBlock):
    kind = "residual"
    domains = ("image",)

    def __init__(self, b: Block, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c, 3), nn.ReLU(), conv_bn(c, c, b.k))
        self.act = b.act

    def forward(self, x):
        return activation(self.act, x + self.body(x))


class RepVGG(VocabularyBlock):
    """kxk+BN + 1x1+BN (+ identity BN) summed: a training-time RepVGG / MobileOne block."""

    kind = "repvgg"
    domains = ("image",)

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

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        c, h, w = shape
        cout = c if b.depthwise else b.cout
        pad = b.k // 2
        return cout, (h + 2 * pad - b.k) // b.stride + 1, (w + 2 * pad - b.k) // b.stride + 1


class ACNet(VocabularyBlock):
    kind = "acnet"
    domains = ("image",)

    def __init__(self, b: Block, c: int):
        super().__init__()
        self.square, self.hor, self.ver = conv_bn(c, c, 3), conv_bn(c, c, (1, 3)), conv_bn(c, c, (3, 1))
        self.act = b.act

    def forward(self, x):
        return activation(self.act, self.square(x) + self.hor(x) + self.ver(x))


class DBBAvg(VocabularyBlock):
    """Diverse Branch Block: kxk, 1x1, and 1x1 -> BN -> avg-pool -> BN branches."""

    kind = "dbb"
    domains = ("image",)

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


class RepMLP(VocabularyBlock):
    """RepMLP's channel + local perceptrons: a grouped FC (+BN per share set) over each
    window x window patch, plus conv+BN branches over the same patches (optionally through
    a nonlinearity, which must keep them apart)."""

    kind = "repmlp"
    domains = ("image",)

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


class Branches(VocabularyBlock):
    """Two parallel conv branches joined by concatenation (an Inception-style block)."""

    kind = "branches"
    domains = ("image",)

    def __init__(self, b: Block, c: int):
        super().__init__()
        self.a, self.b = conv_bn(c, b.cout, 1), conv_bn(c, b.cout, 3)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        _, h, w = shape
        return 2 * b.cout, h, w


class Affine(VocabularyBlock):
    """Constant per-channel scale/shift, standalone BN, or SLAB's RepBN ``BN(x) + a * x``."""

    kind = "affine"
    domains = ("image",)

    def __init__(self, b: Block, c: int):
        super().__init__()
        self.form = b.form
        self.bn = nn.BatchNorm2d(c)
        self.scale = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, c, 1, 1))
        self.alpha = nn.Parameter(torch.rand(1) + 0.5)

    def forward(self, x):
        if self.form == "scale_shift":
            return x * self.scale + self.shift
        if self.form == "scalar":
            return x * 1.5 - 0.25
        if self.form == "repbn":
            return self.bn(x) + self.alpha * x
        return self.bn(x)


class Pool(VocabularyBlock):
    kind = "pool"
    domains = ("image",)

    def __init__(self, b: Block, c: int):
        super().__init__()
        self.form = b.form

    def forward(self, x):
        return F.max_pool2d(x, 2) if self.form == "max" else F.avg_pool2d(x, 2)

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        c, h, w = shape
        return c, h // 2, w // 2


class Act(VocabularyBlock):
    kind = "act"
    domains = ("image", "tokens")

    def __init__(self, b: Block, _: int):
        super().__init__()
        self.act = b.act

    def forward(self, x):
        return activation(self.act, x)


class ImageHead(VocabularyBlock):
    """Global pooling or flattening, then a linear classifier (optionally BN1d after it)."""

    kind = "head"
    domains = ("image",)

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

    @classmethod
    def build(cls, b: Block, shape: Shape) -> nn.Module:
        return cls(b, *shape)

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        return (b.classes,)


class ToTokens(VocabularyBlock):
    kind = "to_tokens"
    domains = ("image",)

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)

    output_domain = "tokens"

    @classmethod
    def build(cls, b: Block, shape: Shape) -> nn.Module:
        return cls()

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        c, h, w = shape
        return h * w, c


# ----------------------------------------------------------------------------------------
# Token blocks (x: [N, L, D])


class TokenLinear(VocabularyBlock):
    kind = "linear"
    domains = ("tokens",)

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

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        return shape[0], b.dout


class ChannelBN(VocabularyBlock):
    """BN1d over the feature dimension of tokens, through a transpose ([N, D, L])."""

    kind = "channel_bn"
    domains = ("tokens",)

    def __init__(self, b: Block, d: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class LayerNorm(VocabularyBlock):
    kind = "layer_norm"
    domains = ("tokens",)

    def __init__(self, b: Block, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=b.affine)
        with torch.no_grad():
            if b.affine:
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.norm(x)


class MLP(VocabularyBlock):
    kind = "mlp"
    domains = ("tokens",)

    def __init__(self, b: Block, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d) if b.pre_norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(d, b.hidden), nn.Linear(b.hidden, d)
        self.act, self.residual = b.act, b.residual

    def forward(self, x):
        y = self.fc2(activation(self.act, self.fc1(self.norm(x))))
        return x + y if self.residual else y


class TokenMix(SequenceBlock):
    """An MLP-Mixer token-mixing linear: transpose, mix along the token axis, transpose back."""

    kind = "token_mix"
    domains = ("tokens",)

    def __init__(self, b: Block, d: int, length: int):
        super().__init__()
        self.mix = nn.Linear(length, length)

    def forward(self, x):
        return self.mix(x.transpose(1, 2)).transpose(1, 2)


class HeadShuffle(VocabularyBlock):
    """Split the features into heads, swap the head and token axes, and merge again."""

    kind = "head_shuffle"
    domains = ("tokens",)

    def __init__(self, b: Block, d: int):
        super().__init__()
        self.heads = b.heads

    def forward(self, x):
        n, length, d = x.shape
        return x.reshape(n, length, self.heads, d // self.heads).transpose(1, 2).reshape(n, length, d)


class Attention(SequenceBlock):
    kind = "attention"
    domains = ("tokens",)

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


class TokenHead(VocabularyBlock):
    kind = "head"
    domains = ("tokens",)

    def __init__(self, b: Block, d: int):
        super().__init__()
        self.pool = b.pool
        self.linear = nn.Linear(d, b.classes)

    def forward(self, x):
        return self.linear(x[:, 0] if self.pool == "cls" else x.mean(1))

    @staticmethod
    def output_shape(b: Block, shape: Shape) -> Shape:
        return (b.classes,)


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


def build_model(spec: ModelSpec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The eval-mode model and input a spec describes; weights and statistics from ``spec.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        layers: list[nn.Module] = []
        domain, shape = input_domain(spec.input_shape), tuple(spec.input_shape[1:])
        for b in spec.blocks:
            kind = vocabulary_block(domain, b.kind)
            layers.append(kind.build(b, shape))
            if b.kind == "head":
                break
            shape, domain = kind.output_shape(b, shape), kind.output_domain or domain
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


