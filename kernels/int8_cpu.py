"""CPU kernels of ``optcc::int8_linear``, and the rule that picks one per process.

Every kernel computes the same thing, ``(Xq @ Wq^T) * s`` for int8-valued rows ``Xq`` and
the int8 weight ``Wq`` with its per-channel scales ``s`` (the rest of LLM.int8() - row
scales, outlier columns, bias - is shared, :mod:`optcc.kernels.int8_linear`). They differ
in what the CPU makes fast, and in whether the integer products can saturate:

========================  ===================================================================
``onednn``                oneDNN's s8 x s8 -> s32 GEMM (``onednn::qlinear_pointwise``), the
                          weight scales applied in its epilogue; int8 rows quantized by one
                          vectorized pass. AMX tiles or VNNI ``vpdpbusd``: 32-bit sums.
``int_mm``                ``torch._int_mm`` (int8 x int8 -> int32), scales applied after.
``fbgemm``                fbgemm's u8 x s8 GEMM (``quantized::linear_dynamic``) in one pass.
``fbgemm_split``          the same on the rows split by sign (``Xq = P - N``, P and N in
                          [0, 127]) and stacked into one GEMM of 2M rows: without VNNI, fbgemm
                          sums pairs of u8 x s8 products in 16 bits (``vpmaddubsw``), which
                          saturates at full-scale values; P and N cannot.
``fp32``                  the integers multiplied in fp32 (exact while ``127^2 K < 2^24``); for
                          a torch without a quantized engine.
========================  ===================================================================

Choice (``auto``, made once per process, :func:`choose`): on a CPU with AMX the first exact
one of ``onednn``, ``int_mm``, ``fbgemm``; with VNNI but no AMX ``int_mm``, ``fbgemm``,
``onednn``; elsewhere ``fbgemm_split``. What backs the order (docs/benchmarks.md,
``examples/bench_int8.py``): on a Xeon with AMX, oneDNN's GEMM ran 5-15x faster than fp32,
``_int_mm`` 2-7x, fbgemm 1.2-3.6x; on an AMD EPYC with AVX512-VNNI and no AMX, oneDNN's
GEMM ran 600-1000x *slower* than fp32 (a reference path), ``_int_mm`` 2-7x faster, fbgemm
1.3-6.5x; on an AVX2 EPYC ``_int_mm`` ran at 0.04-0.06x of fp32 and only the sign split
was exact. "Exact" is
not assumed from the flags: before a kernel is first used, :func:`probe` runs it on
full-scale operands where 16-bit pair sums saturate and compares with the exact integer
product; a kernel that fails is never chosen, and forcing it raises.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from optcc.hardware import cpu

# Quantized tensors are deprecated as a user API; here they are only the carrier of
# PyTorch's vectorized quantize kernel and of fbgemm's GEMM, whose results are plain tensors.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")


class KernelUnavailable(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------
# Packed weights: one per (kernel, weight tensor), freed with the weight


class _PackCache:
    def __init__(self):
        self._packed: dict[tuple[str, int], object] = {}
        self._lock = threading.Lock()

    def get(self, kernel: str, weight: torch.Tensor, pack: Callable[[torch.Tensor], object]):
        key = (kernel, id(weight))
        packed = self._packed.get(key)
        if packed is None:
            packed = pack(weight)
            with self._lock:
                if key not in self._packed:
                    self._packed[key] = packed
                    weakref.finalize(weight, self._packed.pop, key, None)
                packed = self._packed[key]
        return packed

    def clear(self):
        self._packed.clear()


packed_weights = _PackCache()


# ----------------------------------------------------------------------------------------
# Row quantization into what each kernel reads


class _Workspace(threading.local):
    """Per-thread scratch buffers, grown as needed and reused across calls: a fresh
    [M, K] buffer per call costs more in page faults than the pass that fills it."""

    def get(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffers = self.__dict__.setdefault("buffers", {})
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = buffers[key] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]


_workspace = _Workspace()


def quantize_rows_int8(rows: torch.Tensor, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq, a)``: int8 ``round(rows * (1 / a))`` with ``columns`` (the outliers) set to 0
    and ``a`` the absmax of each row over the other columns / 127, computed in scratch
    buffers (the int8 result is one too: valid until this thread's next call)."""
    m, k = rows.shape
    scratch = _workspace.get("fp32", m * k, torch.float32).view(m, k)
    if columns is None:
        # max |x| = max(max x, -min x): two read-only reductions, no temporary
        row_scale = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_()).div_(127.0)
    else:
        torch.abs(rows, out=scratch)
        row_scale = scratch.index_fill_(1, columns, 0.0).amax(dim=1).div_(127.0)
    safe = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
    torch.mul(rows, safe.reciprocal()[:, None], out=scratch).round_()
    if columns is not None:
        scratch.index_fill_(1, columns, 0.0)
    xq = _workspace.get("int8", m * k, torch.int8).view(m, k)
    xq.copy_(scratch)  # integers in [-127, 127]: the conversion is exact
    return xq, row_scale


