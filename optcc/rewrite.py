"""Rules: the unit a rewrite pass is made of (pattern + check + rewrite).

A :class:`Rule` looks at one anchor node. ``match`` returns a :class:`Match` holding the
nodes and values the rewrite needs, or a :class:`NoMatch` whose ``reason`` says why the
rewrite is not legal there (``reason=None`` when the node is not the rule's anchor at
all). ``rewrite`` then changes the graph. :func:`apply_rules` runs a set of rules to a
fixed point and counts, per rule, the matches and the reasons for near misses, so a user
can see *why* a pattern was left alone (``report["bn_reparam"].stats["missed"]``).
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


class Rule:
    """One rewrite. Subclasses set ``name`` and the math in their docstring."""

    name: str = ""

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | NoMatch:
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule, match: Match) -> None:
        raise NotImplementedError


def apply_rules(gm: fx.GraphModule, rules: list[Rule], *, max_sweeps: int = 50) -> dict[str, Any]:
    """Apply ``rules`` until none matches; return ``{"matches", "rules", "missed"}`` counts."""
    applied: Counter = Counter()
    missed: Counter = Counter()
    for _ in range(max_sweeps):
        missed.clear()  # only the near misses of the final sweep describe the result
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
        gm.graph.eliminate_dead_code()
        if not changed:
            break
    return {"matches": sum(applied.values()), "rules": dict(applied), "missed": dict(missed)}
