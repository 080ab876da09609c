"""Writing ONNX: a compiled model's rewritten graph through ``torch.onnx.export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..ir import placeholder_inputs
from .common import ONNX_TRANSLATIONS, OnnxError, first_line, require_onnx


def _standard_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with optcc's ops that have no ONNX form written as aten ops (a copy of the
    graph; the tensors are shared). Token reduction ops are composite and decompose by
    themselves; ``optcc::linear_attention`` keeps one node in graphs and is expanded here."""
    from optcc.kernels.linear_attention import decompose_linear_attention, linear_attention

    if not any(n.target is linear_attention for n in gm.graph.nodes):
        return gm
    graph = fx.Graph(owning_module=gm)
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    decompose_linear_attention(copy)
    copy.recompile()
    return copy


def export_onnx(model: Any, path: str | Path, example_inputs: Any = None) -> Path:
    """Write ``model`` to ``path`` as ONNX and validate the file with ``onnx.checker``.

    ``model`` is what ``optcc.compile`` returned (its latest specialisation's rewritten
    graph is written), a canonical ``GraphModule`` (inputs default to random ones of its
    recorded shapes), or any ``nn.Module`` with ``example_inputs``.
    """
    from optcc.compiler import OptimizedModule

    onnx = require_onnx()
    if isinstance(model, OptimizedModule):
        if model.graph_module is None:
            raise OnnxError("the compiled module runs its model eagerly (capture failed): nothing to export")
        model = model.graph_module
    if isinstance(model, fx.GraphModule) and example_inputs is None:
        try:
            example_inputs = placeholder_inputs(model)
        except ValueError as exc:
            raise OnnxError(str(exc)) from exc
    if isinstance(model, fx.GraphModule):
        model = _standard_ops(model)
    if example_inputs is None:
        raise OnnxError("export_onnx needs example_inputs for a module that optcc did not compile")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, tuple(example_inputs), dynamo=True, optimize=False,
                                        verbose=False, report=False,
                                        custom_translation_table=dict(ONNX_TRANSLATIONS))
            program.save(str(path))
    except Exception as exc:
        raise OnnxError(f"torch.onnx.export could not write the model: {type(exc).__name__}: "
                        f"{first_line(exc)}") from exc
    onnx.checker.check_model(onnx.load(str(path)))
    return path


def onnx_text(model) -> str:
    """The ONNX text form (``onnx.printer``) of ``model`` (a ``ModelProto`` or a path) with
    each initializer shown as a typed graph input instead of its values: what the graph
    computes, readable and stable enough to diff."""
    onnx = require_onnx()
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    graph = onnx.GraphProto()
    graph.CopyFrom(proto.graph)
    for tensor in graph.initializer:
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del graph.initializer[:]
    return onnx.printer.to_text(graph) + "\n"
