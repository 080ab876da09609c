"""Reading ONNX: a file becomes an :class:`OnnxModule`, a torch module optcc captures like any other."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import EXPORT_HINT, OnnxError, first_line, require_onnx
from .ops import AUDITED_OPSET, HANDLERS, SPECS, SUPPORTED_OPS, Value, as_tensor, is_static, numpy_dtype, torch_dtype

# ----------------------------------------------------------------------------------------
# Reading


def read_onnx(path: str | Path) -> Any:
    """``onnx.load`` + ``onnx.checker.check_model``, with one clear error per kind of bad file."""
    onnx = require_onnx()
    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise OnnxError(f"{path} is empty; {EXPORT_HINT}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, missing external data, ...
        raise OnnxError(f"{path} is not a readable ONNX file (truncated or not ONNX: "
                        f"{type(exc).__name__}: {first_line(exc)}); {EXPORT_HINT}") from exc
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise OnnxError(f"{path} is not a valid ONNX model (onnx.checker: {first_line(exc)}); "
                        f"the file may be truncated or corrupt: {EXPORT_HINT}") from exc
    if not model.graph.output:
        raise OnnxError(f"{path} has a graph without outputs (a truncated file?); {EXPORT_HINT}")
    return model


def load_onnx(path: str | Path, *, dims: dict[str, int] | None = None, default_dim: int = 1,
              batch: int | None = None) -> tuple["OnnxModule", tuple[torch.Tensor, ...]]:
    """An ONNX file as ``(module, example_inputs)``.

    Example inputs follow the graph's input shapes; a symbolic dimension (``batch``,
    ``sequence``) takes its value from ``dims`` or else ``default_dim``. Floating inputs
    are random normal, integer ones are ones (valid token ids and attention masks) and
    boolean ones True.
    """
    proto = read_onnx(path)
    module = OnnxModule(proto, source=str(path))
    return module, module.example_inputs(dims or {}, default_dim, batch)


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_value(node) -> np.ndarray:
    from onnx import numpy_helper

    attrs = _attributes(node)
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    raise OnnxError(f"Constant node '{node.name}' with attributes {sorted(attrs)} is not supported")


def _value_types(proto: Any) -> dict[str, np.dtype]:
    """Element type of every value ONNX shape inference can type (what CastLike casts to)."""
    from onnx import shape_inference

    try:
        graph = shape_inference.infer_shapes(proto).graph
    except Exception:  # inference is a help here, not a requirement
        graph = proto.graph
    types = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        elem = info.type.tensor_type.elem_type
        if elem:
            types[info.name] = numpy_dtype(elem)
    return types


def _default_opset(proto: Any) -> int:
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise OnnxError("the model imports no version of the default ONNX opset; " + EXPORT_HINT)
    return int(versions[0])


def _declared(outputs) -> list[str]:
    """A node's outputs, without the trailing empty names that stand for outputs not asked for."""
    outputs = list(outputs)
    while outputs and not outputs[-1]:
        outputs.pop()
    return outputs


def _op_version(op_type: str, opset: int) -> int | None:
    """The version of ``op_type`` that ``opset`` selects (its ``since_version``)."""
    from onnx import defs

    try:
        return defs.get_schema(op_type, opset, "").since_version
    except Exception:  # not an op of that opset
        return None


def _check_graph(graph: Any, opset: int, source: str, initializers: dict[str, np.ndarray]) -> list[int]:
    """Every reason the importer cannot evaluate the graph exactly, found before anything is
    evaluated and raised as one line: ops it has no handler for, and, per op, the version,
    attribute, output or data-dependent input it cannot honour. Returns each node's op version."""
    unsupported = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
    unsupported += sorted({n.op_type for n in graph.node if n.domain in ("", "ai.onnx")} - SUPPORTED_OPS)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    # values computed from the graph inputs' values (not only from their shapes)
    dynamic = {i.name for i in graph.input if i.name not in initializers}
    constants = dict(initializers)
    problems: list[str] = []
    versions = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            try:
                constants[node.output[0]] = _constant_value(node)
            except OnnxError:
                pass  # refused when the module stores it
        version = _op_version(node.op_type, opset) if node.domain in ("", "ai.onnx") else None
        versions.append(version or 0)
        spec = SPECS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        inputs = list(node.input)
        if node.op_type not in ("Shape", "Size"):  # their outputs depend on shapes only
            reads = inputs[:1] if node.op_type in ("CastLike", "Dropout") else inputs
            if any(i in dynamic for i in reads):
                dynamic.update(o for o in node.output if o)
        if spec is None:
            continue
        where = f"{node.op_type} (opset {opset})"
        if opset > AUDITED_OPSET:
            problems.append(f"{where}: opset {opset} is newer than the newest one optcc's importer was "
                            f"checked against ({AUDITED_OPSET})")
            continue
        if version is None:
            problems.append(f"{where}: the op is not part of opset {opset}")
            continue
        attrs = _attributes(node)
        used = [bool(o) and o in read for o in _declared(node.output)]
        problems += [f"{where}: {p}" for p in spec.problems(attrs, version, used)]
        if spec.check_constants is not None:
            problems += [f"{where}: {p}" for p in spec.check_constants([constants.get(i) for i in inputs])]
        for position in spec.static:
            if position < len(inputs) and inputs[position] in dynamic:
                problems.append(f"{where}: input {position} ('{inputs[position]}') is computed from the graph "
                                f"inputs' values; optcc needs it known when the model is traced")
    problems = list(dict.fromkeys(problems))
    if unsupported:
        settings = f"; and op settings it cannot honour: {'; '.join(problems)}" if problems else ""
        raise OnnxError(f"{source} uses ONNX ops optcc cannot import: {', '.join(unsupported)}{settings}; "
                        f"supported: {', '.join(sorted(SUPPORTED_OPS))}")
    if problems:
        raise OnnxError(f"{source} uses ONNX op settings optcc cannot honour: {'; '.join(problems)}")
    return versions


