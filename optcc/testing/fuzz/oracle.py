"""The oracle: every exact pass, and the default pipeline, against eager PyTorch."""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings

import optcc
from optcc.compiler import default_passes
from optcc.pass_base import registered_passes
from optcc.pass_manager import PassManager, output_error, snapshot

from .strategies import model_specs
from .vocabulary import ModelSpec, build_model

# ----------------------------------------------------------------------------------------
# The differential check


@dataclass
class FuzzStats:
    """Counters a test session prints at the end (see tests/conftest.py)."""

    examples: int = 0
    pass_runs: int = 0
    triton_runs: int = 0  # models whose default-pipeline graph also ran as Triton kernels
    settled_in_float64: int = 0  # fp32 differences of ill-conditioned models, exact in float64
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    blocks: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, spec: ModelSpec, pass_runs: int, seconds: float, cpu_seconds: float) -> None:
        with self.lock:
            self.examples += 1
            self.pass_runs += pass_runs
            self.seconds += seconds
            self.cpu_seconds += cpu_seconds
            for b in spec.blocks:
                name = f"attention:{b.idiom}" if b.kind == "attention" else b.kind
                self.blocks[name] = self.blocks.get(name, 0) + 1


    def merge(self, other: dict) -> None:
        with self.lock:
            self.examples += other["examples"]
            self.pass_runs += other["pass_runs"]
            self.triton_runs += other.get("triton_runs", 0)
            self.settled_in_float64 += other.get("settled_in_float64", 0)
            self.seconds += other["seconds"]
            self.cpu_seconds += other["cpu_seconds"]
            for name, n in other["blocks"].items():
                self.blocks[name] = self.blocks.get(name, 0) + n

    def as_dict(self) -> dict:
        return {"examples": self.examples, "pass_runs": self.pass_runs, "triton_runs": self.triton_runs,
                "settled_in_float64": self.settled_in_float64,
                "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds, "blocks": dict(self.blocks)}


#: What this process fuzzed (tests/conftest.py prints it at the end of a session).
STATS = FuzzStats()


@contextlib.contextmanager
def cheaper_captures():
    """Memoize torch.export's scan of the operator registry while fuzzing.

    ``run_decompositions`` walks every CompositeImplicitAutograd operator on each call
    (about a quarter of a tiny model's capture time). The result only changes when an
    operator is registered, so it is cached under the dispatcher's registration count.
    """
    try:
        from torch.export import exported_program
        original = exported_program._collect_all_valid_cia_ops
    except (ImportError, AttributeError):  # another torch: capture at full cost
        yield
        return
    cache: dict[int, Any] = {}

    def collect():
        key = len(torch._C._dispatch_get_registrations_for_dispatch_key("CompositeImplicitAutograd"))
        if key not in cache:
            cache[key] = original()
        return cache[key]

    exported_program._collect_all_valid_cia_ops = collect
    try:
        yield
    finally:
        exported_program._collect_all_valid_cia_ops = original


TRITON_EVERY = 10


def _triton_problem(gm, inputs: tuple, expected: list, tolerance: float) -> str | None:
    """The default pipeline's graph with every region lowered to its generated Triton
    kernel (run in the interpreter when ``TRITON_INTERPRET=1``) must match eager too."""
    from optcc.lowering.runtime import lower_regions

    try:
        lowered, _ = lower_regions(gm)
        error = output_error(expected, list(lowered(*inputs)))
    except Exception as exc:  # a generator or a kernel that fails is a finding
        return f"target triton raised {type(exc).__name__}: {exc}"
    if error > tolerance:
        return f"target triton: outputs differ from eager by {error:.3g} (relative; tolerance {tolerance:g})"
    return None


#: An exact rewrite run in float64 agrees with float64 eager to ~1e-14 (relative).
FLOAT64_TOLERANCE = 1e-9


def float64_error(model: nn.Module, inputs: tuple, make_passes) -> float:
    """The relative output difference of the passes on a float64 copy of the model."""
    model64 = copy.deepcopy(model).double()
    inputs64 = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    expected = model64(*inputs64)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    gm, _ = PassManager(make_passes(), verify=False).run(optcc.capture(model64, inputs64))
    return output_error(expected, list(gm(*inputs64)))


def differential_check(model: nn.Module, inputs: tuple, tolerance: float = 1e-5,
                       triton: bool = False, stats: FuzzStats | None = None) -> tuple[list[str], int]:
    """Run each exact pass alone, and the default pipeline, against eager; return (problems, runs).

    The passes come from the registry on every call, so a pass registered later is
    fuzzed without any change here.

    Each run starts from its own copy of one captured graph and runs with ``verify=False``
    so that nothing is rolled back. A problem is a pass that raised, an output beyond
    ``tolerance`` (relative, :func:`optcc.pass_manager.output_error`), or a captured
    graph whose outputs changed after the passes ran on copies of it (a pass that wrote
    into a shared constant).

    Some models amplify rounding: a LayerNorm over two nearly equal features turns the
    last-bit differences of a re-associated sum into 1e-5 of its output (eager itself moves
    by 7e-6 for a 1e-7 input perturbation on such a model). An fp32 difference beyond
    ``tolerance`` is therefore re-checked on a float64 copy of the model, inputs and
    passes, where an exact rewrite agrees with eager to ~1e-14: it is a problem unless
    that difference is within :data:`FLOAT64_TOLERANCE` (counted in ``stats``). Such a
    model's graph is not run as Triton kernels (they compute in fp32).
    """
    with torch.no_grad():
        expected = model(*inputs)
        expected = list(expected) if isinstance(expected, tuple) else [expected]
        captured = optcc.capture(model, inputs)
        problems = []
        baseline = list(captured(*inputs))
        error = output_error(expected, baseline)
        if error > tolerance:
            problems.append(f"capture alone changed the outputs by {error:.3g}")
        ill_conditioned = False
        exact = {name: cls for name, cls in registered_passes().items() if cls.exact}
        pipelines = [(name, lambda cls=cls: [cls()]) for name, cls in sorted(exact.items())]
        if len(exact) > 1:  # with one exact pass the default pipeline is that pass alone
            pipelines.append(("default pipeline", default_passes))
        for label, make_passes in pipelines:
            gm, report = PassManager(make_passes(), verify=False).run(snapshot(captured))
            for record in report.records:
                if record.status == "failed":
                    problems.append(f"{label}: pass {record.name} raised: {record.message}")
            error = output_error(expected, list(gm(*inputs)))
            if error > tolerance and float64_error(model, inputs, make_passes) <= FLOAT64_TOLERANCE:
                ill_conditioned = True
                if stats is not None:
                    stats.settled_in_float64 += 1
            elif error > tolerance:
                applied = [r.name for r in report.records if r.status == "applied"]
                problems.append(f"{label}: outputs differ from eager by {error:.3g} (relative; "
                                f"tolerance {tolerance:g}); applied: {applied}")
            # fp32 kernels cannot be held to the tolerance on a model that amplifies rounding
            if triton and label == pipelines[-1][0] and not ill_conditioned:
                if stats is not None:
                    stats.triton_runs += 1
                problem = _triton_problem(gm, inputs, expected, tolerance)
                if problem:
                    problems.append(problem)
        error = output_error(baseline, list(captured(*inputs)))
        if error != 0.0:
            problems.append(f"a pass changed a constant shared with the captured graph (outputs moved by {error:.3g})")
    return problems, len(pipelines)


def check_spec(spec: ModelSpec, stats: FuzzStats | None = None) -> None:
    """Build ``spec``'s model and assert that every exact pass reproduces eager on it."""
    start, cpu_start = time.perf_counter(), time.process_time()
    model, inputs = build_model(spec)
    stats = stats or STATS
    # Every TRITON_EVERY-th model also runs the default pipeline's graph as generated
    # Triton kernels (in the interpreter: slow, so not every model).
    triton = os.environ.get("TRITON_INTERPRET") == "1" and stats.examples % TRITON_EVERY == 0
    problems, runs = differential_check(model, inputs, triton=triton, stats=stats)
    stats.count(spec, runs, time.perf_counter() - start, time.process_time() - cpu_start)
    assert not problems, f"{spec!r}\n" + "\n".join(problems)


def run_examples(examples: int, max_blocks: int = 3) -> dict:
    """Fuzz ``examples`` random models in this process; return counts and the first failure.

    Meant to run in worker processes (one per core): a failure is shrunk by hypothesis
    here and comes back as text that names the minimal ``ModelSpec``.
    """
    torch.set_num_threads(1)  # tiny tensors: a thread pool costs more than the ops
    stats = FuzzStats()

    @settings(max_examples=examples, deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(spec=model_specs(max_blocks=max_blocks))
    def fuzz(spec: ModelSpec) -> None:
        check_spec(spec, stats)

    failure = None
    with cheaper_captures():
        try:
            fuzz()
        except Exception as exc:  # the shrunk failure, with hypothesis' notes
            failure = "".join(traceback.format_exception(exc))
    return {**stats.as_dict(), "failure": failure}
