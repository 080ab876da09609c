"""``optcc.compile``: capture, run the passes, hand the result to a target.

The flow is the same for every entry point (this function, the ``torch.compile``
backend, the CLI)::

    model --capture--> canonical GraphModule --PassManager--> rewritten graph --target--> callable

Targets:

* ``eager``: the rewritten graph runs op by op with torch (elementwise ops whose input
  is a dead temporary run in place, :mod:`optcc.inplace`);
* ``inductor``: the rewritten graph is compiled by TorchInductor (fast on CPU);
* ``triton``: fused regions become generated Triton kernels (``optcc.lowering``);
* ``auto``: ``triton`` when CUDA is available and the lowering is built, else ``inductor``.

A compiled graph is specialised to the shapes, dtypes and devices of the inputs it was
built for. A call with different ones builds (and caches) another specialisation rather
than run a graph that does not fit. A change to the model's weights or to its
train/eval mode is noticed (:mod:`optcc.guard`), and the graph is rebuilt: folded
weights are never stale.
Inputs the model itself cannot run raise :class:`InputMismatchError` (what was compiled
for, what came, and the model's own error). Builds hold :data:`BUILD_LOCK`, so a compiled
module can be called from several threads. See docs/guarantees.md.
"""

from __future__ import annotations

import logging
import threading
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
from .guard import FullStateGuard, make_guard
from .pass_base import Pass, PassSpec, make_pass, registered_passes
from .pass_manager import PassManager, order_constraints
from .report import Report

log = logging.getLogger("optcc")

TARGETS = ("auto", "eager", "inductor", "triton")


class TargetError(ValueError):
    pass


def default_passes() -> list[Pass]:
    """Every registered exact pass of the default pipeline, in an order that satisfies
    their ``run_after`` / ``run_before`` constraints."""
    exact = {name: cls for name, cls in registered_passes().items() if cls.exact and cls.in_default_pipeline}
    order = nx.DiGraph()
    order.add_nodes_from(exact)
    order.add_edges_from((earlier, later) for earlier, later, _ in order_constraints(list(exact.values())))
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
    from .regions import has_regions, inline_regions

    if target in ("eager", "inductor"):
        # Both schedule op by op or by themselves: regions (present only when the user
        # named block_fusion) would only add call overhead.
        if has_regions(gm):
            gm = inline_regions(gm)
    if target == "eager":
        from .inplace import reinplace

        return reinplace(gm)[0]  # Inductor and the Triton lowering plan their own buffers
    if target == "inductor":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch._inductor.compile(gm, list(flat_inputs))
    if target == "triton":
        from optcc import lowering

        return lowering.lower(lowering.with_regions(gm), flat_inputs)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Specialization:
    graph_module: fx.GraphModule | None
    runner: Callable
    report: Report
    compile_seconds: float = 0.0
    #: dotted names of the model's tensors the graph froze and reads (what the guard
    #: watches); None: unknown, watch them all; () for the eager fallback, which runs
    #: the model itself and cannot go stale
    state_targets: tuple[str, ...] | None = None


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
    budget: Any = None  # the budget search that chose these passes (optcc.budget.BudgetResult)

    def build(self, capture: Callable[[], fx.GraphModule], flat_inputs: Sequence[Any]) -> Specialization:
        start = time.perf_counter()
        gm = capture()
        state_targets = gm.meta.get("optcc_state_targets")  # read before the passes copy the graph
        manager = PassManager(self.passes, verify=self.verify, example_inputs=flat_inputs,
                              tolerance=self.tolerance, fail_fast=self.fail_fast,
                              dump_after_each=self.dump_after_each)
        gm, report = manager.run(gm)
        runner = lower(gm, self.target, flat_inputs)
        report.notes.append(f"target: {self.target}; inputs {_describe(signature_of(flat_inputs))}")
        report.budget = self.budget
        return Specialization(gm, runner, report, time.perf_counter() - start, state_targets)


# torch.export patches global operator tables while it decomposes a graph, so two
# captures must never run at once, whichever modules or threads they come from.
BUILD_LOCK = threading.RLock()


class InputMismatchError(TypeError):
    """A compiled module was called with inputs its model cannot run on."""


