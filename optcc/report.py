"""The per-pass report a compilation carries (``compiled.report``); prints as a table."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from rich.console import Console
from rich.table import Table

from . import ir


@dataclass
class PassRecord:
    name: str
    exact: bool
    status: str = "pending"  # applied | unchanged | rolled back | failed
    changed: bool = False
    matches: int = 0
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    ops_before: Counter = field(default_factory=Counter)
    ops_after: Counter = field(default_factory=Counter)
    error: float | None = None  # relative output change vs the graph before the pass
    stats: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def finish(self, gm: fx.GraphModule) -> None:
        self.nodes_after = len(gm.graph.nodes)
        self.ops_after = ir.op_counts(gm)

    def left_alone(self) -> list[tuple[str, int, list[str]]]:
        """``(reason, count, first nodes)`` for every kind of near miss, most frequent first."""
        misses = self.stats.get("near_misses") or []
        by_reason: dict[str, list] = {}
        for miss in misses:
            by_reason.setdefault(f"{miss.rule}: {miss.reason}", []).append(miss)
        if not by_reason:  # passes that count reasons without recording nodes
            return [(reason, count, []) for reason, count in
                    sorted((self.stats.get("missed") or {}).items(), key=lambda kv: -kv[1])]
        return [(reason, len(items), [f"%{m.node}" + (f" ({m.source})" if m.source else "") for m in items[:3]])
                for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]

    def op_changes(self) -> dict[str, tuple[int, int]]:
        """Ops whose count changed: ``{op: (before, after)}``."""
        names = sorted(set(self.ops_before) | set(self.ops_after))
        return {
            n: (self.ops_before.get(n, 0), self.ops_after.get(n, 0))
            for n in names
            if self.ops_before.get(n, 0) != self.ops_after.get(n, 0)
        }


@dataclass
class Report:
    initial_ops: Counter = field(default_factory=Counter)
    initial_nodes: int = 0
    final_ops: Counter = field(default_factory=Counter)
    final_nodes: int = 0
    records: list[PassRecord] = field(default_factory=list)
    dumps: list[tuple[str, fx.GraphModule]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # capture fallbacks, target choices
    budget: Any = None  # optcc.budget.BudgetResult when a budget chose the passes

    def __getitem__(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name or r.name.split("(")[0] == name:
                return r
        raise KeyError(name)

    def table(self) -> Table:
        table = Table(title="optcc passes", title_justify="left")
        for col, justify in [("pass", "left"), ("kind", "left"), ("status", "left"),
                             ("matches", "right"), ("nodes", "right"), ("time", "right"),
                             ("rel. error", "right")]:
            table.add_column(col, justify=justify)
        for r in self.records:
            err = "-" if r.error is None else f"{r.error:.2e}"
            table.add_row(r.name, "exact" if r.exact else "approx", r.status, str(r.matches),
                          f"{r.nodes_before} -> {r.nodes_after}", f"{r.seconds * 1e3:.1f} ms", err)
        return table

    def op_table(self) -> Table:
        """Op counts before and after each pass, for the ops that pass changed."""
        table = Table(title="op counts changed by each pass", title_justify="left")
        for col, justify in [("pass", "left"), ("op", "left"), ("before", "right"), ("after", "right")]:
            table.add_column(col, justify=justify)
        for r in self.records:
            for op, (before, after) in r.op_changes().items():
                table.add_row(r.name, op, str(before), str(after))
        return table

    def render(self, width: int = 110) -> str:
        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None)
        console.print(self.table())
        if any(r.op_changes() for r in self.records):
            console.print(self.op_table())
        for note in self.notes:
            console.print(f"note: {note}")
        for r in self.records:
            if r.message:
                console.print(f"{r.name}: {r.message}")
        for r in self.records:
            left = r.left_alone()
            if left:
                console.print(f"{r.name}: left alone")
                for reason, count, nodes in left[:8]:
                    at = f" at {', '.join(nodes)}" + (", ..." if count > len(nodes) and nodes else "") if nodes else ""
                    console.print(f"  {count} x {reason}{at}")
                if len(left) > 8:
                    console.print(f"  ... {len(left) - 8} more reasons (optcc dump --explain lists every one)")
        if self.budget is not None:
            self.budget.render(console)
        return buf.getvalue().rstrip()

    def explain(self) -> str:
        """Every near miss of every pass, one a line, with its node and source line."""
        lines = []
        for r in self.records:
            misses = r.stats.get("near_misses") or []
            lines.append(f"{r.name}: {r.matches} rewrite(s), {len(misses)} near miss(es)")
            lines += [f"  {miss}" for miss in misses]
            if not misses and r.stats.get("missed"):
                lines += [f"  {count} x {reason}" for reason, count in r.stats["missed"].items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    __repr__ = __str__
