"""optcc.hardware reads the CPU the way the kernels and benchmarks rely on."""

from __future__ import annotations

import torch

from optcc.hardware import CpuInfo, cpu


def test_detected_cpu_agrees_with_torch():
    info = cpu()
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert info.threads == torch.get_num_threads()
    assert info.features()[0] == info.capability
    if info.capability.startswith("AVX512"):
        assert info.avx512
    assert info.model in info.summary() and f"{info.threads} threads" in info.summary()


def test_features_follow_the_flags():
    avx2 = CpuInfo("epyc", "AVX2", frozenset({"avx2", "fma"}), 2)
    assert (avx2.vnni, avx2.bf16, avx2.amx, avx2.avx512) == (False, False, False, False)
    assert avx2.features() == ["AVX2"]
    zen4 = CpuInfo("epyc", "AVX512", frozenset({"avx512f", "avx512_vnni", "avx512_bf16"}), 2)
    assert zen4.features() == ["AVX512", "VNNI", "BF16"] and not zen4.amx
    spr = CpuInfo("xeon", "AVX512", frozenset({"avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}), 2)
    assert spr.amx and spr.features() == ["AVX512", "VNNI", "BF16", "AMX"]
    assert CpuInfo("xeon", "AVX512", frozenset({"amx_tile"}), 1).amx is False  # tiles without int8
