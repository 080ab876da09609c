"""The ONNX op table: one torch (or, for values known while tracing, numpy) function per op.

A handler takes the node's attributes and its input values and returns its output value(s).
Values while evaluating are a tensor (traced) or a numpy array (static: known while
tracing, like shapes and the integer constants that index them).

Semantics change between opsets (Softmax's axis and 2-D coercion before opset 13, axes as
an attribute or an input, Clip's bounds, ...). The reader passes each handler the version
of the op the model's opset selects as ``attrs["@version"]`` (the op's ``since_version``)
and the number of outputs the node declares as ``attrs["@outputs"]``; without them a
handler follows the newest semantics. :data:`SPECS` says, per op, which attributes a handler
honours, which outputs it computes, which inputs must be known while tracing and which
settings it refuses: the reader refuses a node outside that, naming op, opset and setting,
rather than compute something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .common import OnnxError

# ----------------------------------------------------------------------------------------
# Values while evaluating: a tensor (traced) or a numpy array (static: known while
# tracing, like shapes and the integer constants that index them).

Value = Any

#: The newest opset whose changes to the supported ops were checked (onnx 1.23's opsets).
AUDITED_OPSET = 28
_NEWEST = 10 ** 6  # "@version" when a handler is called without one: the newest semantics


def is_static(v: Value) -> bool:
    return isinstance(v, np.ndarray)


def as_tensor(v: Value) -> torch.Tensor:
    return torch.from_numpy(np.array(v, copy=True)) if is_static(v) else v


def _ints(v: Value, what: str) -> list[int]:
    if not is_static(v):
        raise OnnxError(f"{what} must be known when the model is traced (a constant or computed from "
                        "shapes); optcc does not import data-dependent shapes")
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _version(attrs: dict) -> int:
    return attrs.get("@version", _NEWEST)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rank(x: Value) -> int:
    return np.ndim(x) if is_static(x) else x.dim()


def _shape_of(x: Value) -> tuple[int, ...]:
    return tuple(np.shape(x)) if is_static(x) else tuple(x.shape)


def numpy_dtype(onnx_type: int) -> np.dtype:
    from onnx.helper import tensor_dtype_to_np_dtype

    return tensor_dtype_to_np_dtype(onnx_type)


def torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        np_dtype = np.dtype(numpy_dtype(onnx_type))
        return torch.bool if np_dtype == np.bool_ else torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
    except Exception:
        raise OnnxError(f"element type {_type_name(onnx_type)} is not supported") from None


def _type_name(onnx_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(onnx_type)
    except ValueError:
        return str(onnx_type)


def _elementwise(np_fn: Callable, torch_fn: Callable) -> Callable:
    def op(attrs: dict, *args: Value) -> Value:
        if all(is_static(a) for a in args):
            return np.asarray(np_fn(*args))
        tensors = [as_tensor(a) for a in args]
        return torch_fn(*tensors)

    return op


def _binary(np_fn: Callable, torch_fn: Callable) -> Callable:
    """A two-input elementwise op. Before opset 7, ``broadcast=1`` with ``axis`` lines B's
    dimensions up with A's from ``axis`` (not from the right, as numpy does)."""
    plain = _elementwise(np_fn, torch_fn)

    def op(attrs: dict, a: Value, b: Value) -> Value:
        if attrs.get("broadcast", 0) and "axis" in attrs:
            rank_a, shape_b = _rank(a), _shape_of(b)
            axis = attrs["axis"] + rank_a if attrs["axis"] < 0 else attrs["axis"]
            trailing = rank_a - axis - len(shape_b)
            if trailing < 0:
                raise OnnxError(f"broadcast axis {attrs['axis']} does not fit shapes {_shape_of(a)} and {shape_b}")
            target = shape_b + (1,) * trailing
            b = np.reshape(b, target) if is_static(b) else b.reshape(target)
        return plain(attrs, a, b)

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


def _reshape(attrs: dict, x: Value, shape: Value = None) -> Value:
    if shape is None:  # opset 1: the shape is an attribute
        if "shape" not in attrs:
            raise OnnxError("Reshape needs a shape")
        shape = np.array(attrs["shape"], dtype=np.int64)
    target = _ints(shape, "Reshape's shape")
    if not attrs.get("allowzero", 0):  # 0 copies the input's size at that position
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return np.reshape(x, target) if is_static(x) else x.reshape(target)


def _unsqueeze(attrs: dict, x: Value, axes: Value = None) -> Value:
    axes_list = _axes(attrs, [x, axes], 1)
    if axes_list is None:
        raise OnnxError("Unsqueeze needs axes")
    rank = _rank(x) + len(axes_list)
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
    axis = attrs.get("axis", 1)  # opset 1 made axis optional, defaulting to 1; later opsets require it
    if all(is_static(a) for a in args):
        return np.concatenate(args, axis=axis)
    return torch.cat([as_tensor(a) for a in args], dim=axis)


def _gather(attrs: dict, data: Value, indices: Value) -> Value:
    axis = attrs.get("axis", 0)
    if is_static(data) and is_static(indices):
        return np.take(data, indices, axis=axis)
    data = as_tensor(data)
    if is_static(indices) and np.ndim(indices) == 0:
        return data.select(axis, int(indices) % data.shape[axis])
    index = as_tensor(indices).long()
    index = _wrapped(index, data.shape[axis])
    if axis == 0 and data.dim() == 2:
        return F.embedding(index, data)
    return data.index_select(axis, index.reshape(-1)).reshape(
        *data.shape[:axis % data.dim()], *index.shape, *data.shape[axis % data.dim() + 1:])



def _wrapped(index, size):
    """Negative ONNX indices count from the end."""
    return index + size * (index < 0)


def _gather_elements(attrs: dict, data: Value, indices: Value) -> Value:
    axis = attrs.get("axis", 0) % _rank(data)
    if is_static(data) and is_static(indices):
        return np.take_along_axis(data, _wrapped(np.asarray(indices, dtype=np.int64), np.shape(data)[axis]), axis)
    data, index = as_tensor(data), as_tensor(indices).long()
    return torch.gather(data, axis, _wrapped(index, data.shape[axis]))


