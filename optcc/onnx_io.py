"""Reading and writing ONNX.

Read: :func:`load_onnx` parses a file with ``onnx.load``, validates it with
``onnx.checker.check_model`` and turns it into an :class:`OnnxModule`, a plain
``torch.nn.Module`` that evaluates the ONNX graph with torch ops. optcc then captures that
module like any other model, so every pass sees the same canonical IR whatever the
source. Initializers become buffers (frozen constants after capture: a BatchNormalization
after a Conv folds like ``nn.BatchNorm2d`` after ``nn.Conv2d``), a ``Gemm`` or a
``MatMul`` by a constant matrix becomes ``aten.linear``, and shape arithmetic (``Shape``,
``Gather`` on shapes, ``Concat`` of sizes, ...) is evaluated with numpy while tracing, so
the captured graph holds only the tensor computation. An op outside
:data:`SUPPORTED_OPS` is refused when the file is read, with the list of the ones found.

(``onnx2torch`` was evaluated first: it rejects what ``torch.onnx.export`` writes today -
``ReduceMean`` of opset 18 and ``Reshape(allowzero=1)`` - hence this small importer.)

Write: :func:`export_onnx` writes a compiled model's rewritten graph (or any module) with
``torch.onnx.export(..., dynamo=True, optimize=False)``: the file holds optcc's graph op
for op, so what the passes did is what the file computes.

Files are only parsed as protobuf: reading an ONNX file runs no code from it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

EXPORT_HINT = "re-export it, e.g. torch.onnx.export(model, inputs, 'model.onnx', dynamo=True)"


class OnnxError(ValueError):
    """An ONNX file optcc cannot read or a model it cannot write; the message says what to do."""


def _onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        raise OnnxError("reading and writing ONNX needs the onnx package: pip install onnx") from None
    return onnx


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------
# Reading


def read_onnx(path: str | Path) -> Any:
    """``onnx.load`` + ``onnx.checker.check_model``, with one clear error per kind of bad file."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise OnnxError(f"{path} is empty; {EXPORT_HINT}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, missing external data, ...
        raise OnnxError(f"{path} is not a readable ONNX file (truncated or not ONNX: "
                        f"{type(exc).__name__}: {_first_line(exc)}); {EXPORT_HINT}") from exc
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise OnnxError(f"{path} is not a valid ONNX model (onnx.checker: {_first_line(exc)}); "
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


# ----------------------------------------------------------------------------------------
# Values while evaluating: a tensor (traced) or a numpy array (static: known while
# tracing, like shapes and the integer constants that index them).

Value = Any


def _is_static(v: Value) -> bool:
    return isinstance(v, np.ndarray)


def _tensor(v: Value) -> torch.Tensor:
    return torch.from_numpy(np.array(v, copy=True)) if _is_static(v) else v


def _ints(v: Value, what: str) -> list[int]:
    if not _is_static(v):
        raise OnnxError(f"{what} must be known when the model is traced (a constant or computed from "
                        "shapes); optcc does not import data-dependent shapes")
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _numpy_dtype(onnx_type: int) -> np.dtype:
    from onnx.helper import tensor_dtype_to_np_dtype

    return tensor_dtype_to_np_dtype(onnx_type)


def _torch_dtype(onnx_type: int) -> torch.dtype:
    np_dtype = _numpy_dtype(onnx_type)
    return torch.bool if np_dtype == np.bool_ else torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


def _elementwise(np_fn: Callable, torch_fn: Callable) -> Callable:
    def op(attrs: dict, *args: Value) -> Value:
        if all(_is_static(a) for a in args):
            return np.asarray(np_fn(*args))
        tensors = [_tensor(a) for a in args]
        return torch_fn(*tensors)

    return op


def _unary(torch_fn: Callable) -> Callable:
    return lambda attrs, x: torch_fn(_tensor(x))


def _axes(attrs: dict, args: Sequence[Value], position: int) -> list[int] | None:
    """Axes given as an attribute (older opsets) or as an input (newer ones)."""
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(args) > position and args[position] is not None:
        return _ints(args[position], "axes")
    return None


def _reshape(attrs: dict, x: Value, shape: Value) -> Value:
    target = _ints(shape, "Reshape's shape")
    if not attrs.get("allowzero", 0):  # 0 copies the input's size at that position
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return np.reshape(x, target) if _is_static(x) else x.reshape(target)


def _unsqueeze(attrs: dict, x: Value, axes: Value = None) -> Value:
    axes_list = _axes(attrs, [x, axes], 1)
    rank = np.ndim(x) + len(axes_list) if _is_static(x) else x.dim() + len(axes_list)
    for axis in sorted(a % rank for a in axes_list):
        x = np.expand_dims(x, axis) if _is_static(x) else x.unsqueeze(axis)
    return x


def _squeeze(attrs: dict, x: Value, axes: Value = None) -> Value:
    axes_list = _axes(attrs, [x, axes], 1)
    if _is_static(x):
        return np.squeeze(x, axis=tuple(axes_list) if axes_list is not None else None)
    if axes_list is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes_list))


