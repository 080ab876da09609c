"""The canonical IR: how a model becomes the one graph every pass is written against.

A captured model is a ``torch.fx.GraphModule`` with these properties:

* ATen level, from ``torch.export`` followed by ``run_decompositions`` with
  :func:`decomposition_table`, which decomposes everything *except* the ops passes
  match on: ``aten.convolution`` (every conv1d/2d/3d/transposed form lands here),
  ``aten.linear``, ``aten._native_batch_norm_legit_no_training`` (eval BatchNorm;
  training BatchNorm stays the distinct ``_native_batch_norm_legit_functional``),
  ``aten.layer_norm``, ``aten.scaled_dot_product_attention``, ``aten.softmax`` and
  ``aten.gelu``.
* flat calling convention: ``forward(*tensors) -> tuple(tensors)``. The pytree specs
  that map the user's ``(args, kwargs)`` and outputs onto that flat form are kept in
  ``gm.meta["optcc_in_spec"]`` / ``gm.meta["optcc_out_spec"]``; the dotted names of the
  model's tensors the graph reads in ``gm.meta["optcc_state_targets"]`` (for the guard).
* parameters, buffers and lifted constants are frozen: detached copies stored as
  attributes and read with ``get_attr`` nodes, so a pass can fold them. Passes never
  modify a constant in place; they register a new one (:func:`add_constant`).
* every node carries ``node.meta["val"]`` (a FakeTensor: shape, dtype, device), kept
  current by :func:`refresh_meta`, which the pass manager runs after each pass.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

aten = torch.ops.aten

#: Composite ops that stay whole in the canonical IR (passes match on them).
KEPT_OPS = (
    aten.linear.default,
    aten.layer_norm.default,
    aten.softmax.int,
    aten.scaled_dot_product_attention.default,
)


class CaptureError(RuntimeError):
    """The model could not be traced into the canonical IR."""


def decomposition_table() -> Any:
    """torch.export's default decompositions minus the ops optcc keeps whole.

    ``aten.gelu``, ``aten.convolution`` and ``_native_batch_norm_legit_no_training``
    are core ATen ops and are never decomposed; the composites in :data:`KEPT_OPS`
    are removed from the table so they survive too.
    """
    table = torch.export.default_decompositions()
    for op in KEPT_OPS:
        table.pop(op, None)
    return table


def _normalize_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tensor or a tuple of positional inputs, got "
            f"{type(example_inputs).__name__}"
        )
    return example_inputs


def capture(
    model: torch.nn.Module | ExportedProgram,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
) -> fx.GraphModule:
    """Trace ``model`` on ``example_inputs`` into the canonical IR (see module docstring).

    ``model`` may also be an ``ExportedProgram`` (e.g. loaded from a ``.pt2`` file), in
    which case ``example_inputs`` is not needed.
    """
    if isinstance(model, ExportedProgram):
        program = model
    else:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"optcc captures torch.nn.Module objects, got {type(model).__name__}")
        args = _normalize_inputs(example_inputs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                program = torch.export.export(model, args, example_kwargs or {}, strict=False)
        except Exception as exc:  # torch.export raises many unrelated exception types
            raise CaptureError(_describe_capture_failure(exc)) from exc
    try:
        program = program.run_decompositions(decomposition_table())
    except Exception as exc:
        raise CaptureError(_describe_capture_failure(exc)) from exc
    return graph_module_from_program(program)


def _describe_capture_failure(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    ops = re.findall(r"(aten\.[\w.]+|torch\.ops\.[\w.]+|[\w.]+\.default)", text)
    where = f" (op: {ops[0]})" if ops else ""
    # torch.export's own message rarely says where in the model it failed, and for a
    # branch on a tensor's value (``if x.item() > 0``) it only names a symbol ("zuf0 >
    # 0.0"). Name the cause and the model's line so the user knows what to change.
    cause = ""
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        cause = (" the model uses a tensor's value as a Python value (.item(), int(), bool(), "
                 ".tolist() or `if tensor:`) to branch or size a tensor;")
    frame = _model_frame(exc)
    if frame is not None:
        where += f" at {frame.filename}:{frame.lineno} in {frame.name}"
        if frame.line:
            where += f" `{frame.line.strip()}`"
    return f"torch.export could not trace the model{where}:{cause} {type(exc).__name__}: {first}"


def _model_frame(exc: BaseException):
    """The innermost traceback frame in user code (outside torch, optcc and the stdlib)."""
    import os
    import sysconfig
    import traceback

    internal = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    stdlib = sysconfig.get_paths()["stdlib"]

    def is_model_code(filename: str) -> bool:
        if filename.startswith(internal):
            return False
        # model libraries (timm, transformers) may sit in a site-packages inside the stdlib
        return "-packages" in filename or not filename.startswith(stdlib)

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if is_model_code(f.filename)]
    return frames[-1] if frames else None


def _attribute_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "const"
    if base[0].isdigit():
        base = "_" + base
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


def graph_module_from_program(program: ExportedProgram) -> fx.GraphModule:
    """Build the flat, frozen GraphModule of the canonical IR from an ExportedProgram."""
    signature = program.graph_signature
    lifted: dict[str, torch.Tensor] = {}
    for spec in signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = program.state_dict.get(spec.target)
            if tensor is None:  # non-persistent buffers live in constants
                tensor = program.constants[spec.target]
            lifted[spec.arg.name] = tensor
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            lifted[spec.arg.name] = program.constants[spec.target]

    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    # get_attr nodes of the exported graph read submodules (the branches of torch.cond,
    # the body of a while_loop, ...): carry them over under their own names, which the
    # frozen constants must then not take.
    taken: set[str] = {n.target.split(".")[0] for n in program.graph.nodes if n.op == "get_attr"}
    user_outputs = [
        i for i, spec in enumerate(signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT
    ]
    if len(user_outputs) != len(signature.output_specs):
        warnings.warn(
            "the model mutates its buffers or inputs while running (e.g. BatchNorm running "
            "statistics in training mode); optcc's compiled graph does not write those "
            "updates back. Call model.eval() for inference.",
            stacklevel=3,
        )
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name in lifted:
                clean = re.sub(r"^(p|b|c)_", "", node.name)
                attr = _attribute_name(clean, taken)
                tensor = lifted[node.name]
                if isinstance(tensor, torch.nn.Parameter):
                    tensor = tensor.data
                setattr(root, attr, tensor.detach().clone())
                new = graph.get_attr(attr)
                new.meta.update(node.meta)
            else:
                new = graph.placeholder(node.name)
                new.meta.update(node.meta)
            env[node] = new
        elif node.op == "output":
            outputs = node.args[0]
            graph.output(tuple(env[outputs[i]] if isinstance(outputs[i], fx.Node) else outputs[i]
                               for i in user_outputs))
        elif node.target is aten._assert_tensor_metadata.default:
            # A dtype/device check export inserts for ``tensor.to(...)`` (BERT's attention
            # mask, GPT-2): a no-op returning None, without node.meta["val"], whose only
            # effect on a pass would be an extra user that blocks its match. Inductor's
            # post-grad passes drop it for the same reason (remove_assert_ops).
            continue
        else:
            if node.op == "get_attr":
                _copy_submodule(program.graph_module, root, node.target)
            env[node] = graph.node_copy(node, lambda n: env[n])
    gm = fx.GraphModule(root, graph, class_name="CanonicalGraph")
    gm.meta["optcc_in_spec"] = program.call_spec.in_spec
    gm.meta["optcc_out_spec"] = program.call_spec.out_spec
    # The model's tensors (dotted names) this graph froze and reads: what optcc's guard
    # watches on every call (an unread one, such as BatchNorm's num_batches_tracked in
    # eval, cannot make the graph stale).
    read = {node.name for node in program.graph.nodes if node.op == "placeholder" and node.users}
    gm.meta["optcc_state_targets"] = tuple(
        spec.target for spec in signature.input_specs
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
        and spec.target is not None and spec.arg.name in read)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _copy_submodule(source: torch.nn.Module, root: torch.nn.Module, target: str) -> None:
    """Put ``source``'s attribute at dotted path ``target`` on ``root`` at the same path."""
    *path, leaf = target.split(".")
    for part in path:
        source = getattr(source, part)
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    value = getattr(source, leaf)
    if isinstance(value, torch.nn.Module):
        root.add_module(leaf, value)
    else:
        setattr(root, leaf, value)


