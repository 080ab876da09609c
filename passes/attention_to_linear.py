"""attention_to_linear: softmax attention replaced by linear (kernelized) attention.

Each selected canonical SDPA node ``softmax(s Q K^T + M) V`` becomes
``optcc::linear_attention`` (:mod:`optcc.kernels.linear_attention`)::

    O_i = phi(q_i) sum_j phi(k_j)^T v_j / (phi(q_i) . sum_j phi(k_j) + eps)

computed in the cheaper matmul order for the shapes (``phi(K)^T V`` first when the keys
outnumber the features), fp32 accumulation. ``feature_map``: ``relu``, ``elu1``
(Katharopoulos et al.), ``cosine`` (Hydra), ``focused`` (FLatten, ``power`` p), ``favor``
(Performer's positive random features, ``num_features`` drawn from ``seed``: the
training-free approximation of ``softmax(s q k^T)``; the projection becomes a constant of
the graph), ``hedgehog`` (Hedgehog's learned per-head maps, initialised to the identity
here). The masks: none; ``is_causal`` -> the causal chunked form (each query sees the keys
before it); a key-padding mask (``_key_padding``) -> masked keys get zero features; any
other mask leaves that layer softmax, with the reason in ``stats["missed"]`` and
``--explain``. Grouped-query attention keeps its shared K/V heads.

Selection: ``layers`` (indices among the SDPA nodes in graph order; default every one)
and ``min_tokens`` (only where the keys number more than that: linear attention pays off
on long sequences). Approximate: never runs unless named; the report gives the output
change.

Calibration (``hedgehog`` only; ``_attention_transfer``): ``calibrate=[batches]`` trains each
converted layer's maps alone to reproduce its softmax output (``steps``, ``lr``: layer-wise
attention transfer); ``finetune_steps`` (``finetune_lr``) then trains all of them together so
the graph's outputs match the softmax graph's; ``maps="file.pt"`` writes the result after
calibrating and, without ``calibrate``, reads it back instead.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
import torch.fx as fx

from optcc import graph_utils as gu
from optcc.ir import add_constant
from optcc.kernels import linear_attention as la
from optcc.kernels.token_merge import MASKED
from optcc.pass_base import Knob, OptionError, Pass, PassResult, register_pass
from optcc.rewrite import NOT_ANCHOR, Match, NoMatch, Rule, apply_rules

from . import _attention_transfer as transfer
from . import _key_padding as key_padding
from ._token_follow import Inserter

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


class LinearizeAttention(Rule):
    """One canonical SDPA node -> ``optcc::linear_attention``."""

    name = "linear_attention"

    def __init__(self, options, order: dict):
        self.options = options
        self.order = order          # SDPA node -> its index among the graph's SDPA nodes
        self.layers: list[str] = []
        self.trained: dict[str, torch.Tensor] = {}  # SDPA node name -> calibrated hedgehog maps
        self.param_attributes: dict[int, str] = {}  # layer index -> the graph buffer holding its maps

    def match(self, gm, node):
        if node.target is not SDPA:
            return NOT_ANCHOR
        o = self.options
        index = self.order.get(node)
        if o.layers is not None and index not in o.layers:
            return NoMatch("not selected by layers")
        q, k, v = node.args[:3]
        shapes = [gu.shape(t) for t in (q, k, v)]
        if any(s is None for s in shapes):
            return NoMatch("unknown shapes")
        if shapes[1][-2] <= o.min_tokens:
            return NoMatch(f"{shapes[1][-2]} keys, not more than min_tokens={o.min_tokens}")
        if len(shapes[0]) not in (3, 4):
            return NoMatch("attention of rank other than 3 or 4")
        if node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0):
            return NoMatch("attention with dropout")
        causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
        if causal and shapes[0][-2] != shapes[1][-2]:
            return NoMatch("causal attention with more keys than queries")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        source = None
        if mask is not None:
            if causal:
                return NoMatch("causal attention with a mask")
            if len(shapes[0]) != 4:
                return NoMatch("flattened heads with a mask")
            source = key_padding.source(gm, mask)
            if source is None:
                return NoMatch("an attention mask that is not a key-padding mask")
            lead = gu.shape(source)[:-1]
            if any(d not in (1, shapes[0][0]) for d in lead) or sum(d == shapes[0][0] for d in lead) > 1:
                return NoMatch("a key-padding mask with values per head")
        gqa = bool(node.kwargs.get("enable_gqa", False))
        if not gqa and shapes[0][-3:-2] != shapes[1][-3:-2] and len(shapes[0]) == 4:
            return NoMatch("queries and keys with different head counts")
        return Match(nodes={"sdpa": node, "q": q, "k": k, "v": v},
                     values={"causal": causal, "mask_source": source, "index": index})

    def rewrite(self, gm, m):
        o = self.options
        node = m.nodes["sdpa"]
        q, k, v = m.nodes["q"], m.nodes["k"], m.nodes["v"]
        insert = Inserter(gm.graph)
        scale = node.kwargs.get("scale")
        with gm.graph.inserting_before(node):
            if gu.rank(q) == 3:  # [B*H, L, E] as B*H batches of one head
                q, k, v = (insert(aten.unsqueeze.default, (t, 1)) for t in (q, k, v))
            key_mask = None
            if m.values["mask_source"] is not None:
                batch = gu.shape(q)[0]
                bias = key_padding.bias_rows(insert, m.values["mask_source"], batch)
                key_mask = insert(aten.gt.Scalar, (bias, MASKED))
            params = self._params(gm, node, q, k, m.values["index"])
            kwargs = {"key_mask": key_mask, "feature_map": o.feature_map, "params": params,
                      "causal": m.values["causal"], "seed": o.seed, "scale": scale,
                      "num_features": o.num_features, "power": o.power}
            new = insert(la.linear_attention, (q, k, v), kwargs)
            if gu.rank(node) == 3:
                new = insert(aten.squeeze.dim, (new, 1))
        new.meta.update({k_: v_ for k_, v_ in node.meta.items() if k_ != "val"})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        self.layers.append(f"{m.values['index']}:{node.name}")

    def _params(self, gm, node, q, k, index):
        o = self.options
        head_dim = gu.shape(q)[-1]
        if o.feature_map == "favor":
            projection = la.favor_projection(head_dim, o.num_features, o.seed)
            return add_constant(gm, f"{node.name}_favor_projection", projection, before=node)
        if o.feature_map == "hedgehog":
            heads, kv_heads = gu.shape(q)[1], gu.shape(k)[1]
            maps = self.trained.get(node.name)
            if maps is None:
                maps = la.hedgehog_init(heads, head_dim, o.num_features or None, kv_heads)
            constant = add_constant(gm, f"{node.name}_hedgehog", maps, before=node)
            self.param_attributes[index] = constant.target
            return constant
        return None


@register_pass
class AttentionToLinear(Pass):
    """Replace softmax attention (canonical SDPA nodes) with linear attention of a chosen feature map (approximate)."""

    name = "attention_to_linear"
    exact = False
    run_after = ("canonicalize_attention", "bn_reparam", "token_pruning")
    requires = ("canonicalize_attention",)  # it matches the canonical SDPA node alone
    run_before = ("int8_decomposition", "block_fusion")

    @dataclass
    class Options:
        feature_map: str = "elu1"
        layers: typing.Optional[list] = None
        min_tokens: int = 0
        num_features: int = 0
        power: float = 3.0
        seed: int = 0
        calibrate: typing.Optional[list] = None   # batches of model inputs (tuples)
        steps: int = 200
        lr: float = 0.01
        finetune_steps: int = 0   # then every converted layer's maps together, on the graph's outputs
        finetune_lr: float = 0.001
        maps: typing.Optional[str] = None   # a file: written after calibrating, read instead of it

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if o.feature_map not in la.FEATURE_MAPS:
            raise OptionError(f"attention_to_linear: feature_map must be one of {', '.join(la.FEATURE_MAPS)}, "
                              f"got {o.feature_map!r}")
        if o.calibrate is not None and o.feature_map != "hedgehog":
            raise OptionError("attention_to_linear: calibrate trains Hedgehog's feature maps; "
                              "use feature_map='hedgehog' (the other maps have nothing to learn)")
        if o.calibrate is not None and not o.calibrate:
            raise OptionError("attention_to_linear: calibrate needs at least one batch of inputs")
        if o.maps is not None and o.feature_map != "hedgehog":
            raise OptionError("attention_to_linear: maps holds calibrated Hedgehog maps; use feature_map='hedgehog'")
        if o.finetune_steps and o.calibrate is None:
            raise OptionError("attention_to_linear: finetune_steps trains on the calibration batches; "
                              "give calibrate=[batches] too")
        # calibrated maps by (SDPA node name, q shape), shared by the passes configure() makes
        self._trained: dict[tuple, tuple] = {}

    def knobs(self, gm: fx.GraphModule) -> list[Knob]:
        """One knob per attention layer this pass would convert; its one setting is ``feature_map``.

        FLOPs saved, per layer: softmax attention's ``4 B H Lq Lk E`` minus the linear
        form's ``2 B H F Ev (Lq + Lk)`` (F features per head; causal layers count half of
        the softmax work). Negative on short sequences: a search then leaves them softmax.
        """
        order = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.target is SDPA)}
        rule = LinearizeAttention(self.options, order)
        knobs = []
        for node, index in order.items():
            m = rule.match(gm, node)
            if not isinstance(m, Match):
                continue
            q, k, v = (gu.shape(t) for t in node.args[:3])
            lead = float(torch.tensor(q[:-2]).prod())
            softmax = 4.0 * lead * q[-2] * k[-2] * q[-1] * (0.5 if m.values["causal"] else 1.0)
            features = self.options.num_features or q[-1]
            linear = 2.0 * lead * features * v[-1] * (q[-2] + k[-2])
            knobs.append(Knob(f"attention {index}", (self.options.feature_map,), (softmax - linear,), softmax))
        return knobs

    def configure(self, choices: dict) -> list[Pass]:
        by_map: dict[str, list[int]] = {}
        for layer, feature_map in choices.items():
            by_map.setdefault(feature_map, []).append(int(layer.split()[-1]))
        passes = []
        for feature_map, layers in sorted(by_map.items()):
            configured = AttentionToLinear(**{**vars(self.options), "feature_map": feature_map, "layers": sorted(layers)})
            configured._trained = self._trained  # calibrate each layer once across configurations
            passes.append(configured)
        return passes

    def run(self, gm: fx.GraphModule) -> PassResult:
        order = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.target is SDPA)}
        rule = LinearizeAttention(self.options, order)
        calibration, targets = self._calibrate(gm, rule, order) if self.options.calibrate is not None else ([], None)
        if self.options.maps and self.options.calibrate is None:
            chosen = {index: node for node, index in order.items() if isinstance(rule.match(gm, node), Match)}
            rule.trained = transfer.load_maps(self.options.maps, chosen)
        stats = apply_rules(gm, [rule])
        stats["calibration"] = calibration
        if self.options.finetune_steps and rule.param_attributes:
            stats["finetune"] = self._finetune(gm, list(rule.param_attributes.values()), targets)
        if self.options.maps and self.options.calibrate is not None:
            stats["maps_saved"] = transfer.save_maps(self.options.maps, gm, rule.param_attributes)
        stats["layers"] = rule.layers
        total = len(order)
        if total == 0:
            stats["message"] = ("left unchanged: the graph has no attention (scaled_dot_product_attention node, "
                                "which canonicalize_attention makes of every softmax attention it recognises)")
        else:
            stats["message"] = (f"{self.options.feature_map}: {stats['matches']} of {total} attention layers "
                                f"linear" + ("" if stats["matches"] == total else
                                             "; the others stay softmax (see left alone)"))
        if calibration:
            before = sum(c["error_before"] for c in calibration) / len(calibration)
            after = sum(c["error_after"] for c in calibration) / len(calibration)
            stats["message"] += (f"; calibrated on {len(self.options.calibrate)} batches, layer output error "
                                 f"{before:.3f} -> {after:.3f} (mean relative RMS)")
        if "maps_saved" in stats:
            stats["message"] += f"; maps written to {stats['maps_saved']}"
        elif self.options.maps:
            stats["message"] += f"; calibrated maps read from {self.options.maps}"
        if "finetune" in stats:
            stats["message"] += (f"; fine-tuned together {self.options.finetune_steps} steps, graph output error "
                                 f"{stats['finetune']['error_before']:.3f} -> {stats['finetune']['error_after']:.3f}")
        return PassResult(gm, stats["matches"] > 0, stats)

    def _finetune(self, gm, attributes: list[str], targets) -> dict:
        """Every converted layer's maps trained together on the graph's outputs (``_attention_transfer.finetune``)."""
        from rich.progress import Progress

        o = self.options
        with Progress(transient=True) as progress:
            task = progress.add_task("fine-tuning the feature maps together", total=o.finetune_steps)
            before, after = transfer.finetune(gm, attributes, o.calibrate, targets, steps=o.finetune_steps,
                                              lr=o.finetune_lr, progress=lambda: progress.advance(task))
        return {"error_before": before, "error_after": after, "steps": o.finetune_steps}

    def _calibrate(self, gm, rule: LinearizeAttention, order: dict) -> tuple[list[dict], list | None]:
        """Train each selected layer's Hedgehog maps on the calibration batches (``_attention_transfer``);
        returns the per-layer rows and, when recorded, the graph's outputs on the batches."""
        from rich.progress import Progress

        o = self.options
        chosen = [n for n in order if rule.match(gm, n)]
        memo_keys = {n: (n.name, tuple(gu.shape(n.args[0]))) for n in chosen}
        rows = []
        for node in [n for n in chosen if memo_keys[n] in self._trained]:
            rule.trained[node.name], row = self._trained[memo_keys[node]]
            rows.append(row)
        chosen = [n for n in chosen if memo_keys[n] not in self._trained]
        if not chosen and not o.finetune_steps:
            return rows, None
        recorded, targets = transfer.record(gm, chosen, o.calibrate)
        with Progress(transient=True) as progress:
            task = progress.add_task("attention transfer", total=len(chosen))
            for node in chosen:
                q, k = node.args[0], node.args[1]
                heads, kv_heads = (gu.shape(q)[1], gu.shape(k)[1]) if gu.rank(q) == 4 else (1, 1)
                init = la.hedgehog_init(heads, gu.shape(q)[-1], o.num_features or None, kv_heads)
                data = recorded[node]
                if gu.rank(q) == 3:
                    data = transfer.Recorded(*[[t.unsqueeze(1) if t is not None and t.dim() == 3 else t for t in ts]
                                               for ts in (data.q, data.k, data.v, data.key_mask, data.out)])
                causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
                maps, before, after = transfer.train_hedgehog(data, init, causal=causal, scale=node.kwargs.get("scale"),
                                                              steps=o.steps, lr=o.lr)
                rule.trained[node.name] = maps
                rows.append({"layer": f"{order[node]}:{node.name}", "error_before": before, "error_after": after})
                self._trained[memo_keys[node]] = (maps, rows[-1])
                progress.advance(task)
        return rows, targets
