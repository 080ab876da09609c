"""What the ONNX reader, op table and writer share: the error users see, and the onnx import."""

from __future__ import annotations

EXPORT_HINT = "re-export it, e.g. torch.onnx.export(model, inputs, 'model.onnx', dynamo=True)"


class OnnxError(ValueError):
    """An ONNX file optcc cannot read or a model it cannot write; the message says what to do."""


def require_onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        raise OnnxError("reading and writing ONNX needs the onnx package: pip install onnx") from None
    return onnx


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__



# optcc's own ops as standard ONNX: the module that defines an op registers the onnxscript
# function that writes it (``torch.onnx.export``'s ``custom_translation_table``), so a file
# optcc writes runs in ONNX Runtime with no custom-op library.
ONNX_TRANSLATIONS: dict = {}


def register_onnx_translation(op, translation) -> None:
    """Write every ``op`` node (an ``OpOverload``) as ``translation(*args)``, a function of
    onnxscript values and the node's non-tensor arguments, traced by ``torch.onnx.export``."""
    ONNX_TRANSLATIONS[op] = translation
