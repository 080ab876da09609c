"""Guards that keep a compiled model's folded weights from going stale.

A compiled graph holds copies of the model's weights (folded, frozen). Before each call
the compiled module asks its guard whether the model changed since the graph was built;
if so the graph is rebuilt. Three levels (``optcc.compile(..., guard=...)``, and the
``"guard"`` option of ``torch.compile(backend="optcc")``):

``True`` (default): :class:`StateGuard`. On every call, for the parameters, buffers and
    tensor attributes *the compiled graph read* (``gm.meta["optcc_state_targets"]``):
    that its module still holds the same object under that name (however it was
    replaced: ``_apply``, behind ``.to()`` / ``.half()``, writes buffers into the dict
    directly), its version counter (every in-place update: ``load_state_dict``,
    optimizer steps, ``mul_`` under ``no_grad``) and its data pointer (``param.data =
    ...``, ``.to()``, ``swap_tensors`` give it new storage without a version bump); that
    each ``Sequential`` / ``ModuleList`` / ``ModuleDict`` holds the same child dict with
    as many entries (their ``insert``, ``del``, ``pop`` edit it directly); and one
    integer comparison with a process-wide *generation*, moved by torch's global
    registration hooks (a parameter, buffer or submodule registered, assigned or
    replaced, on any module), by every ``Module.train()`` / ``eval()`` call and by
    ``del module.name``. Only when the generation moved does the guard walk the whole
    model (the comparison of :class:`FullStateGuard`: modes, added or deleted entries,
    every tensor, running statistics), and when nothing that matters changed it returns
    to the fast path.
    Cost per call: nothing per module; three C-level ``map`` passes over the tensors the
    graph read, plus two over the containers.
``"full"``: :class:`FullStateGuard`, the exhaustive walk on every call: every parameter,
    buffer and submodule of the model, every module's ``training`` flag, and the values of
    running statistics of modules without a ``num_batches_tracked`` counter. It also sees
    what the default does not: a ``training`` flag assigned directly
    (``module.training = False`` rather than ``train()`` / ``eval()``), a submodule
    written into or deleted from a module's ``_modules`` dict directly (outside the
    containers' own methods), and parameters or buffers the graph did not read written
    into or deleted from ``_parameters`` / ``_buffers`` directly.
``False``: no check; :meth:`optcc.OptimizedModule.refresh` after a deliberate change.

Neither guard sees in-place updates made through ``tensor.data`` (``w.data.mul_(2)``;
``.data`` is an alias with a version counter of its own; the full guard sees them only in
the values of running statistics), nor plain Python attributes that steer ``forward`` (a
flag, ``hasattr``). Call ``refresh()`` after those.

Why not less: torch has no event for an in-place update or a ``.data =`` assignment, so
those are checked tensor by tensor; the cost is memory latency (a tensor's version and
storage live in separate heap objects), which a forward pass evicts from the caches.

The hooks are installed when the first guard is created: three global registration
hooks (``torch.nn.modules.module.register_module_*_registration_hook``) and wrappers
around ``torch.nn.Module.train`` and ``torch.nn.Module.__delattr__`` that call the
original and then move the generation.
"""

from __future__ import annotations

import functools
import itertools
import operator
import threading
from typing import Any, Iterable, Sequence

import torch

__all__ = ["StateGuard", "FullStateGuard", "TensorWatch", "RunningStatistics", "generation", "guard_level",
           "install_hooks", "make_guard"]

_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_TRAINING = operator.attrgetter("training")
_is = operator.is_

# ----------------------------------------------------------------------------------------
# The generation: moved by every event that may change a model's structure or mode.

_counter = itertools.count(1)
_generation = 0
_install_lock = threading.Lock()
_installed = False


def generation() -> int:
    """The current generation (changes whenever any module registers, replaces or
    switches mode anywhere in the process)."""
    return _generation


def _bump(*_: Any) -> None:
    # next() on itertools.count is atomic under the GIL, so every bump stores a value no
    # other bump stores: a guard that saw generation g never mistakes a later one for g.
    # Returns None, so as a registration hook it leaves the registered value unchanged.
    global _generation
    _generation = next(_counter)


def _wrap_train(original):
    @functools.wraps(original)
    def train(self, mode: bool = True):
        try:
            return original(self, mode)
        finally:
            _bump()  # after the flags flipped: a guard that sees the new generation sees them

    train._optcc_moves_generation = True  # type: ignore[attr-defined]
    return train


