"""torch.compile(model, backend="optcc"): outputs equal eager on real architectures, the
graph really goes through optcc's passes, new batch sizes and weight updates are handled,
bad options are refused (optcc/backend.py)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn
from helpers import SmallConvBN as ConvBN
from test_capture import MODELS, build, main_output, randomize_bn

import optcc
from optcc import backend
from optcc.pass_manager import output_error

BN = "aten._native_batch_norm_legit_no_training"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def new_graphs(before: list) -> list:
    """The backend's compiled graphs that appeared since ``before = compiled_graphs()``."""
    return [g for g in backend.compiled_graphs() if not any(g is b for b in before)]


def reports(graphs) -> list:
    return [entry.report for g in graphs for entry in g.specializations]


def run(fn, args, kwargs):
    with torch.no_grad():
        return main_output(fn(*args, **kwargs))


PASSES = {"default": None, "bn_reparam": {"passes": ["bn_reparam"]}}
CASES = [
    pytest.param(name, options, marks=pytest.mark.slow, id=f"{name}-{options}")
    for name in MODELS
    for options in PASSES
    # every model with bn_reparam; the default pipeline on one model of each family
    if options == "bn_reparam" or name in ("repvgg_a0", "bert", "gpt2")
]


@pytest.mark.parametrize("name, options", CASES)
def test_outputs_equal_eager(name, options):
    model, args, kwargs = build(name)
    expected = run(model, args, kwargs)
    before = backend.compiled_graphs()
    compiled = torch.compile(model, backend="optcc", options=PASSES[options])
    got = run(compiled, args, kwargs)
    assert output_error([expected], [got]) <= 1e-5
    graphs = new_graphs(before)
    assert graphs, "dynamo did not call the optcc backend"
    records = [r for rep in reports(graphs) for r in rep.records]
    assert records and all(r.status in ("applied", "unchanged") for r in records)
    if BN in MODELS[name][1]:  # the convnets: BatchNorm folded inside torch.compile
        initial = sum(rep.initial_ops.get(BN, 0) for rep in reports(graphs))
        assert initial == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        # every BatchNorm folded, RepVGG's identity-branch ones by merging the branches
        assert sum(rep.final_ops.get(BN, 0) for rep in reports(graphs)) == 0


@pytest.mark.slow
def test_new_batch_size_and_in_place_weight_update_on_repvgg():
    model, (x,), _ = build("repvgg_a0")
    compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"]})
    # batch 2 makes dynamo recompile with a symbolic batch size (a SymInt graph input)
    for xb in (x, torch.randn(2, 3, 64, 64)):
        assert output_error([run(model, (xb,), {})], [run(compiled, (xb,), {})]) <= 1e-5
    with torch.no_grad():  # both are folded away by bn_reparam: stale copies would show
        model.stem.conv_kxk.conv.weight.mul_(2)
        model.stages[1][0].conv_kxk.bn.running_var.mul_(3)
    assert output_error([run(model, (xb,), {})], [run(compiled, (xb,), {})]) <= 1e-5


# ----------------------------------------------------------------------------------------
# Mechanics on a small conv+BN model (fast)




def small():
    torch.manual_seed(0)
    return randomize_bn(ConvBN()).eval()


def test_the_backend_runs_optcc_passes():
    model, x = small(), torch.randn(2, 3, 8, 8)
    before = backend.compiled_graphs()
    compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"]})
    assert output_error([run(model, (x,), {})], [run(compiled, (x,), {})]) <= 1e-5
    (graph,) = new_graphs(before)
    (entry,) = graph.specializations
    assert entry.report["bn_reparam"].status == "applied" and entry.report["bn_reparam"].matches == 1
    assert optcc.op_counts(entry.graph_module).get(BN, 0) == 0
    # parameters and buffers were frozen: only the image is a graph input
    assert [n.op for n in entry.graph_module.graph.nodes].count("placeholder") == 1


