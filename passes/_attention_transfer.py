"""Calibration of linear attention by layer-wise attention transfer (LoLCATs, Hedgehog).

For each attention layer that becomes linear, the softmax layer's inputs and output are
recorded on the calibration batches (one run of the graph before the rewrite, through an
``fx.Interpreter``); then only that layer's new parameters - Hedgehog's feature maps
``[W_h; b_h]`` of every query and key head - are trained so that the linear layer's
output matches the softmax layer's on the same q/k/v::

    min_theta  mean || LinearAttention_theta(q, k, v) - softmax(s q k^T + M) v ||^2

with Adam, ``steps`` steps per layer, every layer on its own (its inputs are the softmax
model's, so errors do not compound during training and the layers are independent). The
error before (the identity initialisation) and after is kept per layer for the report.

Layer-wise transfer does not see how the layers' errors compound: each layer is trained on
the softmax model's inputs, but in the converted model it reads the earlier linear layers'
outputs. LoLCATs follows transfer with a low-rank fine-tune of the whole model for that
reason. :func:`finetune` is that second stage restricted to the same parameters: after the
rewrite, every converted layer's maps together, trained through the whole graph so that its
outputs match the softmax graph's on the calibration batches::

    min_{theta_1..theta_L}  sum_outputs || f_theta(x) - f_softmax(x) ||^2 / || f_softmax(x) ||^2

(``finetune_steps`` Adam steps, one batch a step in turn; nothing but the maps changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from optcc.ir import flat_inputs
from optcc.kernels import linear_attention as la


@dataclass
class Recorded:
    q: list
    k: list
    v: list
    key_mask: list   # [B, S] bool (True = a real key) or None, per batch
    out: list


class _Recorder(fx.Interpreter):
    def __init__(self, gm, nodes: set):
        super().__init__(gm)
        self.nodes = nodes
        self.seen: dict[fx.Node, Recorded] = {n: Recorded([], [], [], [], []) for n in nodes}
        self.outputs: list = []  # the graph's float outputs, per batch (finetune's targets)

    def run_node(self, n):
        result = super().run_node(n)
        if n.op == "output":
            self.outputs.append([t.detach() for t in _float_leaves(result)])
        if n in self.nodes:
            q, k, v = (self.env[a] for a in n.args[:3])
            mask = n.args[3] if len(n.args) > 3 else None
            record = self.seen[n]
            record.key_mask.append(None if mask is None else _key_rows(self.env[mask], q.shape[0], k.shape[-2]))
            record.q.append(q.detach())
            record.k.append(k.detach())
            record.v.append(v.detach())
            record.out.append(result.detach())
        return result


def _key_rows(mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor:
    """A key-padding mask (the same for every query and head) as ``[B, S]`` bools."""
    from optcc.kernels.token_merge import MASKED

    real = mask if mask.dtype == torch.bool else mask > MASKED
    while real.dim() < 4:
        real = real.unsqueeze(0)
    return real.expand(batch, real.shape[1], real.shape[2], keys)[:, 0, 0, :]


def record(gm: fx.GraphModule, nodes: Sequence[fx.Node], batches: Sequence[Any]) -> tuple[dict[fx.Node, Recorded], list]:
    """Each node's q/k/v and output on every calibration batch (tuples of model inputs), and
    the graph's float outputs per batch."""
    from optcc.pass_base import OptionError

    recorder = _Recorder(gm, set(nodes))
    expected = [tuple(n.meta["val"].shape) for n in gm.graph.nodes
                if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    with torch.no_grad():
        for i, batch in enumerate(batches):
            args = batch if isinstance(batch, (tuple, list)) else (batch,)
            flat = flat_inputs(gm, args)
            shapes = [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]
            if shapes != expected:
                raise OptionError(f"attention_to_linear: calibration batch {i} has input shapes {shapes}, the graph "
                                  f"was captured for {expected}: give batches shaped like the example inputs")
            recorder.run(*flat)
    return recorder.seen, recorder.outputs


def _float_leaves(out) -> list:
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _output_error(gm, flat_batches, targets) -> torch.Tensor:
    total, norm = 0.0, 0.0
    for flat, want in zip(flat_batches, targets):
        for got, ref in zip(_float_leaves(gm(*flat)), want):
            total = total + (got.float() - ref.float()).pow(2).mean()
            norm = norm + ref.float().pow(2).mean()
    return (total / norm).sqrt()


def finetune(gm: fx.GraphModule, attributes: Sequence[str], batches: Sequence[Any], targets: list, *,
             steps: int, lr: float, progress=None) -> tuple[float, float]:
    """Train the buffers ``attributes`` of ``gm`` (the converted layers' maps) together so that
    ``gm``'s float outputs match ``targets`` (the softmax graph's, per batch); returns the
    relative RMS output error ``(before, after)`` over all batches. The buffers are replaced by
    the trained values (detached): the graph is unchanged."""
    gm.recompile()  # the rewrite changed the graph, not yet its generated forward
    flat_batches = [flat_inputs(gm, b if isinstance(b, (tuple, list)) else (b,)) for b in batches]
    trained = {name: gm.get_buffer(name).detach().clone().requires_grad_(True) for name in attributes}
    owners = {name: gm.get_submodule(name.rpartition(".")[0]) if "." in name else gm for name in attributes}
    for name, tensor in trained.items():
        owners[name]._buffers[name.rpartition(".")[2]] = tensor
    optimizer = torch.optim.Adam(list(trained.values()), lr=lr)
    try:
        with torch.no_grad():
            before = float(_output_error(gm, flat_batches, targets))
        for step in range(steps):
            i = step % len(flat_batches)
            optimizer.zero_grad()
            with torch.enable_grad():  # passes run under no_grad
                loss = _output_error(gm, flat_batches[i:i + 1], targets[i:i + 1])
                loss.backward()
            optimizer.step()
            if progress:
                progress()
        with torch.no_grad():
            after = float(_output_error(gm, flat_batches, targets))
    finally:
        for name, tensor in trained.items():
            owners[name]._buffers[name.rpartition(".")[2]] = tensor.detach()
    return before, after


def train_hedgehog(recorded: Recorded, params: torch.Tensor, *, causal: bool, scale, steps: int, lr: float) -> tuple[torch.Tensor, float, float]:
    """``(trained params, error before, error after)``: relative RMS error of the layer output."""
    theta = params.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)

    def error(p) -> torch.Tensor:
        total, norm = 0.0, 0.0
        for q, k, v, mask, out in zip(recorded.q, recorded.k, recorded.v, recorded.key_mask, recorded.out):
            got = la.linear_attention_torch(q, k, v, mask, "hedgehog", p, causal, scale=scale)
            total = total + (got - out).pow(2).mean()
            norm = norm + out.pow(2).mean()
        return (total / norm).sqrt()

    with torch.no_grad():
        before = float(error(theta))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = error(theta)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(error(theta))
    return theta.detach(), before, after


