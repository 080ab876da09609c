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
Each node is evaluated with the semantics of the op version its model's opset selects
(Softmax's 2-D coercion before opset 13, axes and bounds as attributes or inputs, ...);
what a handler cannot honour (an attribute, an output the graph reads, training mode, a
shape computed from input values) is refused in the same one-line error, op and opset
named, never computed some other way.

(``onnx2torch`` was evaluated first: it rejects what ``torch.onnx.export`` writes today -
``ReduceMean`` of opset 18 and ``Reshape(allowzero=1)`` - hence this small importer.)

Write: :func:`export_onnx` writes a compiled model's rewritten graph (or any module) with
``torch.onnx.export(..., dynamo=True, optimize=False)``: the file holds optcc's graph op
for op, so what the passes did is what the file computes. optcc's own ops are written as
standard ONNX (translations registered by the modules that define them,
:data:`~optcc.onnx_io.common.ONNX_TRANSLATIONS`), so ONNX Runtime runs the file as is.

Files are only parsed as protobuf: reading an ONNX file runs no code from it.
"""

from __future__ import annotations

from .common import EXPORT_HINT, OnnxError
from .ops import HANDLERS, SUPPORTED_OPS
from .reader import OnnxModule, load_onnx, read_onnx
from .writer import export_onnx, onnx_text

__all__ = ["EXPORT_HINT", "HANDLERS", "SUPPORTED_OPS", "OnnxError", "OnnxModule", "export_onnx", "load_onnx", "onnx_text", "read_onnx"]
