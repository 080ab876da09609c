"""What CPU this process runs on: the facts that decide which kernel is fastest or exact.

The machines optcc is built and tested on differ (AVX2 only; AVX-512 with VNNI and BF16;
AVX-512 with AMX), and some facts follow from the instruction set rather than from
torch's version: whether a uint8 x int8 GEMM saturates at 16 bits (it does without
VNNI, where pairs of products are summed with ``vpmaddubsw``), whether int8 or bf16
matmuls beat fp32 at all. Kernels choose by these facts, tests assert what holds for the
machine they run on, and benchmarks print :func:`cpu_summary` in their headers.

Sources: ``torch.backends.cpu.get_cpu_capability()`` (the vector ISA torch's own kernels
dispatch to) and, on Linux, the ``flags`` line of ``/proc/cpuinfo`` (the features torch
does not report: VNNI, BF16, AMX). Where ``/proc/cpuinfo`` cannot be read the flags are
empty and every feature reads as absent, which only ever picks the conservative path.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuInfo:
    model: str
    capability: str  # torch's dispatch level: "DEFAULT", "AVX2", "AVX512", ...
    flags: frozenset[str]
    threads: int

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags or self.capability.startswith("AVX512")

    @property
    def vnni(self) -> bool:
        """int8 dot products with 32-bit accumulation (AVX512-VNNI or AVX-VNNI)."""
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def amx(self) -> bool:
        """Intel AMX int8 tiles (Sapphire Rapids and later)."""
        return {"amx_tile", "amx_int8"} <= self.flags

    def features(self) -> list[str]:
        names = [self.capability]
        names += [name for name, present in (("VNNI", self.vnni), ("BF16", self.bf16), ("AMX", self.amx)) if present]
        return names

    def summary(self) -> str:
        """One line for benchmark headers: model, ISA features, threads."""
        return f"{self.model} ({' '.join(self.features())}), {self.threads} threads"


def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The first ``model name`` and ``flags`` (``Features`` on ARM) lines of /proc/cpuinfo."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = frozenset(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", flags or frozenset()


@functools.cache
def _static() -> tuple[str, frozenset[str], str]:
    model, flags = _cpuinfo()
    return model, flags, torch.backends.cpu.get_cpu_capability()


def cpu() -> CpuInfo:
    """This machine's CPU; the thread count is read on every call (it can be changed)."""
    model, flags, capability = _static()
    return CpuInfo(model=model, capability=capability, flags=flags, threads=torch.get_num_threads())


def cpu_summary() -> str:
    return cpu().summary()
