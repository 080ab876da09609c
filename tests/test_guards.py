"""Compiled modules never run stale folded weights: every way of changing a model's
parameters, buffers, structure or mode is noticed, by optcc.compile and by
torch.compile(backend="optcc") alike (optcc/guard.py, optcc/backend.py)."""

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


def _buffer_written_into_its_dict(model):
    # what Module._apply (.to(), .half()) does with buffers: no registration hook runs
    model.bn._buffers["running_var"] = model.bn.running_var * 3


MUTATIONS = {f.__name__.lstrip("_"): f for f in (
    _in_place_weight, _in_place_buffer, _load_state_dict, _replaced_parameter, _replaced_submodule,
    _data_assignment, _replaced_buffer, _buffer_written_into_its_dict)}


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
    from optcc.guard import StateGuard

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


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_full_guard_sees_every_change_too(mutation):
    model, x = make_net(), torch.randn(2, 3, 8, 8)
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager", guard="full")
    assert_matches(compiled, model, x)
    MUTATIONS[mutation](model)
    assert_matches(compiled, model, x)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2)})

    def forward(self, x):
        x = self.layers(x)
        return [head(x) for head in self.heads.values()]


CONTAINER_EDITS = {
    "del_item": lambda m: m.layers.__delitem__(3),  # replaces the Sequential's child dict
    "insert": lambda m: m.layers.insert(1, nn.Linear(4, 4)),  # writes into it directly
    "moduledict_pop": lambda m: (m.heads.update({"b": nn.Linear(4, 3)}), m.heads.pop("a")),
    "moduledict_clear_and_refill": lambda m: (m.heads.clear(), m.heads.update({"c": nn.Linear(4, 2)})),
}


@pytest.mark.parametrize("edit", CONTAINER_EDITS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_edited_containers_are_never_served_stale(entry, edit):
    model, x = Stack().eval(), torch.randn(3, 4)
    compiled = compiled_for(entry, model, x)
    with torch.no_grad():
        before = model(x)
        assert [output_error([a], [b]) for a, b in zip(before, compiled(x))] == [0.0] * len(before)
        CONTAINER_EDITS[edit](model)
        expected, got = model(x), compiled(x)
    assert len(expected) == len(got)
    assert all(e.shape == g.shape and output_error([e], [g]) <= 1e-5 for e, g in zip(expected, got))


def test_default_guard_walks_the_model_only_after_an_event(monkeypatch):
    """The per-call check touches only what the graph read; the whole model is compared
    only after a registration, a train()/eval() call or a deletion moved the generation."""
    from optcc import guard as guards

    model, x = make_net(), torch.randn(2, 3, 8, 8)
    compiled = compiled_for("optcc.compile", model, x)
    compiled(x)
    walks = []
    original = guards._FullSnapshot.changed
    monkeypatch.setattr(guards._FullSnapshot, "changed", lambda self: walks.append(1) or original(self))
    first = compiled.graph_module
    for _ in range(5):
        compiled(x)
    assert walks == []
    nn.Linear(3, 3)  # an unrelated registration anywhere moves the generation ...
    compiled(x)
    assert len(walks) == 1 and compiled.graph_module is first  # ... one walk finds nothing, no rebuild
    model.train()
    model.eval()  # back to the mode the graph was built in
    compiled(x)
    compiled(x)
    assert len(walks) == 2 and compiled.graph_module is first


def test_default_guard_watches_only_what_the_graph_read():
    model, x = make_net(), torch.randn(2, 3, 8, 8)
    compiled = compiled_for("optcc.compile", model, x)
    every = len(list(model.parameters())) + len(list(model.buffers()))
    # conv weight+bias, bn weight/bias/mean/var, head weight+bias; not num_batches_tracked
    assert compiled.guard.watched == every - 1 == 8
    first = compiled.graph_module
    model.bn.num_batches_tracked.add_(1)  # eval BatchNorm does not read it
    compiled(x)
    assert compiled.graph_module is first
    _in_place_weight(model)
    assert_matches(compiled, model, x)
    assert compiled.graph_module is not first


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_full_guard_sees_a_training_flag_assigned_directly(entry):
    """model.bn.training = True (not model.train()) calls no hook: guard="full" compares
    every module's flag on every call (the default does not, docs/guarantees.md)."""
    model, x = make_net(), torch.randn(4, 3, 8, 8)
    if entry == "optcc.compile":
        compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager", guard="full")
    else:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"], "guard": "full"})
    assert_matches(compiled, model, x)
    model.bn.training = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_out = compiled(x)
    expected_train = model(x)  # batch statistics; updates the running statistics
    assert output_error([expected_train], [train_out]) <= 1e-5
    model.bn.training = False
    assert_matches(compiled, model, x)  # folded with the updated statistics


def test_swapped_tensor_is_never_served_stale():
    """torch.utils.swap_tensors keeps the Python object and gives it another TensorImpl
    (whose version counter may well be lower). Only through torch.compile: torch.export
    leaves a weak reference on the parameters it traced, and swap_tensors refuses those."""
    model, x = make_net(), torch.randn(2, 3, 8, 8)
    compiled = compiled_for("torch.compile", model, x)
    assert_matches(compiled, model, x)
    torch.utils.swap_tensors(model.conv.weight, nn.Parameter(torch.randn_like(model.conv.weight)))
    assert_matches(compiled, model, x)


def test_bad_guard_value_is_refused():
    model, x = make_net(), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="guard"):
        optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager", guard="fast")