class OptimizedModule(torch.nn.Module):
    """What ``optcc.compile`` returns: call it like the model.

    ``.report`` is the per-pass report of the latest specialisation and
    ``.graph_module`` its rewritten canonical graph (None when capture failed and
    the module runs the original model eagerly).
    """

    def __init__(self, model: torch.nn.Module | ExportedProgram, pipeline: Pipeline, guard: bool | str = True):
        super().__init__()
        self.__dict__["_model"] = model  # not a submodule: its weights are not ours to own
        self.__dict__["_guard"] = make_guard(model, guard)
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

    def refresh(self) -> None:
        """Forget every specialisation: the next call captures the model as it is now.

        Needed only with ``guard=False`` after changing the model on purpose; with the
        guard on, changes are noticed on the next call anyway.
        """
        with BUILD_LOCK:
            self.pipeline.cache.clear()
            if self._guard is not None:
                self._guard.snapshot(watch=())

    @property
    def guard(self) -> FullStateGuard | None:
        """The guard checked before every call (:mod:`optcc.guard`), None with ``guard=False``."""
        return self._guard

    def _model_changed(self) -> bool:
        return self._guard is not None and self._guard.changed()

    def specialize(self, args: tuple, kwargs: dict) -> Specialization:
        flat, _ = pytree.tree_flatten((args, kwargs))
        sig = signature_of(flat)
        # The common case takes no lock: the weights are unchanged and the signature known.
        if not self._model_changed():
            entry = self.pipeline.cache.get(sig)
            if entry is not None:
                self._latest = entry
                return entry
        with BUILD_LOCK:  # one build at a time; a thread that waited finds the others' work
            if self._model_changed():
                log.info("optcc: the model's weights or mode changed; recompiling")
                self.pipeline.cache.clear()
                self._guard.snapshot(watch=())  # before the build: a change during it is seen
            entry = self.pipeline.cache.get(sig)
            if entry is None:
                if self.pipeline.cache:
                    log.info("optcc: new input signature %s; compiling a specialisation", _describe(sig))
                entry = self._build(args, kwargs, flat)
                if self._guard is not None:
                    self._guard.watch(entry.state_targets)  # what this graph froze
                    self._guard.settle()
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
                stacklevel=5,
            )
        try:
            return self.pipeline.build(lambda: ir.capture(model, args, kwargs), flat)
        except ir.CaptureError as exc:
            if self.pipeline.cache:
                # Compiled before, so the model traces: a failure on these inputs most likely
                # means they do not fit the model. Say so with the model's own error, rather
                # than fall back to eager and let the user read a tracing failure first.
                self._raise_if_model_rejects(args, kwargs, flat, exc)
            if self.pipeline.fail_fast or isinstance(model, ExportedProgram):
                raise
            warnings.warn(f"optcc: {exc}; running the model eagerly instead", stacklevel=5)
            report = Report()
            report.notes.append(f"capture failed, running eagerly: {exc}")
            return Specialization(None, lambda *a, **k: model(*a, **k), report, state_targets=())

    def _raise_if_model_rejects(self, args: tuple, kwargs: dict, flat: list, capture_error: Exception) -> None:
        try:
            with torch.no_grad():
                self._model(*args, **kwargs)
        except Exception as model_error:
            compiled_for = " or ".join(_describe(sig) for sig in self.pipeline.cache)
            raise InputMismatchError(
                f"optcc: the model cannot run on the inputs {_describe(signature_of(flat))} (it was compiled "
                f"for {compiled_for}); the model says: {type(model_error).__name__}: "
                f"{_first_line(model_error)}"
            ) from model_error

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
    guard: bool | str = True,
    budget: Any = None,
) -> OptimizedModule:
    """Optimize ``model`` with ``passes`` and return a module that runs the result.

    ``passes``: None runs every exact pass (approximate ones only run when named);
    items are pass names, ``(name, {options})`` pairs or configured ``Pass`` objects.
    ``verify=True`` checks each pass on ``example_inputs`` and rolls back an exact pass
    that changes the outputs by more than ``tolerance`` (default 1e-5 relative in fp32).
    ``fail_fast=True`` makes a failing pass or capture an error instead of a warning.
    ``guard`` (:mod:`optcc.guard`): True checks before every call that the tensors the
    graph read were not replaced, updated in place or moved, and walks the whole model
    only after torch reported a registration or a ``train()``/``eval()`` call (cost
    independent of the number of modules); ``"full"`` walks every parameter, buffer and
    submodule on every call (also sees ``module.training`` assigned directly);
    ``False`` promises that the model will not change after this call (no weight updates,
    replaced layers or train/eval switch): no check, and folded weights go stale if the
    promise is broken - the contract of timm's ``reparameterize_model`` or Inductor's
    ``freezing``. ``compiled.refresh()`` rebuilds after a deliberate change.
    ``budget`` (an :class:`optcc.Budget`): the settings of the approximate passes named in
    ``passes`` are searched, layer by layer, for the fastest within the budget's metric drop
    (:mod:`optcc.budget`); ``compiled.report`` shows the choice and what was tried.
    The model is compiled now, on ``example_inputs``, so errors surface here.
    """
    pass_list = default_passes() if passes is None else [make_pass(p) for p in passes]
    args = ir._normalize_inputs(example_inputs) if example_inputs is not None else ()
    if isinstance(model, ExportedProgram) and example_inputs is None:
        args, example_kwargs = ir.example_inputs_of(model)
    resolved = resolve_target(target)
    chosen = None
    if budget is not None:
        from .budget import tune

        chosen = tune(model, args, example_kwargs or {}, pass_list, budget, resolved)
        pass_list = chosen.passes
    pipeline = Pipeline(pass_list, resolved, verify=verify, tolerance=tolerance,
                        fail_fast=fail_fast, dump_after_each=dump_after_each, budget=chosen)
    compiled = OptimizedModule(model, pipeline, guard=guard)
    compiled.specialize(args, example_kwargs or {})
    return compiled
