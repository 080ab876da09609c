"""``optcc.compile``: capture, run the passes, hand the result to a target.

The flow is the same for every entry point (this function, the ``torch.compile``
backend, the CLI)::

    model --capture--> canonical GraphModule --PassManager--> rewritten graph --target--> callable

Targets:

* ``eager``: the rewritten graph runs op by op with torch;
* ``inductor``: the rewritten graph is compiled by TorchInductor (fast on CPU);
* ``triton``: fused regions become generated Triton kernels (``optcc.lowering``);
* ``auto``: ``triton`` when CUDA is available and the lowering is built, else ``inductor``.

A compiled graph is specialised to the shapes, dtypes and devices of the inputs it was
built for. A call with different ones builds (and caches) another specialisation rather
than run a graph that does not fit. A change to the model's weights or to its
train/eval mode is noticed, and the graph is rebuilt: folded weights are never stale.
"""

from __future__ import annotations

import logging
import operator
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import networkx as nx
import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from . import ir
from .pass_base import Pass, PassSpec, make_pass, registered_passes
from .pass_manager import PassManager
from .report import Report

log = logging.getLogger("optcc")

TARGETS = ("auto", "eager", "inductor", "triton")


class TargetError(ValueError):
    pass


def default_passes() -> list[Pass]:
    """Every registered exact pass, in an order that satisfies their ``run_after`` constraints."""
    exact = {name: cls for name, cls in registered_passes().items() if cls.exact}
    order = nx.DiGraph()
    order.add_nodes_from(exact)
    order.add_edges_from((before, name) for name, cls in exact.items() for before in cls.run_after if before in exact)
    return [exact[name]() for name in nx.lexicographical_topological_sort(order)]


def resolve_target(target: str) -> str:
    if target not in TARGETS:
        raise TargetError(f"unknown target '{target}'; choose one of: {', '.join(TARGETS)}")
    if target == "auto":
        from optcc import lowering

        return "triton" if torch.cuda.is_available() and lowering.is_available() else "inductor"
    return target


def lower(gm: fx.GraphModule, target: str, flat_inputs: Sequence[Any]) -> Callable:
    """Turn a rewritten canonical graph into something callable on flat inputs."""
    if target == "eager":
        return gm
    if target == "inductor":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch._inductor.compile(gm, list(flat_inputs))
    if target == "triton":
        from optcc import lowering

        return lowering.lower(gm, flat_inputs)
    raise TargetError(f"unknown target '{target}'")


