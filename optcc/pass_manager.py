"""Runs an ordered list of passes over the canonical IR and records what each did.

After every pass the manager lints the graph, recompiles it and re-derives shapes
(``node.meta["val"]``), so the next pass always sees a consistent graph. For each pass
it records wall time, matches, node and op counts before and after, and - with
``verify=True``, or always for approximate passes - the output error against the graph
before the pass on the example inputs.

Contracts it enforces:

* an exact pass whose outputs move by more than the tolerance is rolled back, with a
  warning that names it;
* a pass that raises is reported with its name and the node it failed on, and the
  pipeline continues with the graph from before it (``fail_fast=True`` re-raises);
* the given order is checked against every pass's ``run_after`` and ``run_before``.

Rolling back needs the graph from before the pass. Passes never modify constants in
place (they register new ones), so a snapshot copies the graph and shares the tensors.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Sequence

import torch
import torch.fx as fx

from . import ir
from .pass_base import Pass, PassError, PassSpec, make_pass
from .report import PassRecord, Report


class PassOrderError(ValueError):
    pass


def default_tolerance(dtype: torch.dtype) -> float:
    """Largest relative output change an exact pass may cause (DESIGN: 1e-5 in fp32)."""
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)


def output_error(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """Max over outputs of ``max|ref - new| / max|ref|`` (relative to each output's scale)."""
    worst = 0.0
    for ref, new in zip(reference, candidate, strict=True):
        if isinstance(ref, torch.Tensor):
            if not isinstance(new, torch.Tensor) or ref.shape != new.shape:
                return float("inf")
            if not ref.is_floating_point():
                worst = max(worst, 0.0 if torch.equal(ref, new) else float("inf"))
                continue
            ref64, new64 = ref.detach().double(), new.detach().double()
            scale = ref64.abs().max().item() if ref64.numel() else 0.0
            diff = (ref64 - new64).abs().max().item() if ref64.numel() else 0.0
            worst = max(worst, diff / max(scale, 1e-12))
        elif ref != new:
            return float("inf")
    return worst


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph; constant tensors are shared (never mutated)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(gm.meta)
    return copy


def order_constraints(passes: Sequence[Pass | type[Pass]]) -> list[tuple[str, str, str]]:
    """``(earlier, later, declared_by)`` for every constraint among ``passes``."""
    names = {p.name for p in passes}
    pairs = []
    for p in passes:
        pairs += [(earlier, p.name, p.name) for earlier in p.run_after if earlier in names]
        pairs += [(p.name, later, p.name) for later in p.run_before if later in names]
    return pairs


pass_log = logging.getLogger("optcc.passes")  # OPTCC_LOGS=passes (optcc.dump.configure_logs)


def log_record(r: PassRecord) -> None:
    """One ``optcc.passes`` line for a pass that ran: name, status, matches, time, error."""
    err = "-" if r.error is None else f"{r.error:.2e}"
    pass_log.info("%s: %s, %d matches, %d -> %d nodes, %.1f ms, rel. error %s", r.name, r.status, r.matches,
                  r.nodes_before, r.nodes_after, r.seconds * 1e3, err)


def with_requirements(passes: Sequence[Pass]) -> tuple[list[Pass], list[str]]:
    """``passes`` with every pass a member ``requires`` that nobody selected inserted just
    before the first pass that requires it (its own requirements before it), and one line
    per insertion for the report."""
    result: list[Pass] = []
    notes: list[str] = []
    selected = {p.name for p in passes}

    def add(p: Pass) -> None:
        for name in p.requires:
            if name not in selected:
                selected.add(name)
                required = make_pass(name)
                add(required)
                notes.append(f"pass '{name}' added before '{p.name}', which requires it")
        result.append(p)

    for p in passes:
        add(p)
    return result, notes


def check_order(passes: Sequence[Pass]) -> None:
    position = {p.name: i for i, p in enumerate(passes)}
    for earlier, later, declared_by in order_constraints(passes):
        if position[earlier] > position[later]:
            rule = f"after '{earlier}'" if declared_by == later else f"before '{later}'"
            raise PassOrderError(f"pass '{declared_by}' must run {rule}; reorder the list")


class PassManager:
    def __init__(
        self,
        passes: Sequence[PassSpec],
        *,
        verify: bool = False,
        example_inputs: Sequence[Any] | None = None,
        tolerance: float | None = None,
        fail_fast: bool = False,
        dump_after_each: bool = False,
        add_required: bool = True,
    ):
        self.passes = [make_pass(p) for p in passes]
        # (off for a graph the required passes already ran on)
        self.notes: list[str] = []
        if add_required:
            self.passes, self.notes = with_requirements(self.passes)
        check_order(self.passes)
        self.verify = verify
        self.example_inputs = list(example_inputs) if example_inputs is not None else None
        self.tolerance = tolerance
        self.fail_fast = fail_fast
        self.dump_after_each = dump_after_each
        if verify and self.example_inputs is None:
            raise ValueError("verify=True needs example_inputs to compare outputs on")

    def _tolerance(self) -> float:
        if self.tolerance is not None:
            return self.tolerance
        dtypes = [t.dtype for t in self.example_inputs or [] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return max((default_tolerance(d) for d in dtypes), default=1e-5)

    @torch.no_grad()
    def _outputs(self, gm: fx.GraphModule) -> list:
        return list(gm(*self.example_inputs))

    def run(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, Report]:
        report = Report(initial_ops=ir.op_counts(gm), initial_nodes=len(gm.graph.nodes))
        report.notes += self.notes
        if self.dump_after_each:
            report.dumps.append(("captured", snapshot(gm)))
        reference = None
        for p in self.passes:
            measure = self.example_inputs is not None and (self.verify or not p.exact)
            if measure and reference is None:
                reference = self._outputs(gm)
            before = snapshot(gm)
            record = PassRecord(name=repr(p), exact=p.exact, ops_before=ir.op_counts(gm),
                                nodes_before=len(gm.graph.nodes))
            start = time.perf_counter()
            try:
                result = p.run(gm)
                gm = result.graph_module
                if result.changed:
                    ir.drop_unused_constants(gm)
                    gm.graph.lint()
                    gm.recompile()
                    ir.refresh_meta(gm)
            except Exception as exc:
                record.seconds = time.perf_counter() - start
                if self.fail_fast:
                    raise
                node = getattr(exc, "node", None) if isinstance(exc, PassError) else None
                where = f" at node '{node.name}'" if node is not None else ""
                record.status = "failed"
                record.message = f"{type(exc).__name__}{where}: {exc}"
                warnings.warn(f"optcc: pass '{p.name}' failed{where} and was skipped: {exc}", stacklevel=2)
                gm = before
                record.finish(gm)
                report.records.append(record)
                log_record(record)
                continue
            record.seconds = time.perf_counter() - start
            record.changed = result.changed
            record.stats = dict(result.stats)
            record.message = str(result.stats.get("message") or "")
            record.matches = int(result.stats.get("matches", 0))
            record.status = "applied" if result.changed else "unchanged"
            if measure and result.changed:
                outputs = self._outputs(gm)
                record.error = output_error(reference, outputs)
                if p.exact and record.error > self._tolerance():
                    warnings.warn(
                        f"optcc: exact pass '{p.name}' changed the outputs by {record.error:.3g} "
                        f"(relative; tolerance {self._tolerance():.1g}) and was rolled back",
                        stacklevel=2,
                    )
                    record.status = "rolled back"
                    gm = before
                else:
                    reference = outputs
            record.finish(gm)
            report.records.append(record)
            log_record(record)
            if self.dump_after_each:
                report.dumps.append((p.name, snapshot(gm)))
        report.final_ops = ir.op_counts(gm)
        report.final_nodes = len(gm.graph.nodes)
        return gm, report