def _gather_nd(attrs: dict, data: Value, indices: Value) -> Value:
    """GatherND: the last axis of ``indices`` indexes the leading axes of ``data`` after the
    first ``batch_dims`` axes, which both share."""
    batch_dims = attrs.get("batch_dims", 0)
    static = is_static(data) and is_static(indices)
    lib = np if static else torch
    data = data if static else as_tensor(data)
    index = np.asarray(indices, dtype=np.int64) if static else as_tensor(indices).long()
    data_shape, index_shape = tuple(data.shape), tuple(index.shape)
    depth = index_shape[-1]
    if depth > len(data_shape) - batch_dims:
        raise OnnxError(f"GatherND indexes {depth} axes of a rank-{len(data_shape)} tensor after "
                        f"{batch_dims} batch axes")
    batch = int(np.prod(data_shape[:batch_dims], dtype=np.int64)) if batch_dims else 1
    flat_data = data.reshape(batch, *data_shape[batch_dims:])
    flat_index = index.reshape(batch, -1, depth)
    rows = lib.arange(batch).reshape(batch, 1)
    picks = tuple(_wrapped(flat_index[..., j], data_shape[batch_dims + j]) for j in range(depth))
    gathered = flat_data[(rows, *picks)]
    return gathered.reshape(*index_shape[:-1], *data_shape[batch_dims + depth:])

def _slice(attrs: dict, x: Value, starts: Value = None, ends: Value = None, axes: Value = None,
           steps: Value = None) -> Value:
    if starts is None:  # opset 1: starts, ends and axes are attributes
        starts, ends = np.array(attrs["starts"]), np.array(attrs["ends"])
        axes = np.array(attrs["axes"]) if "axes" in attrs else None
    starts_l, ends_l = _ints(starts, "Slice starts"), _ints(ends, "Slice ends")
    rank = _rank(x)
    axes_l = _ints(axes, "Slice axes") if axes is not None else list(range(len(starts_l)))
    steps_l = _ints(steps, "Slice steps") if steps is not None else [1] * len(starts_l)
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts_l, ends_l, axes_l, steps_l):
        if step == 0:
            raise OnnxError("Slice with a step of 0 is invalid")
        size = x.shape[axis]
        # ONNX clamps out-of-range bounds (INT64_MAX means "to the end")
        start, end = max(min(start, size), -size), max(min(end, size), -size - 1)
        if step > 0 and end == -size - 1:
            end = 0
        index[axis % rank] = slice(start, None if (step < 0 and end < -size) else end, step)
    if is_static(x):
        return x[tuple(index)]
    for axis, part in enumerate(index):  # torch has no negative steps: pick the indices instead
        if part.step is not None and part.step < 0:
            picked = np.arange(x.shape[axis])[part]
            x = x.index_select(axis, torch.from_numpy(picked.astype(np.int64)))
            index[axis] = slice(None)
    return x[tuple(index)]


def _split(attrs: dict, x: Value, split: Value = None) -> tuple:
    axis = attrs.get("axis", 0)
    length = _shape_of(x)[axis]
    if split is not None:
        sizes = _ints(split, "Split sizes")
    elif "split" in attrs:
        sizes = list(attrs["split"])
    elif "num_outputs" in attrs:  # opset 18: the last part is smaller when it does not divide
        parts = attrs["num_outputs"]
        size = math.ceil(length / parts)
        sizes = [size] * (parts - 1) + [length - size * (parts - 1)]
    else:  # equal parts, one per output
        if "@outputs" not in attrs:
            raise OnnxError("Split without sizes needs the number of outputs")
        parts = attrs["@outputs"]
        if length % parts:
            raise OnnxError(f"Split of a dimension of {length} into {parts} equal parts")
        sizes = [length // parts] * parts
    if any(s < 0 for s in sizes) or sum(sizes) != length:
        raise OnnxError(f"Split sizes {sizes} do not add up to the dimension's {length}")
    if is_static(x):
        return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))
    return tuple(torch.split(x, list(sizes), dim=axis))


def _shape(attrs: dict, x: Value) -> np.ndarray:
    shape = list(_shape_of(x))
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


def _tile(attrs: dict, x: Value, repeats: Value) -> Value:
    reps = _ints(repeats, "Tile's repeats")
    if len(reps) != _rank(x):
        raise OnnxError(f"Tile's repeats {reps} do not match the input's rank {_rank(x)}")
    return np.tile(x, reps) if is_static(x) else x.repeat(reps)


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


# ----------------------------------------------------------------------------------------
# Convolution and pooling: the padding ONNX asks for (explicit, possibly asymmetric, or
# auto_pad SAME_*), computed from the input's size while tracing.


