"""Small helpers the pass tests share."""

from __future__ import annotations

import torch

import optcc
from optcc.pass_manager import output_error


def run_pipeline(model: torch.nn.Module, inputs: tuple, passes: list):
    """Capture ``model``, run ``passes`` with verification; return (graph, report, error vs eager)."""
    gm = optcc.capture(model, inputs)
    gm, report = optcc.PassManager(passes, verify=True, example_inputs=inputs, fail_fast=True).run(gm)
    with torch.no_grad():
        expected = model(*inputs)
        got = gm(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return gm, report, output_error(expected, got)


def count(gm, op: str) -> int:
    return optcc.op_counts(gm).get(op, 0)