def test_passes_empty_list_runs_the_captured_graph_unchanged():
    model, x = small(), torch.randn(2, 3, 8, 8)
    before = backend.compiled_graphs()
    compiled = torch.compile(model, backend="optcc", options={"passes": []})
    assert output_error([run(model, (x,), {})], [run(compiled, (x,), {})]) <= 1e-6
    (graph,) = new_graphs(before)
    assert optcc.op_counts(graph.specializations[0].graph_module)[BN] == 1


def test_in_place_updates_and_replaced_parameters_are_seen():
    model, x = small(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"]})
    run(compiled, (x,), {})
    with torch.no_grad():
        model.conv.weight.mul_(2)  # folded into the conv: a stale copy would show
    assert output_error([run(model, (x,), {})], [run(compiled, (x,), {})]) <= 1e-5
    with torch.no_grad():
        model.bn.running_mean.add_(0.5)  # a buffer, folded into the conv's bias
        model.bn.weight.mul_(-1)
    assert output_error([run(model, (x,), {})], [run(compiled, (x,), {})]) <= 1e-5
    model.head.weight = nn.Parameter(torch.randn_like(model.head.weight))  # replaced object
    assert output_error([run(model, (x,), {})], [run(compiled, (x,), {})]) <= 1e-5


def test_second_batch_size_and_back():
    model = small()
    compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"]})
    for b in (1, 4, 2, 1):
        x = torch.randn(b, 3, 8, 8)
        assert output_error([run(model, (x,), {})], [run(compiled, (x,), {})]) <= 1e-5


def test_inductor_target():
    model, x = small(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"], "target": "inductor"})
    assert output_error([run(model, (x,), {})], [run(compiled, (x,), {})]) <= 1e-5


@pytest.mark.parametrize("options, error", [
    ({"pases": ["bn_reparam"]}, r"unknown optcc backend option\(s\) \['pases'\]"),
    ({"passes": ["no_such_pass"]}, "no_such_pass"),
    ({"target": "tpu"}, "unknown target 'tpu'"),
    ({"target": "auto"}, "explicitly"),
])
def test_bad_options_raise_a_clear_error(options, error):
    compiled = torch.compile(small(), backend="optcc", options=options)
    # dynamo calls the backend on the first call and re-raises its error
    with pytest.raises(Exception, match=error):
        compiled(torch.randn(1, 3, 8, 8))


def test_compiled_graphs_are_released_with_dynamo():
    model = small()
    compiled = torch.compile(model, backend="optcc")
    run(compiled, (torch.randn(1, 3, 8, 8),), {})
    assert backend.compiled_graphs()
    del compiled
    torch._dynamo.reset()
    gc.collect()
    assert not backend.compiled_graphs()


# ----------------------------------------------------------------------------------------
# Dynamo graphs that torch.export cannot re-trace run unoptimized, with a warning


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.linear, x, use_reentrant=False).relu()


class Autocast(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.linear(x)
        return y.float() + 1


@pytest.mark.parametrize("model_cls, cause", [
    (Checkpointed, "tag_activation_checkpoint"),
    (Autocast, "dtype mismatch"),
])
def test_graph_that_cannot_be_captured_runs_unoptimized(model_cls, cause):
    torch.manual_seed(0)
    model, x = model_cls().eval(), torch.randn(2, 4)
    before = backend.compiled_graphs()
    compiled = torch.compile(model, backend="optcc")
    with pytest.warns(UserWarning, match=f"optcc: torch.export could not trace.*{cause}"):
        got = run(compiled, (x,), {})
    assert torch.equal(got, run(model, (x,), {}))
    (graph,) = new_graphs(before)
    (entry,) = graph.specializations
    assert entry.graph_module is None and "capture failed" in entry.report.notes[0]
    torch._dynamo.reset()
    strict = torch.compile(model, backend="optcc", options={"fail_fast": True})
    with pytest.raises(Exception, match=cause):
        run(strict, (x,), {})
