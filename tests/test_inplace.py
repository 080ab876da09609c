"""The eager target's in-place elementwise ops (optcc/inplace.py): used where nothing can
tell, refused on inputs, constants, views, shared values and broadcasts."""

from __future__ import annotations

import torch
import torch.nn as nn
from helpers import SmallConvBN, randomize_bn

import optcc
from optcc.inplace import reinplace
from optcc.pass_manager import output_error

aten = torch.ops.aten


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_activations_after_convs_run_in_place_and_match_eager():
    model, x = randomize_bn(SmallConvBN()).eval(), torch.randn(2, 3, 8, 8)
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager")
    runner = compiled._latest.runner
    assert aten.relu_.default in targets(runner)
    assert aten.relu_.default not in targets(compiled.graph_module)  # what dumps show stays functional
    with torch.no_grad():
        expected = model(x)
        for _ in range(2):  # the constants are never overwritten: a second call is the same
            assert output_error([expected], [compiled(x)]) <= 1e-6


class Cases(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("shift", torch.randn(4, 1, 1))

    def forward(self, x):
        on_input = torch.relu(x)                       # a graph input: never overwritten
        y = self.conv(on_input)
        shared = torch.sigmoid(y) + y                  # y has two readers: sigmoid stays
        view = torch.tanh(shared.view(2, 4, -1))       # a view's base is still alive: stays
        wider = view.sum(-1, keepdim=True) + view      # the [.., 1] sum would need broadcasting: stays
        residual = self.conv(x) + shared               # fresh conv output: add_ on it
        scaled = self.shift * residual                 # a constant first, the temporary second: swapped
        return wider, scaled


def test_only_unobservable_rewrites_are_made():
    model, x = Cases().eval(), torch.randn(2, 3, 8, 8)
    gm = optcc.capture(model, (x,))
    out, count = reinplace(gm)
    by_name = {n.name: n.target for n in out.graph.nodes if n.op == "call_function"}
    assert by_name["relu"] is aten.relu.default
    assert by_name["sigmoid"] is aten.sigmoid.default
    assert by_name["tanh"] is aten.tanh.default
    assert by_name["add_1"] is aten.add.Tensor  # wider: the sum is [.., 1], the view not fresh
    in_place = [n for n in out.graph.nodes if n.op == "call_function" and n.target._schema.is_mutable]
    assert count == len(in_place) and count >= 2
    mul = next(n for n in in_place if n.target is aten.mul_.Tensor)
    assert mul.args[0].op == "call_function"  # the fresh sum, not the constant, is overwritten
    assert all(n.target is not aten.relu.default or n.args[0].op != "placeholder" for n in in_place)
    with torch.no_grad():
        expected = model(x)
        got = out(x)
    assert output_error(list(expected), list(got)) <= 1e-6
    assert targets(gm) != targets(out) and not any(t._schema.is_mutable for t in targets(gm))
