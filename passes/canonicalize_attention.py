"""canonicalize_attention: every softmax attention as one SDPA node (exact).

Softmax attention in any idiom (``_attention.py``) becomes one
``aten.scaled_dot_product_attention`` node::

    softmax(s (Q K^T) + M, -1) V   ==   SDPA(Q, K, V, attn_mask=M, dropout_p=0, is_causal=False, scale=s)

with ``masked_fill(C, -inf)`` read as the boolean mask ``not C``, a finite fill ``f`` as
the additive mask ``where(C, f, 0)``, scalar multiplies anywhere on the Q/K path folded
into ``s``. Existing SDPA nodes get an explicit scale (``1/sqrt(E)`` when it was the
default); a mask built from constants only is evaluated once and dropped when it masks
nothing, or becomes ``is_causal=True`` when it is top-left lower-triangular.

The passes that replace or prune attention match this one node, so they declare
``run_after = ("canonicalize_attention",)``. The near misses are counted by reason in
``stats["missed"]`` (softmax over another axis, a score tensor read elsewhere, ...).
"""

from __future__ import annotations

from optcc.ir import refresh_meta
from optcc.pass_base import Pass, PassResult, register_pass
from optcc.rewrite import apply_rules

from . import _attention


def canonicalize(gm) -> dict:
    """Apply the attention rules to ``gm`` in place; returns their stats."""
    stats = apply_rules(gm, _attention.RULES)
    if stats["matches"]:
        gm.recompile()
        refresh_meta(gm)
    stats["attention"] = stats["rules"].get("attention", 0)
    return stats


@register_pass
class CanonicalizeAttention(Pass):
    """Rewrite every softmax attention, in any idiom, as one scaled_dot_product_attention node."""

    name = "canonicalize_attention"
    exact = True

    def run(self, gm):
        stats = canonicalize(gm)
        return PassResult(gm, stats["matches"] > 0, stats)
