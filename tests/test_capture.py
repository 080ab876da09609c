"""optcc.capture on real architectures: the canonical IR's contract (optcc/ir.py).

For each model (timm convnets and ViTs, transformers BERT / ViT / GPT-2 built from small
configs): the graph's only placeholders are the user's inputs, parameters and buffers
are frozen *copies* read with get_attr, every call_function node has meta["val"], the
ops passes match on survive, and the graph computes what the model computes. Plus the
edge cases of the calling convention (kwargs, int/bool inputs, dict outputs, lifted
constants, non-persistent buffers, torch.cond) and models that cannot be captured.

The model factories here are shared with tests/test_backend.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import optcc
from optcc import ir
from optcc.pass_manager import output_error

BN = "aten._native_batch_norm_legit_no_training"
CONV = "aten.convolution"
LINEAR = "aten.linear"
LAYER_NORM = "aten.layer_norm"
SDPA = "aten.scaled_dot_product_attention"
SOFTMAX = "aten.softmax.int"
GELU = "aten.gelu"


# ----------------------------------------------------------------------------------------
# Models: (model, args, kwargs) from small inputs; shared with test_backend.py


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics (timm initialises mean 0, var 1: folding would be
    nearly the identity), mild enough that a 50-layer network stays well scaled."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) * 1.0 + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
    return model


def _timm(name: str, size: int, **kwargs):
    import timm

    model = randomize_bn(timm.create_model(name, pretrained=False, **kwargs)).eval()
    return model, (torch.randn(1, 3, size, size),), {}


def _tokens(vocab: int, length: int = 16):
    return torch.randint(0, vocab, (1, length))


def _bert(attn_implementation: str):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64,
                        attn_implementation=attn_implementation)
    model = BertModel(config).eval()
    attention_mask = torch.ones(1, 16, dtype=torch.long)
    attention_mask[0, 12:] = 0  # padding: the mask really masks something
    return model, (), {"input_ids": _tokens(1000), "attention_mask": attention_mask}


def _hf_vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8)
    return ViTModel(config).eval(), (torch.randn(1, 3, 32, 32),), {}


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return GPT2Model(config).eval(), (_tokens(1000),), {}


# name -> (factory, ops the canonical graph must contain)
MODELS = {
    "resnet50": (lambda: _timm("resnet50", 64), {CONV, BN, LINEAR}),
    "efficientnet_lite0": (lambda: _timm("efficientnet_lite0", 64), {CONV, BN, LINEAR}),
    "repvgg_a0": (lambda: _timm("repvgg_a0", 64), {CONV, BN, LINEAR}),
    "vit_small_patch16_224": (lambda: _timm("vit_small_patch16_224", 224), {CONV, LINEAR, LAYER_NORM, SDPA, GELU}),
    "deit_tiny_patch16_224": (lambda: _timm("deit_tiny_patch16_224", 224), {CONV, LINEAR, LAYER_NORM, SDPA, GELU}),
    "bert": (lambda: _bert("sdpa"), {LINEAR, LAYER_NORM, SDPA, GELU}),
    # attention written out as matmul + softmax: the other idiom passes must see
    "bert_eager_attention": (lambda: _bert("eager"), {LINEAR, LAYER_NORM, SOFTMAX, GELU}),
    "hf_vit": (_hf_vit, {CONV, LINEAR, LAYER_NORM, SDPA, GELU}),
    # GPT-2 writes its projections as Conv1D (addmm) and its GELU as the tanh formula
    "gpt2": (_gpt2, {"aten.addmm", LAYER_NORM, SDPA}),
}

CONVNETS = ("resnet50", "efficientnet_lite0", "repvgg_a0")
MODEL_PARAMS = [pytest.param(name, marks=pytest.mark.slow) for name in MODELS]


def build(name: str):
    """A fresh ``(model, args, kwargs)`` (seeded: the same every time)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODELS[name][0]()


def main_output(output):
    """The tensor to compare: the model's output, or last_hidden_state of a ModelOutput."""
    return output if isinstance(output, torch.Tensor) else output.last_hidden_state


