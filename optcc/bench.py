"""Benchmarks: optcc against eager PyTorch and torch.compile, in one process, interleaved.

Contenders (choose with ``targets``):

* ``eager``: the model as given, op by op;
* ``torch.compile``: ``torch.compile(model)`` with its default backend (Inductor);
* ``optcc-eager``: ``optcc.compile(model, passes, target="eager")``;
* ``optcc-inductor``: ``optcc.compile(model, passes, target="inductor")``.

How timings are taken, and why: a machine's speed drifts (other processes, frequency
scaling), so the contenders are timed round-robin - run 1 of each, then run 2 of each,
with the order rotated every run - and each is summarised by the median of its runs.
One run is a loop of enough calls to last ``seconds_per_run`` (calibrated once, on the
first contender), long enough that timer resolution and per-call jitter do not matter.
The result is reported as speed ratios (>1 means faster than the baseline); absolute
times depend on the machine and its load and are shown only for reference.

Each contender's output is checked against eager (max relative error, as the pass
manager measures it), so a speed-up that changes the answer is visible next to it.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from . import hardware
from .compiler import compile as optcc_compile
from .compiler import default_passes
from .pass_base import PassSpec, make_pass
from .pass_manager import output_error

CONTENDERS = ("eager", "torch.compile", "optcc-eager", "optcc-inductor")


@dataclass
class Contender:
    name: str
    times_ms: list[float] = field(default_factory=list)  # per-call time of each run
    compile_seconds: float | None = None  # building it plus its first call
    error: float | None = None  # max relative output error against eager
    failure: str = ""  # why it could not be built or run

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median of the runs: how much to trust the median."""
        if len(self.times_ms) < 2:
            return float("nan")
        return (max(self.times_ms) - min(self.times_ms)) / self.median_ms


