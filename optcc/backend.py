"""``torch.compile(model, backend="optcc", options={...})``.

Dynamo hands a backend a torch-level FX graph whose inputs include the model's
parameters and buffers (dynamo marks them as static inputs). The backend freezes those
into the graph, re-captures it into optcc's canonical IR through the same ``capture``
as ``optcc.compile`` and runs the same pass pipeline, so a pass is written once.

Options (all optional): ``passes`` (as for ``optcc.compile``), ``target`` (default
``"eager"``: dynamo already removed the Python overhead, and ``"inductor"`` compiles the
rewritten graph with TorchInductor), ``verify``, ``tolerance``, ``fail_fast``, ``guard``
(default True; ``"full"`` also compares running statistics on every call; False skips
the per-call check of the frozen weights described below, as
``optcc.compile(..., guard=False)`` does), ``budget`` (an ``optcc.Budget``: its batches are
the graph's user inputs, i.e. the model's tensor arguments in order; the search runs once,
at the first build, and its choice serves every later specialisation).

Dynamo does not guard on the values of parameters, so the backend does (``optcc.guard``):
a frozen tensor that was replaced, updated in place or given new storage since the graph
was built triggers a rebuild (identity, version counter and data pointer of the inputs
dynamo marks static, checked on every call), and so do running statistics with new
values (BatchNorm's kernel updates them in training without a version bump): those are
compared after a ``train()``/``eval()`` call or a registration anywhere in the process
moved the guard's generation, and on every call with ``"guard": "full"``. Dynamo's own
guards see train/eval flags and replaced submodules.

A dynamo graph that cannot be captured runs unoptimized, with a warning (as
``optcc.compile`` falls back to eager); ``fail_fast=True`` makes that an error.
:func:`compiled_graphs` lists what the backend built, with each specialisation's report.
"""

from __future__ import annotations

import operator
import os
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import ir
from . import guard as guards
from .compiler import BUILD_LOCK, Pipeline, Specialization, TargetError, default_passes, resolve_target, signature_of
from .guard import RunningStatistics, TensorWatch
from .pass_base import make_pass
from .report import Report

_OPTION_NAMES = {"passes", "target", "verify", "tolerance", "fail_fast", "guard", "budget", "dump"}

# What dynamo got back from this backend, while dynamo still holds it. Dynamo hides the
# callable a backend returns inside its code cache; this is how a user (or a test) can
# check what optcc did to a torch.compile'd model: each graph's ``pipeline.cache`` holds
# its specialisations, with their rewritten graphs and pass reports.
_live_graphs: "weakref.WeakSet[_CompiledDynamoGraph]" = weakref.WeakSet()


def compiled_graphs() -> list["_CompiledDynamoGraph"]:
    """The graphs the backend compiled that dynamo still uses (in no particular order)."""
    return list(_live_graphs)


def _is_model_state(value: Any) -> bool:
    return isinstance(value, torch.nn.Parameter) or getattr(value, "_dynamo_static_input_type", None) is not None


class _FrozenGraph(torch.nn.Module):
    """The dynamo graph with its parameter/buffer inputs turned into buffers."""

    def __init__(self, gm: fx.GraphModule, inputs: Sequence[Any], frozen: list[int]):
        super().__init__()
        self.gm = gm
        self.frozen = frozen
        self.arity = len(inputs)
        for i in frozen:
            self.register_buffer(f"state_{i}", inputs[i].detach())

    def forward(self, *user_inputs: Any) -> Any:
        it = iter(user_inputs)
        full = [getattr(self, f"state_{i}") if i in self.frozen else next(it) for i in range(self.arity)]
        return self.gm(*full)


