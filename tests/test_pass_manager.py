"""The pass infrastructure: registry, options, ordering, verification and rollback, reports."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import optcc
from optcc.ir import add_constant, get_constant
from optcc.pass_base import make_pass

aten = torch.ops.aten


def small_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


def captured():
    x = torch.randn(1, 3, 6, 6)
    return optcc.capture(small_model(), (x,)), (x,)


def first(gm: fx.GraphModule, target) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target is target)


class DoubleConvWeight(optcc.Pass):
    """Claims to be exact but doubles every conv weight (a broken pass)."""

    name = "double_conv_weight"
    exact = True

    def run(self, gm):
        conv = first(gm, aten.convolution.default)
        new = add_constant(gm, "doubled", get_constant(gm, conv.args[1]) * 2, before=conv)
        conv.replace_input_with(conv.args[1], new)
        return optcc.PassResult(gm, True, {"matches": 1})


class Explode(optcc.Pass):
    """Raises on the first ReLU."""

    name = "explode"

    def run(self, gm):
        raise optcc.PassError("cannot handle this node", node=first(gm, aten.relu.default))


class ScaleOutput(optcc.Pass):
    """An approximate pass: scales the ReLU output by (1 + eps)."""

    name = "scale_output"
    exact = False

    @dataclass
    class Options:
        eps: float = 1e-3
        label: str = "x"

    def run(self, gm):
        relu = first(gm, aten.relu.default)
        with gm.graph.inserting_after(relu):
            scaled = gm.graph.call_function(aten.mul.Tensor, (relu, 1.0 + self.options.eps))
        relu.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        return optcc.PassResult(gm, True, {"matches": 1})


class NeedsScaleFirst(optcc.Pass):
    """Does nothing; must come after scale_output."""

    name = "needs_scale_first"
    run_after = ("scale_output",)

    def run(self, gm):
        return optcc.PassResult(gm, False, {})


def test_registry_lists_bn_reparam_with_its_summary():
    passes = {name: (exact, summary) for name, exact, summary in optcc.list_passes()}
    assert passes["bn_reparam"][0] is True
    assert "BatchNorm" in passes["bn_reparam"][1]
    assert "s_c = gamma_c / sqrt" in optcc.get_pass("bn_reparam").documentation()


def test_default_passes_are_the_exact_ones():
    defaults = optcc.default_passes()
    assert "bn_reparam" in [p.name for p in defaults]
    assert all(p.exact for p in defaults)


def test_unknown_pass_lists_known_ones():
    with pytest.raises(optcc.UnknownPassError, match="unknown pass 'bn_fold'.*known passes: .*bn_reparam"):
        make_pass("bn_fold")


def test_options_are_checked():
    assert ScaleOutput(eps=1).options.eps == 1  # an int is a fine float
    with pytest.raises(optcc.OptionError, match="no option 'epsilon'.*its options: eps, label"):
        ScaleOutput(epsilon=0.1)
    with pytest.raises(optcc.OptionError, match="option 'eps' of pass 'scale_output' must be float, got str"):
        ScaleOutput(eps="big")
    with pytest.raises(optcc.OptionError, match="must be str, got bool"):
        ScaleOutput(label=True)
    with pytest.raises(TypeError, match="a pass is given as a name"):
        make_pass(42)
    assert repr(make_pass(ScaleOutput(eps=0.5))) == "scale_output(eps=0.5)"


def test_ordering_constraints_are_enforced():
    with pytest.raises(optcc.PassOrderError, match="'needs_scale_first' must run after 'scale_output'"):
        optcc.PassManager([NeedsScaleFirst(), ScaleOutput()])
    optcc.PassManager([ScaleOutput(), NeedsScaleFirst()])  # the right order is accepted


def test_broken_exact_pass_is_rolled_back_with_a_warning():
    gm, inputs = captured()
    before = optcc.graph_text(gm)
    manager = optcc.PassManager([DoubleConvWeight(), "bn_reparam"], verify=True, example_inputs=inputs)
    with pytest.warns(UserWarning, match="exact pass 'double_conv_weight' changed the outputs.*rolled back"):
        gm, report = manager.run(gm)
    assert report["double_conv_weight"].status == "rolled back"
    assert report["double_conv_weight"].error > 0.1
    assert report["bn_reparam"].status == "applied"  # the pipeline went on from the rolled-back graph
    assert "doubled" not in optcc.graph_text(gm)
    assert before != optcc.graph_text(gm)


def test_failing_pass_is_reported_with_its_node_and_skipped():
    gm, inputs = captured()
    with pytest.warns(UserWarning, match="pass 'explode' failed at node 'relu'"):
        gm, report = optcc.PassManager([Explode(), "bn_reparam"]).run(gm)
    assert report["explode"].status == "failed"
    assert "relu" in report["explode"].message
    assert report["bn_reparam"].status == "applied"
    with pytest.raises(optcc.PassError):
        optcc.PassManager([Explode()], fail_fast=True).run(captured()[0])


def test_approximate_pass_reports_its_deviation_without_verify():
    gm, inputs = captured()
    gm, report = optcc.PassManager([ScaleOutput(eps=1e-3)], example_inputs=inputs).run(gm)
    assert report["scale_output"].error == pytest.approx(1e-3, rel=1e-3)
    assert report["scale_output"].status == "applied"  # approximate: never rolled back


def test_report_records_op_counts_and_prints():
    gm, inputs = captured()
    _, report = optcc.PassManager(["bn_reparam"], verify=True, example_inputs=inputs).run(gm)
    record = report["bn_reparam"]
    assert record.op_changes()["aten._native_batch_norm_legit_no_training"] == (1, 0)
    assert record.nodes_after < record.nodes_before and record.seconds > 0
    text = str(report)
    assert "bn_reparam" in text and "aten._native_batch_norm_legit_no_training" in text


def test_verify_needs_example_inputs():
    with pytest.raises(ValueError, match="needs example_inputs"):
        optcc.PassManager(["bn_reparam"], verify=True)


class BreakThenRaise(optcc.Pass):
    """Rewires the graph half way, then raises a plain exception (not a PassError)."""

    name = "break_then_raise"

    def run(self, gm):
        conv = first(gm, aten.convolution.default)
        relu = first(gm, aten.relu.default)
        relu.replace_input_with(relu.args[0], conv)  # skips the BatchNorm: wrong if kept
        raise KeyError("lost track of a node")


class DanglingInput(optcc.Pass):
    """Returns a graph that does not lint (an input from a node erased from the graph)."""

    name = "dangling_input"

    def run(self, gm):
        relu = first(gm, aten.relu.default)
        orphan = fx.Graph().placeholder("orphan")
        relu.args = (orphan,)
        return optcc.PassResult(gm, True, {"matches": 1})


def _outputs(gm, inputs):
    with torch.no_grad():
        return list(gm(*inputs))


def test_a_pass_that_raises_after_changing_the_graph_leaves_it_untouched():
    gm, inputs = captured()
    expected = _outputs(gm, inputs)
    with pytest.warns(UserWarning, match="pass 'break_then_raise' failed and was skipped: 'lost track"):
        gm, report = optcc.PassManager([BreakThenRaise(), "bn_reparam"]).run(gm)
    assert report["break_then_raise"].status == "failed"
    assert report["break_then_raise"].message.startswith("KeyError")
    assert report["bn_reparam"].status == "applied"  # the pipeline went on
    assert optcc.pass_manager.output_error(expected, _outputs(gm, inputs)) <= 1e-5


def test_a_pass_that_returns_a_broken_graph_is_reported_and_skipped():
    gm, inputs = captured()
    expected = _outputs(gm, inputs)
    with pytest.warns(UserWarning, match="pass 'dangling_input' failed"):
        gm, report = optcc.PassManager([DanglingInput()]).run(gm)
    assert report["dangling_input"].status == "failed"
    assert optcc.pass_manager.output_error(expected, _outputs(gm, inputs)) == 0.0


def test_without_verify_a_wrong_exact_pass_is_not_rolled_back():
    """verify=False trusts exact passes (this is what differential fuzzing relies on)."""
    gm, inputs = captured()
    expected = _outputs(gm, inputs)
    gm, report = optcc.PassManager([DoubleConvWeight()], verify=False, example_inputs=inputs).run(gm)
    assert report["double_conv_weight"].status == "applied" and report["double_conv_weight"].error is None
    assert optcc.pass_manager.output_error(expected, _outputs(gm, inputs)) > 0.1


def test_compile_with_verify_rolls_back_a_wrong_pass_and_stays_correct():
    model, x = small_model(), torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="exact pass 'double_conv_weight' changed the outputs"):
        compiled = optcc.compile(model, [DoubleConvWeight(), "bn_reparam"], example_inputs=(x,),
                                 target="eager", verify=True)
    assert compiled.report["double_conv_weight"].status == "rolled back"
    assert compiled.report["bn_reparam"].status == "applied"
    with torch.no_grad():
        assert optcc.pass_manager.output_error([model(x)], [compiled(x)]) <= 1e-5
    with pytest.raises(optcc.PassError):
        optcc.compile(model, [Explode()], example_inputs=(x,), target="eager", fail_fast=True)


class MatmulSoftmaxAttention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-1) @ v


def test_a_required_pass_is_added_once_before_the_pass_that_needs_it():
    qkv = tuple(torch.randn(2, 4, 16, 8) for _ in range(3))
    compiled = optcc.compile(MatmulSoftmaxAttention().eval(), ["attention_to_linear"], example_inputs=qkv, target="eager")
    records = compiled.report.records
    assert [r.name.split("(")[0] for r in records] == ["canonicalize_attention", "attention_to_linear"]
    assert records[0].matches == 1 and records[1].matches == 1  # the matmul idiom became SDPA, then linear
    assert "pass 'canonicalize_attention' added before 'attention_to_linear', which requires it" in str(compiled.report)
    named = optcc.compile(MatmulSoftmaxAttention().eval(), ["canonicalize_attention", "token_pruning", "attention_to_linear"],
                          example_inputs=qkv, target="eager")
    assert [r.name.split("(")[0] for r in named.report.records].count("canonicalize_attention") == 1
    assert "added before" not in str(named.report)
