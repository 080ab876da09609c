"""Rules: the unit a rewrite pass is made of (pattern + check + rewrite).

A :class:`Rule` looks at one anchor node. ``match`` returns a :class:`Match` holding the
nodes and values the rewrite needs, or a :class:`NoMatch` whose ``reason`` says why the
rewrite is not legal there (``reason=None`` when the node is not the rule's anchor at
all). ``rewrite`` then changes the graph. :func:`apply_rules` runs a set of rules to a
fixed point and counts, per rule, the matches and the reasons for near misses, so a user
can see *why* a pattern was left alone (``report["bn_reparam"].stats["missed"]``), and
records each near miss with the node it happened at and the model's source line
(``stats["near_misses"]``, :class:`NearMiss`), as MLIR's ``notifyMatchFailure`` does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx


@dataclass
class Match:
    nodes: dict[str, fx.Node] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return True


@dataclass
class NoMatch:
    reason: str | None = None

    def __bool__(self) -> bool:
        return False


NOT_ANCHOR = NoMatch(None)


@dataclass(frozen=True)
class NearMiss:
    """A rule that looked at ``node`` and refused, with why and where in the model."""

    rule: str
    reason: str
    node: str
    source: str = ""  # "file.py:12: code" of the model line the node came from, if known

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"{self.rule}: {self.reason} at %{self.node}{where}"


def source_line(node: fx.Node) -> str:
    """``file:line: code`` of the innermost frame of ``node.meta["stack_trace"]``."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith('File "'):
            path, _, rest = lines[i][len('File "'):].partition('"')
            number = rest.split("line", 1)[-1].split(",", 1)[0].strip()
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith('File "') else ""
            return f"{path.rsplit('/', 1)[-1]}:{number}" + (f": {code}" if code else "")
    return ""


class Rule:
    """One rewrite. Subclasses set ``name`` and the math in their docstring."""

    name: str = ""

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | NoMatch:
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule, match: Match) -> None:
        raise NotImplementedError


def apply_rules(gm: fx.GraphModule, rules: list[Rule], *, max_sweeps: int = 50) -> dict[str, Any]:
    """Apply ``rules`` until none matches; return ``{"matches", "rules", "missed",
    "near_misses"}``: counts, and every near miss of the final sweep with its node."""
    applied: Counter = Counter()
    missed: Counter = Counter()
    near_misses: list[NearMiss] = []
    for _ in range(max_sweeps):
        missed.clear()  # only the near misses of the final sweep describe the result
        near_misses.clear()
        changed = False
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False):  # removed by an earlier rewrite in this sweep
                continue
            for rule in rules:
                result = rule.match(gm, node)
                if result:
                    rule.rewrite(gm, result)
                    applied[rule.name] += 1
                    changed = True
                    break
                if result.reason is not None:
                    missed[f"{rule.name}: {result.reason}"] += 1
                    near_misses.append(NearMiss(rule.name, result.reason, node.name, source_line(node)))
        gm.graph.eliminate_dead_code()
        if not changed:
            break
    return {"matches": sum(applied.values()), "rules": dict(applied), "missed": dict(missed),
            "near_misses": list(near_misses)}
