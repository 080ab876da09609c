"""What a pass is, and the registry passes add themselves to.

A pass is a class with

* ``name``: the string users select it by (``passes=["bn_reparam"]``);
* a docstring whose first line is its summary and whose body states its math;
* ``exact``: True when the rewrite preserves outputs up to floating-point rounding.
  Approximate passes never run unless the user names them;
* ``Options``: a dataclass of its options with defaults; users configure a pass with
  ``("token_pruning", {"r": 8})`` or by constructing it, ``TokenPruning(r=8)``;
* ``run_after`` / ``run_before``: names of passes that must come earlier / later when
  both are selected (ordering constraints, as in torch.fx's pass manager), so a new pass
  states where it belongs without editing the passes around it;
* ``requires``: names of exact passes whose output form this pass matches; when one is not
  selected, the pass manager adds it just before the first pass that requires it and says so
  in the report (``attention_to_linear`` needs ``canonicalize_attention``);
* ``in_default_pipeline``: False for an exact pass that runs only when named;
* ``run(gm) -> PassResult``: rewrites the canonical graph in place and says what changed;
* for approximate passes that an accuracy budget may tune (:mod:`optcc.budget`):
  ``knobs(gm) -> [Knob]``, the per-layer settings a search may choose among, and
  ``configure(choices) -> [Pass]``, the passes that apply exactly those choices.

The core knows no particular pass: ``optcc.passes`` (the ``passes/`` folder) registers
the built-in ones on import, and third-party packages register theirs through the
``optcc.passes`` entry-point group.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch.fx as fx


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module, whether it changed, and stats.

    ``stats["matches"]`` is the number of rewrites applied; passes may add more counters.
    ``stats["message"]``, when set, is one line the report prints under the pass (what an
    approximate pass did, or why it left the graph alone).
    """

    graph_module: fx.GraphModule
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


class PassError(RuntimeError):
    """A pass failed on a particular node; the pass manager reports the node's name."""

    def __init__(self, message: str, node: fx.Node | None = None):
        super().__init__(message)
        self.node = node


class OptionError(ValueError):
    """A pass was given an option it does not have, or a value of the wrong type."""


@dataclass
class NoOptions:
    pass


@dataclass(frozen=True)
class Knob:
    """One per-layer choice an approximate pass offers to a search (:mod:`optcc.budget`).

    ``settings`` are the values the layer may take, mildest first; choosing none leaves
    the layer exact. ``flops_saved[i]`` is the pass's estimate, from the graph, of the
    FLOPs that ``settings[i]`` removes from one call (0 where it removes none, e.g. int8);
    ``work`` is the FLOPs the layer does, used to share a measured speed-up among layers
    when no setting removes FLOPs.
    """

    layer: str
    settings: tuple
    flops_saved: tuple = ()
    work: float = 0.0

    def saved(self, setting: Any) -> float:
        index = self.settings.index(setting)
        return float(self.flops_saved[index]) if index < len(self.flops_saved) else 0.0


class Pass:
    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions
    run_after: ClassVar[tuple[str, ...]] = ()
    run_before: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    in_default_pipeline: ClassVar[bool] = True

    def __init__(self, **options: Any):
        known = {f.name: f for f in dataclasses.fields(self.Options)}
        for key, value in options.items():
            if key not in known:
                names = ", ".join(sorted(known)) or "none"
                raise OptionError(f"pass '{self.name}' has no option '{key}' (its options: {names})")
            _check_type(self.name, key, value, _resolved_type(self.Options, key))
        self.options = self.Options(**options)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def documentation(cls) -> str:
        """The pass's summary followed by its module docstring (where its math is stated)."""
        module_doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
        return f"{(cls.__doc__ or '').strip()}\n\n{module_doc.strip()}".strip()

    def run(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def knobs(self, gm: fx.GraphModule) -> list[Knob]:
        """The per-layer settings a budget search may choose for ``gm`` (none: not tunable)."""
        return []

    def configure(self, choices: dict[str, Any]) -> list["Pass"]:
        """Passes that apply ``choices`` (``{knob.layer: setting}``) and leave every other layer exact."""
        raise NotImplementedError(f"pass '{self.name}' offers no settings to tune")

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.run(gm)

    def __repr__(self) -> str:
        changed = {
            f.name: getattr(self.options, f.name)
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != f.default
        }
        args = ", ".join(f"{k}={_short_repr(v)}" for k, v in changed.items())
        return f"{self.name}({args})" if args else self.name


def _short_repr(value: Any) -> str:
    """Option values as a report line can hold them: long lists (layer selections,
    calibration batches) by their length."""
    if isinstance(value, (list, tuple)) and (len(value) > 6 or any(not isinstance(v, (int, float, str)) for v in value)):
        return f"[{len(value)} items]"
    return repr(value)


def _resolved_type(options_cls: type, key: str) -> Any:
    try:
        return typing.get_type_hints(options_cls)[key]
    except Exception:
        return Any


def _check_type(pass_name: str, key: str, value: Any, expected: Any) -> None:
    allowed = typing.get_args(expected) if typing.get_origin(expected) is typing.Union else (expected,)
    concrete = []
    for tp in allowed:
        if tp is Any:
            return
        tp = typing.get_origin(tp) or tp
        if isinstance(tp, type):
            concrete.append(tp)
        else:
            return
    if isinstance(value, bool) and bool not in concrete:
        pass  # True where an int is expected is a mistake, though bool subclasses int
    elif float in concrete and isinstance(value, int):
        return
    elif isinstance(value, tuple(concrete)):
        return
    names = " or ".join(t.__name__ for t in concrete)
    raise OptionError(
        f"option '{key}' of pass '{pass_name}' must be {names}, got {type(value).__name__} {value!r}"
    )


# ----------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False


class UnknownPassError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this reads better
        return self.args[0]


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass selectable by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"two passes are named '{cls.name}': {existing} and {cls}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_passes() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import optcc.passes  # noqa: F401  (registers the built-in passes)

    for ep in entry_points(group="optcc.passes"):
        ep.load()


def registered_passes() -> dict[str, type[Pass]]:
    _load_passes()
    return dict(_REGISTRY)


def list_passes() -> list[tuple[str, bool, str]]:
    """``(name, exact, summary)`` for every registered pass, sorted by name."""
    return [(name, cls.exact, cls.summary()) for name, cls in sorted(registered_passes().items())]


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        known = ", ".join(sorted(passes))
        raise UnknownPassError(f"unknown pass '{name}'; known passes: {known}")
    return passes[name]


PassSpec = typing.Union[str, tuple, Pass]


def make_pass(spec: PassSpec) -> Pass:
    """Turn a user's pass spec into a configured pass.

    Accepted forms: ``"name"``, ``("name", {option: value})`` or a ``Pass`` instance.
    """
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        return get_pass(spec)()
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return get_pass(spec[0])(**spec[1])
    raise TypeError(
        f"a pass is given as a name, a (name, options-dict) pair or a Pass object; got {spec!r}"
    )