def _wrap_delattr(original):
    @functools.wraps(original)
    def __delattr__(self, name):
        try:
            return original(self, name)
        finally:
            _bump()

    __delattr__._optcc_moves_generation = True  # type: ignore[attr-defined]
    return __delattr__


def install_hooks() -> None:
    """Install the hooks that move the generation (idempotent, thread-safe)."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        from torch.nn.modules import module as module_lib

        module_lib.register_module_parameter_registration_hook(_bump)
        module_lib.register_module_buffer_registration_hook(_bump)
        module_lib.register_module_module_registration_hook(_bump)
        if not getattr(torch.nn.Module.train, "_optcc_moves_generation", False):
            torch.nn.Module.train = _wrap_train(torch.nn.Module.train)
        if not getattr(torch.nn.Module.__delattr__, "_optcc_moves_generation", False):
            torch.nn.Module.__delattr__ = _wrap_delattr(torch.nn.Module.__delattr__)
        _installed = True


# ----------------------------------------------------------------------------------------
# Building blocks


class RunningStatistics:
    """The values of 1-D floating buffers: running statistics.

    BatchNorm updates its running mean and variance in training inside the batch_norm
    kernel, which bumps no version counter, so a model trained eagerly and switched back
    to eval would look unchanged. These buffers are small (one value per channel): one
    ``torch.cat`` + ``torch.equal`` per dtype compares them all (~70 us on resnet50).
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            if t.dim() == 1 and t.is_floating_point() and not isinstance(t, torch.nn.Parameter):
                by_dtype.setdefault(t.dtype, []).append(t)
        self.groups = [(group, torch.cat(group).clone()) for group in by_dtype.values()]

    def changed(self) -> bool:
        return not all(torch.equal(torch.cat(group), saved) for group, saved in self.groups)


class TensorWatch:
    """Identity, version counter and data pointer of a fixed list of tensors.

    ``matches(current)`` is True when ``current`` holds the very same tensor objects,
    none updated in place (version) or given new storage (data pointer) since.
    Immutable once built, so a thread may check it while another builds a new one.
    """

    __slots__ = ("tensors", "versions", "pointers")

    def __init__(self, tensors: Sequence[torch.Tensor], versions: Sequence[int] | None = None,
                 pointers: Sequence[int] | None = None):
        self.tensors = list(tensors)
        self.versions = list(map(_VERSION, self.tensors)) if versions is None else list(versions)
        self.pointers = list(map(_DATA_PTR, self.tensors)) if pointers is None else list(pointers)

    def __len__(self) -> int:
        return len(self.tensors)

    def unchanged(self) -> bool:
        """No watched tensor updated in place or given new storage."""
        return (list(map(_VERSION, self.tensors)) == self.versions
                and list(map(_DATA_PTR, self.tensors)) == self.pointers)

    def matches(self, current: Sequence[Any]) -> bool:
        return len(current) == len(self.tensors) and all(map(_is, current, self.tensors)) and self.unchanged()


_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
_MODULES = operator.attrgetter("_modules")


class _SlotWatch:
    """What :class:`StateGuard` checks on every call, immutable once built.

    A :class:`TensorWatch` over tensors found by (dict, name): a module's ``_parameters``,
    ``_buffers`` or ``__dict__``, which must still hold each one; and the child dicts of
    the model's containers (``Sequential``, ``ModuleList``, ``ModuleDict``), whose
    ``insert``, ``del seq[i]``, ``pop`` and ``clear`` edit or replace that dict directly,
    without a registration hook.
    """

    __slots__ = ("dicts", "names", "tensors", "containers", "container_dicts", "container_sizes")

    def __init__(self, dicts: list[dict], names: list[str], tensors: TensorWatch,
                 containers: list[torch.nn.Module], container_dicts: list[dict]):
        self.dicts, self.names, self.tensors = dicts, names, tensors
        self.containers, self.container_dicts = containers, container_dicts
        self.container_sizes = list(map(len, container_dicts))

    def intact(self) -> bool:
        return (all(map(_is, map(dict.get, self.dicts, self.names), self.tensors.tensors))
                and self.tensors.unchanged()
                and all(map(_is, map(_MODULES, self.containers), self.container_dicts))
                and list(map(len, self.container_dicts)) == self.container_sizes)