#: what a maps file holds (``save_maps``): the format, then per layer index the maps and the
#: query shape they were calibrated for.
MAPS_FORMAT = "optcc.attention_to_linear.hedgehog_maps/1"


def save_maps(path, gm: fx.GraphModule, attributes: dict[int, str]) -> str:
    """Write the calibrated maps of the converted layers (``{layer index: buffer name}`` of
    ``gm``) to ``path`` (``torch.save``); returns the path."""
    layers = {index: gm.get_buffer(name).detach().clone() for index, name in attributes.items()}
    torch.save({"format": MAPS_FORMAT, "layers": layers}, path)
    return str(path)


def load_maps(path, chosen: dict[int, fx.Node]) -> dict[str, torch.Tensor]:
    """``{SDPA node name: maps}`` for the layers ``chosen`` (``{layer index: node}``) from a file
    :func:`save_maps` wrote; every chosen layer must be there with maps of its shape."""
    import os

    from optcc.pass_base import OptionError

    if not os.path.exists(path):
        raise OptionError(f"attention_to_linear: maps file {path} does not exist; calibrate once with "
                          f"calibrate=[batches] and maps={str(path)!r} to write it")
    saved = torch.load(path, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != MAPS_FORMAT:
        raise OptionError(f"attention_to_linear: {path} is not a maps file written by attention_to_linear")
    maps = {}
    for index, node in chosen.items():
        tensor = saved["layers"].get(index)
        q, k = node.args[0].meta["val"], node.args[1].meta["val"]
        heads, kv_heads = (q.shape[1], k.shape[1]) if q.dim() == 4 else (1, 1)
        expected = (heads + kv_heads, q.shape[-1] + 1)
        if tensor is None or tuple(tensor.shape[:2]) != expected:
            got = "none" if tensor is None else tuple(tensor.shape)
            raise OptionError(f"attention_to_linear: {path} has no maps for attention layer {index} of this graph "
                              f"(expected [{expected[0]}, {expected[1]}, F], got {got}): it was calibrated for "
                              f"another model or layer selection; calibrate again")
        maps[node.name] = tensor
    return maps
