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


def assert_left_alone(model: torch.nn.Module, inputs: tuple, pass_spec, reason: str):
    """The pass (a name or ``(name, options)``) must leave ``model``'s graph untouched and
    say why (``reason``); returns the graph."""
    from optcc.dump import graph_text

    before = graph_text(optcc.capture(model, inputs))
    gm, report, error = run_pipeline(model, inputs, [pass_spec])
    record = report[pass_spec if isinstance(pass_spec, str) else pass_spec[0]]
    assert record.matches == 0 and record.status == "unchanged"
    assert record.stats["missed"] == {reason: 1}
    assert graph_text(gm) == before
    assert error <= 1e-6
    return gm


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.25, 4)
            if m.affine:
                m.weight.data.uniform_(0.25, 2)
                m.bias.data.uniform_(-1, 1)
    return model


def count(gm, op: str) -> int:
    return optcc.op_counts(gm).get(op, 0)


class SmallConvBN(torch.nn.Module):
    """conv -> BN -> relu -> pool -> linear: the small model the guard, shape, thread and
    backend tests share (one BN to fold, weights to change)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


class BackgroundBuild:
    """Ahead-of-time Triton builds in a clean process (no ``TRITON_INTERPRET``, which the
    test session sets): ``script`` runs with ``python -c`` and ``argv``, and writes a JSON
    list to the path given as its last argument. Start it in a module-scoped fixture, so it
    compiles while other tests run; ``results()`` waits for it; ``stop()`` kills it."""

    def __init__(self, directory, script: str, argv: list[str]):
        import os
        import subprocess
        import sys

        self.path = directory / "builds.json"
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        self.process = subprocess.Popen([sys.executable, "-c", script, *argv, str(self.path)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def results(self, timeout: float = 300) -> list:
        import json

        _, stderr = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, stderr[-4000:]
        return json.loads(self.path.read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
