"""A compiled module called from several threads gives every thread the right result,
including when the threads race to build the same new specialisation (one build only)."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import SmallConvBN as ConvNet
from helpers import randomize_bn

import optcc
from optcc import backend
from optcc.pass_manager import output_error

THREADS = 4
CALLS = 3




def run_in_threads(fn, inputs: list) -> list:
    """Call ``fn`` on each input from its own thread, all released at once; re-raise errors."""
    barrier = threading.Barrier(len(inputs))
    results: list = [None] * len(inputs)
    errors: list = []

    def work(i):
        try:
            barrier.wait()
            with torch.no_grad():
                results[i] = [fn(inputs[i]) for _ in range(CALLS)]
        except Exception as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def count_builds(pipeline) -> list:
    builds = []
    original = pipeline.build

    def counting(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    pipeline.build = counting
    return builds


def test_optcc_compile_threads_race_to_a_new_specialisation():
    model = randomize_bn(ConvNet()).eval()
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(torch.randn(1, 3, 8, 8),), target="eager")
    builds = count_builds(compiled.pipeline)
    inputs = [torch.randn(3, 3, 8, 8) for _ in range(THREADS)]  # a new batch size for every thread
    results = run_in_threads(compiled, inputs)
    with torch.no_grad():
        for x, outs in zip(inputs, results):
            expected = model(x)
            assert all(output_error([expected], [out]) <= 1e-5 for out in outs)
    assert len(builds) == 1  # the racing threads waited for one build and shared it


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_torch_compile_backend_called_from_many_threads(fresh_dynamo, monkeypatch):
    from optcc.compiler import Pipeline

    builds = []
    original_build = Pipeline.build
    monkeypatch.setattr(Pipeline, "build", lambda self, *a, **k: builds.append(1) or original_build(self, *a, **k))
    model = randomize_bn(ConvNet()).eval()
    compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"]})
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(THREADS)]
    before = backend.compiled_graphs()
    # dynamo's own tracing is not thread-safe (concurrent first calls can leave torch's
    # global dispatch state broken for the rest of the process), so it traces once here;
    # the threads then race through dynamo's guards into optcc's backend.
    with torch.no_grad():
        compiled(inputs[0])
    results = run_in_threads(compiled, inputs)
    with torch.no_grad():
        for x, outs in zip(inputs, results):
            expected = model(x)
            assert all(output_error([expected], [out]) <= 1e-5 for out in outs)
    graphs = [g for g in backend.compiled_graphs() if not any(g is b for b in before)]
    # dynamo may hand each racing thread a graph of its own; none of them is built twice
    assert graphs and all(len(g.specializations) == 1 for g in graphs)
    assert len(builds) == len(graphs)