class OnnxModule(nn.Module):
    """An ONNX graph evaluated with torch ops (see the module docstring)."""

    def __init__(self, proto: Any, source: str = "the ONNX model"):
        super().__init__()
        from onnx import numpy_helper

        graph = proto.graph
        self.source = source
        self.opset = _default_opset(proto)
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        versions = _check_graph(graph, self.opset, source, initializers)
        self.input_specs = [i for i in graph.input if i.name not in initializers]
        self.input_names = [i.name for i in self.input_specs]
        self.output_names = [o.name for o in graph.output]
        self.static: dict[str, np.ndarray] = {}
        self.tensor_names: dict[str, str] = {}  # ONNX value name -> buffer attribute
        self.weights_of_matmul = {n.input[1] for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1}
        for name, array in initializers.items():
            self._store_constant(name, array)
        self.nodes = []
        for node, version in zip(graph.node, versions):
            if node.op_type == "Constant":
                continue
            outputs = _declared(node.output)
            attrs = {**_attributes(node), "@version": version, "@outputs": len(outputs)}
            self.nodes.append((node.op_type, node.name or node.op_type, list(node.input), outputs, attrs))
        for node in graph.node:
            if node.op_type == "Constant":
                self._store_constant(node.output[0], _constant_value(node))
        self._check_defined(graph)
        self._static_floats()
        self._fold_constants(_value_types(proto))
        self.eval()  # an ONNX graph is an inference graph: BatchNormalization uses its statistics

    def _static_floats(self) -> None:
        """A floating constant read where a value must be known while tracing (Pad's
        constant_value, Range's bounds) is read as its numpy value, not as a buffer."""
        nodes = []
        for op_type, name, inputs, outputs, attrs in self.nodes:
            inputs = list(inputs)
            for position in SPECS[op_type].static:
                if position < len(inputs) and inputs[position] in self.tensor_names:
                    alias = inputs[position] + "::static"
                    self.static[alias] = getattr(self, self.tensor_names[inputs[position]]).numpy().copy()
                    inputs[position] = alias
            nodes.append((op_type, name, inputs, outputs, attrs))
        self.nodes = nodes

    def _store_constant(self, name: str, value: Value) -> None:
        """Floating constants become buffers (frozen constants the passes can fold); integer
        and boolean ones stay numpy arrays, read while tracing (shapes, axes, indices), also
        when folding computed them as tensors (``Cast(Pow(2.0, 4.0), to=INT64)`` in a shape)."""
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            value = value.detach().numpy().copy()
        if isinstance(value, torch.Tensor) or np.issubdtype(value.dtype, np.floating):
            array = value.detach().numpy() if isinstance(value, torch.Tensor) else value
            self._add_buffer(name, array)
            if name in self.weights_of_matmul and array.ndim == 2:  # x @ W is linear(x, W^T)
                self._add_buffer(name + "::T", array.T)
        else:
            self.static[name] = value

    def _fold_constants(self, value_types: dict[str, np.dtype]) -> None:
        """Evaluate now every node whose inputs are all constants (a zero bias built from
        ``Shape`` + ``Expand``, a transposed weight): the captured graph then reads them as
        constants instead of computing them."""
        kept = []
        for op_type, name, inputs, outputs, attrs in self.nodes:
            known = all(i == "" or i in self.static or i in self.tensor_names for i in inputs)
            like_input = op_type == "CastLike" and inputs[1] in value_types and (
                inputs[0] in self.static or inputs[0] in self.tensor_names)
            if not (known or like_input):
                kept.append((op_type, name, inputs, outputs, attrs))
                continue
            args = [self._constant(i) if i else None for i in (inputs[:1] if like_input else inputs)]
            try:
                with torch.no_grad():
                    if like_input:
                        result = np.asarray(as_tensor(args[0]).numpy() if isinstance(args[0], torch.Tensor)
                                            else args[0]).astype(value_types[inputs[1]])
                    else:
                        result = self._evaluate(op_type, inputs, args, attrs)
            except Exception:  # not foldable here: evaluated while tracing
                kept.append((op_type, name, inputs, outputs, attrs))
                continue
            for out, value in zip(outputs, result if isinstance(result, tuple) else (result,)):
                self._store_constant(out, value)
        self.nodes = kept

    def _constant(self, name: str) -> Value:
        return self.static[name] if name in self.static else getattr(self, self.tensor_names[name])

    def _evaluate(self, op_type: str, input_names: list[str], args: list, attrs: dict) -> Value:
        while args and args[-1] is None:
            args.pop()
        transposed = input_names[1] + "::T" if len(input_names) > 1 else None
        if op_type == "MatMul" and transposed in self.tensor_names and not is_static(args[0]) and args[0].dim() >= 2:
            return F.linear(args[0], getattr(self, self.tensor_names[transposed]))
        result = HANDLERS[op_type](attrs, *args)
        # numpy reductions and indexing return scalars (np.int64), not arrays: keep them static
        return np.asarray(result) if isinstance(result, np.generic) else result

    def _add_buffer(self, name: str, array: np.ndarray) -> None:
        attr = f"onnx_{len(self.tensor_names)}"
        self.register_buffer(attr, torch.from_numpy(np.array(array, copy=True)))
        self.tensor_names[name] = attr

    def _check_defined(self, graph) -> None:
        known = set(self.input_names) | set(self.static) | set(self.tensor_names) | {""}
        for op_type, name, inputs, outputs, _ in self.nodes:
            missing = [i for i in inputs if i not in known]
            if missing:
                raise OnnxError(f"{self.source}: node '{name}' ({op_type}) reads '{missing[0]}', which nothing "
                                f"defines (a truncated or corrupt file?); {EXPORT_HINT}")
            known.update(outputs)
        missing = [o for o in self.output_names if o not in known]
        if missing:
            raise OnnxError(f"{self.source}: graph output '{missing[0]}' is never computed; {EXPORT_HINT}")

    def example_inputs(self, dims: dict[str, int], default_dim: int = 1, batch: int | None = None,
                       shapes: dict[str, Sequence[int]] | None = None) -> tuple[torch.Tensor, ...]:
        """Random inputs of the graph's shapes. A symbolic dimension takes ``batch`` (the first
        axis), else its size in ``dims``, else ``default_dim``; ``shapes`` gives an input's whole
        shape by name (for dimensions without a name), checked against its fixed sizes."""
        shapes = dict(shapes or {})
        unknown = sorted(set(shapes) - set(self.input_names))
        if unknown:
            raise OnnxError(f"{self.source} has no input {unknown[0]!r}; its inputs are {', '.join(self.input_names)}")
        inputs = []
        for spec in self.input_specs:
            ttype = spec.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value")
                     else batch if i == 0 and batch is not None else dims.get(d.dim_param, default_dim)
                     for i, d in enumerate(ttype.shape.dim)]
            if spec.name in shapes:
                given = list(shapes[spec.name])
                fixed = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
                if len(given) != len(fixed) or any(f is not None and f != g for f, g in zip(fixed, given)):
                    shown = "x".join(str(f) if f is not None else "?" for f in fixed)
                    raise OnnxError(f"input {spec.name!r} of {self.source} has shape {shown}; "
                                    f"{'x'.join(map(str, given))} does not fit it")
                shape = given
            dtype = torch_dtype(ttype.elem_type)
            if dtype.is_floating_point:
                inputs.append(torch.randn(shape, dtype=dtype))
            elif dtype == torch.bool:
                inputs.append(torch.ones(shape, dtype=torch.bool))
            else:
                inputs.append(torch.ones(shape, dtype=dtype))
        return tuple(inputs)

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"{self.source} takes {len(self.input_names)} inputs "
                            f"({', '.join(self.input_names)}), got {len(inputs)}")
        env: dict[str, Value] = dict(self.static)
        env.update({name: getattr(self, attr) for name, attr in self.tensor_names.items()})
        env.update(zip(self.input_names, inputs))
        for op_type, name, input_names, output_names, attrs in self.nodes:
            args = [env[i] if i else None for i in input_names]
            try:
                result = self._evaluate(op_type, input_names, args, attrs)
            except OnnxError as exc:
                raise OnnxError(f"{self.source}: node '{name}' ({op_type}, opset {self.opset}): {exc}") from None
            env.update(zip(output_names, result if isinstance(result, tuple) else (result,)))
        outputs = tuple(as_tensor(env[o]) for o in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