def _concat(attrs: dict, *args: Value) -> Value:
    if all(_is_static(a) for a in args):
        return np.concatenate(args, axis=attrs["axis"])
    return torch.cat([_tensor(a) for a in args], dim=attrs["axis"])


def _gather(attrs: dict, data: Value, indices: Value) -> Value:
    axis = attrs.get("axis", 0)
    if _is_static(data) and _is_static(indices):
        return np.take(data, indices, axis=axis)
    data = _tensor(data)
    if _is_static(indices) and np.ndim(indices) == 0:
        return data.select(axis, int(indices) % data.shape[axis])
    index = _tensor(indices).long()
    index = torch.where(index < 0, index + data.shape[axis], index)
    if axis == 0 and data.dim() == 2:
        return F.embedding(index, data)
    return data.index_select(axis, index.reshape(-1)).reshape(
        *data.shape[:axis % data.dim()], *index.shape, *data.shape[axis % data.dim() + 1:])


def _slice(attrs: dict, x: Value, starts: Value, ends: Value, axes: Value = None, steps: Value = None) -> Value:
    starts_l, ends_l = _ints(starts, "Slice starts"), _ints(ends, "Slice ends")
    rank = np.ndim(x) if _is_static(x) else x.dim()
    axes_l = _ints(axes, "Slice axes") if axes is not None else list(range(len(starts_l)))
    steps_l = _ints(steps, "Slice steps") if steps is not None else [1] * len(starts_l)
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts_l, ends_l, axes_l, steps_l):
        size = x.shape[axis]
        # ONNX clamps out-of-range bounds (INT64_MAX means "to the end")
        start, end = max(min(start, size), -size), max(min(end, size), -size - 1)
        if step > 0 and end == -size - 1:
            end = 0
        index[axis % rank] = slice(start, None if (step < 0 and end < -size) else end, step)
    if _is_static(x):
        return x[tuple(index)]
    if any(s.step is not None and s.step < 0 for s in index):
        raise OnnxError("Slice with a negative step is not supported")
    return x[tuple(index)]


def _split(attrs: dict, x: Value, split: Value = None) -> tuple:
    axis = attrs.get("axis", 0)
    sizes = _ints(split, "Split sizes") if split is not None else attrs.get("split")
    if sizes is None:
        parts = attrs["num_outputs"]
        size = math.ceil(x.shape[axis] / parts)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(parts)]
    return tuple(torch.split(_tensor(x), list(sizes), dim=axis))


def _shape(attrs: dict, x: Value) -> np.ndarray:
    shape = list(np.shape(x) if _is_static(x) else x.shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array([int(s) for s in shape[start:end]], dtype=np.int64)


def _cast(attrs: dict, x: Value) -> Value:
    if _is_static(x):
        return x.astype(_numpy_dtype(attrs["to"]))
    return x.to(_torch_dtype(attrs["to"]))


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                 torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32,
                 torch.int64: np.int64, torch.bool: np.bool_}


def _cast_like(attrs: dict, x: Value, like: Value) -> Value:
    if _is_static(x):  # stays a constant (a zero bias, a scale), which passes can fold
        return x.astype(like.dtype if _is_static(like) else _NUMPY_DTYPES[like.dtype])
    return x.to(_tensor(like).dtype)


def _constant_of_shape(attrs: dict, shape: Value) -> Value:
    from onnx.numpy_helper import to_array

    value = to_array(attrs["value"]) if "value" in attrs else np.zeros(1, dtype=np.float32)
    return np.full(_ints(shape, "ConstantOfShape's shape"), value.reshape(-1)[0], dtype=value.dtype)


def _expand(attrs: dict, x: Value, shape: Value) -> Value:
    target = _ints(shape, "Expand's shape")
    if _is_static(x):
        return np.broadcast_to(x, np.broadcast_shapes(np.shape(x), tuple(target))).copy()
    out_shape = torch.broadcast_shapes(tuple(x.shape), tuple(target))
    return x.expand(out_shape)