# ----------------------------------------------------------------------------------------
# Helpers passes use to read and write the IR.


def get_constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or None when ``node`` is not a constant."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def add_constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor, *, before: fx.Node) -> fx.Node:
    """Register ``tensor`` as a new frozen constant and insert a get_attr for it before ``before``."""
    taken = set(dict(gm.named_buffers()).keys()) | set(dict(gm.named_parameters()).keys())
    taken |= {k for k in gm.__dict__ if not k.startswith("_")} | set(gm._buffers) | set(gm._modules)
    attr = _attribute_name(name, taken | set(dir(gm)))
    gm.register_buffer(attr, tensor.detach().contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(attr)
    node.meta["val"] = _fake_like(before, tensor)
    return node


def _fake_like(anchor: fx.Node, tensor: torch.Tensor) -> Any:
    mode = _fake_mode_of(anchor.graph)
    return mode.from_tensor(tensor) if mode is not None else tensor


def _fake_mode_of(graph: fx.Graph):
    from torch._subclasses.fake_tensor import FakeTensor

    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def drop_unused_constants(gm: fx.GraphModule) -> None:
    """Delete attributes no get_attr node reads any more (folded weights)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in list(gm._buffers):
        if name not in used:
            del gm._buffers[name]
    for name, value in list(vars(gm).items()):
        if isinstance(value, torch.Tensor) and name not in used and not name.startswith("_"):
            delattr(gm, name)


def refresh_meta(gm: fx.GraphModule) -> None:
    """Re-derive ``node.meta["val"]`` for every node by fake-tensor propagation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = _fake_mode_of(gm.graph) or FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = []
    for node in placeholders:
        val = node.meta.get("val")
        fake_inputs.append(val)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)


