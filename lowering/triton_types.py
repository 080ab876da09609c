"""What every Triton source generator shares: dtypes, literals, signatures, the file layout.

``TRITON_DTYPES``   torch dtype -> Triton element type of a value (``tl.float32``, ...)
``POINTER_TYPES``   torch dtype -> Triton pointer type of a kernel argument (``*fp32``, ...)
``literal(v)``      a Python scalar of the graph written into the source (bools as 1.0 /
                    0.0, like every other value; infinities spelled out)
``kernel_signature(source, pointers)``  the Triton signature of a generated kernel, for
                    ahead-of-time builds (:mod:`.aot`)
``kernel_source(...)``  the text of one generated kernel file
``Unsupported``     raised by a generator for a region it cannot express (says what); the
                    region then runs its reference subgraph
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch


class Unsupported(Exception):
    """The region holds something this generator cannot express (says what)."""


TRITON_DTYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
                 torch.float64: "tl.float64", torch.bool: "tl.int1", torch.int32: "tl.int32", torch.int64: "tl.int64"}

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
                 torch.bool: "*i1", torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8"}


def literal(value: Any) -> str:
    """A Python scalar argument as Triton source."""
    if isinstance(value, bool):
        return "1.0" if value else "0.0"
    if isinstance(value, (int, float)):
        return repr(float(value)) if math.isfinite(value) else ("float('inf')" if value > 0 else "float('-inf')")
    if value is None:
        return "None"
    raise Unsupported(f"argument {value!r} of type {type(value).__name__}")


def kernel_signature(source: str, pointers: dict[str, torch.dtype]) -> dict[str, str]:
    """The Triton signature of the generated kernel in ``source``: the named pointers with
    their element types, every other parameter a 32-bit integer, the constexprs marked."""
    params = re.search(r"def \w+\((.*)\):", source).group(1).split(", ")
    signature = {}
    for param in params:
        name = param.split(":")[0]
        if param.endswith("tl.constexpr"):
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = POINTER_TYPES[pointers[name]]
        else:
            signature[name] = "i32"
    return signature


def kernel_source(header: str, ops: Sequence[str], name: str, params: Sequence[str],
                  constexprs: Sequence[str], body: Sequence[str]) -> str:
    """One generated kernel file: imports, ``# header`` and the region's ops as comments,
    then ``@triton.jit def name(*params, *constexprs: tl.constexpr)`` with ``body``."""
    arguments = ", ".join([*params, *(f"{c}: tl.constexpr" for c in constexprs)])
    return "\n".join([
        "import triton",
        "import triton.language as tl",
        "",
        "",
        f"# {header}",
        *[f"#   {line}" for line in ops],
        "@triton.jit",
        f"def {name}({arguments}):",
        *[f"    {line}" for line in body],
        "",
    ])