def _range(attrs: dict, start: Value, limit: Value, delta: Value) -> Value:
    if all(map(_is_static, (start, limit, delta))):
        return np.arange(start, limit, delta, dtype=np.asarray(start).dtype)
    raise OnnxError("Range with data-dependent bounds is not supported")


def _where(attrs: dict, cond: Value, a: Value, b: Value) -> Value:
    if all(map(_is_static, (cond, a, b))):
        return np.where(cond, a, b)
    return torch.where(_tensor(cond).bool(), _tensor(a), _tensor(b))


def _gemm(attrs: dict, a: Value, b: Value, c: Value = None) -> Value:
    a, b = _tensor(a), _tensor(b)
    if attrs.get("transA", 0):
        a = a.t()
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if not attrs.get("transB", 0):
        b = b.t()
    y = F.linear(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (_tensor(c) * beta if beta != 1.0 else _tensor(c))
    return y


def _matmul(attrs: dict, a: Value, b: Value) -> Value:
    return torch.matmul(_tensor(a), _tensor(b))


def _pads(attrs: dict, rank: int) -> tuple[list[int], list[int] | None]:
    """Symmetric padding for torch, or the explicit F.pad list when begin != end."""
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise OnnxError(f"auto_pad={attrs['auto_pad']!r} is not supported; export with explicit pads")
    pads = list(attrs.get("pads", [0] * (2 * rank)))
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return begin, None
    explicit = []
    for b, e in zip(reversed(begin), reversed(end)):
        explicit += [b, e]
    return [0] * rank, explicit


def _conv(attrs: dict, x: Value, w: Value, b: Value = None) -> Value:
    x, w = _tensor(x), _tensor(w)
    rank = w.dim() - 2
    padding, explicit = _pads(attrs, rank)
    if explicit is not None:
        x = F.pad(x, explicit)
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return conv(x, w, None if b is None else _tensor(b), list(attrs.get("strides", [1] * rank)), padding,
                list(attrs.get("dilations", [1] * rank)), attrs.get("group", 1))


def _conv_transpose(attrs: dict, x: Value, w: Value, b: Value = None) -> Value:
    x, w = _tensor(x), _tensor(w)
    rank = w.dim() - 2
    padding, explicit = _pads(attrs, rank)
    if explicit is not None or "output_shape" in attrs:
        raise OnnxError("ConvTranspose with asymmetric pads or output_shape is not supported")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    return conv(x, w, None if b is None else _tensor(b), list(attrs.get("strides", [1] * rank)), padding,
                list(attrs.get("output_padding", [0] * rank)), attrs.get("group", 1),
                list(attrs.get("dilations", [1] * rank)))


def _batch_norm(attrs: dict, x, scale, bias, mean, var) -> Value:
    if attrs.get("training_mode", 0):
        raise OnnxError("BatchNormalization in training mode is not supported; export the model in eval mode")
    return F.batch_norm(_tensor(x), _tensor(mean), _tensor(var), _tensor(scale), _tensor(bias),
                        training=False, eps=attrs.get("epsilon", 1e-5))


def _layer_norm(attrs: dict, x, scale, bias=None) -> Value:
    x = _tensor(x)
    axis = attrs.get("axis", -1) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), _tensor(scale), None if bias is None else _tensor(bias),
                        attrs.get("epsilon", 1e-5))


def _pool(kind: str) -> Callable:
    def op(attrs: dict, x: Value) -> Value:
        x = _tensor(x)
        rank = x.dim() - 2
        kernel = list(attrs["kernel_shape"])
        padding, explicit = _pads(attrs, rank)
        if explicit is not None:
            raise OnnxError(f"{kind} pooling with asymmetric pads is not supported")
        strides = list(attrs.get("strides", [1] * rank))
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
            return fn(x, kernel, strides, padding, list(attrs.get("dilations", [1] * rank)), ceil)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        return fn(x, kernel, strides, padding, ceil, bool(attrs.get("count_include_pad", 0)))

    return op


def _reduce(torch_fn: Callable, np_fn: Callable) -> Callable:
    def op(attrs: dict, x: Value, axes: Value = None) -> Value:
        axes_list = _axes(attrs, [x, axes], 1)
        keep = bool(attrs.get("keepdims", 1))
        if not axes_list:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes_list = list(range(np.ndim(x) if _is_static(x) else x.dim()))
        if _is_static(x):
            return np_fn(x, axis=tuple(axes_list), keepdims=keep)
        return torch_fn(x, axes_list, keep)

    return op


def _clip(attrs: dict, x: Value, low: Value = None, high: Value = None) -> Value:
    def bound(value: Value, attr: str):
        if value is None:
            return attrs.get(attr)
        return float(np.asarray(value)) if _is_static(value) else value

    return torch.clamp(_tensor(x), bound(low, "min"), bound(high, "max"))