def run_captured(gm, args, kwargs):
    with torch.no_grad():
        return ir.unflatten_outputs(gm, gm(*ir.flat_inputs(gm, args, kwargs)))


# Capturing is the slow part (2-3 s a model on 2 cores): each model is captured once
# per test session, and the tests below check different properties of that one capture.
_CAPTURED: dict[str, tuple] = {}


def captured(name: str):
    if name not in _CAPTURED:
        model, args, kwargs = build(name)
        gm = optcc.capture(model, args, kwargs)
        with torch.no_grad():
            expected = model(*args, **kwargs)
        _CAPTURED[name] = (model, args, kwargs, gm, expected)
    return _CAPTURED[name]


# ----------------------------------------------------------------------------------------
# The contract, model by model


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_outputs_match_the_model(name):
    model, args, kwargs, gm, expected = captured(name)
    got = run_captured(gm, args, kwargs)
    assert type(got) is type(expected)  # ModelOutput comes back as a ModelOutput
    assert output_error([main_output(expected)], [main_output(got)]) <= 1e-5


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_placeholders_are_the_user_inputs_and_state_is_frozen(name):
    model, args, kwargs, gm, _ = captured(name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = ir.flat_inputs(gm, args, kwargs)
    assert len(placeholders) == len(flat)
    for node, value in zip(placeholders, flat):
        assert node.meta["val"].shape == value.shape and node.meta["val"].dtype == value.dtype
    # every parameter and buffer of the model is now a get_attr constant ...
    constants = [ir.get_constant(gm, n) for n in gm.graph.nodes if n.op == "get_attr"]
    assert all(isinstance(c, torch.Tensor) for c in constants)
    assert sum(c.numel() for c in constants) >= sum(p.numel() for p in model.parameters())
    # ... holding its own copy of the data
    model_storage = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not model_storage & {c.untyped_storage().data_ptr() for c in constants}
    assert not any(c.requires_grad for c in constants)


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_every_call_function_has_a_fake_value(name):
    *_, gm, _ = captured(name)
    missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    assert not missing
    # and shape propagation keeps it that way (the pass manager re-runs it after each pass)
    ir.refresh_meta(gm)
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_kept_ops_survive(name):
    model, *_, gm, _ = captured(name)
    counts = optcc.op_counts(gm)
    required = MODELS[name][1]
    missing = {op for op in required if counts.get(op, 0) == 0}
    assert not missing, f"{name}: {sorted(missing)} decomposed away; ops: {sorted(counts)}"
    if BN in required:  # one kept batch_norm per BatchNorm module, none decomposed
        n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert counts[BN] == n_bn
        assert not counts.get("aten._native_batch_norm_legit_functional")
    if CONV in required:
        n_conv = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        assert counts[CONV] == n_conv
    # the composites that would otherwise hide inside them were not produced instead
    assert not counts.get("aten.native_layer_norm")
    assert not counts.get("aten._softmax")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in ("resnet50", "bert")])
def test_constants_are_copies_of_the_weights(name):
    model, args, kwargs, gm, expected = captured(name)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)
            changed = model(*args, **kwargs)
        assert output_error([main_output(expected)], [main_output(changed)]) > 1e-2
        got = run_captured(gm, args, kwargs)
        assert output_error([main_output(expected)], [main_output(got)]) <= 1e-5
    finally:
        model.load_state_dict(saved)


def test_model_state_is_not_touched_by_capture():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    args, kwargs = (torch.randn(1, 3, 8, 8),), {}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = optcc.capture(model, args)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training
    assert torch.allclose(run_captured(gm, args, kwargs)[0], model(*args))


# ----------------------------------------------------------------------------------------
# The calling convention