def op_name(node: fx.Node) -> str:
    """A short, stable name for what a node computes (``aten.convolution``, ``getitem``,
    ``region.gemm``)."""
    target = node.target
    region = node.meta.get("optcc_region") if node.op == "call_module" else None
    if region is not None:
        return f"region.{region.kind}"
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}.{target._opname}"
        return name if target._overloadname == "default" else f"{name}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__name__", str(target))


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many times each operator is called in the graph (call_* nodes only).

    A fused region counts once as ``region.<kind>`` and its reference ops count as ops,
    so "how many convolutions" has the same answer before and after grouping.
    """
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if not node.op.startswith("call_"):
            continue
        counts[op_name(node)] += 1
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            if isinstance(sub, fx.GraphModule):
                counts.update(op_counts(sub))
    return counts


def flat_inputs(gm: fx.GraphModule, args: Iterable, kwargs: dict | None = None) -> list:
    """Flatten a user's ``(args, kwargs)`` into the canonical graph's positional inputs."""
    spec = gm.meta.get("optcc_in_spec")
    if spec is not None and kwargs:
        # pytree flattens a dict in insertion order: model(a=.., b=..) and model(b=.., a=..)
        # must give the graph the same positional inputs (as ExportedProgram.module() does).
        from torch.export._tree_utils import reorder_kwargs

        try:
            kwargs = reorder_kwargs(kwargs, spec)
        except (AssertionError, ValueError):
            pass  # a different structure: reported just below
    flat, got_spec = pytree.tree_flatten((tuple(args), kwargs or {}))
    if spec is not None and got_spec != spec:
        raise TypeError(
            "the inputs do not have the structure the model was captured with: expected "
            f"{spec}, got {got_spec}"
        )
    return flat


def unflatten_outputs(gm: fx.GraphModule, flat_outputs: Iterable) -> Any:
    spec = gm.meta.get("optcc_out_spec")
    flat_outputs = list(flat_outputs)
    return pytree.tree_unflatten(flat_outputs, spec) if spec is not None else tuple(flat_outputs)


def tensor_like(val: Any, integers: int = 0) -> Any:
    """A real tensor of a recorded (fake) value's shape and dtype: random floats, else
    filled with ``integers``; anything that is no tensor is returned as it is."""
    if not isinstance(val, torch.Tensor):
        return val
    shape = [int(s) for s in val.shape]
    return (torch.randn(shape, dtype=val.dtype) if val.dtype.is_floating_point
            else torch.full(shape, integers, dtype=val.dtype))


def example_inputs_of(program: ExportedProgram) -> tuple[tuple, dict]:
    """Random inputs with the shapes and dtypes an ExportedProgram was exported with."""
    user_inputs = set(program.graph_signature.user_inputs)
    flat = [tensor_like(node.meta.get("val")) for node in program.graph.nodes
            if node.op == "placeholder" and node.name in user_inputs]
    args, kwargs = pytree.tree_unflatten(flat, program.call_spec.in_spec)
    return tuple(args), dict(kwargs)


def placeholder_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """Random positional inputs of the shapes a canonical graph recorded for its placeholders
    (integer inputs all ones: valid token ids, masks that keep every position)."""
    inputs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ValueError(f"input '{node.name}' of the graph has no recorded shape; pass example inputs")
            inputs.append(tensor_like(val, integers=1))
    return tuple(inputs)


def save_program(gm: fx.GraphModule, path: str | Path) -> Path:
    """Write a canonical graph as a ``torch.export`` program (``.pt2``: Model Explorer opens
    it). optcc's own ops stay single nodes with their arguments; loading the file needs
    ``import optcc``, which registers them."""
    program = torch.export.export(gm, placeholder_inputs(gm), strict=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def insert_call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """``graph.call_function`` at the current insertion point, with ``meta["val"]`` derived.

    Rules that read shapes of nodes they created earlier in the same pass need the fake
    value at once, before the pass manager re-propagates the whole graph.
    """
    from torch.utils._pytree import tree_map_only

    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = tree_map_only(fx.Node, lambda n: n.meta["val"], (args, kwargs))
    mode = _fake_mode_of(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode is None:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        else:
            with mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node