@dataclass
class BenchResult:
    model: str
    passes: list[str]
    contenders: list[Contender]
    runs: int
    iterations: int  # calls per timed run
    threads: int
    notes: list[str] = field(default_factory=list)
    cpu: str = field(default_factory=lambda: " ".join(hardware.cpu().features()))  # ISA the times hold for

    def __getitem__(self, name: str) -> Contender:
        for c in self.contenders:
            if c.name == name:
                return c
        raise KeyError(name)

    def ratio(self, name: str, baseline: str = "eager") -> float | None:
        """How many times faster ``name`` runs than ``baseline`` (ratio of medians)."""
        names = {c.name for c in self.contenders if c.times_ms}
        if name not in names or baseline not in names:
            return None
        return self[baseline].median_ms / self[name].median_ms

    def table(self) -> Table:
        passes = ", ".join(self.passes) or "none"
        table = Table(
            title=f"{self.model}: passes {passes}; median of {self.runs} interleaved runs x "
                  f"{self.iterations} calls, {self.threads} thread(s), CPU {self.cpu}",
            title_justify="left",
        )
        baselines = [b for b in ("eager", "torch.compile") if any(c.name == b and c.times_ms for c in self.contenders)]
        columns = ["contender", "median ms", "spread"] + [f"vs {b}" for b in baselines] + ["compile s", "max rel err"]
        for col in columns:
            table.add_column(col, justify="left" if col == "contender" else "right")
        for c in self.contenders:
            compile_s = _fmt(c.compile_seconds, "{:.1f}")
            if c.failure:
                table.add_row(c.name, "-", "-", *["-" for _ in baselines], compile_s, f"failed: {c.failure}")
                continue
            table.add_row(
                c.name,
                f"{c.median_ms:.3f}",
                f"{c.spread:.0%}" if c.spread == c.spread else "-",  # NaN with one run
                *[_ratio_text(self.ratio(c.name, b)) for b in baselines],
                compile_s,
                "reference" if c.name == "eager" else _fmt(c.error, "{:.1e}"),
            )
        return table

    def summary(self) -> list[str]:
        lines = []
        for name in ("optcc-eager", "optcc-inductor"):
            for baseline in ("eager", "torch.compile"):
                r = self.ratio(name, baseline)
                if r is not None:
                    speed = f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"
                    lines.append(f"{name} vs {baseline}: {speed}")
        return lines

    def render(self, width: int = 120) -> str:
        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None)
        console.print(self.table())
        for line in self.summary() + [f"note: {n}" for n in self.notes]:
            console.print(line, highlight=False, soft_wrap=True)
        return buf.getvalue().rstrip()

    def __str__(self) -> str:
        return self.render()


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _ratio_text(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _flat_tensors(out: Any) -> list:
    return pytree.tree_leaves(out)


# ----------------------------------------------------------------------------------------
# Timing


def calibrate(fn: Callable[[], Any], seconds_per_run: float) -> int:
    """Calls per run so that one run lasts about ``seconds_per_run``."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(1, round(seconds_per_run / max(best, 1e-7)))


def time_interleaved(fns: dict[str, Callable[[], Any]], *, runs: int, iterations: int) -> dict[str, list[float]]:
    """Per-call milliseconds of each run of each function, timed round-robin."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for run in range(runs):
        # Rotate the order so no contender always runs right after the same other one.
        for name in names[run % len(names):] + names[:run % len(names)]:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(iterations):
                fn()
            times[name].append((time.perf_counter() - start) / iterations * 1e3)
    return times


def measure(
    contenders: Sequence[Contender],
    calls: dict[str, Callable[[], Any]],
    *,
    runs: int,
    seconds_per_run: float,
    warmup: int = 0,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Time ``calls`` interleaved and store each one's per-run times in its contender.

    Returns the calls per run, calibrated on the first of ``calls``.
    """
    if not calls:
        return 0
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    iterations = calibrate(next(iter(calls.values())), seconds_per_run)
    if progress:
        progress(f"optcc bench: timing {', '.join(calls)}: {runs} runs x {iterations} calls each")
    times = time_interleaved(calls, runs=runs, iterations=iterations)
    for contender in contenders:
        contender.times_ms = times.get(contender.name, contender.times_ms)
    return iterations


# ----------------------------------------------------------------------------------------
# The benchmark


def _build(name: str, model: Any, inputs: tuple, passes: Sequence[PassSpec] | None) -> Callable:
    if name == "eager":
        return model.module() if isinstance(model, ExportedProgram) else model
    if name == "torch.compile":
        return torch.compile(model.module() if isinstance(model, ExportedProgram) else model)
    if name.startswith("optcc-"):
        return optcc_compile(model, passes, example_inputs=inputs, target=name[len("optcc-"):])
    raise ValueError(f"unknown contender '{name}'; choose from: {', '.join(CONTENDERS)}")


@torch.no_grad()
def benchmark(
    model: torch.nn.Module | ExportedProgram,
    example_inputs: tuple,
    passes: Sequence[PassSpec] | None = None,
    *,
    runs: int = 7,
    warmup: int = 3,
    targets: Sequence[str] = CONTENDERS,
    seconds_per_run: float = 0.15,
    model_name: str = "model",
    progress: Callable[[str], None] | None = _stderr,
) -> BenchResult:
    """Time ``targets`` (see module docstring) on ``example_inputs``; see :class:`BenchResult`.

    ``passes`` is what ``optcc.compile`` takes (None: every exact pass). A contender that
    fails to build or run is reported as failed and the others still run.
    """
    unknown = [t for t in targets if t not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contender '{unknown[0]}'; choose from: {', '.join(CONTENDERS)}")
    if runs < 1:
        raise ValueError("runs must be at least 1")
    say = progress or (lambda message: None)
    load = load_average()  # before we add our own load
    pass_list = default_passes() if passes is None else [make_pass(p) for p in passes]
    pass_names = [repr(p) for p in pass_list]
    eager = model.module() if isinstance(model, ExportedProgram) else model
    reference = _flat_tensors(eager(*example_inputs))

    contenders: list[Contender] = []
    calls: dict[str, Callable[[], Any]] = {}
    for name in targets:
        contender = Contender(name)
        contenders.append(contender)
        if name != "eager":
            say(f"optcc bench: compiling {name} ...")
        start = time.perf_counter()
        try:
            fn = _build(name, model, example_inputs, pass_list)
            out = fn(*example_inputs)  # the first call is where torch.compile compiles
        except Exception as exc:
            text = str(exc).strip()
            contender.failure = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
            say(f"optcc bench: {name} failed: {contender.failure}")
            continue
        if name != "eager":
            contender.compile_seconds = time.perf_counter() - start
            contender.error = output_error(reference, _flat_tensors(out))
        calls[name] = lambda fn=fn: fn(*example_inputs)

    iterations = measure(contenders, calls, runs=runs, seconds_per_run=seconds_per_run,
                         warmup=warmup, progress=say)
    result = BenchResult(model_name, pass_names, contenders, runs, iterations, torch.get_num_threads())
    if runs < 5:
        result.notes.append(f"only {runs} runs: medians of fewer than 5 runs are noisy")
    result.notes += contention_notes(result, load)
    return result


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def contention_notes(result: BenchResult, load: float | None) -> list[str]:
    """Warnings that the numbers may say more about the machine than about the model."""
    notes = []
    cores = os.cpu_count() or 1
    if load is not None and load >= 0.5 and load + result.threads > cores + 0.5:
        free = max(1, cores - round(load))
        tip = f" (try --threads {free})" if free < result.threads else ""
        notes.append(f"load average was {load:.1f} on {cores} cores before the benchmark: other "
                     f"processes compete for the CPU{tip}")
    noisy = [c.name for c in result.contenders if c.times_ms and c.spread > 0.2]
    if noisy:
        notes.append(f"runs of {', '.join(noisy)} varied by more than 20%: ratios are less reliable")
    return notes
