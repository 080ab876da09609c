"""Hypothesis strategies for :class:`~optcc.testing.fuzz.vocabulary.ModelSpec`."""

from __future__ import annotations

from hypothesis import strategies as st

from .vocabulary import ACTIVATIONS, ATTENTION_IDIOMS, MASKS, Block, ModelSpec, block, vocabulary_block

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
            c2, h2, w2 = vocabulary_block("image", b.kind).output_shape(b, (c, h, w))
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