class Mixed(nn.Module):
    """kwargs, an int, a bool and a float input; a non-persistent buffer, a plain tensor
    attribute and a tensor created in forward (lifted constants); dict + tuple outputs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("offset", torch.linspace(-1, 1, 4), persistent=False)
        self.table = torch.arange(4.0)

    def forward(self, x, n: int, flag: bool, scale: float = 1.0, *, mask=None):
        y = self.linear(x) * scale + self.offset + self.table + torch.tensor([1.0, 2.0, 3.0, 4.0])
        if flag:
            y = y * n
        if mask is not None:
            y = y.masked_fill(~mask, 0.0)
        return {"y": y, "index": y.argmax(-1), "pair": (y.sum(), n)}


def test_kwargs_scalars_lifted_constants_and_dict_outputs():
    model = Mixed().eval()
    x, mask = torch.randn(2, 4), torch.rand(2, 4) > 0.5
    args, kwargs = (x, 3, True, 2.0), {"mask": mask}
    gm = optcc.capture(model, args, kwargs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == ["x", "n", "flag", "scale", "mask"]
    assert all(n.op != "call_function" or "val" in n.meta for n in gm.graph.nodes)
    got, expected = run_captured(gm, args, kwargs), model(*args, **kwargs)
    assert set(got) == {"y", "index", "pair"}
    assert torch.allclose(got["y"], expected["y"]) and torch.equal(got["index"], expected["index"])
    assert torch.allclose(got["pair"][0], expected["pair"][0]) and got["pair"][1] == 3
    # the buffer, the attribute and the literal are frozen copies too
    with torch.no_grad():
        model.offset.add_(10)
        model.table.add_(10)
    assert torch.allclose(run_captured(gm, args, kwargs)["y"], got["y"])


@pytest.mark.slow
def test_kwargs_in_another_order_reach_the_right_inputs():
    model, args, kwargs, gm, expected = captured("bert")
    reordered = dict(reversed(list(kwargs.items())))
    assert list(reordered) != list(kwargs)
    got = run_captured(gm, args, reordered)
    assert output_error([expected.last_hidden_state], [got.last_hidden_state]) <= 1e-5
    with pytest.raises(TypeError, match="structure"):
        ir.flat_inputs(gm, args, {"input_ids": kwargs["input_ids"]})


def test_torch_cond_branches_are_carried_into_the_graph():
    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda t: self.linear(t), lambda t: t - 1, (x,))

    model = Cond().eval()
    x = torch.randn(2, 4)
    gm = optcc.capture(model, (x,))
    assert optcc.op_counts(gm)["cond"] == 1
    assert all(n.op != "call_function" or "val" in n.meta for n in gm.graph.nodes)
    ir.refresh_meta(gm)
    with torch.no_grad():
        for sample in (x.abs(), -x.abs()):  # both branches
            assert torch.allclose(gm(sample)[0], model(sample))


# ----------------------------------------------------------------------------------------
# Models that cannot be captured


class BranchOnValue(nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:
            return x * 2
        return x - 1


class CallsNumpy(nn.Module):
    def forward(self, x):
        return torch.from_numpy(np.tanh(x.numpy())) + 1


@pytest.mark.parametrize("model_cls, names", [
    (BranchOnValue, [".item()", "data-dependent", "test_capture.py", "x.sum().item() > 0"]),
    (CallsNumpy, [".numpy()", "test_capture.py", "np.tanh"]),
])
def test_uncapturable_model_raises_capture_error_naming_the_cause(model_cls, names):
    with pytest.raises(optcc.CaptureError) as info:
        optcc.capture(model_cls(), (torch.randn(2, 3),))
    message = str(info.value)
    for part in names:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("model_cls", [BranchOnValue, CallsNumpy])
def test_compile_falls_back_to_eager_when_capture_fails(model_cls):
    model, x = model_cls().eval(), torch.randn(2, 3)
    with pytest.warns(UserWarning, match="running the model eagerly"):
        compiled = optcc.compile(model, example_inputs=(x,), target="eager")
    assert compiled.graph_module is None
    assert any("capture failed" in note for note in compiled.report.notes)
    for sample in (x, -x.abs(), x.abs()):
        assert torch.equal(compiled(sample), model(sample))
    with pytest.raises(optcc.CaptureError):
        optcc.compile(model, example_inputs=(x,), target="eager", fail_fast=True)
