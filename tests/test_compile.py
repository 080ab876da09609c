"""optcc.compile: targets, specialisation on new shapes, guards against stale folded weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import count, randomize_bn

import optcc
from optcc.lowering import LoweringNotAvailable

BN_OP = "aten._native_batch_norm_legit_no_training"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x, *, scale=None):
        y = self.bn(self.conv(x)).relu().mean((2, 3))
        out = self.head(y)
        return {"logits": out * scale if scale is not None else out, "features": y}


def make_net():
    return randomize_bn(Net()).eval()


def assert_same(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_eager_target_keeps_output_structure_and_kwargs():
    model, x, scale = make_net(), torch.randn(2, 3, 8, 8), torch.tensor(3.0)
    compiled = optcc.compile(model, example_inputs=(x,), example_kwargs={"scale": scale}, target="eager")
    assert count(compiled.graph_module, BN_OP) == 0  # default passes include bn_reparam
    with torch.no_grad():
        assert_same(compiled(x, scale=scale), model(x, scale=scale))


def test_no_passes_runs_the_captured_graph():
    model, x = make_net(), torch.randn(1, 3, 8, 8)
    compiled = optcc.compile(model, passes=[], example_inputs=(x,), target="eager")
    assert count(compiled.graph_module, BN_OP) == 1
    assert compiled.report.records == []


def test_inductor_target_matches_eager():
    model, x = make_net(), torch.randn(2, 3, 8, 8)
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="inductor")
    with torch.no_grad():
        assert_same(compiled(x), model(x))
    assert "target: inductor" in str(compiled.report)


def test_targets_are_checked(monkeypatch):
    model, x = make_net(), torch.randn(1, 3, 8, 8)
    with pytest.raises(optcc.TargetError, match="unknown target 'gpu'; choose one of: auto, eager, inductor, triton"):
        optcc.compile(model, example_inputs=(x,), target="gpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors and no interpreter: nothing can run the kernels
    with pytest.raises(LoweringNotAvailable, match="target='triton' runs generated kernels on CUDA tensors.*"
                                                   "target='inductor'"):
        optcc.compile(model, example_inputs=(x,), target="triton")


def test_new_batch_size_builds_a_new_specialisation():
    model = make_net()
    compiled = optcc.compile(model, example_inputs=(torch.randn(2, 3, 8, 8),), target="eager")
    for shape in [(5, 3, 8, 8), (1, 3, 12, 12), (2, 3, 8, 8)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert_same(compiled(x)["logits"], model(x)["logits"])
    assert len(compiled.pipeline.cache) == 3


def test_weight_updates_are_never_served_stale():
    model, x = make_net(), torch.randn(2, 3, 8, 8)
    compiled = optcc.compile(model, example_inputs=(x,), target="eager")
    with torch.no_grad():
        model.bn.running_var.mul_(4)  # in-place update of a folded buffer
        assert_same(compiled(x)["logits"], model(x)["logits"])
        model.load_state_dict(make_net().state_dict())
        assert_same(compiled(x)["logits"], model(x)["logits"])


def test_eval_train_eval_does_not_reuse_stale_weights():
    model, x = make_net(), torch.randn(4, 3, 8, 8)
    compiled = optcc.compile(model, example_inputs=(x,), target="eager")
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        train_out = compiled(x)["logits"]  # batch statistics, BN not folded, running stats not updated
    model.train()
    expected_train = model(x)["logits"]  # this eager call updates the running statistics
    assert_same(train_out, expected_train)
    model.eval()
    with torch.no_grad():
        assert_same(compiled(x)["logits"], model(x)["logits"])  # folded with the *new* statistics


def test_exported_program_compiles_without_example_inputs(tmp_path):
    model, x = make_net(), torch.randn(1, 3, 8, 8)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    compiled = optcc.compile(torch.export.load(path), ["bn_reparam"], example_inputs=None, target="eager")
    assert count(compiled.graph_module, BN_OP) == 0
    with torch.no_grad():
        assert_same(compiled(x)["logits"], model(x)["logits"])


def test_unknown_pass_fails_before_any_work():
    with pytest.raises(optcc.UnknownPassError, match="known passes"):
        optcc.compile(make_net(), ["nope"], example_inputs=(torch.randn(1, 3, 8, 8),))


def test_public_names_resolve_from_the_package():
    """``optcc.compile`` is the function (the module is ``optcc.compiler``) and the errors
    users catch are exported at the top."""
    import inspect

    import optcc

    assert inspect.isfunction(optcc.compile) and optcc.compile.__module__ == "optcc.compiler"
    for name in ("InputMismatchError", "TargetError", "CaptureError", "PassOrderError", "OptionError", "OnnxError"):
        assert issubclass(getattr(optcc, name), Exception), name
