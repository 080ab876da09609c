"""token_pruning: ToMe / EViT token reduction inserted into transformer graphs.

What is proven here: the ops are ToMe's matching and size-weighted merge exactly; the pass
on a timm ViT computes what ToMe's own timm patch computes (a reference forward written
from ToMe's Block/Attention); the inserted ops on every model family (golden text);
padding never leaks into real tokens; FLOPs targets and schedules; ONNX export through
ONNX Runtime; the three entry points; and a graph the pass cannot follow is left
unchanged with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import optcc
from optcc.dump import graph_text
from optcc.kernels import token_merge as ops
from optcc.onnx_io import export_onnx
from optcc.passes.token_pruning import TokenPruning, parse_r

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=10)
TOKEN_OPS = ("optcc.tome_plan", "optcc.topk_plan", "optcc.token_merge", "optcc.token_unmerge", "optcc.token_pool")


def image(batch=2):
    return torch.randn(batch, 3, 32, 32)


def prune(model, inputs, target="eager", **options):
    model.eval()
    compiled = optcc.compile(model, example_inputs=inputs, target=target,
                             passes=["canonicalize_attention", ("token_pruning", options)])
    with torch.no_grad():
        out = compiled(*inputs)
    return compiled, out, compiled.report["token_pruning"].stats


def inserted(gm) -> str:
    """The graph text lines of the token ops the pass inserted (the golden part)."""
    return "\n".join(line for line in graph_text(gm).splitlines() if any(op in line for op in TOKEN_OPS)) + "\n"


def cosine(a, b):
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).min().item()


# ----------------------------------------------------------------------------------------
# The ops


@pytest.mark.parametrize("class_token,distill_token", [(True, False), (True, True)])
@pytest.mark.parametrize("r", [0, 1, 4, 100])
def test_plan_and_merge_equal_tome_reference(class_token, distill_token, r):
    b, n, c = 3, 17, 8
    metric, x = torch.randn(b, n, c), torch.randn(b, n, c)
    size = torch.rand(b, n, 1) + 0.5
    protected = int(class_token) + int(distill_token)
    r_eff = min(r, (n - protected) // 2)
    x_ref, size_ref = ops.tome_plan_reference(metric.clone(), r, class_token, distill_token)(x, size)
    dest, keep = ops.tome_plan(metric, None, r_eff, protected)
    x_new, size_new = ops.token_merge(x, size[..., 0], dest, n - r_eff)
    torch.testing.assert_close(x_new, x_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(size_new, size_ref[..., 0])
    # keep names each output token's representative; unmerge sends every token to its merged token
    assert torch.equal(ops.token_unmerge(x_new, dest).gather(1, keep[..., None].expand(-1, -1, c)), x_new)
    assert torch.equal(keep[:, :protected], torch.arange(protected).expand(b, protected))


def test_plan_never_merges_across_padding():
    b, n = 2, 16
    metric = torch.randn(b, 1, 4).expand(b, n, 4).contiguous()  # every token alike: any edge is best
    bias = torch.zeros(b, n)
    bias[1, 9:] = float("-inf")  # row 1: 9 real tokens, 7 padded
    dest, keep = ops.tome_plan(metric, bias, 6, 1)
    for row in range(b):
        for group in dest[row].unique():
            members = bias[row][dest[row] == group]
            assert (members == members[0]).all(), f"row {row} merges padded and real tokens"
    assert dest[:, 0].eq(0).all()


def test_topk_keeps_highest_attention_and_fuses_the_rest():
    attention = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.2, 0.01]])
    dest, keep = ops.topk_plan(attention, 2, 1)
    assert keep[0, :3].tolist() == [0, 2, 4]  # class token, then the two best in input order
    assert dest[0].tolist() == [0, 3, 1, 3, 2, 3]
    x = torch.arange(6.0).view(1, 6, 1)
    merged, sizes = ops.token_merge(x, torch.ones(1, 6), dest, 4, attention)
    fused = (0.1 * 1 + 0.05 * 3 + 0.01 * 5) / 0.16
    assert merged[0, :, 0].tolist() == pytest.approx([0.0, 2.0, 4.0, fused])
    assert sizes[0].tolist() == [1.0, 1.0, 1.0, 3.0]


def test_pool_is_the_mean_over_input_tokens():
    x = torch.randn(2, 9, 5)
    dest, _ = ops.tome_plan(torch.randn(2, 9, 3), None, 3, 1)
    merged, sizes = ops.token_merge(x, torch.ones(2, 9), dest, 6)
    torch.testing.assert_close(ops.token_pool(merged, sizes), ops.token_unmerge(merged, dest).mean(1))
    torch.testing.assert_close(ops.token_pool(merged[:, 1:], sizes, 1, False),
                               ops.token_unmerge(merged, dest)[:, 1:].sum(1))


def test_schedules():
    assert parse_r(3, 4) == [3, 3, 3, 3]
    assert parse_r([5, 2], 4) == [5, 2, 0, 0]
    # ToMe's parse_r: r (1 - i) rising linearly to r (1 + i)
    assert parse_r((8, 0.5), 5) == [4, 6, 8, 10, 12]


# ----------------------------------------------------------------------------------------
# Exactly ToMe on a timm ViT


def tome_forward(model: VisionTransformer, x, schedule, proportional=True):
    """ToMe's timm patch (tome/patch/timm.py: ToMeBlock + ToMeAttention) as a plain forward."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = None
    distill = isinstance(model, VisionTransformerDistilled)
    for block, r in zip(model.blocks, schedule):
        attn = block.attn
        b, n, c = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if proportional and size is not None:
            scores = scores + size.log()[:, None, None, :, 0]
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + block.ls1(attn.proj(out))
        if r > 0:
            merge = ops.tome_plan_reference(k.mean(1), r, True, distill)
            x, size = merge(x, torch.ones_like(x[..., :1]) if size is None else size)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