# ----------------------------------------------------------------------------------------
# The kernels


@dataclass(frozen=True)
class CpuKernel:
    name: str
    reads_int8: bool  # True: rows as int8; False: integer-valued fp32
    summary: str
    available: Callable[[], bool]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (xq, Wq, s) -> (Xq Wq^T) s


def _quantized_engine() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def _has_onednn() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _onednn(xq, weight, scale):
    packed = packed_weights.get("onednn", weight, lambda w: torch.ops.onednn.qlinear_prepack(w, None))
    zero_points = _zeros(scale.shape[0])
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, scale, zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> torch.Tensor:
    """The weight zero points oneDNN asks for (symmetric quantization: all 0), one per size."""
    return torch.zeros(n, dtype=torch.long)


def _int_mm(xq, weight, scale):
    return torch._int_mm(xq, weight.t()).float().mul_(scale)  # the [K, N] view ran faster than a copy


def _fbgemm_pack(weight):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qweight = torch._make_per_tensor_quantized_tensor(weight, 1.0, 0)
    return torch.ops.quantized.linear_prepack(qweight, None)


def fbgemm_int_matmul(xq: torch.Tensor, weight: torch.Tensor, *, split_signs: bool = True) -> torch.Tensor:
    """``xq @ weight.T`` for integer-valued fp32 ``xq`` in [-127, 127] and int8 ``weight``,
    as fp32, through fbgemm's int8 GEMM.

    The rows are padded with one row that makes fbgemm's per-tensor activation range
    exactly 255 wide: scale 1, so the quantization it applies reproduces ``xq`` exactly.
    ``split_signs`` (module docstring) avoids 16-bit saturation on CPUs without VNNI at
    twice the GEMM work.
    """
    packed = packed_weights.get("fbgemm", weight, _fbgemm_pack)
    m, k = xq.shape
    if split_signs:
        # [P; N; pad] written in place: P = max(xq, 0), N = -min(xq, 0), both in [0, 127]
        stacked = xq.new_empty(2 * m + 1, k)
        torch.clamp_min(xq, 0, out=stacked[:m])
        torch.clamp_max(xq, 0, out=stacked[m:2 * m]).neg_()
        stacked[2 * m].zero_()
        stacked[2 * m, 0] = 255.0  # range [0, 255]: scale 1, zero point 0
        out = torch.ops.quantized.linear_dynamic(stacked, packed, False)
        return out[:m].sub_(out[m:2 * m])  # in place: a fresh [M, N] buffer costs page faults
    pad = xq.new_zeros(2, k)
    pad[0, 0], pad[1, 0] = 128.0, -127.0  # range [-127, 128]: scale 1, zero point 127
    return torch.ops.quantized.linear_dynamic(torch.cat([xq, pad]), packed, False)[:m]


