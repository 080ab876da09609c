"""The ONNX op table: one torch (or, for values known while tracing, numpy) function per op.

A handler takes the node's attributes and its input values and returns its output value(s).
Values while evaluating are a tensor (traced) or a numpy array (static: known while
tracing, like shapes and the integer constants that index them).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .common import OnnxError

# ----------------------------------------------------------------------------------------
# Values while evaluating: a tensor (traced) or a numpy array (static: known while
# tracing, like shapes and the integer constants that index them).

Value = Any


def is_static(v: Value) -> bool:
    return isinstance(v, np.ndarray)


def as_tensor(v: Value) -> torch.Tensor:
    return torch.from_numpy(np.array(v, copy=True)) if is_static(v) else v


def _ints(v: Value, what: str) -> list[int]:
    if not is_static(v):
        raise OnnxError(f"{what} must be known when the model is traced (a constant or computed from "
                        "shapes); optcc does not import data-dependent shapes")
    return [int(i) for i in np.asarray(v).reshape(-1)]


def numpy_dtype(onnx_type: int) -> np.dtype:
    from onnx.helper import tensor_dtype_to_np_dtype

    return tensor_dtype_to_np_dtype(onnx_type)


def torch_dtype(onnx_type: int) -> torch.dtype:
    np_dtype = numpy_dtype(onnx_type)
    return torch.bool if np_dtype == np.bool_ else torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


def _elementwise(np_fn: Callable, torch_fn: Callable) -> Callable:
    def op(attrs: dict, *args: Value) -> Value:
        if all(is_static(a) for a in args):
            return np.asarray(np_fn(*args))
        tensors = [as_tensor(a) for a in args]
        return torch_fn(*tensors)

    return op


def _unary(torch_fn: Callable) -> Callable:
    return lambda attrs, x: torch_fn(as_tensor(x))


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
    return np.reshape(x, target) if is_static(x) else x.reshape(target)


def _unsqueeze(attrs: dict, x: Value, axes: Value = None) -> Value:
    axes_list = _axes(attrs, [x, axes], 1)
    rank = np.ndim(x) + len(axes_list) if is_static(x) else x.dim() + len(axes_list)
    for axis in sorted(a % rank for a in axes_list):
        x = np.expand_dims(x, axis) if is_static(x) else x.unsqueeze(axis)
    return x


def _squeeze(attrs: dict, x: Value, axes: Value = None) -> Value:
    axes_list = _axes(attrs, [x, axes], 1)
    if is_static(x):
        return np.squeeze(x, axis=tuple(axes_list) if axes_list is not None else None)
    if axes_list is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes_list))


def _concat(attrs: dict, *args: Value) -> Value:
    if all(is_static(a) for a in args):
        return np.concatenate(args, axis=attrs["axis"])
    return torch.cat([as_tensor(a) for a in args], dim=attrs["axis"])


def _gather(attrs: dict, data: Value, indices: Value) -> Value:
    axis = attrs.get("axis", 0)
    if is_static(data) and is_static(indices):
        return np.take(data, indices, axis=axis)
    data = as_tensor(data)
    if is_static(indices) and np.ndim(indices) == 0:
        return data.select(axis, int(indices) % data.shape[axis])
    index = as_tensor(indices).long()
    index = torch.where(index < 0, index + data.shape[axis], index)
    if axis == 0 and data.dim() == 2:
        return F.embedding(index, data)
    return data.index_select(axis, index.reshape(-1)).reshape(
        *data.shape[:axis % data.dim()], *index.shape, *data.shape[axis % data.dim() + 1:])


def _slice(attrs: dict, x: Value, starts: Value, ends: Value, axes: Value = None, steps: Value = None) -> Value:
    starts_l, ends_l = _ints(starts, "Slice starts"), _ints(ends, "Slice ends")
    rank = np.ndim(x) if is_static(x) else x.dim()
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
    if is_static(x):
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
    return tuple(torch.split(as_tensor(x), list(sizes), dim=axis))


def _shape(attrs: dict, x: Value) -> np.ndarray:
    shape = list(np.shape(x) if is_static(x) else x.shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array([int(s) for s in shape[start:end]], dtype=np.int64)


def _cast(attrs: dict, x: Value) -> Value:
    if is_static(x):
        return x.astype(numpy_dtype(attrs["to"]))
    return x.to(torch_dtype(attrs["to"]))


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                 torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32,
                 torch.int64: np.int64, torch.bool: np.bool_}


def _cast_like(attrs: dict, x: Value, like: Value) -> Value:
    if is_static(x):  # stays a constant (a zero bias, a scale), which passes can fold
        return x.astype(like.dtype if is_static(like) else _NUMPY_DTYPES[like.dtype])
    return x.to(as_tensor(like).dtype)


def _constant_of_shape(attrs: dict, shape: Value) -> Value:
    from onnx.numpy_helper import to_array

    value = to_array(attrs["value"]) if "value" in attrs else np.zeros(1, dtype=np.float32)
    return np.full(_ints(shape, "ConstantOfShape's shape"), value.reshape(-1)[0], dtype=value.dtype)


def _expand(attrs: dict, x: Value, shape: Value) -> Value:
    target = _ints(shape, "Expand's shape")
    if is_static(x):
        return np.broadcast_to(x, np.broadcast_shapes(np.shape(x), tuple(target))).copy()
    out_shape = torch.broadcast_shapes(tuple(x.shape), tuple(target))
    return x.expand(out_shape)


def _range(attrs: dict, start: Value, limit: Value, delta: Value) -> Value:
    if all(map(is_static, (start, limit, delta))):
        return np.arange(start, limit, delta, dtype=np.asarray(start).dtype)
    raise OnnxError("Range with data-dependent bounds is not supported")


def _where(attrs: dict, cond: Value, a: Value, b: Value) -> Value:
    if all(map(is_static, (cond, a, b))):
        return np.where(cond, a, b)
    return torch.where(as_tensor(cond).bool(), as_tensor(a), as_tensor(b))


def gemm(attrs: dict, a: Value, b: Value, c: Value = None) -> Value:
    a, b = as_tensor(a), as_tensor(b)
    if attrs.get("transA", 0):
        a = a.t()
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if not attrs.get("transB", 0):
        b = b.t()
    y = F.linear(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (as_tensor(c) * beta if beta != 1.0 else as_tensor(c))
    return y


def _matmul(attrs: dict, a: Value, b: Value) -> Value:
    return torch.matmul(as_tensor(a), as_tensor(b))


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
    x, w = as_tensor(x), as_tensor(w)
    rank = w.dim() - 2
    padding, explicit = _pads(attrs, rank)
    if explicit is not None:
        x = F.pad(x, explicit)
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return conv(x, w, None if b is None else as_tensor(b), list(attrs.get("strides", [1] * rank)), padding,
                list(attrs.get("dilations", [1] * rank)), attrs.get("group", 1))


def _conv_transpose(attrs: dict, x: Value, w: Value, b: Value = None) -> Value:
    x, w = as_tensor(x), as_tensor(w)
    rank = w.dim() - 2
    padding, explicit = _pads(attrs, rank)
    if explicit is not None or "output_shape" in attrs:
        raise OnnxError("ConvTranspose with asymmetric pads or output_shape is not supported")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    return conv(x, w, None if b is None else as_tensor(b), list(attrs.get("strides", [1] * rank)), padding,
                list(attrs.get("output_padding", [0] * rank)), attrs.get("group", 1),
                list(attrs.get("dilations", [1] * rank)))


def _batch_norm(attrs: dict, x, scale, bias, mean, var) -> Value:
    if attrs.get("training_mode", 0):
        raise OnnxError("BatchNormalization in training mode is not supported; export the model in eval mode")
    return F.batch_norm(as_tensor(x), as_tensor(mean), as_tensor(var), as_tensor(scale), as_tensor(bias),
                        training=False, eps=attrs.get("epsilon", 1e-5))


def _layer_norm(attrs: dict, x, scale, bias=None) -> Value:
    x = as_tensor(x)
    axis = attrs.get("axis", -1) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), as_tensor(scale), None if bias is None else as_tensor(bias),
                        attrs.get("epsilon", 1e-5))


def _pool(kind: str) -> Callable:
    def op(attrs: dict, x: Value) -> Value:
        x = as_tensor(x)
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
            axes_list = list(range(np.ndim(x) if is_static(x) else x.dim()))
        if is_static(x):
            return np_fn(x, axis=tuple(axes_list), keepdims=keep)
        return torch_fn(x, axes_list, keep)

    return op


def _clip(attrs: dict, x: Value, low: Value = None, high: Value = None) -> Value:
    def bound(value: Value, attr: str):
        if value is None:
            return attrs.get(attr)
        return float(np.asarray(value)) if is_static(value) else value

    return torch.clamp(as_tensor(x), bound(low, "min"), bound(high, "max"))


def _softmax(fn: Callable) -> Callable:
    return lambda attrs, x: fn(as_tensor(x), dim=attrs.get("axis", -1))


def _gelu(attrs: dict, x: Value) -> Value:
    approximate = attrs.get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return F.gelu(as_tensor(x), approximate=approximate)


def _flatten(attrs: dict, x: Value) -> Value:
    axis = attrs.get("axis", 1)
    x = as_tensor(x)
    axis %= max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _transpose(attrs: dict, x: Value) -> Value:
    perm = attrs.get("perm")
    if is_static(x):
        return np.transpose(x, perm)
    return x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


def _hard_sigmoid(attrs: dict, x: Value) -> Value:
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return torch.clamp(as_tensor(x) * alpha + beta, 0.0, 1.0)


def _variadic(torch_fn: Callable, np_fn: Callable) -> Callable:
    def op(attrs: dict, *args: Value) -> Value:
        if all(map(is_static, args)):
            out = args[0]
            for a in args[1:]:
                out = np_fn(out, a)
            return out
        out = as_tensor(args[0])
        for a in args[1:]:
            out = torch_fn(out, as_tensor(a))
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
    "LeakyRelu": lambda attrs, x: F.leaky_relu(as_tensor(x), attrs.get("alpha", 0.01)),
    "Elu": lambda attrs, x: F.elu(as_tensor(x), attrs.get("alpha", 1.0)),
    "HardSigmoid": _hard_sigmoid, "Gelu": _gelu, "Clip": _clip,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "MatMul": _matmul, "Conv": _conv, "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda attrs, x: as_tensor(x).mean(tuple(range(2, as_tensor(x).dim())), keepdim=True),
    "GlobalMaxPool": lambda attrs, x: as_tensor(x).amax(tuple(range(2, as_tensor(x).dim())), keepdim=True),
    "ReduceMean": _reduce(torch.mean, np.mean), "ReduceSum": _reduce(torch.sum, np.sum),
    "ReduceMax": _reduce(torch.amax, np.max), "ReduceMin": _reduce(torch.amin, np.min),
    "Reshape": _reshape, "Transpose": _transpose, "Flatten": _flatten, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Slice": _slice, "Gather": _gather, "Split": _split,
    "Expand": _expand, "Shape": _shape, "Cast": _cast, "CastLike": _cast_like, "ConstantOfShape": _constant_of_shape,
    "Range": _range, "Where": _where,
    "Identity": lambda attrs, x: x, "Dropout": lambda attrs, x, *rest: x,
    "Size": lambda attrs, x: np.array(int(np.prod(np.shape(x) if is_static(x) else x.shape)), dtype=np.int64),
}
#: The ONNX ops (default domain) the importer evaluates; Gemm and Constant are handled apart.
SUPPORTED_OPS = frozenset(HANDLERS) | {"Gemm", "Constant"}