def vit_tiny_224():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False)


@pytest.mark.parametrize("factory,schedule,proportional,target", [
    (vit_tiny_224, [13] * 12, True, "eager"),  # ToMe's r=13 on the real architecture, 197 tokens
    (lambda: VisionTransformer(**SMALL), [2, 3, 1], True, "inductor"),
    (lambda: VisionTransformer(**SMALL), [4, 0, 2], False, "eager"),
    (lambda: VisionTransformerDistilled(**SMALL), [2, 2, 2], True, "eager"),
])
def test_pass_computes_what_tome_computes(factory, schedule, proportional, target):
    model = factory().eval()
    x = torch.randn(1, 3, 224, 224) if len(schedule) == 12 else image()
    _, out, stats = prune(model, (x,), target, r=schedule, proportional_attention=proportional)
    with torch.no_grad():
        expected = tome_forward(model, x, schedule, proportional)
    assert stats["schedule"] == schedule
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Model families: where the ops go, and what the readout does


class HandWrittenViT(nn.Module):
    """Nothing in common with timm: separate q/k/v, einsum attention, post-norm, two class-like
    tokens built by one parameter, mean pooling over every token."""

    def __init__(self, dim=48, heads=3, depth=3):
        super().__init__()
        self.embed = nn.Linear(4 * 4 * 3, dim)
        self.lead = nn.Parameter(torch.randn(2, dim))
        self.pos = nn.Parameter(torch.randn(66, dim) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict(dict(
                q=nn.Linear(dim, dim), k=nn.Linear(dim, dim), v=nn.Linear(dim, dim), o=nn.Linear(dim, dim),
                n1=nn.LayerNorm(dim), n2=nn.LayerNorm(dim),
                up=nn.Linear(dim, 2 * dim), down=nn.Linear(2 * dim, dim))))
        self.heads = heads

    def forward(self, img):
        b = img.shape[0]
        patches = img.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(b, 64, 48)
        x = torch.cat([self.lead.unsqueeze(0).expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        for layer in self.layers:
            n, h = x.shape[1], self.heads
            split = lambda t: t.view(b, n, h, -1).transpose(1, 2)  # noqa: E731
            q, k, v = split(layer["q"](x)), split(layer["k"](x)), split(layer["v"](x))
            w = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
            o = torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v).transpose(1, 2).reshape(b, n, -1)
            x = layer["n1"](x + layer["o"](o))
            x = layer["n2"](x + layer["down"](F.relu(layer["up"](x))))
        return x.mean(dim=1)


class MHABlock(nn.Module):
    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CLIPStyle(nn.Module):
    """OpenAI CLIP's visual tower in miniature: [N, B, C] tokens through nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 8, 8)
        self.cls = nn.Parameter(torch.randn(64))
        self.pos = nn.Parameter(torch.randn(17, 64) * 0.02)
        self.blocks = nn.Sequential(*[MHABlock() for _ in range(3)])
        self.ln = nn.LayerNorm(64)

    def forward(self, x):
        x = self.conv(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1) + self.pos
        x = self.blocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln(x[:, 0])


def hf_vit():
    import transformers

    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=128, image_size=32, patch_size=8)
    return transformers.ViTModel(config)


FAMILIES = {
    # name: (model factory, protected tokens, tokens through the graph at r=2, unmerged at)
    "timm_vit": (lambda: VisionTransformer(**SMALL), 1, [17, 15, 13, 11]),
    "timm_deit_distilled": (lambda: VisionTransformerDistilled(**SMALL), 2, [18, 16, 14, 12]),
    "timm_vit_registers": (lambda: VisionTransformer(**SMALL, reg_tokens=4), 5, [21, 19, 17, 15]),
    "timm_vit_global_pool": (lambda: VisionTransformer(**SMALL, global_pool="avg", class_token=False), 0,
                             [16, 14, 12, 10]),
    "timm_vit_dense": (lambda: VisionTransformer(**{**SMALL, "num_classes": 0}, global_pool=""), 1,
                       [17, 15, 13, 11]),
    "transformers_vit": (hf_vit, 1, [17, 15, 13, 11]),
    "mha_clip_style": (CLIPStyle, 1, [17, 15, 13, 11]),
    "hand_written": (HandWrittenViT, 2, [66, 64, 62, 60]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families(family, golden):
    factory, protected, tokens = FAMILIES[family]
    model = factory().eval()
    x = image()
    compiled, out, stats = prune(model, (x,), r=2)
    with torch.no_grad():
        reference = model(x)
    if hasattr(reference, "last_hidden_state"):
        reference, out = reference.last_hidden_state, out.last_hidden_state
    assert stats["matches"] == 3 and stats["protected"] == protected and stats["tokens"] == tokens
    assert stats["unmerged"] == [] and stats["flops_removed"] > 0.03
    assert out.shape == reference.shape
    # merging 2 of >= 16 tokens per block moves the output, but stays close to it; a dense
    # output is compared on its class token (merged tokens come back as copies of their group)
    if out.dim() == 3:
        out, reference = out[:, 0], reference[:, 0]
    assert cosine(out, reference) > 0.9
    golden("token_pruning", family, inserted(compiled.graph_module))


def test_dense_output_is_unmerged_to_every_token():
    model = VisionTransformer(**{**SMALL, "num_classes": 0}, global_pool="").eval()
    compiled, out, stats = prune(model, (image(),), r=2)
    assert out.shape == (2, 17, 64)
    assert inserted(compiled.graph_module).count("optcc.token_unmerge") == 3  # back through every merge


def test_bert_padding_never_leaks_into_real_tokens(golden):
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=128)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 9:] = 0
    compiled, out, stats = prune(model, (ids, mask), r=3)
    assert stats["matches"] == 3 and stats["protected"] == 1  # the pooler reads token 0
    other = ids.clone()
    other[1, 9:] = torch.randint(1, 100, (7,))  # change only what the padding hides
    with torch.no_grad():
        again = compiled(other, mask)
    torch.testing.assert_close(again.last_hidden_state[:, :9], out.last_hidden_state[:, :9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.pooler_output, out.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.last_hidden_state[0], out.last_hidden_state[0])
    golden("token_pruning", "transformers_bert_padding", inserted(compiled.graph_module))


def test_topk_on_timm_vit(golden):
    model = VisionTransformer(**SMALL).eval()
    compiled, out, stats = prune(model, (image(),), r=3, method="topk")
    assert stats["tokens"] == [17, 14, 11, 8] and stats["unmerged"] == []
    golden("token_pruning", "timm_vit_topk", inserted(compiled.graph_module))


def test_flops_target_is_met_by_the_smallest_constant_r():
    model = VisionTransformer(**{**SMALL, "depth": 6}).eval()
    _, _, stats = prune(model, (image(),), r={"flops": 0.4})
    r = stats["schedule"][0]
    assert stats["flops_removed"] >= 0.4
    _, _, smaller = prune(model, (image(),), r=r - 1)
    assert smaller["flops_removed"] < 0.4


def test_r_zero_changes_nothing():
    model = VisionTransformer(**SMALL).eval()
    x = image()
    compiled, out, stats = prune(model, (x,), r=0)
    assert stats["matches"] == 0 and "optcc.token" not in graph_text(compiled.graph_module)
    torch.testing.assert_close(out, model(x))


# ----------------------------------------------------------------------------------------
# Left alone, with the reason


class PositionBiasEveryBlock(nn.Module):
    """Adds a learned per-token bias in every block: after a merge that bias has no token to go to."""

    def __init__(self):
        super().__init__()
        self.vit = VisionTransformer(**SMALL)
        self.bias = nn.Parameter(torch.randn(17, 64))

    def forward(self, x):
        v = self.vit
        x = v._pos_embed(v.patch_embed(x))
        for block in v.blocks:
            x = block(x) + self.bias
        return v.forward_head(v.norm(x))


def test_graph_without_attention_is_left_unchanged():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 8)
    compiled, out, stats = prune(model, (x,), r=2)
    assert stats["matches"] == 0 and "no attention" in stats["message"]
    torch.testing.assert_close(out, model(x))


def test_position_dependent_op_leaves_the_graph_unchanged_and_says_where():
    model = PositionBiasEveryBlock().eval()
    x = image()
    before = graph_text(optcc.capture(model, (x,)))
    compiled, out, stats = prune(model, (x,), r=2)
    assert stats["matches"] == 0
    assert "with all 17 tokens" in stats["message"] and "before block 1" in stats["message"]
    assert stats["near_misses"] and stats["near_misses"][0].node
    torch.testing.assert_close(out, model(x))
    assert "optcc.token" not in graph_text(compiled.graph_module) and before.count("\n") > 0


@pytest.mark.parametrize("options,message", [
    ({"method": "random"}, "method must be 'tome' or 'topk'"),
    ({"r": {"flop": 0.5}}, "takes one key, 'flops'"),
    ({"r": {"flops": 1.5}}, "must be a fraction"),
    ({"r": (8, 0.5, 1)}, "is not an int, a list"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(optcc.OptionError, match=message):
        TokenPruning(**options)


# ----------------------------------------------------------------------------------------
# Entry points and export


def test_torch_compile_backend_and_onnx_runtime(tmp_path):
    import onnxruntime

    model = VisionTransformer(**SMALL).eval()
    x = image()
    passes = ["canonicalize_attention", ("token_pruning", {"r": 3})]
    compiled = torch.compile(model, backend="optcc", options={"passes": passes})
    with torch.no_grad():
        dynamo_out = compiled(x)
        expected = tome_forward(model, x, [3, 3, 3])
    torch.testing.assert_close(dynamo_out, expected, rtol=1e-5, atol=1e-5)

    optimized = optcc.compile(model, example_inputs=(x,), passes=passes)
    path = export_onnx(optimized, tmp_path / "tome.onnx", (x,))
    import onnx

    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "ScatterElements" in kinds and not any("optcc" in k for k in kinds)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-4)


VIT_FACTORY = """
import torch
from timm.models.vision_transformer import VisionTransformer

def build():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=10)
    return model.eval(), (torch.randn(2, 3, 32, 32),)
