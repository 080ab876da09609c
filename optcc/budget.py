"""Accuracy-budget compilation: the approximate passes' settings chosen layer by layer.

    budget = optcc.Budget("top1", max_drop=0.01, data=batches, heldout=other_batches)
    compiled = optcc.compile(model, passes=["token_pruning", "int8_decomposition"],
                             example_inputs=batches[0], budget=budget)
    print(compiled.report)          # the pass table, then the budget's choice and its Pareto points

The search (after ModelOpt's ``auto_quantize``, HAWQ-V3 and NNCF's accuracy control, over
every approximate pass named at once):

1. **Reference.** The exact pipeline (the listed exact passes) runs on the calibration
   batches; its outputs are what the metric compares against.
2. **Knobs.** Each approximate pass lists its per-layer settings on the canonical graph
   (:meth:`optcc.Pass.knobs`): token_pruning's r per block, attention_to_linear's layers,
   int8_decomposition's linears and their outlier threshold.
3. **Sensitivity.** Every (knob, setting) is applied alone and its metric drop ``d`` measured.
4. **Single-pass settings.** Every pass with one setting on all its layers: its drop, and its
   speed-up over the exact pipeline, timed (objective ``latency``: :func:`optcc.bench.
   time_interleaved`, same process, interleaved, medians) or counted
   (``flops``: ``torch.utils.flop_counter`` on the rewritten graph). These are the baselines
   the result must beat, and they give each layer its gain: the pass's measured gain at
   that setting, shared among its layers in proportion to the FLOPs each removes (or does,
   for int8, which removes none).
5. **Prediction.** A multiple-choice knapsack: one setting (or none) per knob, maximising
   the predicted gain while the summed drops stay under a cap; solved for several caps
   around ``max_drop``, since drops do not add exactly. Beside them, the unions of
   single-pass settings within budget (one per pass) whose drops sum under the largest cap:
   the interactions inside a pass (token merging in every block) are measured there.
6. **Verification and repair.** Each predicted combination is measured; while it is over
   the budget, the group of choices (a pass at a setting) whose removal helps most is found
   by measuring, and its choices are reverted one at a time, most harmful first (NNCF's
   greedy repair, in context), until it is within.
7. **Choice.** The verified combinations and the single-pass settings within the budget are
   timed again, together in one interleaved run against the exact pipeline (speed-ups
   from separate runs, or from a cache, drift by more than the differences that decide
   here); the fastest wins; the exact pipeline when
   none is within budget (the report says so). The chosen settings are then measured on the
   held-out batches, which the search never saw.

Every measurement is cached on disk under the fingerprint of the model's canonical graph and
weights, the data, the metric and the passes, so a rerun with another ``max_drop`` only times.
Speed-ups are cached per CPU and target. Drops are relative to the metric's value on the exact
pipeline: ``cosine`` (mean cosine of the first output, per sample; drop = 1 - cosine), ``top1``
(argmax agreement over the last axis; drop = 1 - agreement), ``perplexity`` (of the first
output as next-token logits of the batch's first input; drop = ppl / ppl_exact - 1), or a
callable ``(reference_outputs, outputs) -> score`` over the lists of per-batch outputs, higher
is better (drop = score(ref, ref) - score(ref, outputs)); with ``Budget(labels=...)`` it
also receives the batches' labels (an accuracy against ground truth).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from . import hardware, ir
from .pass_base import Knob, Pass
from .pass_manager import PassManager, check_order, snapshot, with_requirements

Metric = Union[str, Callable[[list, list], float]]
METRICS = ("cosine", "top1", "perplexity")
OBJECTIVES = ("latency", "flops")


class BudgetError(ValueError):
    """A budget that cannot be searched as given (no data, no tunable pass, shapes that differ)."""


class BudgetWarning(UserWarning):
    """The chosen settings are over the budget on the held-out data."""


@dataclass
class Budget:
    """What ``optcc.compile(..., budget=...)`` searches for: the fastest settings of the named
    approximate passes whose metric drop on ``data`` stays within ``max_drop``.

    ``data``: calibration batches, each a tuple of positional inputs (or a dict of keyword
    inputs) of the shapes of ``example_inputs``; ``heldout``: batches the search never sees,
    on which the choice is reported. ``labels`` / ``heldout_labels``: per-batch targets; when
    given, a callable metric is called ``metric(reference_outputs, outputs, labels)`` (e.g. a
    probe's accuracy). ``objective``: ``latency`` (timed here, on the compile
    target) or ``flops`` (counted). ``cache``: a directory, True for the default
    (``$OPTCC_CACHE_DIR/budget`` or ``~/.cache/optcc/budget``), False for none. ``out``: a
    directory the Pareto table (``budget.md``) and plot (``budget.svg``, ``budget.png``) are written to.
    ``sensitivity_batches``: measure each layer alone on the first n batches only (the
    combinations are always verified on all of them), for models where one pass over
    ``data`` is slow. ``margin``: the fraction of ``max_drop`` held back during the search:
    candidates must stay within ``max_drop * (1 - margin)`` on the calibration data. The
    search picks the best of many measured candidates, so the winner's calibration drop is
    optimistic (most of all for a discrete metric on few samples: one image of 96 is a point
    of accuracy); the margin leaves that room, and the held-out drop shows whether it was enough.
    """

    metric: Metric = "cosine"
    max_drop: float = 0.01
    data: Sequence[Any] = ()
    heldout: Sequence[Any] = ()
    labels: Sequence[Any] | None = None          # per-batch targets a callable metric scores against
    heldout_labels: Sequence[Any] | None = None
    objective: str = "latency"
    cache: Union[bool, str, os.PathLike] = True
    out: Union[str, os.PathLike, None] = None
    runs: int = 5                 # timed runs per contender (median)
    seconds_per_run: float = 0.3
    caps: Sequence[float] = (0.5, 1.0, 1.5, 2.0)   # knapsack caps, as multiples of max_drop
    sensitivity_batches: int | None = None         # the first n batches measure each layer alone (default all)
    margin: float = 0.0                            # fraction of max_drop held back on the calibration data
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise BudgetError(f"unknown budget metric '{self.metric}'; choose one of {', '.join(METRICS)} "
                              f"or pass a callable (reference_outputs, outputs) -> score")
        if not isinstance(self.metric, str) and not callable(self.metric):
            raise BudgetError(f"the budget metric must be a name or a callable, got {self.metric!r}")
        if self.objective not in OBJECTIVES:
            raise BudgetError(f"unknown budget objective '{self.objective}'; choose one of {', '.join(OBJECTIVES)}")
        if not (isinstance(self.max_drop, (int, float)) and self.max_drop >= 0):
            raise BudgetError(f"max_drop must be a number >= 0, got {self.max_drop!r}")
        if not (isinstance(self.margin, (int, float)) and 0 <= self.margin < 1):
            raise BudgetError(f"margin must be a fraction of max_drop in [0, 1), got {self.margin!r}")
        for name, labels, batches in (("labels", self.labels, self.data), ("heldout_labels", self.heldout_labels,
                                                                            self.heldout)):
            if labels is not None and len(labels) != len(batches):
                raise BudgetError(f"{name} must hold one entry per batch: {len(labels)} for {len(batches)} batches")
        if not self.data:
            raise BudgetError("the budget needs calibration data: Budget(data=[batch, ...]), each batch the "
                              "model's inputs")

    @property
    def limit(self) -> float:
        """The drop the search allows on the calibration data: ``max_drop`` less the margin."""
        return self.max_drop * (1.0 - self.margin)

    @property
    def metric_name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "custom")


# ----------------------------------------------------------------------------------------
# Metrics: drops relative to the exact pipeline's outputs (lists of flat outputs per batch)


def _first_float(flat: Sequence[Any]) -> torch.Tensor:
    for value in flat:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().float()
    raise BudgetError("the budget metric needs a floating-point output; the model returned none")


def _cosine(ref: list, out: list, batches: list) -> float:
    cos = [F.cosine_similarity(_first_float(r).flatten(1), _first_float(o).flatten(1), dim=1) for r, o in zip(ref, out)]
    return 1.0 - torch.cat(cos).mean().item()


def _top1(ref: list, out: list, batches: list) -> float:
    same = [(_first_float(r).argmax(-1) == _first_float(o).argmax(-1)).flatten() for r, o in zip(ref, out)]
    return 1.0 - torch.cat(same).float().mean().item()


def _nll(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = tokens[:, 1:].reshape(-1)
    return F.cross_entropy(flat, targets, reduction="sum").item(), targets.numel()


def _first_tokens(flat_batch: Sequence[Any]) -> torch.Tensor:
    for value in flat_batch:
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() == 2:
            return value
    raise BudgetError("the perplexity metric reads the tokens from the batch's first integer [batch, length] "
                      "input; this model's inputs have none")


def _perplexity(ref: list, out: list, batches: list) -> float:
    def ppl(outputs):
        total, count = 0.0, 0
        for o, b in zip(outputs, batches):
            nll, n = _nll(_first_float(o), _first_tokens(b))
            total, count = total + nll, count + n
        return math.exp(total / count)

    return ppl(out) / ppl(ref) - 1.0


_DROPS = {"cosine": _cosine, "top1": _top1, "perplexity": _perplexity}


# ----------------------------------------------------------------------------------------
# Configurations: {pass index: {layer: setting}}


Config = dict  # int -> dict[str, Any]


def config_key(config: Config) -> str:
    return json.dumps({str(k): dict(sorted(v.items())) for k, v in sorted(config.items()) if v}, sort_keys=True)


def _describe(tunable: dict[int, Pass], config: Config) -> str:
    parts = []
    for index, choices in sorted(config.items()):
        if not choices:
            continue
        counts: dict[str, int] = {}
        for v in choices.values():
            counts[json.dumps(v)] = counts.get(json.dumps(v), 0) + 1
        at = (f"at {next(iter(counts))}" if len(counts) == 1 else
              "(" + ", ".join(f"{n} at {v}" for v, n in sorted(counts.items())) + ")")
        parts.append(f"{tunable[index].name}: {len(choices)} layer(s) {at}")
    return "; ".join(parts) or "exact"


@dataclass
class Point:
    """One measured configuration: what it is, its drop (calibration, held-out) and its speed-up."""

    label: str
    kind: str                      # exact | single-pass | search
    drop: float
    speedup: float | None = None
    heldout_drop: float | None = None
    config: Config = field(default_factory=dict, repr=False)

    def within(self, max_drop: float) -> bool:
        return self.drop <= max_drop + 1e-12


@dataclass
class BudgetResult:
    """What a budget search chose and everything it measured on the way (``compiled.report.budget``)."""

    metric: str
    max_drop: float
    objective: str
    target: str
    chosen: Point
    best_single: Point | None
    points: list[Point]
    choices: list[tuple[str, str, Any]]      # (pass, layer, setting) of the chosen configuration
    passes: list[Pass]                       # the pipeline that applies them
    status: str                              # met | not faster | unmet
    cpu: str
    limit: float = -1.0                      # the calibration limit searched (max_drop less the margin)
    evaluations: int = 0                     # configurations measured in this run (the rest came from the cache)
    cached: int = 0
    files: list[str] = field(default_factory=list)
    timed_together: bool = False             # the settings within budget were re-timed in one final run

    def __post_init__(self):
        if self.limit < 0:
            self.limit = self.max_drop

    @property
    def met(self) -> bool:
        return self.status == "met"

    @property
    def heldout_exceeded(self) -> bool:
        """The choice is over ``max_drop`` on the held-out data (measured there, never searched)."""
        held = self.chosen.heldout_drop
        return held is not None and held > self.max_drop + 1e-12

    @property
    def bound(self) -> str:
        """How the budget reads: the drop allowed, and the calibration limit when a margin lowers it."""
        margin = f" (searched within {self.limit:g} on the calibration data)" if self.limit < self.max_drop else ""
        return f"{self.metric} drop <= {self.max_drop:g}{margin}"

    @property
    def message(self) -> str:
        if self.status == "unmet":
            return (f"no setting keeps {self.metric} within a drop of {self.limit:g} on the calibration data; "
                    f"the exact pipeline is returned")
        if self.status == "not faster":
            return (f"settings within a {self.metric} drop of {self.limit:g} exist, but none was faster than the "
                    f"exact pipeline ({self.objective}, {self.target}); the exact pipeline is returned")
        single = (f"; best single-pass setting within budget: {self.best_single.label} "
                  f"({_speed(self.best_single.speedup)})" if self.best_single else "; no single-pass setting is within budget")
        held = "" if self.chosen.heldout_drop is None else f", held-out drop {self.chosen.heldout_drop:.4f}"
        message = (f"chosen: {self.chosen.label}: {self.metric} drop {self.chosen.drop:.4f}{held}, "
                   f"{_speed(self.chosen.speedup)} {self.objective} vs exact ({self.target}){single}")
        if self.heldout_exceeded:
            message += (f". WARNING: the held-out drop {self.chosen.heldout_drop:.4f} is over the budget "
                        f"{self.max_drop:g}: the calibration data did not predict it; give more calibration "
                        f"batches or a larger Budget(margin=...)")
        return message

    def table(self):
        from rich.table import Table

        unit = "speed-up" if self.objective == "latency" else "FLOPs ratio"
        table = Table(title=f"budget: {self.bound}, objective {self.objective}",
                      title_justify="left")
        for col, justify in [("configuration", "left"), ("kind", "left"), ("drop", "right"),
                             ("held-out drop", "right"), (unit, "right"), ("", "left")]:
            table.add_column(col, justify=justify)
        for p in sorted(self.points, key=lambda p: (p.speedup or 0.0)):
            mark = "chosen" if p is self.chosen else ("within" if p.within(self.limit) else "over")
            held = "-" if p.heldout_drop is None else f"{p.heldout_drop:.4f}"
            table.add_row(p.label, p.kind, f"{p.drop:.4f}", held, _speed(p.speedup), mark)
        return table

    def choices_table(self):
        from rich.table import Table

        table = Table(title="chosen settings per layer", title_justify="left")
        for col in ("pass", "layer", "setting"):
            table.add_column(col)
        for name, layer, setting in self.choices:
            table.add_row(name, layer, json.dumps(setting))
        return table

    def choices_summary(self) -> str:
        """The chosen settings in one line: per pass and setting, its layers (or the ones left exact)."""
        parts = []
        by_pass: dict[str, dict[str, list[str]]] = {}
        for name, layer, setting in self.choices:
            by_pass.setdefault(name, {}).setdefault(json.dumps(setting), []).append(layer)
        for name, settings in by_pass.items():
            for setting, layers in settings.items():
                parts.append(f"{name} = {setting} at {', '.join(layers)}" if len(layers) <= 8 else
                             f"{name} = {setting} at {len(layers)} layers ({', '.join(layers[:3])}, ...)")
        return "; ".join(parts)

    def render(self, console) -> None:
        console.print(self.table())
        if self.choices:
            console.print(self.choices_table())
        console.print(f"budget: {self.message}")
        console.print(f"budget: {self.evaluations} configurations measured, {self.cached} from the cache; "
                      f"CPU {self.cpu}")
        for path in self.files:
            console.print(f"budget: wrote {path}")

    def markdown(self) -> str:
        unit = "speed-up" if self.objective == "latency" else "FLOPs ratio"
        lines = [f"Budget: {self.bound}, objective {self.objective}, target "
                 f"{self.target}, CPU {self.cpu}.", "",
                 f"| configuration | kind | drop | held-out drop | {unit} | |", "|---|---|---|---|---|---|"]
        for p in sorted(self.points, key=lambda p: (p.speedup or 0.0)):
            mark = "**chosen**" if p is self.chosen else ("within" if p.within(self.limit) else "over")
            held = "-" if p.heldout_drop is None else f"{p.heldout_drop:.4f}"
            lines.append(f"| {p.label} | {p.kind} | {p.drop:.4f} | {held} | {_speed(p.speedup)} | {mark} |")
        if self.timed_together:
            lines += ["", "The speed-ups of the settings within the budget come from one final run that timed them "
                      "together (interleaved, medians); the others are from the search's runs."]
        if self.choices:
            lines += ["", "Chosen settings: " + self.choices_summary()]
        lines += ["", self.message]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> str:
        """The Pareto points (drop against speed-up) as an image; the format follows the suffix."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        styles = {"exact": ("k", "s"), "single-pass": ("tab:blue", "o"), "search": ("tab:orange", "^")}
        for kind, (color, marker) in styles.items():
            pts = [p for p in self.points if p.kind == kind and p.speedup is not None]
            if pts:
                ax.scatter([p.drop for p in pts], [p.speedup for p in pts], c=color, marker=marker, label=kind)
        if self.chosen.speedup is not None:
            ax.scatter([self.chosen.drop], [self.chosen.speedup], s=160, facecolors="none", edgecolors="red",
                       label="chosen")
        ax.axvline(self.max_drop, color="grey", linestyle="--", linewidth=1, label=f"max drop {self.max_drop:g}")
        if self.limit < self.max_drop:
            ax.axvline(self.limit, color="grey", linestyle=":", linewidth=1, label=f"searched within {self.limit:g}")
        ax.set_xlabel(f"{self.metric} drop (calibration data)")
        ax.set_ylabel("speed-up vs exact" if self.objective == "latency" else "FLOPs ratio vs exact")
        ax.set_title(f"budget search ({self.target}, {self.cpu.split()[0] if self.cpu else 'cpu'})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return str(path)


def _speed(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ----------------------------------------------------------------------------------------
# The cache


def _default_cache_dir() -> Path:
    base = os.environ.get("OPTCC_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "optcc") / "budget"


def _digest_tensors(h, values: Any) -> None:
    for leaf in pytree.tree_leaves(values):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(leaf).encode())


def fingerprint(gm: fx.GraphModule, budget: Budget, passes: Sequence[Pass]) -> str:
    """Model (canonical graph and its constants), data, metric and passes, hashed."""
    h = hashlib.sha256()
    h.update(gm.code.encode())
    for node in gm.graph.nodes:  # the canonical IR reads every weight through a get_attr node
        if node.op == "get_attr":
            value = getattr(gm, str(node.target), None)
            if isinstance(value, torch.Tensor):
                h.update(str(node.target).encode())
                _digest_tensors(h, value)
    _digest_tensors(h, list(budget.data))
    h.update(b"heldout")
    _digest_tensors(h, list(budget.heldout))
    _digest_tensors(h, [budget.labels, budget.heldout_labels])
    metric = budget.metric
    h.update((metric if isinstance(metric, str) else getattr(metric, "__qualname__", repr(metric))).encode())
    code = getattr(metric, "__code__", None)
    if code is not None:
        h.update(code.co_code)
    h.update(repr([(p.name, repr(p)) for p in passes]).encode())
    return h.hexdigest()[:24]


class _Cache:
    def __init__(self, setting: Union[bool, str, os.PathLike], key: str):
        self.path = None
        if setting:
            folder = _default_cache_dir() if setting is True else Path(setting)
            self.path = folder / f"{key}.json"
        self.data = {"drops": {}, "heldout": {}, "speedups": {}}  # and "deviation <which>"
        if self.path is not None and self.path.exists():
            try:
                self.data.update(json.loads(self.path.read_text()))
            except (OSError, ValueError):
                pass  # a damaged cache is measured again

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


# ----------------------------------------------------------------------------------------
# The search


def _flat(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


class _Search:
    def __init__(self, model, args, kwargs, passes: list[Pass], budget: Budget, target: str):
        from rich.console import Console

        self.budget, self.target = budget, target
        self.console = Console(stderr=True)
        gm = ir.capture(model, args, kwargs)
        passes, self.notes = with_requirements(passes)
        check_order(passes)
        # The leading exact passes run once; everything from the first approximate pass on
        # runs per configuration.
        first = next((i for i, p in enumerate(passes) if not p.exact), len(passes))
        self.prefix, self.rest = passes[:first], passes[first:]
        self.base, _ = PassManager(self.prefix).run(gm) if self.prefix else (gm, None)
        self.tunable = {i: p for i, p in enumerate(self.rest) if not p.exact}
        self.knobs: dict[int, list[Knob]] = {i: p.knobs(snapshot(self.base)) for i, p in self.tunable.items()}
        self.knob_of = {(i, k.layer): k for i, knobs in self.knobs.items() for k in knobs}
        if not any(self.knobs.values()):
            names = ", ".join(p.name for p in self.tunable.values()) or "none"
            raise BudgetError(f"no approximate pass found a layer to tune in this graph (approximate passes named: "
                              f"{names}); name token_pruning, attention_to_linear or int8_decomposition, and see "
                              f"their report for why layers were left alone")
        self.batches = [self._check(b, args, kwargs, "data") for b in budget.data]
        self.heldout = [self._check(b, args, kwargs, "heldout") for b in budget.heldout]
        self.cache = _Cache(budget.cache, fingerprint(self.base, budget, passes))
        self.cpu = " ".join(hardware.cpu().features())
        self.speed_key = f"{budget.objective}|{target}|{self.cpu}"
        self.cache.data["speedups"].setdefault(self.speed_key, {})
        self.evaluations = self.cached = 0
        self.reference = self._outputs(snapshot(self.base), self.batches)
        self.reference_heldout = self._outputs(snapshot(self.base), self.heldout) if self.heldout else []

    def _check(self, batch, args, kwargs, what: str) -> list:
        b_args, b_kwargs = _flat(batch)
        flat = ir.flat_inputs(self.base, b_args, b_kwargs)
        expected = ir.flat_inputs(self.base, args, kwargs)
        got = [(tuple(t.shape), t.dtype) for t in flat if isinstance(t, torch.Tensor)]
        want = [(tuple(t.shape), t.dtype) for t in expected if isinstance(t, torch.Tensor)]
        if got != want:
            raise BudgetError(f"budget {what} batches must have the shapes and dtypes of example_inputs: got {got}, "
                              f"expected {want}; make every batch the same size (pad, or drop the last one)")
        return flat

    # -- building and measuring ---------------------------------------------------------

    def passes_of(self, config: Config) -> list[Pass]:
        result = list(self.prefix)
        for i, p in enumerate(self.rest):
            if i in self.tunable:
                result += self.tunable[i].configure(config.get(i, {})) if config.get(i) else []
            else:
                result.append(p)
        return result

    def graph(self, config: Config) -> fx.GraphModule:
        rest = self.passes_of(config)[len(self.prefix):]
        gm, _ = PassManager(rest, add_required=False).run(snapshot(self.base))
        return gm

    @torch.no_grad()
    def _outputs(self, gm: fx.GraphModule, batches: list) -> list:
        from .compiler import lower

        runner = lower(gm, "eager", batches[0]) if batches else None
        return [list(runner(*b)) for b in batches]

    def _drop(self, reference: list, outputs: list, batches: list, heldout: bool = False) -> float:
        metric = self.budget.metric
        if isinstance(metric, str):
            return float(_DROPS[metric](reference, outputs, batches))
        unflat = lambda outs: [ir.unflatten_outputs(self.base, o) for o in outs]  # noqa: E731
        ref, out = unflat(reference), unflat(outputs)
        labels = self.budget.heldout_labels if heldout else self.budget.labels
        extra = () if labels is None else (list(labels)[:len(batches)],)
        return float(metric(ref, ref, *extra)) - float(metric(ref, out, *extra))

    def drop(self, config: Config, heldout: bool = False, first: int | None = None) -> float:
        """The metric drop of ``config`` on the calibration batches (the first ``first`` of
        them) or the held-out ones; also records its output deviation (1 - cosine)."""
        batches, reference = (self.heldout, self.reference_heldout) if heldout else (self.batches, self.reference)
        first = len(batches) if first is None else min(first, len(batches))
        which = "heldout" if heldout else ("drops" if first == len(batches) else f"drops[:{first}]")
        key = config_key(config)
        store = self.cache.data.setdefault(which, {})
        deviations = self.cache.data.setdefault("deviation " + which, {})
        if key in store:
            self.cached += 1
            return store[key]
        batches, reference = batches[:first], reference[:first]
        if not key.strip("{}"):
            value = 0.0 if self.budget.metric in METRICS else self._drop(reference, reference, batches, heldout)
            deviations[key] = 0.0
        else:
            outputs = self._outputs(self.graph(config), batches)
            value = self._drop(reference, outputs, batches, heldout)
            deviations[key] = _cosine(reference, outputs, batches)
        self.evaluations += 1
        store[key] = value
        self.cache.save()
        return value

    def deviation(self, config: Config, first: int | None = None) -> float:
        first = len(self.batches) if first is None else min(first, len(self.batches))
        which = "drops" if first == len(self.batches) else f"drops[:{first}]"
        self.drop(config, first=first)
        return self.cache.data["deviation " + which][config_key(config)]

    def speedups(self, configs: list[Config]) -> list[float]:
        """Speed-up over the exact pipeline of each configuration (cached per CPU and target)."""
        store = self.cache.data["speedups"][self.speed_key]
        todo = [c for c in configs if config_key(c) not in store]
        if todo:
            if self.budget.objective == "flops":
                exact = self._flops({})
                for c in todo:
                    store[config_key(c)] = exact / max(self._flops(c), 1.0)
            else:
                store.update(self._time(todo))
            self.cache.save()
        return [store[config_key(c)] for c in configs]

    def retime(self, configs: list[Config]) -> list[float]:
        """Time ``configs`` afresh, together in one interleaved run against the exact pipeline,
        and keep those numbers: speed-ups timed in separate runs (minutes apart, or read from
        a cache written under another load) are not comparable to a few percent. Twice the
        budget's runs: this one decides."""
        fresh = self._time(configs, runs=2 * self.budget.runs + 1)
        self.cache.data["speedups"][self.speed_key].update(fresh)
        self.cache.save()
        return [fresh[config_key(c)] for c in configs]

    @torch.no_grad()
    def _flops(self, config: Config) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        from .compiler import lower

        gm = self.graph(config) if config else snapshot(self.base)
        runner = lower(gm, "eager", self.batches[0])
        with FlopCounterMode(display=False) as counter:
            runner(*self.batches[0])
        return float(counter.get_total_flops())

    @torch.no_grad()
    def _time(self, configs: list[Config], runs: int | None = None) -> dict[str, float]:
        from .bench import calibrate, time_interleaved
        from .compiler import lower

        batch = self.batches[0]
        runners = {"exact": lower(snapshot(self.base), self.target, batch)}
        for c in configs:
            runners[config_key(c)] = lower(self.graph(c), self.target, batch)
        calls = {k: (lambda r=r: r(*batch)) for k, r in runners.items()}
        for fn in calls.values():
            fn()  # first calls (allocations, Inductor's lazy work) are not timed
        iterations = calibrate(calls["exact"], self.budget.seconds_per_run)
        times = time_interleaved(calls, runs=runs or self.budget.runs, iterations=iterations)
        exact = statistics.median(times["exact"])
        return {k: exact / statistics.median(v) for k, v in times.items() if k != "exact"}

    # -- the steps ----------------------------------------------------------------------

    def sensitivities(self, progress) -> dict[tuple[int, str, Any], float]:
        items = [(i, k.layer, s) for i, knobs in self.knobs.items() for k in knobs for s in k.settings]
        task = progress.add_task("budget: each layer alone", total=len(items))
        result = {}
        first = self.budget.sensitivity_batches
        for i, layer, setting in items:
            result[(i, layer, setting)] = self.drop({i: {layer: setting}}, first=first)
            progress.advance(task)
        return result

    def singles(self) -> list[Config]:
        configs = []
        for i, knobs in self.knobs.items():
            settings = []
            for k in knobs:
                settings += [s for s in k.settings if s not in settings]
            for s in settings:
                configs.append({i: {k.layer: s for k in knobs if s in k.settings}})
        return configs

    def gains(self, singles: list[Config], speeds: list[float]) -> dict[tuple[int, str, Any], float]:
        """Each (knob, setting)'s share of its pass's measured gain at that setting."""
        gains = {}
        for config, speed in zip(singles, speeds):
            ((i, choices),) = config.items()
            knobs = {k.layer: k for k in self.knobs[i]}
            setting = next(iter(choices.values()))
            weights = {layer: knobs[layer].saved(setting) for layer in choices}
            if sum(max(w, 0.0) for w in weights.values()) <= 0:
                weights = {layer: knobs[layer].work for layer in choices}
            total = sum(max(w, 0.0) for w in weights.values()) or 1.0
            gain = 1.0 - 1.0 / speed if speed > 0 else 0.0   # fraction of the exact time saved
            for layer, w in weights.items():
                gains[(i, layer, setting)] = gain * max(w, 0.0) / total
        return gains

    def knapsack(self, drops: dict, gains: dict, cap: float) -> Config:
        """One setting or none per knob: max sum gain s.t. sum max(drop, 0) <= cap (DP over drop bins)."""
        bins = 400
        unit = cap / bins if cap > 0 else 1.0
        groups = [[(key, gains.get(key, 0.0), drops[key]) for key in drops if key[:2] == (i, k.layer)]
                  for i, knobs in self.knobs.items() for k in knobs]
        best = {0: (0.0, [])}   # used bins -> (gain, chosen keys)
        for group in groups:
            nxt = dict(best)
            for used, (total, chosen) in best.items():
                for key, gain, drop in group:
                    if gain <= 0:
                        continue
                    cost = math.ceil(max(drop, 0.0) / unit - 1e-9) if cap > 0 else (0 if drop <= 0 else bins + 1)
                    if used + cost > bins:
                        continue
                    if nxt.get(used + cost, (-1.0,))[0] < total + gain:
                        nxt[used + cost] = (total + gain, chosen + [key])
            best = nxt
        _, chosen = max(best.values(), key=lambda v: v[0])
        config: Config = {}
        for i, layer, setting in chosen:
            config.setdefault(i, {})[layer] = setting
        return config

    #: a group of at most this many choices is ordered by measuring each one's removal
    LEAVE_ONE_OUT = 12
    #: unions of single-pass settings verified, the most promising first
    COMBINATIONS = 4

    def soften(self, config: Config, keys) -> Config:
        """``config`` with each choice in ``keys`` moved to its knob's next milder setting, or
        reverted to exact when it is already the mildest."""
        out = {i: dict(c) for i, c in config.items()}
        for i, layer, setting in keys:
            if out.get(i, {}).get(layer) != setting:
                continue
            settings = self.knob_of[(i, layer)].settings
            index = settings.index(setting)
            if index > 0:
                out[i][layer] = settings[index - 1]
            else:
                del out[i][layer]
        return {i: c for i, c in out.items() if c}

    def repair(self, config: Config, drops: dict, gains: dict, progress) -> tuple[Config, float]:
        """Soften choices until ``config``'s measured drop is within the limit (NNCF-style
        greedy repair, in context).

        Drops measured alone miss interactions (r tokens merged in each of six blocks is
        harmless alone and ruinous together), so the culprit is found in context: the group
        of choices (one pass at one setting) whose softening lowers the measured drop most.
        Its choices are ordered by the harm each does - measured one by one for a small
        group, else its drop alone per unit of gain, output deviation breaking ties - and
        the shortest prefix of that order whose softening brings the drop within the limit
        is found by doubling, then bisection (a few measurements, not one per layer).
        Softening moves a choice to its knob's next milder setting (int8 at threshold 0 to
        threshold 6), and only the mildest back to exact.
        """
        first = self.budget.sensitivity_batches
        limit = self.budget.limit
        measured = self.drop(config)

        def harm(key):  # drop removed per unit of gain lost, by softening this choice
            i, layer, setting = key
            settings = self.knob_of[(i, layer)].settings
            index = settings.index(setting)
            milder = (i, layer, settings[index - 1]) if index > 0 else None
            gain = max(gains.get(key, 0.0) - (gains.get(milder, 0.0) if milder else 0.0), 1e-12)
            less = max(drops[key], 0.0) - (max(drops.get(milder, 0.0), 0.0) if milder else 0.0)
            return (-less / gain, -self.deviation({i: {layer: setting}}, first) / gain)

        while measured > limit and config:
            groups: dict[tuple, list] = {}
            for i, c in config.items():
                for layer, setting in c.items():
                    groups.setdefault((i, json.dumps(setting)), []).append((i, layer, setting))
            group = min(groups.values(), key=lambda keys: self.drop(self.soften(config, keys))) \
                if len(groups) > 1 else next(iter(groups.values()))
            if len(group) <= self.LEAVE_ONE_OUT:
                order = sorted(group, key=lambda key: self.drop(self.soften(config, [key])))
            else:
                order = sorted(group, key=harm)
            n = self._shortest_prefix(config, order)
            config = self.soften(config, order[:n])
            measured = self.drop(config)
            if self.budget.progress:
                progress.console.print(f"budget: softened {n} {self.tunable[order[0][0]].name} choice(s) at "
                                       f"{order[0][2]!r}: drop {measured:.4f}", highlight=False)
        return config, measured

    def _shortest_prefix(self, config: Config, order: list) -> int:
        """The fewest leading choices of ``order`` whose softening puts the drop within the
        limit (doubling, then bisection), or all of them when none does."""
        limit = self.budget.limit
        within = lambda n: self.drop(self.soften(config, order[:n])) <= limit  # noqa: E731
        high = 1
        while high < len(order) and not within(high):
            high *= 2
        if high >= len(order):
            if not within(len(order)):
                return len(order)
            high = len(order)
        low = high // 2  # not within (or 0)
        while high - low > 1:
            mid = (low + high) // 2
            if within(mid):
                high = mid
            else:
                low = mid
        return high

    def over_budget_seeds(self, singles: list[Config], single_drops: list[float], speeds: list[float]) -> list[Config]:
        """Single-pass settings over the limit but faster than the exact pipeline, the fastest
        first, each with the fastest within-limit setting of every other pass: repair softens
        them from the fast side (all linears int8 at threshold 0, the most sensitive moved to
        6), as NNCF starts from the fully quantized model.

        Not only those that timed faster than every setting within the limit: speed-ups from
        separate timing runs drift by more than the gap between a pass's two settings, and a
        seed that turns out slower costs a repair, not a wrong choice (the final run decides)."""
        limit = self.budget.limit
        fastest_within: dict[int, tuple[float, Config]] = {}
        for c, d, v in zip(singles, single_drops, speeds):
            ((i, _),) = c.items()
            if d <= limit and v > fastest_within.get(i, (0.0, {}))[0]:
                fastest_within[i] = (v, c)
        seeds = []
        for c, d, v in sorted(zip(singles, single_drops, speeds), key=lambda cdv: -cdv[2]):
            ((i, _),) = c.items()
            if d > limit and v > 1.0:
                seed = dict(c)
                for j, (_, other) in fastest_within.items():
                    if j != i:
                        seed.update(other)
                seeds.append(seed)
        return seeds[:self.COMBINATIONS]

    def pass_combinations(self, singles: list[Config], single_drops: list[float], gains: dict) -> list[Config]:
        """Unions of single-pass settings (at most one per pass) whose drops sum within the
        largest cap, by predicted gain: interactions inside a pass are already measured."""
        options: dict[int, list[tuple[Config, float, float]]] = {}
        for config, d in zip(singles, single_drops):
            ((i, choices),) = config.items()
            gain = sum(gains.get((i, layer, s), 0.0) for layer, s in choices.items())
            if d <= self.budget.limit and gain > 0:
                options.setdefault(i, []).append((config, d, gain))
        combos: list[tuple[float, Config]] = []
        cap = self.budget.limit * max(self.budget.caps, default=1.0)

        def extend(passes, chosen, drop, gain):
            if not passes:
                if sum(1 for c in chosen if c) > 1 and drop <= cap:
                    merged = {}
                    for c in chosen:
                        merged.update(c)
                    combos.append((gain, merged))
                return
            i, rest = passes[0], passes[1:]
            extend(rest, chosen + [{}], drop, gain)
            for config, d, g in options[i]:
                extend(rest, chosen + [config], drop + max(d, 0.0), gain + g)

        extend(sorted(options), [], 0.0, 0.0)
        return [c for _, c in sorted(combos, key=lambda gc: -gc[0])[:self.COMBINATIONS]]


def tune(model, args: tuple, kwargs: dict, passes: Sequence[Pass], budget: Budget, target: str) -> BudgetResult:
    """Search the settings of ``passes``' approximate members within ``budget`` (module docstring)."""
    from rich.progress import Progress

    if target == "triton":
        raise BudgetError("a budget times its candidates on the CPU targets; use target='eager' or 'inductor'")
    search = _Search(model, args, kwargs, list(passes), budget, target)
    points: list[Point] = [Point("exact", "exact", search.drop({}), 1.0, config={})]
    with Progress(transient=True, disable=not budget.progress, console=search.console) as progress:
        drops = search.sensitivities(progress)
        singles = search.singles()
        task = progress.add_task("budget: single-pass settings", total=len(singles))
        single_drops = []
        for c in singles:
            single_drops.append(search.drop(c))
            progress.advance(task)
        progress.update(task, description="budget: timing single-pass settings")
        single_speeds = search.speedups(singles)
        for c, d, s in zip(singles, single_drops, single_speeds):
            points.append(Point(_describe(search.tunable, c), "single-pass", d, s, config=c))
        gains = search.gains(singles, single_speeds)
        candidates: list[Config] = []
        predicted = [search.knapsack(drops, gains, budget.limit * factor) for factor in budget.caps]
        predicted += search.pass_combinations(singles, single_drops, gains)
        predicted += search.over_budget_seeds(singles, single_drops, single_speeds)
        task = progress.add_task("budget: verifying combinations", total=len(predicted))
        for config in predicted:
            config, _ = search.repair(config, drops, gains, progress)
            if config and config_key(config) not in {config_key(c) for c in candidates + singles}:
                candidates.append(config)
            progress.advance(task)
        progress.update(task, description="budget: timing combinations")
        for c, s in zip(candidates, search.speedups(candidates)):
            points.append(Point(_describe(search.tunable, c), "search", search.drop(c), s, config=c))
        within = [p for p in points[1:] if p.within(budget.limit)]
        timed_together = budget.objective == "latency" and len(within) > 1
        if timed_together:
            progress.update(task, description=f"budget: timing the {len(within)} settings within budget together")
            for p, s in zip(within, search.retime([p.config for p in within])):
                p.speedup = s
    faster = [p for p in within if (p.speedup or 0.0) > 1.0]
    chosen = max(faster, key=lambda p: p.speedup or 0.0) if faster else points[0]
    singles_within = [p for p in within if p.kind == "single-pass"]
    best_single = max(singles_within, key=lambda p: p.speedup or 0.0) if singles_within else None
    if search.heldout:
        for p in {id(p): p for p in [chosen, best_single, points[0]] if p is not None}.values():
            p.heldout_drop = search.drop(p.config, heldout=True)
    status = "met" if faster else ("not faster" if within else "unmet")
    choices = [(search.tunable[i].name, layer, setting) for i, c in sorted(chosen.config.items())
               for layer, setting in c.items()]
    result = BudgetResult(budget.metric_name, float(budget.max_drop), budget.objective, target, chosen, best_single,
                          points, choices, search.passes_of(chosen.config), status, search.cpu,
                          limit=budget.limit, evaluations=search.evaluations, cached=search.cached,
                          timed_together=timed_together)
    if result.heldout_exceeded:
        warnings.warn(f"optcc budget: {result.message.split('WARNING: ')[-1]}", BudgetWarning, stacklevel=3)
    if budget.out is not None:
        out = Path(budget.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "budget.md").write_text(result.markdown())
        result.files = [str(out / "budget.md"), result.plot(out / "budget.svg"), result.plot(out / "budget.png")]
    return result
