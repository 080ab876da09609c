"""block_fusion: canonical attention and fused regions (exact).

Two jobs, each an identity of the math:

1. **Attention canonicalization** (``_attention.py``). Softmax attention in any idiom
   becomes one ``aten.scaled_dot_product_attention`` node::

       softmax(s (Q K^T) + M, -1) V   ==   SDPA(Q, K, V, attn_mask=M, dropout_p=0, is_causal=False, scale=s)

   with ``masked_fill(C, -inf)`` read as the boolean mask ``not C``, a finite fill ``f``
   as the additive mask ``where(C, f, 0)``, scalar multiplies anywhere on the Q/K path
   folded into ``s``. Existing SDPA nodes get an explicit scale (``1/sqrt(E)`` when it was
   the default); a mask built from constants only is evaluated once and dropped when it
   masks nothing, or becomes ``is_causal=True`` when it is top-left lower-triangular.
   The passes that replace or prune attention match this one node.

2. **Fused regions** (``_regions.py``). Ops are grouped into regions the lowering turns
   into one kernel each: gemm (conv/linear/matmul) + epilogue (bias, activation, one
   residual), residual add + row reduction (softmax, layer_norm, sum/mean/max over the
   last dim) + epilogue, and chains of pointwise ops. A region is one node whose
   submodule keeps the reference subgraph (``optcc.regions``), so ``target="eager"``
   still runs it op for op.

The near misses of the attention rule are counted by reason in
``stats["missed"]`` (softmax over another axis, a score tensor read elsewhere, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from optcc.ir import refresh_meta
from optcc.pass_base import Pass, PassResult, register_pass
from optcc.rewrite import apply_rules

from . import _attention
from ._regions import form_regions


@register_pass
class BlockFusion(Pass):
    """Rewrite every softmax attention as one SDPA node and group ops into fused regions."""

    name = "block_fusion"
    exact = True
    # Regions hide their ops from later rewrites: passes that match linears or convs
    # (folding, quantization) must run first.
    run_after = ("bn_reparam", "int8_decomposition")

    @dataclass
    class Options:
        attention: bool = True
        regions: bool = True

    def run(self, gm):
        stats = {"matches": 0, "rules": {}, "missed": {}}
        if self.options.attention:
            stats = apply_rules(gm, _attention.RULES)
            if stats["matches"]:
                gm.recompile()
                refresh_meta(gm)
        if self.options.regions:
            stats.update(form_regions(gm))
        changed = stats["matches"] > 0 or bool(stats.get("regions"))
        stats["attention"] = stats["rules"].get("attention", 0)
        return PassResult(gm, changed, stats)