"""


def test_command_line_dump_explain_and_bench(capsys, tmp_path):
    from optcc.cli import main

    path = tmp_path / "vit.py"
    path.write_text(VIT_FACTORY)
    assert main(["dump", f"{path}:build", "--passes", "canonicalize_attention,token_pruning(r=2)"]) == 0
    out, err = capsys.readouterr()
    assert "optcc.tome_plan" in out, err
    assert "tome: 3 of 3 blocks reduce tokens, 17 -> 11" in err
    assert main(["bench", f"{path}:build", "--passes", "token_pruning(r=[4, 4])", "--targets", "eager,optcc-eager",
                 "--runs", "3", "--seconds", "0.01", "--threads", "1"]) == 0
    out, _ = capsys.readouterr()
    assert "optcc-eager vs eager:" in out


def test_causal_attention_is_left_alone():
    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj, self.mlp = nn.Linear(32, 96), nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, c))
            return x + self.mlp(x)

    model = Causal().eval()
    x = torch.randn(2, 12, 32)
    _, out, stats = prune(model, (x,), r=2)
    assert stats["matches"] == 0 and "causal attention: a merged token would see later tokens" in stats["message"]
    torch.testing.assert_close(out, model(x))


class GridDecoder(nn.Module):
    """A dense head as saliency/segmentation models have: the patch tokens (class token
    sliced off) laid out on the patch grid, then convolutions - it needs every patch token."""

    def __init__(self):
        super().__init__()
        self.vit = VisionTransformer(**{**SMALL, "num_classes": 0})
        self.conv = nn.Conv2d(64, 1, 3, padding=1)

    def forward(self, x):
        tokens = self.vit.forward_features(x)[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], 64, 4, 4)
        return self.conv(grid)


class Features(nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)


def test_grid_decoder_reads_the_patch_tokens_unmerged():
    model = GridDecoder().eval()
    x = image()
    compiled, out, stats = prune(model, (x,), r=2)
    assert stats["matches"] == 3 and len(stats["unmerged"]) == 1 and "reshape splits" in stats["unmerged"][0]
    # the decoder sees exactly the dense (unmerged) tokens of the same pruned backbone
    _, dense, _ = prune(Features(model.vit), (x,), r=2)
    with torch.no_grad():
        expected = model.conv(dense[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