class _CompiledDynamoGraph:
    """Callable dynamo runs in place of its graph; builds one specialisation per input signature.

    Built on first call rather than at compile time because dynamo's example inputs may be
    symbolic (dynamic shapes); dynamo calls the result right after compiling anyway.
    """

    def __init__(self, gm: fx.GraphModule, pipeline: Pipeline, guard: bool | str = True, budget: Any = None):
        guard = guards.guard_level(guard)
        self.budget = budget
        if guard:
            guards.install_hooks()
        self.gm = gm
        self.pipeline = pipeline
        self.guard = guard
        self.frozen: list[int] | None = None
        self.frozen_of: Callable[[Sequence[Any]], Sequence[Any]] = lambda inputs: ()
        # (watch over the frozen inputs, their running statistics) as of the latest build;
        # one tuple, replaced whole, so a thread checking it never sees half of a new one
        self.state: tuple[TensorWatch, RunningStatistics] | None = None
        self.seen = guards.generation()
        self.user_positions: list[int] = []
        _live_graphs.add(self)

    @property
    def specializations(self) -> list:
        """The specialisations built so far (graph module, runner, report each)."""
        return list(self.pipeline.cache.values())

    def _same_state(self, frozen: Sequence[Any]) -> bool:
        state = self.state
        if state is None:
            return False
        watch, statistics = state
        if not watch.matches(frozen):  # replaced, updated in place or moved
            return False
        if self.guard == "full":
            return not statistics.changed()
        seen = guards.generation()
        if seen == self.seen:
            return True
        # a train()/eval() call or a registration since: BatchNorm may have updated its
        # running statistics in an eager training step (no version bump)
        if statistics.changed():
            return False
        self.seen = seen
        return True

    def __call__(self, *inputs: Any) -> Any:
        if self.frozen is None:
            with BUILD_LOCK:
                if self.frozen is None:
                    frozen = [i for i, x in enumerate(inputs) if _is_model_state(x)]
                    # Positions of the user's inputs, found once: testing every input against
                    # the list of frozen positions on each call cost ~0.4 ms a call on resnet50.
                    frozen_positions = set(frozen)
                    self.user_positions = [i for i in range(len(inputs)) if i not in frozen_positions]
                    if len(frozen) > 1:
                        self.frozen_of = operator.itemgetter(*frozen)  # one C call, a tuple
                    elif frozen:
                        self.frozen_of = lambda inputs, i=frozen[0]: (inputs[i],)
                    self.frozen = frozen
        user = [inputs[i] for i in self.user_positions]
        key = signature_of(user)
        if self.guard:
            unchanged = self._same_state(self.frozen_of(inputs))
        else:
            unchanged = self.state is not None
        entry = self.pipeline.cache.get(key) if unchanged else None
        if entry is None:
            with BUILD_LOCK:  # one build at a time; a thread that waited finds the others' work
                frozen = self.frozen_of(inputs)
                if not self._same_state(frozen):  # weights replaced or updated: folded copies are stale
                    self.pipeline.cache.clear()
                    self.seen = guards.generation()
                    self.state = (TensorWatch(frozen), RunningStatistics(frozen))
                entry = self.pipeline.cache.get(key)
                if entry is None:
                    entry = self._build(inputs, user)
                    self.pipeline.cache[key] = entry
        if entry.graph_module is None:
            return self.gm(*inputs)
        flat = ir.flat_inputs(entry.graph_module, user)
        return ir.unflatten_outputs(entry.graph_module, entry.runner(*flat))

    def _build(self, inputs: Sequence[Any], user: list) -> Specialization:
        module = _FrozenGraph(self.gm, inputs, self.frozen).eval()
        if self.budget is not None and self.pipeline.budget is None:
            from .budget import tune

            chosen = tune(module, tuple(user), {}, self.pipeline.passes, self.budget, self.pipeline.target)
            self.pipeline.passes, self.pipeline.budget = chosen.passes, chosen
        try:
            return self.pipeline.build(lambda: ir.capture(module, tuple(user)), user)
        except ir.CaptureError as exc:
            # Some dynamo graphs do not re-export (activation checkpointing's
            # tag_activation_checkpoint, autocast regions): run the graph dynamo traced,
            # as optcc.compile runs the model eagerly, rather than fail the user's call.
            if self.pipeline.fail_fast:
                raise
            warnings.warn(f"optcc: {exc}; running this graph unoptimized", stacklevel=3)
            report = Report()
            report.notes.append(f"capture failed, running the dynamo graph unoptimized: {exc}")
            return Specialization(None, self.gm, report)


def optcc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None):
    options = dict(options or {})
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown optcc backend option(s) {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}")
    guards.guard_level(options.get("guard", True))  # a bad value fails before any work
    passes = options.get("passes")
    target = options.get("target", "eager")
    if target == "auto":
        raise TargetError("inside torch.compile choose target='eager', 'inductor' or 'triton' explicitly")
    # dump: a folder that gets the report page of every specialisation (OPTCC_DUMP too)
    dump = options.get("dump") or os.environ.get("OPTCC_DUMP")
    extra = {"dump_dir": str(dump)} if dump else {}
    pipeline_class = Pipeline
    if dump:
        from .dump_html import DumpingPipeline as pipeline_class
    pipeline = pipeline_class(
        default_passes() if passes is None else [make_pass(p) for p in passes],
        resolve_target(target),
        verify=bool(options.get("verify", False)),
        tolerance=options.get("tolerance"),
        fail_fast=bool(options.get("fail_fast", False)),
        **extra,
    )
    return _CompiledDynamoGraph(gm, pipeline, guard=options.get("guard", True), budget=options.get("budget"))
