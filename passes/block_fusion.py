"""block_fusion: canonical attention and fused regions in the graph (exact).

The two jobs this name has always meant, now two stages of the pipeline that can also be
asked for together:

1. **Attention canonicalization**: the ``canonicalize_attention`` pass (its docstring
   states the identity), which the default pipeline runs on its own.
2. **Fused regions** (:mod:`optcc.lowering.partition`): gemm + epilogue, residual add +
   row reduction + epilogue, and pointwise chains grouped into one ``region`` node each,
   whose submodule keeps the reference subgraph (``optcc.regions``), so every target
   still runs it. This is the lowering's own first step: ``target="triton"`` and
   ``optcc dump --format triton`` form regions after every selected rewrite without this
   pass. Name ``block_fusion`` to see the regions in a graph dump or in the compiled
   graph; a region hides its ops from later rewrites, so passes that match ops declare
   ``run_before = ("block_fusion",)``.

``Options``: ``attention`` and ``regions`` switch the two stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from optcc.lowering.partition import form_regions
from optcc.pass_base import Pass, PassResult, register_pass

from .canonicalize_attention import canonicalize


@register_pass
class BlockFusion(Pass):
    """Canonicalize attention, then group ops into fused regions shown in the graph."""

    name = "block_fusion"
    exact = True
    in_default_pipeline = False  # the Triton lowering forms regions itself, last
    run_after = ("canonicalize_attention",)

    @dataclass
    class Options:
        attention: bool = True
        regions: bool = True

    def run(self, gm):
        stats = {"matches": 0, "rules": {}, "missed": {}, "attention": 0}
        if self.options.attention:
            stats = canonicalize(gm)
        if self.options.regions:
            stats.update(form_regions(gm))
        changed = stats["matches"] > 0 or bool(stats.get("regions"))
        return PassResult(gm, changed, stats)
