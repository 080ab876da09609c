"""Ahead-of-time compilation of Triton kernels for a GPU target, without a GPU.

``triton.compile`` runs the whole front end and the NVIDIA back end (TTIR -> TTGIR ->
LLVM IR -> PTX) on the host; only loading the binary (cubin) onto a device needs a GPU.
This is how tests prove that a kernel builds for a GPU generation this machine does not
have, and how they inspect its IR (a ``tt.dot`` in the TTIR, tensor-core instructions in
the PTX)::

    from optcc.lowering.aot import compile_for_target
    ir = compile_for_target(my_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                            constexprs={"BLOCK": 128}, arch=90)
    assert "tt.load" in ir["ttir"]

``signature`` maps every parameter of the ``@triton.jit`` function to a Triton type
string (``"*fp32"``, ``"*i8"``, ``"i32"``, ``"fp32"``, ...) or ``"constexpr"``; the values
of the constexpr parameters go in ``constexprs``. Kernels run with the Triton interpreter
(``TRITON_INTERPRET=1``) still compile here: the JIT function is unwrapped first.
"""

from __future__ import annotations

from typing import Any

#: The GPU generations optcc's generated kernels are checked against (Ampere, Hopper).
DEFAULT_ARCHS = (80, 90)


def _jit_function(kernel: Any) -> Any:
    """The ``JITFunction`` behind ``kernel``.

    Under ``TRITON_INTERPRET=1`` ``@triton.jit`` returns an interpreter wrapper around the
    plain Python function; a ``JITFunction`` is then built from that function, since the
    compiler (unlike the interpreter) needs one.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if isinstance(kernel, InterpretedFunction):
        return JITFunction(kernel.fn)
    raise TypeError(f"{kernel!r} is not a @triton.jit function")


def compile_for_target(
    kernel: Any,
    signature: dict[str, str],
    *,
    constexprs: dict[str, Any] | None = None,
    arch: int = 90,
    backend: str = "cuda",
    warp_size: int = 32,
    options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Compile ``kernel`` for ``GPUTarget(backend, arch, warp_size)``; return its IR texts.

    The result maps each stage Triton produced and that is text (``ttir``, ``ttgir``,
    ``llir``, ``ptx`` for CUDA) to its contents. ``options`` are Triton compile options
    (``num_warps``, ``num_stages``, ...).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    missing = [name for name in fn.arg_names if name not in signature]
    if missing:
        raise ValueError(f"signature has no type for parameter(s) {', '.join(missing)} of {fn.__name__}")
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs or {}))
    compiled = triton.compile(source, target=GPUTarget(backend, arch, warp_size), options=options)
    return {stage: text for stage, text in compiled.asm.items() if isinstance(text, str)}


_ISOLATED = r"""
import importlib.util, json, sys
from optcc.lowering.aot import compile_for_target
results = []
for i, (path, name, signature, constexprs, arch) in enumerate(json.loads(sys.stdin.read())):
    spec = importlib.util.spec_from_file_location(f"aot_kernel_{i}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        results.append(compile_for_target(getattr(module, name), signature, constexprs=constexprs, arch=arch))
    except Exception as exc:
        results.append({"error": f"{type(exc).__name__}: {exc}"})
json.dump(results, sys.stdout)
"""


def compile_files_for_targets(jobs: list[tuple[str, str, dict[str, str], dict[str, Any], int]]) -> list[dict[str, str]]:
    """:func:`compile_for_target` for many ``(path, kernel name, signature, constexprs, arch)``
    jobs, in one fresh Python process without ``TRITON_INTERPRET``; a job that fails to
    compile gets ``{"error": message}``.

    A process that has run kernels in the interpreter keeps parts of ``triton.language``
    patched for it, and the compiler then fails on plain code; a clean process does not.
    """
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps([[str(path), name, signature, dict(constexprs or {}), arch]
                          for path, name, signature, constexprs, arch in jobs])
    result = subprocess.run([sys.executable, "-c", _ISOLATED], input=payload, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)


def compile_file_for_target(
    path: str, name: str, signature: dict[str, str], *, constexprs: dict[str, Any] | None = None, arch: int = 90
) -> dict[str, str]:
    """One job of :func:`compile_files_for_targets`; raises if it does not compile."""
    (ir,) = compile_files_for_targets([(path, name, signature, dict(constexprs or {}), arch)])
    if "error" in ir:
        raise RuntimeError(f"compiling {name} from {path} for sm_{arch} failed: {ir['error']}")
    return ir
