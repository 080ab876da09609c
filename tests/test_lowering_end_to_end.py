"""target="triton" end to end in the Triton interpreter: a small CNN and a small ViT."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from helpers import randomize_bn

import optcc
from optcc.lowering.runtime import (GemmLaunch, PointwiseLaunch, ReductionLaunch, VendorAnchorLaunch,
                                   attention_like_reference)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.block(h) + h) * torch.sigmoid(h)
        return torch.softmax(self.head(h.mean((2, 3))), dim=-1)


def _compile(model, x):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*run their reference torch ops")  # every region lowered
        compiled = optcc.compile(model, example_inputs=(x,), target="triton")
    launched = compiled.pipeline.cache  # one specialisation, lowered
    (spec,) = launched.values()
    return compiled, spec.runner


def test_small_cnn():
    model = randomize_bn(SmallCNN()).eval()
    x = torch.randn(2, 3, 12, 12)
    compiled, runner = _compile(model, x)
    kinds = {type(m) for m in runner.modules()}
    assert {VendorAnchorLaunch, PointwiseLaunch, ReductionLaunch, GemmLaunch} <= kinds
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_small_vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=64, num_heads=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled, runner = _compile(model, x)
    kinds = {type(m) for m in runner.modules()}
    assert {ReductionLaunch, GemmLaunch, VendorAnchorLaunch} <= kinds  # add + layer_norm, linears, patch conv
    assert sum(n.target is attention_like_reference for n in runner.graph.nodes) == 2  # one per block
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_gpu_benchmark_script_runs_tiny_in_the_interpreter():
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "bench_lowering.py"
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(script), "--tiny"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = [float(e) for e in re.findall(r"\| ([0-9.e+-]+) \|$", result.stdout, re.M)]
    assert len(errors) == 8 and max(errors) <= 1e-5, result.stdout


def test_triton_dump_prints_every_region_kernel():
    from optcc.dump import triton_text

    model = randomize_bn(SmallCNN()).eval()
    compiled = optcc.compile(model, example_inputs=(torch.randn(1, 3, 8, 8),), target="eager")
    from optcc.lowering import with_regions

    text = triton_text(compiled.graph_module)  # the default pipeline forms no regions: the dump does
    regions = [n for n in with_regions(compiled.graph_module).graph.nodes if n.op == "call_module"]
    assert text.count("# ---- ") == len(regions) > 0
    assert "runs as the vendor kernel" in text and "@triton.jit" in text
    assert "tl.dot" in text  # the head linear


@pytest.mark.parametrize("mask,heads", [("bool", 2), ("causal", 1)])
def test_results_keep_the_reference_layout(mask, heads):
    """Found by the fuzzer: a kernel result laid out differently from the reference op's
    broke a later view (nn.MultiheadAttention reshapes the attention output)."""
    from optcc.testing.fuzz import ModelSpec, block, build_model

    spec = ModelSpec(input_shape=(2, 5, 8), blocks=(block("attention", idiom="mha", heads=heads, mask=mask,
                                                          bias=True, pre_norm=True, residual=True),), seed=0)
    model, inputs = build_model(spec)
    compiled = optcc.compile(model.eval(), example_inputs=inputs, target="triton")
    with torch.no_grad():
        expected, got = model(*inputs), compiled(*inputs)
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