def _window_pads(attrs: dict, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                 dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis."""
    rank = len(sizes)
    mode = _text(attrs.get("auto_pad", "NOTSET"))
    if mode == "VALID":
        return [0] * rank, [0] * rank
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(sizes, kernel, strides, dilations):
            total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
            small, big = total // 2, total - total // 2
            begin.append(small if mode == "SAME_UPPER" else big)
            end.append(big if mode == "SAME_UPPER" else small)
        return begin, end
    if mode != "NOTSET":
        raise OnnxError(f"auto_pad={mode!r} is not supported")
    pads = list(attrs.get("pads", [0] * (2 * rank)))
    return pads[:rank], pads[rank:]


def _pad_list(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """F.pad's argument: (begin, end) pairs from the last dimension backwards."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _conv(attrs: dict, x: Value, w: Value, b: Value = None) -> Value:
    x, w = as_tensor(x), as_tensor(w)
    rank = w.dim() - 2
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    begin, end = _window_pads(attrs, x.shape[2:], w.shape[2:], strides, dilations)
    padding = begin
    if begin != end:
        x, padding = F.pad(x, _pad_list(begin, end)), [0] * rank
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return conv(x, w, None if b is None else as_tensor(b), strides, padding, dilations, attrs.get("group", 1))


def _conv_transpose(attrs: dict, x: Value, w: Value, b: Value = None) -> Value:
    x, w = as_tensor(x), as_tensor(w)
    rank = w.dim() - 2
    if _text(attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        raise OnnxError(f"ConvTranspose with auto_pad={_text(attrs['auto_pad'])!r} is not supported")
    pads = [0] * (2 * rank) if _text(attrs.get("auto_pad", "NOTSET")) == "VALID" else \
        list(attrs.get("pads", [0] * (2 * rank)))
    begin, end = pads[:rank], pads[rank:]
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    strides, dilations = list(attrs.get("strides", [1] * rank)), list(attrs.get("dilations", [1] * rank))
    output_padding, groups = list(attrs.get("output_padding", [0] * rank)), attrs.get("group", 1)
    bias = None if b is None else as_tensor(b)
    if begin == end:
        return conv(x, w, bias, strides, begin, output_padding, groups, dilations)
    # asymmetric: the full result, cropped by begin and end (the padding removes outputs)
    y = conv(x, w, None, strides, 0, output_padding, groups, dilations)
    crop = tuple(slice(bb, y.shape[2 + i] - e) for i, (bb, e) in enumerate(zip(begin, end)))
    y = y[(slice(None), slice(None)) + crop]
    return y if bias is None else y + bias.reshape(-1, *([1] * rank))


def _batch_norm(attrs: dict, x, scale, bias, mean, var) -> Value:
    if attrs.get("training_mode", 0):
        raise OnnxError("BatchNormalization in training mode is not supported; export the model in eval mode")
    eps = attrs.get("epsilon", 1e-5)
    if not attrs.get("spatial", 1):  # opsets before 9: statistics per (channel, position)
        x = as_tensor(x)
        return (x - as_tensor(mean)) * torch.rsqrt(as_tensor(var) + eps) * as_tensor(scale) + as_tensor(bias)
    return F.batch_norm(as_tensor(x), as_tensor(mean), as_tensor(var), as_tensor(scale), as_tensor(bias),
                        training=False, eps=eps)


def _instance_norm(attrs: dict, x, scale, bias) -> Value:
    return F.instance_norm(as_tensor(x), weight=as_tensor(scale), bias=as_tensor(bias),
                           eps=attrs.get("epsilon", 1e-5))


def _layer_norm(attrs: dict, x, scale, bias=None) -> Value:
    x = as_tensor(x)
    axis = attrs.get("axis", -1) % x.dim()
    normalized = tuple(x.shape[axis:])
    scale = as_tensor(scale)
    bias = None if bias is None else as_tensor(bias)
    if tuple(scale.shape) == normalized and (bias is None or tuple(bias.shape) == normalized):
        return F.layer_norm(x, normalized, scale, bias, attrs.get("epsilon", 1e-5))
    y = F.layer_norm(x, normalized, None, None, attrs.get("epsilon", 1e-5)) * scale  # broadcast scale/bias
    return y if bias is None else y + bias


def _lrn(attrs: dict, x: Value) -> Value:
    """Across channels; ONNX's window is [c - floor((size-1)/2), c + ceil((size-1)/2)] (torch's
    local_response_norm puts the longer half first, which differs for an even size)."""
    x = as_tensor(x)
    size = attrs["size"]
    alpha, beta, bias = attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    n, c = x.shape[0], x.shape[1]
    square = (x * x).reshape(n, 1, c, -1)
    front = (size - 1) // 2
    square = F.pad(square, (0, 0, front, size - 1 - front))
    mean = F.avg_pool2d(square, (size, 1), stride=1)  # sum over the window / size
    return x / (mean * alpha + bias).pow(beta).reshape(x.shape)


def _pool_size(n: int, k: int, s: int, d: int, begin: int, end: int, ceil: bool) -> int:
    """ONNX's (and onnxruntime's) output size; with ceil_mode a window that would start
    in the right padding is dropped."""
    span = n + begin + end - ((k - 1) * d + 1)
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    return out - 1 if (out - 1) * s >= n + begin else out


def _pool(kind: str) -> Callable:
    def op(attrs: dict, x: Value) -> Value:
        x = as_tensor(x)
        rank = x.dim() - 2
        kernel = list(attrs["kernel_shape"])
        strides = list(attrs.get("strides", [1] * rank))
        dilations = list(attrs.get("dilations", [1] * rank))
        if kind == "avg" and any(d != 1 for d in dilations):
            raise OnnxError("AveragePool with dilations is not supported")
        sizes = list(x.shape[2:])
        begin, end = _window_pads(attrs, sizes, kernel, strides, dilations)
        ceil = bool(attrs.get("ceil_mode", 0)) and _text(attrs.get("auto_pad", "NOTSET")) == "NOTSET"
        out = [_pool_size(*a, ceil) for a in zip(sizes, kernel, strides, dilations, begin, end)]
        include_pad = bool(attrs.get("count_include_pad", 0))
        effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        if begin == end and all(p <= e // 2 for p, e in zip(begin, effective)):  # torch's own padding
            if kind == "max":
                fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
                y = fn(x, kernel, strides, begin, dilations, ceil)
            else:
                fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
                y = fn(x, kernel, strides, begin, ceil, include_pad)
            if list(y.shape[2:]) == out:
                return y
        # explicit padding, enough on the right for every window, then the windows ONNX keeps
        right = [max(e, (o - 1) * s + k - n - b)
                 for e, o, s, k, n, b in zip(end, out, strides, effective, sizes, begin)]
        keep = (slice(None), slice(None)) + tuple(slice(0, o) for o in out)
        if kind == "max":
            low = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
            return fn(F.pad(x, _pad_list(begin, right), value=low), kernel, strides, 0, dilations, False)[keep]
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        y = fn(F.pad(x, _pad_list(begin, right)), kernel, strides, 0, False, True)[keep]  # sum / prod(kernel)
        counts = np.ones((), dtype=np.float64)  # elements each window averages, axis by axis
        for n, k, s, b, e, o in zip(sizes, kernel, strides, begin, end, out):
            lo, hi = (-b, n + e) if include_pad else (0, n)
            starts = np.arange(o) * s - b
            axis_counts = np.minimum(starts + k, hi) - np.maximum(starts, lo)
            counts = np.multiply.outer(counts, axis_counts)
        factor = float(np.prod(kernel)) / counts
        if np.all(factor == 1.0):
            return y
        return y * torch.from_numpy(factor.astype(np.float32)).to(y.dtype)

    return op


def _reduce(torch_fn: Callable, np_fn: Callable) -> Callable:
    def op(attrs: dict, x: Value, axes: Value = None) -> Value:
        axes_list = _axes(attrs, [x, axes], 1)
        keep = bool(attrs.get("keepdims", 1))
        if not axes_list:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes_list = list(range(_rank(x)))
        if is_static(x):
            return np_fn(x, axis=tuple(axes_list), keepdims=keep)
        return torch_fn(x, axes_list, keep)

    return op


def _clip(attrs: dict, x: Value, low: Value = None, high: Value = None) -> Value:
    def bound(value: Value, attr: str):
        if value is None:  # opsets before 11: attributes; from 11: inputs, absent when empty
            return attrs.get(attr)
        return float(np.asarray(value)) if is_static(value) else value

    return torch.clamp(as_tensor(x), bound(low, "min"), bound(high, "max"))


def _hardmax_fn(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.zeros_like(x).scatter(dim, x.argmax(dim, keepdim=True), 1.0)


def _softmax(fn: Callable) -> Callable:
    """Softmax, LogSoftmax and Hardmax. From opset 13: over ``axis`` (default -1). Before:
    the input is coerced to 2-D, dimensions ``[axis:]`` flattened into one (default
    ``axis`` 1), the op runs over that, and the result takes the input's shape back."""

    def op(attrs: dict, x: Value) -> Value:
        x = as_tensor(x)
        if _version(attrs) >= 13:
            return fn(x, attrs.get("axis", -1))
        rank = x.dim()
        axis = attrs.get("axis", 1)
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < max(rank, 1):
            raise OnnxError(f"axis {attrs.get('axis', 1)} is out of range for a rank-{rank} input")
        if axis >= rank - 1:
            return fn(x, -1)
        return fn(x.flatten(axis), -1).reshape(x.shape)

    return op


def _gelu(attrs: dict, x: Value) -> Value:
    return F.gelu(as_tensor(x), approximate=_text(attrs.get("approximate", "none")))


def _flatten(attrs: dict, x: Value) -> Value:
    x = as_tensor(x)
    axis = attrs.get("axis", 1)
    if axis < 0:  # 0 <= axis <= rank; axis == rank gives (prod(shape), 1)
        axis += x.dim()
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _transpose(attrs: dict, x: Value) -> Value:
    perm = attrs.get("perm")
    if is_static(x):
        return np.transpose(x, perm)
    return x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


def _hard_sigmoid(attrs: dict, x: Value) -> Value:
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return torch.clamp(as_tensor(x) * alpha + beta, 0.0, 1.0)


def _prelu(attrs: dict, x: Value, slope: Value) -> Value:
    x, slope = as_tensor(x), as_tensor(slope)
    if _version(attrs) < 7 and slope.dim() == 1 and slope.numel() > 1 and x.dim() > 2:
        slope = slope.reshape(-1, *([1] * (x.dim() - 2)))  # before opset 7: one slope per channel
    return torch.where(x < 0, x * slope, x)



def _is_inf(attrs: dict, x: Value) -> Value:
    negative, positive = attrs.get("detect_negative", 1), attrs.get("detect_positive", 1)
    lib, values = (np, x) if is_static(x) else (torch, as_tensor(x))
    found = (lib.isinf(values) & (values > 0)) if positive else lib.zeros_like(values, dtype=bool)
    if negative:
        found = found | (lib.isinf(values) & (values < 0))
    return found

def _selu(attrs: dict, x: Value) -> Value:
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return F.elu(as_tensor(x), alpha) * gamma


def _shrink(attrs: dict, x: Value) -> Value:
    x = as_tensor(x)
    lambd, bias = attrs.get("lambd", 0.5), attrs.get("bias", 0.0)
    y = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))
    return y.to(x.dtype)


def _dropout(attrs: dict, x: Value, ratio: Value = None, training_mode: Value = None) -> Value:
    """Inference: the identity (and, when asked for, a mask of ones)."""
    if training_mode is not None and (not is_static(training_mode) or bool(np.asarray(training_mode))):
        raise OnnxError("Dropout in training mode is not supported; export the model in eval mode")
    if attrs.get("@outputs", 1) < 2:
        return x
    mask = np.ones(np.shape(x), dtype=np.bool_) if is_static(x) else torch.ones_like(x, dtype=torch.bool)
    return x, mask


_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(attrs: dict, x: Value, pads: Value = None, value: Value = None, axes: Value = None) -> Value:
    """Pad: pads as an attribute (opsets 2-10) or an input, constant/reflect/edge/wrap; a
    negative pad removes elements."""
    mode = _text(attrs.get("mode", "constant"))
    rank = _rank(x)
    if pads is None:
        if "pads" not in attrs:
            raise OnnxError("Pad needs pads")
        pad_list, fill = list(attrs["pads"]), attrs.get("value", 0.0)
    else:
        pad_list = _ints(pads, "Pad's pads")
        if value is not None and not is_static(value):
            raise OnnxError("Pad's constant_value must be known when the model is traced")
        fill = 0 if value is None or np.size(value) == 0 else np.asarray(value).reshape(-1)[0].item()
    axes_l = [a % rank for a in _ints(axes, "Pad's axes")] if axes is not None else list(range(rank))
    if len(pad_list) != 2 * len(axes_l):
        raise OnnxError(f"Pad's pads {pad_list} do not match {len(axes_l)} axes")
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes_l):
        begin[axis], end[axis] = pad_list[i], pad_list[len(axes_l) + i]
    shape = _shape_of(x)
    if any(p < 0 for p in begin + end):  # crop first
        x = x[tuple(slice(-min(b, 0), n + min(e, 0)) for b, e, n in zip(begin, end, shape))]
        begin, end, shape = [max(b, 0) for b in begin], [max(e, 0) for e in end], _shape_of(x)
    if not any(begin + end):
        return x
    if is_static(x):
        if mode == "constant":
            return np.pad(x, list(zip(begin, end)), mode="constant", constant_values=fill)
        return np.pad(x, list(zip(begin, end)), mode={"edge": "edge", "reflect": "reflect", "wrap": "wrap"}[mode])
    if mode == "constant":
        return F.pad(x, _pad_list(begin, end), value=fill)
    if mode not in _PAD_MODES:
        raise OnnxError(f"Pad mode {mode!r} is not supported")
    padded = [i for i in range(rank) if begin[i] or end[i]]
    spatial = rank - 2
    fits = (3 <= rank <= 5 and padded[0] >= 2 and all(
        (mode != "reflect" or (begin[i] < shape[i] and end[i] < shape[i]))
        and (mode != "wrap" or (begin[i] <= shape[i] and end[i] <= shape[i])) for i in padded))
    if fits:  # torch's own reflection/replication/circular padding of the spatial dimensions
        return F.pad(x, _pad_list(begin[2:], end[2:])[:2 * spatial], mode=_PAD_MODES[mode])
    for i in padded:  # any other case: the indices numpy.pad would read
        index = np.pad(np.arange(shape[i]), (begin[i], end[i]), mode={"reflect": "reflect", "edge": "edge",
                                                                         "wrap": "wrap"}[mode])
        x = x.index_select(i, torch.from_numpy(index.astype(np.int64)))
    return x



# Resize settings that are exactly one of torch's interpolations (checked against ONNX
# Runtime): (mode, coordinate_transformation_mode, nearest_mode) -> (torch mode, align_corners).
# Both sides read outside the input as its edge value.
_RESIZE_MODES = {
    ("nearest", "asymmetric", "floor"): ("nearest", None),  # src = floor(dst / scale)
    ("nearest", "half_pixel", "round_prefer_ceil"): ("nearest-exact", None),  # floor((dst + 0.5) / scale)
    ("linear", "half_pixel", None): ("linear", False),
    ("linear", "pytorch_half_pixel", None): ("linear", False),  # the same unless an output size is 1
    ("linear", "align_corners", None): ("linear", True),
    ("cubic", "half_pixel", None): ("bicubic", False),  # Keys' cubic with a = -0.75, as torch's
    ("cubic", "align_corners", None): ("bicubic", True),
}
_LINEAR_BY_RANK = {3: "linear", 4: "bilinear", 5: "trilinear"}


def _resize_setting(attrs: dict) -> tuple:
    mode = _text(attrs.get("mode", "nearest"))
    coordinates = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    nearest = _text(attrs.get("nearest_mode", "round_prefer_floor")) if mode == "nearest" else None
    return mode, coordinates, nearest


def _resize(attrs: dict, x: Value, roi: Value = None, scales: Value = None, sizes: Value = None) -> Value:
    """Resize (opset 11 on) as ``F.interpolate``: nearest, linear and cubic in the settings of
    :data:`_RESIZE_MODES`; the batch and channel dimensions unchanged; sizes, or scales
    used as given (``recompute_scale_factor=False``: the scale ONNX uses)."""
    x = as_tensor(x)
    torch_mode, align_corners = _RESIZE_MODES[_resize_setting(attrs)]
    rank, shape = x.dim(), tuple(x.shape)
    have_sizes = sizes is not None and np.size(sizes) > 0
    have_scales = scales is not None and np.size(scales) > 0
    if have_sizes == have_scales:
        raise OnnxError("Resize needs exactly one of scales and sizes")
    if have_sizes:
        size = _ints(sizes, "Resize's sizes")
        factors = None
        if len(size) != rank or tuple(size[:2]) != shape[:2]:
            raise OnnxError(f"Resize to {size} changes the batch or channel dimension of {list(shape)} "
                            "(only spatial dimensions are supported)")
        spatial = size[2:]
    else:
        if not is_static(scales):
            raise OnnxError("Resize's scales must be known when the model is traced")
        factors = [float(v) for v in np.asarray(scales).reshape(-1)]
        if len(factors) != rank or factors[:2] != [1.0, 1.0]:
            raise OnnxError(f"Resize by scales {factors} changes the batch or channel dimension "
                            "(only spatial dimensions are supported)")
        spatial = [int(math.floor(n * f)) for n, f in zip(shape[2:], factors[2:])]
    if not 1 <= rank - 2 <= 3 or (torch_mode == "bicubic" and rank != 4):
        raise OnnxError(f"Resize ({_text(attrs.get('mode', 'nearest'))}) of a rank-{rank} tensor is not supported")
    if _resize_setting(attrs)[1] == "pytorch_half_pixel" and 1 in spatial:
        raise OnnxError("Resize with coordinate_transformation_mode='pytorch_half_pixel' to an output size of 1 "
                        "is not supported")
    if torch_mode == "linear":
        torch_mode = _LINEAR_BY_RANK[rank]
    options = {} if align_corners is None else {"align_corners": align_corners}
    if factors is None:
        return F.interpolate(x, size=spatial, mode=torch_mode, **options)
    return F.interpolate(x, scale_factor=factors[2:], mode=torch_mode, recompute_scale_factor=False, **options)


# ----------------------------------------------------------------------------------------
# Index, order and layout ops


def _arg_extreme(largest: bool) -> Callable:
    """ArgMax / ArgMin: the first index of the extreme value, or the last with
    ``select_last_index=1``."""

    def op(attrs: dict, x: Value) -> Value:
        x = as_tensor(x)
        axis, keep = attrs.get("axis", 0) % max(x.dim(), 1), bool(attrs.get("keepdims", 1))
        last = bool(attrs.get("select_last_index", 0))
        data = x.flip(axis) if last else x
        # torch.argmax/argmin return the first extreme index on CPU, as ONNX asks
        index = (data.argmax if largest else data.argmin)(axis, keepdim=keep)
        return x.shape[axis] - 1 - index if last else index

    return op


def _cumsum(attrs: dict, x: Value, axis: Value) -> Value:
    x = as_tensor(x)
    dim = _ints(axis, "CumSum's axis")[0] % x.dim()
    data = x.flip(dim) if attrs.get("reverse", 0) else x
    out = torch.cumsum(data, dim)
    if attrs.get("exclusive", 0):
        out = out - data
    return out.flip(dim) if attrs.get("reverse", 0) else out


def _depth_to_space(attrs: dict, x: Value) -> Value:
    x, size = as_tensor(x), attrs["blocksize"]
    b, c, h, w = x.shape
    if _text(attrs.get("mode", "DCR")) == "CRD":
        return F.pixel_shuffle(x, size)
    y = x.reshape(b, size, size, c // size ** 2, h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(b, c // size ** 2, h * size, w * size)


def _space_to_depth(attrs: dict, x: Value) -> Value:
    x, size = as_tensor(x), attrs["blocksize"]
    b, c, h, w = x.shape
    y = x.reshape(b, c, h // size, size, w // size, size).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * size ** 2, h // size, w // size)


def _top_k(attrs: dict, x: Value, k: Value) -> Value:
    """TopK as a stable sort: ties keep the lower index first, as ONNX specifies (torch.topk
    does not promise an order among equal values)."""
    x = as_tensor(x)
    count = _ints(k, "TopK's k")[0]
    axis = attrs.get("axis", -1) % x.dim()
    values, indices = torch.sort(x, dim=axis, descending=bool(attrs.get("largest", 1)), stable=True)
    return values.narrow(axis, 0, count), indices.narrow(axis, 0, count)


def _trilu(attrs: dict, x: Value, k: Value = None) -> Value:
    diagonal = _ints(k, "Trilu's k")[0] if k is not None else 0
    x = as_tensor(x)
    return torch.triu(x, diagonal) if attrs.get("upper", 1) else torch.tril(x, diagonal)


def _one_hot(attrs: dict, indices: Value, depth: Value, values: Value) -> Value:
    size = int(np.asarray(depth).reshape(-1)[0]) if is_static(depth) else None
    if size is None:
        raise OnnxError("OneHot's depth must be known when the model is traced")
    index = as_tensor(indices).long()
    index = _wrapped(index, size)
    valid = (index >= 0) & (index < size)
    hot = F.one_hot(torch.where(valid, index, torch.zeros_like(index)), size) * valid.unsqueeze(-1)
    axis = attrs.get("axis", -1) % (index.dim() + 1)
    hot = hot.movedim(-1, axis).bool()
    off_on = as_tensor(values)
    return torch.where(hot, off_on[1], off_on[0])


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_elements(attrs: dict, data: Value, indices: Value, updates: Value) -> Value:
    data, updates = as_tensor(data), as_tensor(updates)
    axis = attrs.get("axis", 0) % data.dim()
    index = as_tensor(indices).long()
    index = _wrapped(index, data.shape[axis])
    reduction = _text(attrs.get("reduction", "none"))
    if reduction == "none":
        return data.scatter(axis, index, updates)
    return data.scatter_reduce(axis, index, updates, _SCATTER_REDUCE[reduction], include_self=True)


def _scatter_nd(attrs: dict, data: Value, indices: Value, updates: Value) -> Value:
    data, updates = as_tensor(data), as_tensor(updates)
    index = as_tensor(indices).long()
    depth = index.shape[-1]
    picks = tuple(_wrapped(index[..., j], data.shape[j]) for j in range(depth))
    accumulate = _text(attrs.get("reduction", "none")) == "add"
    return data.index_put(picks, updates, accumulate=accumulate)


def _check_scatter(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    reduction = _text(attrs.get("reduction", "none"))
    return [] if reduction in ("none", *_SCATTER_REDUCE) else [f"reduction={reduction!r} is not supported"]


def _check_scatter_nd(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    reduction = _text(attrs.get("reduction", "none"))
    return [] if reduction in ("none", "add") else [f"reduction={reduction!r} is not supported"]


def _mod(attrs: dict, a: Value, b: Value) -> Value:
    """fmod=0: the remainder takes the divisor's sign (integers); fmod=1: C's fmod."""
    fmod = attrs.get("fmod", 0)
    if is_static(a) and is_static(b):
        return np.fmod(a, b) if fmod else np.mod(a, b)
    return (torch.fmod if fmod else torch.remainder)(as_tensor(a), as_tensor(b))



def _reduce_prod(x: torch.Tensor, axes: Sequence[int], keep: bool) -> torch.Tensor:
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.prod(axis, keepdim=keep)
    return x

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


# ----------------------------------------------------------------------------------------
# What each op's handler honours. The reader refuses, before evaluating anything, a node
# with an attribute outside ``attrs``, an output past ``outputs`` that the graph reads,
# an op version older than ``since``, or a setting ``check`` names; ``static`` inputs
# (shapes, axes, pads) must not be computed from the graph inputs' values.


@dataclass(frozen=True)
class OpSpec:
    handler: Callable
    attrs: frozenset = frozenset()
    outputs: int = 1  # outputs it computes; -1: any number (Split)
    static: tuple = ()  # input positions that must be known while tracing
    since: int = 1  # the oldest version of the op the handler implements
    check: Callable | None = None  # (attrs, version, outputs used) -> problems
    check_constants: Callable | None = None  # (constant input values, None where not constant) -> problems

    def problems(self, attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
        found = []
        if version < self.since:
            found.append(f"version {version} of the op (before opset {self.since}) is not supported")
        found += [f"attribute '{a}' is not supported" for a in sorted(attrs) if a not in self.attrs]
        if self.outputs >= 0:
            found += [f"output {i} is not supported" for i, u in enumerate(used) if u and i >= self.outputs]
        if self.check is not None:
            found += self.check(attrs, version, used)
        return found


def _spec(handler: Callable, attrs: str = "", **kw: Any) -> OpSpec:
    return OpSpec(handler, frozenset(attrs.split()), **kw)


def _check_training(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    """BatchNormalization: before opset 7 ``is_test=0`` means training; from 7 to 13 the
    number of outputs does (more than one: training); from 14 ``training_mode``."""
    training = ((version < 7 and not attrs.get("is_test", 0)) or (7 <= version < 14 and len(used) > 1)
                or attrs.get("training_mode", 0))
    return ["training mode (batch statistics) is not supported; export the model in eval mode"] if training else []


def _check_dropout(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    if version < 7 and not attrs.get("is_test", 0):
        return ["is_test=0 (training mode, random) is not supported; export the model in eval mode"]
    if version < 10 and len(used) > 1 and used[1]:
        return ["output 1 (the mask, of the input's type before opset 10) is not supported"]
    return []


def _check_dropout_constants(values: Sequence[np.ndarray | None]) -> list[str]:
    if len(values) > 2 and values[2] is not None and bool(np.asarray(values[2]).reshape(-1)[0]):
        return ["training_mode=True (random) is not supported; export the model in eval mode"]
    return []


def _check_cast(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    if "to" not in attrs:
        return []
    try:
        torch_dtype(attrs["to"])
    except OnnxError:
        return [f"cast to {_type_name(attrs['to'])} is not supported"]
    return []


def _check_auto_pad(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    mode = _text(attrs.get("auto_pad", "NOTSET"))
    return [] if mode in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER") else [f"auto_pad={mode!r} is not supported"]


def _check_conv_transpose(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    mode = _text(attrs.get("auto_pad", "NOTSET"))
    return [] if mode in ("NOTSET", "VALID") else [f"auto_pad={mode!r} is not supported"]


def _check_average_pool(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    found = _check_auto_pad(attrs, version, used)
    if any(d != 1 for d in attrs.get("dilations", [])):
        found.append(f"dilations={list(attrs['dilations'])} is not supported")
    return found


def _check_pad(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    mode = _text(attrs.get("mode", "constant"))
    return [] if mode in ("constant", "reflect", "edge", "wrap") else [f"mode={mode!r} is not supported"]


def _check_resize(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    found = []
    mode, coordinates, nearest = _resize_setting(attrs)
    if (mode, coordinates, nearest) not in _RESIZE_MODES:
        setting = f"mode={mode!r} with coordinate_transformation_mode={coordinates!r}"
        found.append(setting + (f" and nearest_mode={nearest!r}" if nearest else "") + " is not supported")
    if mode == "cubic" and (attrs.get("cubic_coeff_a", -0.75) != -0.75 or attrs.get("exclude_outside", 0)):
        found.append("cubic with cubic_coeff_a other than -0.75 or exclude_outside=1 is not supported")
    if attrs.get("antialias", 0):
        found.append("antialias=1 is not supported")
    if _text(attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        found.append(f"keep_aspect_ratio_policy={_text(attrs['keep_aspect_ratio_policy'])!r} is not supported")
    return found


def _check_gelu(attrs: dict, version: int, used: Sequence[bool]) -> list[str]:
    mode = _text(attrs.get("approximate", "none"))
    return [] if mode in ("none", "tanh") else [f"approximate={mode!r} is not supported"]


_LEGACY = "consumed_inputs"  # opset-1 in-place hint, no effect on values
_BROADCAST = f"broadcast axis {_LEGACY}"  # opsets before 7
_CONV = "auto_pad dilations group kernel_shape pads strides"
_POOL = "auto_pad ceil_mode dilations kernel_shape pads strides"

SPECS: dict[str, OpSpec] = {
    # elementwise
    "Add": _spec(_binary(np.add, torch.add), _BROADCAST), "Sub": _spec(_binary(np.subtract, torch.sub), _BROADCAST),
    "Mul": _spec(_binary(np.multiply, torch.mul), _BROADCAST), "Div": _spec(_binary(_div, _torch_div), _BROADCAST),
    "Pow": _spec(_binary(np.power, torch.pow), _BROADCAST), "Equal": _spec(_binary(np.equal, torch.eq), _BROADCAST),
    "Less": _spec(_binary(np.less, torch.lt), _BROADCAST), "Greater": _spec(_binary(np.greater, torch.gt), _BROADCAST),
    "LessOrEqual": _spec(_binary(np.less_equal, torch.le)),
    "GreaterOrEqual": _spec(_binary(np.greater_equal, torch.ge)),
    "And": _spec(_binary(np.logical_and, torch.logical_and), _BROADCAST),
    "Or": _spec(_binary(np.logical_or, torch.logical_or), _BROADCAST),
    "Not": _spec(_elementwise(np.logical_not, torch.logical_not)),
    "Xor": _spec(_binary(np.logical_xor, torch.logical_xor), _BROADCAST),
    "Mod": _spec(_mod, "fmod"),
    "Mean": _spec(lambda attrs, *xs: _variadic(torch.add, np.add)(attrs, *xs) / len(xs)),
    "ThresholdedRelu": _spec(lambda attrs, x: torch.where(as_tensor(x) > attrs.get("alpha", 1.0), as_tensor(x),
                                                          torch.zeros_like(as_tensor(x))), "alpha"),
    **{name: _spec(_elementwise(np_fn, torch_fn)) for name, np_fn, torch_fn in (
        ("Tan", np.tan, torch.tan), ("Asin", np.arcsin, torch.asin), ("Acos", np.arccos, torch.acos),
        ("Atan", np.arctan, torch.atan), ("Sinh", np.sinh, torch.sinh), ("Cosh", np.cosh, torch.cosh),
        ("Asinh", np.arcsinh, torch.asinh), ("Acosh", np.arccosh, torch.acosh), ("Atanh", np.arctanh, torch.atanh))},
    "IsNaN": _spec(_elementwise(np.isnan, torch.isnan)),
    "IsInf": _spec(_is_inf, "detect_negative detect_positive"),
    "Floor": _spec(_elementwise(np.floor, torch.floor), _LEGACY), "Ceil": _spec(_elementwise(np.ceil, torch.ceil), _LEGACY),
    "Round": _spec(_elementwise(np.round, torch.round)),  # both round halves to even, as ONNX
    "Neg": _spec(_elementwise(np.negative, torch.neg), _LEGACY), "Abs": _spec(_elementwise(np.abs, torch.abs), _LEGACY),
    "Sqrt": _spec(_elementwise(np.sqrt, torch.sqrt), _LEGACY), "Sign": _spec(_elementwise(np.sign, torch.sign)),
    "Reciprocal": _spec(_elementwise(np.reciprocal, torch.reciprocal), _LEGACY),
    "Exp": _spec(_elementwise(np.exp, torch.exp), _LEGACY), "Log": _spec(_elementwise(np.log, torch.log), _LEGACY),
    "Max": _spec(_variadic(torch.maximum, np.maximum), _LEGACY),
    "Min": _spec(_variadic(torch.minimum, np.minimum), _LEGACY), "Sum": _spec(_variadic(torch.add, np.add), _LEGACY),
    "Relu": _spec(_unary(F.relu), _LEGACY), "Sigmoid": _spec(_unary(torch.sigmoid), _LEGACY),
    "Tanh": _spec(_unary(torch.tanh), _LEGACY), "Erf": _spec(_unary(torch.erf)),
    "Softplus": _spec(_unary(F.softplus)), "Softsign": _spec(_unary(F.softsign)),
    "HardSwish": _spec(_unary(F.hardswish)), "Sin": _spec(_unary(torch.sin)), "Cos": _spec(_unary(torch.cos)),
    "LeakyRelu": _spec(lambda attrs, x: F.leaky_relu(as_tensor(x), attrs.get("alpha", 0.01)), f"alpha {_LEGACY}"),
    "Elu": _spec(lambda attrs, x: F.elu(as_tensor(x), attrs.get("alpha", 1.0)), f"alpha {_LEGACY}"),
    "Selu": _spec(_selu, f"alpha gamma {_LEGACY}"),
    "PRelu": _spec(_prelu, _LEGACY),
    "HardSigmoid": _spec(_hard_sigmoid, f"alpha beta {_LEGACY}"),
    "Shrink": _spec(_shrink, "bias lambd"),
    "Gelu": _spec(_gelu, "approximate", check=_check_gelu),
    "Clip": _spec(_clip, f"min max {_LEGACY}"),
    "Softmax": _spec(_softmax(torch.softmax), "axis"), "LogSoftmax": _spec(_softmax(torch.log_softmax), "axis"),
    "Hardmax": _spec(_softmax(_hardmax_fn), "axis"),
    # linear algebra, convolution, normalization, pooling
    "MatMul": _spec(_matmul), "Gemm": _spec(gemm, "alpha beta broadcast transA transB"),
    "Conv": _spec(_conv, _CONV, check=_check_auto_pad),
    "ConvTranspose": _spec(_conv_transpose, f"{_CONV} output_padding", check=_check_conv_transpose),
    "BatchNormalization": _spec(_batch_norm, f"epsilon is_test momentum spatial training_mode {_LEGACY}",
                                check=_check_training),
    "InstanceNormalization": _spec(_instance_norm, f"epsilon {_LEGACY}"),
    "LayerNormalization": _spec(_layer_norm, "axis epsilon stash_type"),
    "LRN": _spec(_lrn, "alpha beta bias size"),
    "MaxPool": _spec(_pool("max"), f"{_POOL} storage_order", check=_check_auto_pad),
    "AveragePool": _spec(_pool("avg"), f"{_POOL} count_include_pad", check=_check_average_pool),
    "GlobalAveragePool": _spec(lambda attrs, x: as_tensor(x).mean(tuple(range(2, as_tensor(x).dim())), keepdim=True)),
    "GlobalMaxPool": _spec(lambda attrs, x: as_tensor(x).amax(tuple(range(2, as_tensor(x).dim())), keepdim=True)),
    "ReduceMean": _spec(_reduce(torch.mean, np.mean), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ReduceSum": _spec(_reduce(torch.sum, np.sum), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ReduceMax": _spec(_reduce(torch.amax, np.max), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ReduceMin": _spec(_reduce(torch.amin, np.min), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ReduceProd": _spec(_reduce(_reduce_prod, np.prod), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ReduceL1": _spec(_reduce(lambda x, a, k: x.abs().sum(a, k), lambda x, axis, keepdims: np.abs(x).sum(
        axis=axis, keepdims=keepdims)), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ReduceL2": _spec(_reduce(lambda x, a, k: x.square().sum(a, k).sqrt(), lambda x, axis, keepdims: np.sqrt(
        np.square(x).sum(axis=axis, keepdims=keepdims))), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ReduceSumSquare": _spec(_reduce(lambda x, a, k: x.square().sum(a, k), lambda x, axis, keepdims: np.square(
        x).sum(axis=axis, keepdims=keepdims)), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ReduceLogSum": _spec(_reduce(lambda x, a, k: x.sum(a, k).log(), lambda x, axis, keepdims: np.log(
        x.sum(axis=axis, keepdims=keepdims))), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ReduceLogSumExp": _spec(_reduce(torch.logsumexp, lambda x, axis, keepdims: np.log(np.exp(x).sum(
        axis=axis, keepdims=keepdims))), "axes keepdims noop_with_empty_axes", static=(1,)),
    "ArgMax": _spec(_arg_extreme(True), "axis keepdims select_last_index"),
    "ArgMin": _spec(_arg_extreme(False), "axis keepdims select_last_index"),
    "CumSum": _spec(_cumsum, "exclusive reverse", static=(1,)),
    "TopK": _spec(_top_k, "axis largest sorted", outputs=2, static=(1,), since=10),
    "Trilu": _spec(_trilu, "upper", static=(1,)),
    "OneHot": _spec(_one_hot, "axis", static=(1,)),
    "Einsum": _spec(lambda attrs, *xs: torch.einsum(_text(attrs["equation"]), *map(as_tensor, xs)), "equation"),
    "ScatterElements": _spec(_scatter_elements, "axis reduction", check=_check_scatter),
    "ScatterND": _spec(_scatter_nd, "reduction", check=_check_scatter_nd),
    "DepthToSpace": _spec(_depth_to_space, "blocksize mode"),
    "SpaceToDepth": _spec(_space_to_depth, "blocksize"),
    # shapes and data movement
    "Reshape": _spec(_reshape, f"allowzero shape {_LEGACY}", static=(1,)),
    "Transpose": _spec(_transpose, "perm"), "Flatten": _spec(_flatten, "axis"),
    "Squeeze": _spec(_squeeze, "axes", static=(1,)), "Unsqueeze": _spec(_unsqueeze, "axes", static=(1,)),
    "Concat": _spec(_concat, "axis"), "Slice": _spec(_slice, "axes ends starts", static=(1, 2, 3, 4)),
    "Gather": _spec(_gather, "axis"), "GatherElements": _spec(_gather_elements, "axis"),
    "GatherND": _spec(_gather_nd, "batch_dims", since=11), "Split": _spec(_split, "axis num_outputs split", outputs=-1, static=(1,)),
    "Expand": _spec(_expand, static=(1,)), "Tile": _spec(_tile, static=(1,), since=6),
    "Pad": _spec(_pad, "mode pads value", static=(1, 2, 3), since=2, check=_check_pad),
    "Resize": _spec(_resize, "mode coordinate_transformation_mode nearest_mode cubic_coeff_a exclude_outside "
                    "extrapolation_value antialias keep_aspect_ratio_policy", static=(1, 2, 3), since=11,
                    check=_check_resize),
    "Shape": _spec(_shape, "end start"), "Size": _spec(
        lambda attrs, x: np.array(int(np.prod(_shape_of(x))), dtype=np.int64)),
    "Cast": _spec(_cast, "round_mode saturate to", check=_check_cast),
    "CastLike": _spec(_cast_like, "round_mode saturate"),
    "ConstantOfShape": _spec(_constant_of_shape, "value", static=(0,)),
    "Range": _spec(_range, "stash_type", static=(0, 1, 2)), "Where": _spec(_where),
    "Identity": _spec(lambda attrs, x: x),
    "Dropout": _spec(_dropout, f"is_test ratio seed {_LEGACY}", outputs=2, static=(2,), check=_check_dropout,
                     check_constants=_check_dropout_constants),
}
#: One handler per op (the newest semantics when called without ``@version``).
HANDLERS: dict[str, Callable] = {name: spec.handler for name, spec in SPECS.items()}
#: The ONNX ops (default domain) the importer evaluates; Constant is handled apart.
SUPPORTED_OPS = frozenset(HANDLERS) | {"Constant"}
