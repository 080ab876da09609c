"""Compiled modules never run stale folded weights: every way of changing a model's
parameters, buffers, structure or mode is noticed, by optcc.compile and by
torch.compile(backend="optcc") alike (optcc/compile.py StateGuard, optcc/backend.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from helpers import SmallConvBN as Net
from helpers import randomize_bn

import optcc
from optcc.pass_manager import output_error

ENTRY_POINTS = ["optcc.compile", "torch.compile"]




def make_net() -> Net:
    return randomize_bn(Net()).eval()


def compiled_for(entry: str, model: nn.Module, x: torch.Tensor):
    if entry == "optcc.compile":
        return optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager")
    torch._dynamo.reset()
    return torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"]})


def assert_matches(compiled, model, x):
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    assert output_error([expected], [got]) <= 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


def _in_place_weight(model):
    with torch.no_grad():
        model.conv.weight.mul_(2)


def _in_place_buffer(model):
    with torch.no_grad():
        model.bn.running_var.mul_(3)
        model.bn.running_mean.add_(0.5)


def _load_state_dict(model):
    model.load_state_dict(make_net().state_dict())


def _replaced_parameter(model):
    model.bn.weight = nn.Parameter(torch.rand(8) + 0.5)


def _replaced_submodule(model):
    model.bn = randomize_bn(nn.BatchNorm2d(8)).eval()


def _data_assignment(model):
    model.conv.weight.data = torch.randn_like(model.conv.weight)  # no version bump


def _replaced_buffer(model):
    model.bn.running_mean = torch.randn(8)


MUTATIONS = {f.__name__.lstrip("_"): f for f in (
    _in_place_weight, _in_place_buffer, _load_state_dict, _replaced_parameter, _replaced_submodule,
    _data_assignment, _replaced_buffer)}


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_changed_weights_are_never_served_stale(entry, mutation):
    model, x = make_net(), torch.randn(2, 3, 8, 8)
    compiled = compiled_for(entry, model, x)
    assert_matches(compiled, model, x)
    with torch.no_grad():
        before = model(x)
    MUTATIONS[mutation](model)
    with torch.no_grad():
        assert output_error([before], [model(x)]) > 1e-3  # the change matters to the output
    assert_matches(compiled, model, x)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_eval_train_eval(entry):
    model, x = make_net(), torch.randn(4, 3, 8, 8)
    compiled = compiled_for(entry, model, x)
    assert_matches(compiled, model, x)
    stats_before = model.bn.running_mean.clone()

    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "training mode" / "mutates its buffers" warnings
        train_out = compiled(x)
    expected_train = model(x)  # batch statistics; this eager call updates the running statistics
    assert output_error([expected_train], [train_out]) <= 1e-5
    assert not torch.equal(model.bn.running_mean, stats_before)

    model.eval()
    assert_matches(compiled, model, x)  # folded with the *updated* statistics


def test_guard_notices_added_and_deleted_entries():
    from optcc.compile import StateGuard

    model = make_net()
    guard = StateGuard(model)
    assert not guard.changed()
    model.register_buffer("extra", torch.zeros(1))
    assert guard.changed()
    guard.snapshot()
    del model.extra
    assert guard.changed()
    guard.snapshot()
    model.head.to(torch.float64)  # a dtype change swaps the storage without a version bump
    assert guard.changed()


def test_unchanged_model_reuses_its_specialisation():
    model, x = make_net(), torch.randn(2, 3, 8, 8)
    compiled = compiled_for("optcc.compile", model, x)
    first = compiled.graph_module
    for _ in range(3):
        compiled(x)
    assert compiled.graph_module is first and len(compiled.pipeline.cache) == 1


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unguarded_module_keeps_its_build_until_refreshed(entry):
    """guard=False is a promise that the model will not change: the check is skipped.

    The stale output after a change is the documented contract (as with timm's
    reparameterize_model); refresh() (or, inside torch.compile, a new input signature)
    rebuilds from the model as it is now.
    """
    model, x = make_net(), torch.randn(2, 3, 8, 8)
    if entry == "optcc.compile":
        compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager", guard=False)
    else:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"], "guard": False})
    with torch.no_grad():
        before = compiled(x)
        _in_place_weight(model)
        assert output_error([before], [model(x)]) > 1e-3
        assert torch.equal(compiled(x), before)  # not checked, so not rebuilt
    if entry == "optcc.compile":
        compiled.refresh()
        assert_matches(compiled, model, x)
