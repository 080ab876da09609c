"""optcc.bench on a tiny model: result structure, interleaving, errors against eager."""

from __future__ import annotations

import pytest
import torch

import optcc.bench
from optcc.bench import BenchResult, Contender, benchmark, calibrate, contention_notes, time_interleaved


def tiny_model():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval(), (torch.randn(1, 3, 16, 16),)


FAST = dict(runs=5, warmup=1, targets=("eager", "optcc-eager"), seconds_per_run=0.01, progress=None)


def test_benchmark_eager_vs_optcc_eager():
    model, inputs = tiny_model()
    result = benchmark(model, inputs, ["bn_reparam"], model_name="tiny", **FAST)
    assert isinstance(result, BenchResult)
    assert [c.name for c in result.contenders] == ["eager", "optcc-eager"]
    assert result.passes == ["bn_reparam"] and result.runs == 5 and result.iterations >= 1
    for c in result.contenders:
        assert len(c.times_ms) == 5 and all(t > 0 for t in c.times_ms)
        assert c.median_ms > 0 and not c.failure
    eager, optimized = result["eager"], result["optcc-eager"]
    assert eager.compile_seconds is None and eager.error is None
    assert optimized.compile_seconds > 0
    assert optimized.error < 1e-5
    assert result.ratio("eager") == 1.0
    from optcc.hardware import cpu

    assert f"CPU {' '.join(cpu().features())}" in result.render(width=200)  # times hold for this ISA only
    assert result.ratio("optcc-eager") == pytest.approx(eager.median_ms / optimized.median_ms)
    assert result.ratio("optcc-eager", "torch.compile") is None  # not timed here

    text = result.render()
    assert "tiny: passes bn_reparam" in text and "vs eager" in text
    assert "vs torch.compile" not in text  # no column for a baseline that did not run
    assert "reference" in text and "optcc-eager vs eager:" in text


def test_benchmark_runs_an_exported_program():
    model, inputs = tiny_model()
    program = torch.export.export(model, inputs)
    result = benchmark(program, inputs, [], **FAST)
    assert result.passes == []
    assert result["optcc-eager"].error < 1e-5


def test_a_failing_contender_is_reported_and_the_rest_still_run(monkeypatch):
    real_build = optcc.bench._build

    def build(name, *args):
        if name == "optcc-eager":
            raise RuntimeError("boom\nsecond line")
        return real_build(name, *args)

    monkeypatch.setattr(optcc.bench, "_build", build)
    model, inputs = tiny_model()
    result = benchmark(model, inputs, ["bn_reparam"], **FAST)
    assert result["optcc-eager"].failure == "RuntimeError: boom"
    assert len(result["eager"].times_ms) == 5
    assert result.ratio("optcc-eager") is None
    assert "failed: RuntimeError: boom" in result.render()


def test_unknown_contender_is_rejected():
    model, inputs = tiny_model()
    with pytest.raises(ValueError, match="unknown contender 'tvm'"):
        benchmark(model, inputs, [], targets=("eager", "tvm"), progress=None)


def test_time_interleaved_rotates_the_order():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = time_interleaved(fns, runs=3, iterations=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert order == list("abc" "bca" "cab")


def test_calibrate_gives_at_least_one_call():
    assert calibrate(lambda: None, 1e-9) == 1
    assert calibrate(lambda: None, 0.01) > 1


def test_contention_notes():
    quiet = BenchResult("m", [], [Contender("eager", [1.0, 1.0, 1.05])], 3, 1, threads=1)
    assert contention_notes(quiet, load=0.0) == []
    busy = BenchResult("m", [], [Contender("eager", [1.0, 2.0, 1.0])], 3, 1, threads=64)
    notes = contention_notes(busy, load=64.0)
    assert any("load average" in n for n in notes) and any("varied by more than 20%" in n for n in notes)
