"""``torch.compile(model, backend="optcc", options={...})``.

Dynamo hands a backend a torch-level FX graph whose inputs include the model's
parameters and buffers (dynamo marks them as static inputs). The backend freezes those
into the graph, re-captures it into optcc's canonical IR through the same ``capture``
as ``optcc.compile`` and runs the same pass pipeline, so a pass is written once.

Options (all optional): ``passes`` (as for ``optcc.compile``), ``target`` (default
``"eager"``: dynamo already removed the Python overhead, and ``"inductor"`` compiles the
rewritten graph with TorchInductor), ``verify``, ``tolerance``, ``fail_fast``.

Dynamo does not guard on the values of parameters, so the backend does: a frozen tensor
that was replaced or updated in place since the graph was built triggers a rebuild.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from . import ir
from .compile import Pipeline, TargetError, default_passes, resolve_target, signature_of
from .pass_base import make_pass

_OPTION_NAMES = {"passes", "target", "verify", "tolerance", "fail_fast"}


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

    def __init__(self, gm: fx.GraphModule, pipeline: Pipeline):
        self.gm = gm
        self.pipeline = pipeline
        self.frozen: list[int] | None = None
        self.versions: list[tuple[int, int]] = []

    def _model_state(self, inputs: Sequence[Any]) -> list[tuple[int, int]]:
        return [(id(inputs[i]), inputs[i]._version) for i in self.frozen or ()]

    def __call__(self, *inputs: Any) -> Any:
        if self.frozen is None:
            self.frozen = [i for i, x in enumerate(inputs) if _is_model_state(x)]
        state = self._model_state(inputs)
        if state != self.versions:  # weights replaced or updated in place: folded copies are stale
            self.pipeline.cache.clear()
            self.versions = state
        user = [x for i, x in enumerate(inputs) if i not in self.frozen]
        key = signature_of(user)
        entry = self.pipeline.cache.get(key)
        if entry is None:
            module = _FrozenGraph(self.gm, inputs, self.frozen).eval()
            entry = self.pipeline.build(lambda: ir.capture(module, tuple(user)), user)
            self.pipeline.cache[key] = entry
        flat = ir.flat_inputs(entry.graph_module, user)
        return ir.unflatten_outputs(entry.graph_module, entry.runner(*flat))


def optcc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None):
    options = dict(options or {})
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown optcc backend option(s) {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}")
    passes = options.get("passes")
    target = options.get("target", "eager")
    if target == "auto":
        raise TargetError("inside torch.compile choose target='eager', 'inductor' or 'triton' explicitly")
    pipeline = Pipeline(
        default_passes() if passes is None else [make_pass(p) for p in passes],
        resolve_target(target),
        verify=bool(options.get("verify", False)),
        tolerance=options.get("tolerance"),
        fail_fast=bool(options.get("fail_fast", False)),
    )
    return _CompiledDynamoGraph(gm, pipeline)
