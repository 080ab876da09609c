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


def export_onnx(model: Any, path: str | Path, example_inputs: Any = None, *, like: Any = None,
                note: str | None = None, fold: bool = False) -> Path:
    """Write ``model`` to ``path`` as ONNX and validate the file with ``onnx.checker``.

    ``model`` is what ``optcc.compile`` returned (its latest specialisation's rewritten
    graph is written), a canonical ``GraphModule`` (inputs default to random ones of its
    recorded shapes), or any ``nn.Module`` with ``example_inputs``. ``like`` (the ONNX
    model the graph was read from, a ``ModelProto`` or a path) gives the file that model's
    input and output names and its metadata; ``note`` is recorded as the metadata entry
    ``optcc`` (what was done to it). ``fold`` runs the exporter's ONNX optimizer (constant
    folding - shape arithmetic, weight transposes - and dead-node removal) and then
    onnxscript's default rewrite rules (transposes that cancel, reshape chains), for a file
    to deploy; without it the file is optcc's graph op for op, for reading what passes did.
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
            program = torch.onnx.export(model, tuple(example_inputs), dynamo=True, optimize=fold,
                                        verbose=False, report=False,
                                        custom_translation_table=dict(ONNX_TRANSLATIONS))
            program.save(str(path))
    except Exception as exc:
        raise OnnxError(f"torch.onnx.export could not write the model: {type(exc).__name__}: "
                        f"{first_line(exc)}") from exc
    written = onnx.load(str(path))
    if fold:
        written = _cleaned(written)
    if like is not None or note or fold:
        keep_interface(written, onnx.load(str(like)) if isinstance(like, (str, Path)) else like, note)
        onnx.save(written, str(path))
    onnx.checker.check_model(written)
    return path


def _cleaned(model):
    """onnxscript's default rewrite rules, then its optimizer again for what they expose:
    the exporter translates op by op, so ops of neighbouring translations that cancel (a
    transpose undoing the previous one, two reshapes in a row) are left to this."""
    from onnxscript import optimizer, rewriter

    return optimizer.optimize(rewriter.rewrite(model))


def keep_interface(written, original, note: str | None = None) -> None:
    """Give ``written`` the graph input and output names and the metadata (``metadata_props``,
    doc strings, domain, model version, graph name) of ``original``, in place; ``note``
    becomes the metadata entry ``optcc``."""
    if original is not None:
        initializers = {t.name for t in original.graph.initializer}
        old_inputs = [i.name for i in written.graph.input]
        new_inputs = [i.name for i in original.graph.input if i.name not in initializers]
        old_outputs = [o.name for o in written.graph.output]
        new_outputs = [o.name for o in original.graph.output]
        if len(old_inputs) != len(new_inputs) or len(old_outputs) != len(new_outputs):
            raise OnnxError(f"the optimized graph has {len(old_inputs)} inputs and {len(old_outputs)} outputs, "
                            f"the original {len(new_inputs)} and {len(new_outputs)}: cannot keep its names")
        renames = zip(old_inputs + old_outputs, new_inputs + new_outputs)
        _rename_values(written.graph, {old: new for old, new in renames if old != new})
        written.doc_string = original.doc_string
        written.domain = original.domain
        written.model_version = original.model_version
        written.graph.name = original.graph.name or written.graph.name
        written.graph.doc_string = original.graph.doc_string
        del written.metadata_props[:]
        written.metadata_props.extend(p for p in original.metadata_props if p.key != "optcc")
    if note:
        entry = written.metadata_props.add()
        entry.key, entry.value = "optcc", note


def _rename_values(graph, renames: dict[str, str]) -> None:
    """Rename values everywhere ``graph`` names them. A value already called by a target
    name is moved out of the way first, so swapping two names works."""
    if not renames:
        return
    taken = set(renames.values()) - set(renames)
    everything = {n for node in graph.node for n in (*node.input, *node.output)}
    aside = {name: f"{name}__optcc" for name in taken if name in everything}
    mapping = {**aside, **renames}

    def rename(name: str) -> str:
        return mapping.get(name, name)

    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for values in (graph.input, graph.output, graph.value_info):
        for value in values:
            value.name = rename(value.name)
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)


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