def signature_of(flat_inputs: Sequence[Any]) -> tuple:
    """What a specialisation depends on: shapes, dtypes, devices (and non-tensor values)."""
    return tuple(
        (tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else (type(x), x)
        for x in flat_inputs
    )


def _describe(sig: tuple) -> str:
    parts = []
    for item in sig:
        if isinstance(item[0], tuple):
            parts.append(f"{str(item[1]).replace('torch.', '')}{list(item[0])}@{item[2]}")
        else:
            parts.append(repr(item[1]))
    return "(" + ", ".join(parts) + ")"


@dataclass
class Specialization:
    graph_module: fx.GraphModule | None
    runner: Callable
    report: Report
    compile_seconds: float = 0.0


@dataclass
class Pipeline:
    """Everything needed to (re)build a specialisation: passes, target, verification."""

    passes: list[Pass]
    target: str
    verify: bool = False
    tolerance: float | None = None
    fail_fast: bool = False
    dump_after_each: bool = False
    cache: dict[tuple, Specialization] = field(default_factory=dict)

    def build(self, capture: Callable[[], fx.GraphModule], flat_inputs: Sequence[Any]) -> Specialization:
        start = time.perf_counter()
        gm = capture()
        manager = PassManager(self.passes, verify=self.verify, example_inputs=flat_inputs,
                              tolerance=self.tolerance, fail_fast=self.fail_fast,
                              dump_after_each=self.dump_after_each)
        gm, report = manager.run(gm)
        runner = lower(gm, self.target, flat_inputs)
        report.notes.append(f"target: {self.target}; inputs {_describe(signature_of(flat_inputs))}")
        return Specialization(gm, runner, report, time.perf_counter() - start)


_VERSION = operator.attrgetter("_version")
_TRAINING = operator.attrgetter("training")


class StateGuard:
    """Notices when a model's weights are replaced or updated in place, or a mode flips.

    Checked on every call, so it is kept to three flat passes over lists made once:
    tensor version counters (bumped by every in-place update, ``load_state_dict``
    included), train/eval flags, and the identity of each registered tensor.
    """

    def __init__(self, model: Any):
        self.modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
        self.snapshot()

    def snapshot(self) -> None:
        slots = [
            (group, name, tensor)
            for m in self.modules
            for group in (m._parameters, m._buffers)
            for name, tensor in group.items()
            if tensor is not None
        ]
        self.groups = [group for group, _, _ in slots]
        self.names = [name for _, name, _ in slots]
        self.tensors = [tensor for _, _, tensor in slots]
        self.versions = list(map(_VERSION, self.tensors))
        self.modes = list(map(_TRAINING, self.modules))

    def changed(self) -> bool:
        # map() with C-level getters: about half the cost of the equivalent comprehensions
        return (
            list(map(_VERSION, self.tensors)) != self.versions
            or list(map(_TRAINING, self.modules)) != self.modes
            or not all(map(operator.is_, map(dict.get, self.groups, self.names), self.tensors))
        )


class OptimizedModule(torch.nn.Module):
    """What ``optcc.compile`` returns: call it like the model.

    ``.report`` is the per-pass report of the latest specialisation and
    ``.graph_module`` its rewritten canonical graph (None when capture failed and
    the module runs the original model eagerly).
    """

    def __init__(self, model: torch.nn.Module | ExportedProgram, pipeline: Pipeline):
        super().__init__()
        self.__dict__["_model"] = model  # not a submodule: its weights are not ours to own
        self.__dict__["_guard"] = StateGuard(model)
        self.pipeline = pipeline
        self._latest: Specialization | None = None

    @property
    def report(self) -> Report | None:
        return self._latest.report if self._latest else None

    @property
    def graph_module(self) -> fx.GraphModule | None:
        return self._latest.graph_module if self._latest else None

    @property
    def compile_seconds(self) -> float:
        return self._latest.compile_seconds if self._latest else 0.0

    def specialize(self, args: tuple, kwargs: dict) -> Specialization:
        flat, _ = pytree.tree_flatten((args, kwargs))
        sig = signature_of(flat)
        if self._guard.changed():
            log.info("optcc: the model's weights or mode changed; recompiling")
            self.pipeline.cache.clear()
            self._guard.snapshot()
        entry = self.pipeline.cache.get(sig)
        if entry is None:
            if self.pipeline.cache:
                log.info("optcc: new input signature %s; compiling a specialisation", _describe(sig))
            entry = self._build(args, kwargs, flat)
            self.pipeline.cache[sig] = entry
        self._latest = entry
        return entry

    def _build(self, args: tuple, kwargs: dict, flat: list) -> Specialization:
        model = self._model
        if isinstance(model, torch.nn.Module) and model.training:
            warnings.warn(
                "optcc: the model is in training mode, so training behaviour (BatchNorm batch "
                "statistics, dropout) is captured and not folded. Call model.eval() before "
                "compiling for inference.",
                stacklevel=4,
            )
        try:
            return self.pipeline.build(lambda: ir.capture(model, args, kwargs), flat)
        except ir.CaptureError as exc:
            if self.pipeline.fail_fast or isinstance(model, ExportedProgram):
                raise
            warnings.warn(f"optcc: {exc}; running the model eagerly instead", stacklevel=4)
            report = Report()
            report.notes.append(f"capture failed, running eagerly: {exc}")
            return Specialization(None, lambda *a, **k: model(*a, **k), report)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        entry = self.specialize(args, kwargs)
        if entry.graph_module is None:
            return entry.runner(*args, **kwargs)
        flat = ir.flat_inputs(entry.graph_module, args, kwargs)
        return ir.unflatten_outputs(entry.graph_module, entry.runner(*flat))


def compile(
    model: torch.nn.Module | ExportedProgram,
    passes: Sequence[PassSpec] | None = None,
    *,
    example_inputs: Any,
    example_kwargs: dict | None = None,
    target: str = "auto",
    verify: bool = False,
    tolerance: float | None = None,
    fail_fast: bool = False,
    dump_after_each: bool = False,
) -> OptimizedModule:
    """Optimize ``model`` with ``passes`` and return a module that runs the result.

    ``passes``: None runs every exact pass (approximate ones only run when named);
    items are pass names, ``(name, {options})`` pairs or configured ``Pass`` objects.
    ``verify=True`` checks each pass on ``example_inputs`` and rolls back an exact pass
    that changes the outputs by more than ``tolerance`` (default 1e-5 relative in fp32).
    ``fail_fast=True`` makes a failing pass or capture an error instead of a warning.
    The model is compiled now, on ``example_inputs``, so errors surface here.
    """
    pass_list = default_passes() if passes is None else [make_pass(p) for p in passes]
    pipeline = Pipeline(pass_list, resolve_target(target), verify=verify, tolerance=tolerance,
                        fail_fast=fail_fast, dump_after_each=dump_after_each)
    compiled = OptimizedModule(model, pipeline)
    args = ir._normalize_inputs(example_inputs) if example_inputs is not None else ()
    if isinstance(model, ExportedProgram) and example_inputs is None:
        args, example_kwargs = ir.example_inputs_of(model)
    compiled.specialize(args, example_kwargs or {})
    return compiled