def _softmax(fn: Callable) -> Callable:
    return lambda attrs, x: fn(_tensor(x), dim=attrs.get("axis", -1))


def _gelu(attrs: dict, x: Value) -> Value:
    approximate = attrs.get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return F.gelu(_tensor(x), approximate=approximate)


def _flatten(attrs: dict, x: Value) -> Value:
    axis = attrs.get("axis", 1)
    x = _tensor(x)
    axis %= max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _transpose(attrs: dict, x: Value) -> Value:
    perm = attrs.get("perm")
    if _is_static(x):
        return np.transpose(x, perm)
    return x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


def _hard_sigmoid(attrs: dict, x: Value) -> Value:
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return torch.clamp(_tensor(x) * alpha + beta, 0.0, 1.0)


def _variadic(torch_fn: Callable, np_fn: Callable) -> Callable:
    def op(attrs: dict, *args: Value) -> Value:
        if all(map(_is_static, args)):
            out = args[0]
            for a in args[1:]:
                out = np_fn(out, a)
            return out
        out = _tensor(args[0])
        for a in args[1:]:
            out = torch_fn(out, _tensor(a))
        return out

    return op


def _div(a, b):
    if np.issubdtype(np.asarray(a).dtype, np.integer):
        return np.trunc(np.asarray(a) / np.asarray(b)).astype(np.asarray(a).dtype)
    return np.divide(a, b)


def _torch_div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


HANDLERS: dict[str, Callable] = {
    "Add": _elementwise(np.add, torch.add), "Sub": _elementwise(np.subtract, torch.sub),
    "Mul": _elementwise(np.multiply, torch.mul), "Div": _elementwise(_div, _torch_div),
    "Pow": _elementwise(np.power, torch.pow), "Equal": _elementwise(np.equal, torch.eq),
    "Less": _elementwise(np.less, torch.lt), "Greater": _elementwise(np.greater, torch.gt),
    "LessOrEqual": _elementwise(np.less_equal, torch.le), "GreaterOrEqual": _elementwise(np.greater_equal, torch.ge),
    "And": _elementwise(np.logical_and, torch.logical_and), "Or": _elementwise(np.logical_or, torch.logical_or),
    "Not": _elementwise(np.logical_not, torch.logical_not), "Neg": _elementwise(np.negative, torch.neg),
    "Abs": _elementwise(np.abs, torch.abs), "Sqrt": _elementwise(np.sqrt, torch.sqrt),
    "Reciprocal": _elementwise(np.reciprocal, torch.reciprocal), "Exp": _elementwise(np.exp, torch.exp),
    "Log": _elementwise(np.log, torch.log), "Max": _variadic(torch.maximum, np.maximum),
    "Min": _variadic(torch.minimum, np.minimum), "Sum": _variadic(torch.add, np.add),
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Softplus": _unary(F.softplus), "HardSwish": _unary(F.hardswish),
    "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "LeakyRelu": lambda attrs, x: F.leaky_relu(_tensor(x), attrs.get("alpha", 0.01)),
    "Elu": lambda attrs, x: F.elu(_tensor(x), attrs.get("alpha", 1.0)),
    "HardSigmoid": _hard_sigmoid, "Gelu": _gelu, "Clip": _clip,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "MatMul": _matmul, "Conv": _conv, "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda attrs, x: _tensor(x).mean(tuple(range(2, _tensor(x).dim())), keepdim=True),
    "GlobalMaxPool": lambda attrs, x: _tensor(x).amax(tuple(range(2, _tensor(x).dim())), keepdim=True),
    "ReduceMean": _reduce(torch.mean, np.mean), "ReduceSum": _reduce(torch.sum, np.sum),
    "ReduceMax": _reduce(torch.amax, np.max), "ReduceMin": _reduce(torch.amin, np.min),
    "Reshape": _reshape, "Transpose": _transpose, "Flatten": _flatten, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Slice": _slice, "Gather": _gather, "Split": _split,
    "Expand": _expand, "Shape": _shape, "Cast": _cast, "CastLike": _cast_like, "ConstantOfShape": _constant_of_shape,
    "Range": _range, "Where": _where,
    "Identity": lambda attrs, x: x, "Dropout": lambda attrs, x, *rest: x,
    "Size": lambda attrs, x: np.array(int(np.prod(np.shape(x) if _is_static(x) else x.shape)), dtype=np.int64),
}
#: The ONNX ops (default domain) the importer evaluates; Gemm and Constant are handled apart.
SUPPORTED_OPS = frozenset(HANDLERS) | {"Gemm", "Constant"}


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
            types[info.name] = _numpy_dtype(elem)
    return types