_EMPTY_WATCH = _SlotWatch([], [], TensorWatch([]), [], [])


def _counts_its_updates(module: torch.nn.Module) -> bool:
    counter = module._buffers.get("num_batches_tracked")
    return isinstance(counter, torch.Tensor)


class _FullSnapshot:
    """Everything :class:`FullStateGuard` compares, recorded at one moment."""

    def __init__(self, model: Any):
        # walked again each time: a replaced submodule brings tensors of its own
        self.modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
        self.dicts = [d for m in self.modules for d in (m._parameters, m._buffers, m._modules)]
        # del seq[i] on a Sequential or ModuleList replaces its _modules dict
        self.children = list(map(_MODULES, self.modules))
        self.container_children = {id(m): m._modules for m in self.modules if isinstance(m, _CONTAINERS)}
        self.sizes = list(map(len, self.dicts))
        slots = [(d, name, value) for d in self.dicts for name, value in d.items() if value is not None]
        self.slot_dicts = [d for d, _, _ in slots]
        self.slot_names = [name for _, name, _ in slots]
        self.slot_values = [value for _, _, value in slots]
        self.tensors = [v for v in self.slot_values if isinstance(v, torch.Tensor)]
        self.versions = list(map(_VERSION, self.tensors))
        self.pointers = list(map(_DATA_PTR, self.tensors))
        self.modes = list(map(_TRAINING, self.modules))
        # A BatchNorm step in training bumps the version of num_batches_tracked (a Python
        # add_), which the version check sees; only buffers of modules without such a
        # counter need their values compared.
        self.statistics = RunningStatistics([b for m in self.modules if not _counts_its_updates(m)
                                             for b in m._buffers.values() if b is not None])

    def changed(self) -> bool:
        # map() with C-level getters: about half the cost of the equivalent comprehensions
        return (
            list(map(_VERSION, self.tensors)) != self.versions
            or list(map(_TRAINING, self.modules)) != self.modes
            or list(map(len, self.dicts)) != self.sizes
            or not all(map(_is, map(_MODULES, self.modules), self.children))
            or not all(map(_is, map(dict.get, self.slot_dicts, self.slot_names), self.slot_values))
            or list(map(_DATA_PTR, self.tensors)) != self.pointers
            or self.statistics.changed()
        )

    def recorded(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(version, data pointer) of ``tensor`` when the snapshot was taken, if it was in the model."""
        index = getattr(self, "_index", None)
        if index is None:
            index = self._index = {id(t): i for i, t in enumerate(self.tensors)}
        i = index.get(id(tensor))
        if i is None or self.tensors[i] is not tensor:
            return None
        return self.versions[i], self.pointers[i]


# ----------------------------------------------------------------------------------------
# The guards


class FullStateGuard:
    """Notices when a model's weights are replaced or updated in place, or a mode flips,
    by walking the whole model on every call (``guard="full"``).

    Checked on every call, so it is kept to a few flat passes over lists made once:
    tensor version counters (bumped by every in-place update, ``load_state_dict``
    included), data pointers (``param.data = ...`` and ``model.to(dtype)`` swap the
    storage without bumping the version), train/eval flags, the identity of everything
    registered on each module (parameters, buffers, submodules: a replaced parameter or
    layer), the number of entries (one added or deleted), the identity of each module's
    child dict (``del seq[i]`` replaces it) and the values of running statistics
    (:class:`RunningStatistics`). Cost: linear in the model's tensors and
    modules (~0.7 ms warm, ~2.5 ms inside a forward loop on mobileone_s0's 1,323 tensors
    and 1,289 modules).
    """

    def __init__(self, model: Any, watch: Iterable[str] | None = None):
        self.model = model
        self.snapshot(watch)

    def snapshot(self, watch: Iterable[str] | None = None) -> None:
        """Record the model's state now (``watch`` is accepted for the same signature as
        :class:`StateGuard`; this guard always compares everything)."""
        self._full = _FullSnapshot(self.model)

    def watch(self, targets: Iterable[str] | None) -> None:
        """Nothing to add: this guard compares everything on every call."""

    def settle(self) -> None:
        """Nothing to do: this guard keeps no generation."""

    def changed(self) -> bool:
        return self._full.changed()


class StateGuard(FullStateGuard):
    """The default guard: watches the tensors the compiled graphs read, and walks the
    model only after an event that may have changed its structure or mode (see the module
    docstring for what is and is not seen).

    ``watch``: the dotted names (``"bn.running_mean"``) of the parameters, buffers and
    tensor attributes the compiled graphs read, as :func:`optcc.ir.capture` records them
    in ``gm.meta["optcc_state_targets"]``; None watches every parameter and buffer.
    ``snapshot(watch)`` records the state now and starts watching ``watch``;
    ``watch(targets)`` adds the tensors another specialisation read, with their state as
    of the snapshot (so a change made while that graph was being built is still seen).
    """

    def __init__(self, model: Any, watch: Iterable[str] | None = None):
        install_hooks()
        super().__init__(model, watch)

    def snapshot(self, watch: Iterable[str] | None = None) -> None:
        seen = _generation  # read first: an event during the walk moves it past this
        super().snapshot()
        self._watched = _EMPTY_WATCH
        self._names: set[str] = set()
        self._seen = seen
        self.watch(watch)

    def watch(self, targets: Iterable[str] | None) -> None:
        if targets is None:
            targets = self._every_tensor_name()
        full, old = self._full, self._watched
        dicts, names, tensors = list(old.dicts), list(old.names), list(old.tensors.tensors)
        versions, pointers = list(old.tensors.versions), list(old.tensors.pointers)
        for target in targets:
            if target in self._names:
                continue
            slot = self._resolve(target)
            if slot is None:
                continue
            owner_dict, name, tensor = slot
            # As of the snapshot, taken before the graph was built. A tensor attribute that
            # is no parameter or buffer (a lifted constant) was not recorded: as of now. So
            # was a tensor registered since the snapshot, but registering it moved the
            # generation, so the next call compares everything anyway.
            recorded = full.recorded(tensor) or (tensor._version, tensor.data_ptr())
            self._names.add(target)
            dicts.append(owner_dict)
            names.append(name)
            tensors.append(tensor)
            versions.append(recorded[0])
            pointers.append(recorded[1])
        containers = [m for m in full.modules if isinstance(m, _CONTAINERS)]
        self._watched = _SlotWatch(dicts, names, TensorWatch(tensors, versions, pointers),
                                   containers, [full.container_children[id(m)] for m in containers])

    def settle(self) -> None:
        """After a build: if the model is as the snapshot recorded it, forget the events
        the build itself caused (its modules registered tensors), so the next call takes
        the fast path instead of walking the model and rebuilding for an unread tensor
        that changed."""
        seen = _generation
        if not self._full.changed():
            self._seen = seen

    @property
    def watched(self) -> int:
        """How many tensors are checked on every call."""
        return len(self._watched.tensors)

    def changed(self) -> bool:
        if not self._watched.intact():
            return True
        seen = _generation
        if seen == self._seen:
            return False
        if self._full.changed():  # an event since the snapshot: compare everything
            return True
        self._seen = seen  # nothing that matters changed; stay on the fast path
        return False

    def _every_tensor_name(self) -> list[str]:
        if not isinstance(self.model, torch.nn.Module):
            return []
        named = itertools.chain(self.model.named_parameters(remove_duplicate=False),
                                self.model.named_buffers(remove_duplicate=False))
        return [name for name, _ in named]

    def _resolve(self, target: str) -> tuple[dict, str, torch.Tensor] | None:
        if not isinstance(self.model, torch.nn.Module):
            return None
        path, _, name = target.rpartition(".")
        try:
            owner = self.model.get_submodule(path) if path else self.model
        except AttributeError:
            return None  # a lifted constant without an attribute of its own
        for owner_dict in (owner._parameters, owner._buffers, owner.__dict__):
            value = owner_dict.get(name)
            if isinstance(value, torch.Tensor):
                return owner_dict, name, value
        return None


def guard_level(guard: Any) -> bool | str:
    """``guard`` as True, False or "full" (a ValueError for any other string)."""
    if isinstance(guard, str):
        if guard != "full":
            raise ValueError(f"guard must be True, False or 'full', got {guard!r}")
        return guard
    return bool(guard)


def make_guard(model: Any, guard: Any) -> FullStateGuard | None:
    """The guard ``optcc.compile(..., guard=...)`` asks for: True, "full" or False (None).

    The default guard starts watching nothing: the compiled module adds what each graph
    it builds read (:meth:`StateGuard.watch`)."""
    level = guard_level(guard)
    if level == "full":
        return FullStateGuard(model)
    return StateGuard(model, watch=()) if level else None