KERNELS: dict[str, CpuKernel] = {
    k.name: k
    for k in (
        CpuKernel("onednn", True, "oneDNN s8 x s8 GEMM, weight scales in its epilogue", _has_onednn, _onednn),
        CpuKernel("int_mm", True, "torch._int_mm int8 x int8 -> int32", lambda: hasattr(torch, "_int_mm"), _int_mm),
        CpuKernel("fbgemm", False, "fbgemm u8 x s8 GEMM, one pass", _quantized_engine,
                  lambda xq, w, s: fbgemm_int_matmul(xq, w, split_signs=False).mul_(s)),
        CpuKernel("fbgemm_split", False, "fbgemm u8 x s8 GEMM on sign-split rows (no 16-bit saturation)",
                  _quantized_engine, lambda xq, w, s: fbgemm_int_matmul(xq, w).mul_(s)),
        CpuKernel("fp32", False, "integer products in fp32", lambda: True,
                  lambda xq, w, s: (xq @ w.float().t()).mul_(s)),
    )
}


# ----------------------------------------------------------------------------------------
# Exactness probe and the choice


def full_scale_operands(m: int = 33, k: int = 96, n: int = 40, seed: int = 0):
    """Integer operands at the edges of the int8 range, where 16-bit pair sums saturate:
    ``(xq fp32 [m, k], wq int8 [n, k])``."""
    generator = torch.Generator().manual_seed(seed)
    xq = torch.randint(-127, 128, (m, k), generator=generator).float()
    xq[:, :8] = 127.0
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    wq[:, :8] = 127
    return xq, wq


def run_kernel(kernel: CpuKernel, xq: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``kernel`` on integer-valued rows ``xq`` (fp32 or int8), converted to what it reads."""
    wanted = torch.int8 if kernel.reads_int8 else torch.float32
    return kernel.run(xq.to(wanted).contiguous(), weight, scale)


@functools.cache
def probe(name: str) -> str | None:
    """``None`` if kernel ``name`` runs and is exact on saturating operands here, else why not."""
    kernel = KERNELS[name]
    if not kernel.available():
        return "not available in this torch build"
    xq, wq = full_scale_operands()
    exact = (xq.double() @ wq.double().t()).float()  # |values| < 2^24: exact in fp32
    try:
        got = run_kernel(kernel, xq, wq, torch.ones(wq.shape[0]))
    except Exception as exc:  # noqa: BLE001 - a kernel this build cannot run is simply not chosen
        return f"fails here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    if not torch.equal(got, exact):
        worst = (got - exact).abs().max().item()
        return f"not exact here (off by up to {worst:.0f} on full-scale int8 operands: 16-bit saturation)"
    return None


@dataclass(frozen=True)
class Choice:
    kernel: CpuKernel
    reason: str


def preference() -> tuple[str, ...]:
    info = cpu()
    if info.amx:
        return ("onednn", "int_mm", "fbgemm", "fbgemm_split", "fp32")
    if info.vnni:
        # Without AMX, oneDNN's s8 x s8 GEMM took 150-3800 ms where fp32 took 0.2-6 ms
        # (AMD EPYC, AVX512-VNNI): it falls back to a reference path. _int_mm ran 2-7x
        # faster than fp32 there.
        return ("int_mm", "fbgemm", "onednn", "fbgemm_split", "fp32")
    return ("fbgemm_split", "fp32")


@functools.cache
def _auto() -> Choice:
    info = cpu()
    passed_over = []
    for name in preference():
        why_not = probe(name)
        if why_not is None:
            features = " ".join(info.features())
            skipped = f"; passed over: {'; '.join(passed_over)}" if passed_over else ""
            return Choice(KERNELS[name], f"{features}: first exact kernel of {', '.join(preference())}{skipped}")
        passed_over.append(f"{name} {why_not}")
    raise KernelUnavailable("no exact CPU int8 kernel: " + "; ".join(passed_over))


def choose(name: str = "auto") -> Choice:
    """The kernel for ``name`` (``auto`` or one of :data:`KERNELS`), checked to be exact here."""
    if name == "auto":
        return _auto()
    if name not in KERNELS:
        raise ValueError(f"unknown CPU int8 kernel {name!r}; choose one of: auto, {', '.join(KERNELS)}")
    why_not = probe(name)
    if why_not is not None:
        raise KernelUnavailable(f"CPU int8 kernel {name!r} {why_not}; use 'auto' (picks "
                                f"{_auto().kernel.name} on this CPU)")
    return Choice(KERNELS[name], "forced by the cpu_kernel option")