class OnnxModule(nn.Module):
    """An ONNX graph evaluated with torch ops (see the module docstring)."""

    def __init__(self, proto: Any, source: str = "the ONNX model"):
        super().__init__()
        from onnx import numpy_helper

        graph = proto.graph
        self.source = source
        foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
        unsupported = sorted({n.op_type for n in graph.node if n.domain in ("", "ai.onnx")} - SUPPORTED_OPS)
        if foreign or unsupported:
            raise OnnxError(f"{source} uses ONNX ops optcc cannot import: {', '.join(unsupported + foreign)}; "
                            f"supported: {', '.join(sorted(SUPPORTED_OPS))}")
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_specs = [i for i in graph.input if i.name not in initializers]
        self.input_names = [i.name for i in self.input_specs]
        self.output_names = [o.name for o in graph.output]
        self.static: dict[str, np.ndarray] = {}
        self.tensor_names: dict[str, str] = {}  # ONNX value name -> buffer attribute
        self.weights_of_matmul = {n.input[1] for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1}
        for name, array in initializers.items():
            self._store_constant(name, array)
        self.nodes = [(node.op_type, node.name or node.op_type, list(node.input), list(node.output),
                       _attributes(node)) for node in graph.node if node.op_type != "Constant"]
        for node in graph.node:
            if node.op_type == "Constant":
                self._store_constant(node.output[0], _constant_value(node))
        self._check_defined(graph)
        self._fold_constants(_value_types(proto))
        self.eval()  # an ONNX graph is an inference graph: BatchNormalization uses its statistics

    def _store_constant(self, name: str, value: Value) -> None:
        """Floating constants become buffers (frozen constants the passes can fold); integer
        and boolean ones stay numpy arrays, read while tracing (shapes, axes, indices)."""
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
                        result = np.asarray(_tensor(args[0]).numpy() if isinstance(args[0], torch.Tensor)
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
        if op_type == "Gemm":
            return _gemm(attrs, *args)
        transposed = input_names[1] + "::T" if len(input_names) > 1 else None
        if op_type == "MatMul" and transposed in self.tensor_names and not _is_static(args[0]) and args[0].dim() >= 2:
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

    def example_inputs(self, dims: dict[str, int], default_dim: int = 1,
                       batch: int | None = None) -> tuple[torch.Tensor, ...]:
        inputs = []
        for spec in self.input_specs:
            ttype = spec.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value")
                     else batch if i == 0 and batch is not None else dims.get(d.dim_param, default_dim)
                     for i, d in enumerate(ttype.shape.dim)]
            dtype = _torch_dtype(ttype.elem_type)
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
                raise OnnxError(f"{self.source}: node '{name}' ({op_type}): {exc}") from None
            env.update(zip(output_names, result if isinstance(result, tuple) else (result,)))
        outputs = tuple(_tensor(env[o]) for o in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


# ----------------------------------------------------------------------------------------
# Writing


def _inputs_from_placeholders(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise OnnxError(f"input '{node.name}' of the graph has no recorded shape; pass example_inputs")
        shape = [int(s) for s in val.shape]
        inputs.append(torch.randn(shape, dtype=val.dtype) if val.dtype.is_floating_point
                      else torch.ones(shape, dtype=val.dtype))
    return tuple(inputs)


def export_onnx(model: Any, path: str | Path, example_inputs: Any = None) -> Path:
    """Write ``model`` to ``path`` as ONNX and validate the file with ``onnx.checker``.

    ``model`` is what ``optcc.compile`` returned (its latest specialisation's rewritten
    graph is written), a canonical ``GraphModule`` (inputs default to random ones of its
    recorded shapes), or any ``nn.Module`` with ``example_inputs``.
    """
    from .compile import OptimizedModule

    onnx = _onnx()
    if isinstance(model, OptimizedModule):
        if model.graph_module is None:
            raise OnnxError("the compiled module runs its model eagerly (capture failed): nothing to export")
        model = model.graph_module
    if isinstance(model, fx.GraphModule) and example_inputs is None:
        example_inputs = _inputs_from_placeholders(model)
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
                                        verbose=False, report=False)
            program.save(str(path))
    except Exception as exc:
        raise OnnxError(f"torch.onnx.export could not write the model: {type(exc).__name__}: "
                        f"{_first_line(exc)}") from exc
    onnx.checker.check_model(onnx.load(str(path)))
    return path
