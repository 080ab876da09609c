"""optcc's own ops written as standard ONNX: each mapping's text is a golden file, and the
file runs in ONNX Runtime (no custom-op library) with optcc's own output."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import optcc
from optcc.onnx_io import export_onnx, onnx_text
from optcc.pass_manager import output_error


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 8, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def ort_outputs(path, inputs) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(out)) for out in session.run(None, feed)]


def standard_domains_only(path) -> set[str]:
    model = onnx.load(str(path))
    domains = {n.domain for n in model.graph.node} | {f.domain for f in model.functions}
    assert domains <= {"", "ai.onnx"}, f"custom domains in the file: {domains}"
    return {n.op_type for n in model.graph.node}


def with_outlier_column(x: torch.Tensor, column: int, scale: float = 40.0) -> torch.Tensor:
    x = x.clone()
    x[..., column] *= scale
    return x


@pytest.mark.parametrize("threshold", [6.0, 0.0], ids=["outliers", "no_decomposition"])
def test_int8_linear_is_matmulinteger_with_per_row_scales(tmp_path, golden, threshold):
    torch.manual_seed(0)
    model = Mlp().eval()
    x = with_outlier_column(torch.randn(2, 5, 16), column=3)
    compiled = optcc.compile(model, [("int8_decomposition", {"threshold": threshold})], example_inputs=(x,))
    path = export_onnx(compiled, tmp_path / "int8.onnx", (x,))
    kinds = standard_domains_only(path)
    assert "MatMulInteger" in kinds and ("Compress" in kinds) == (threshold > 0)
    golden("onnx", f"int8_linear_{'outliers' if threshold else 'no_decomposition'}", onnx_text(path))

    # Fresh values with their outlier column elsewhere: the outliers are found at run time.
    fresh = with_outlier_column(torch.randn(2, 5, 16), column=11)
    with torch.no_grad():
        expected, exact = compiled(fresh), model(fresh)
    (got,) = ort_outputs(path, (fresh,))
    assert got.shape == expected.shape
    assert output_error([expected], [got]) <= 1e-5  # the same integers, fp32 sums in another order
    assert output_error([exact], [got]) > 1e-4  # and it really is int8, not the fp32 linear


def test_int8_weight_only_keeps_fp32_activations(tmp_path):
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(4, 16)
    compiled = optcc.compile(model, [("int8_decomposition", {"weight_only": True})], example_inputs=(x,))
    path = export_onnx(compiled, tmp_path / "w8.onnx", (x,))
    assert "MatMulInteger" not in standard_domains_only(path)
    with torch.no_grad():
        expected = compiled(x)
    (got,) = ort_outputs(path, (x,))
    assert output_error([expected], [got]) <= 1e-5


def test_int8_export_of_a_conv_net_runs_in_onnxruntime(tmp_path):
    from optcc.models import demo_model

    model, (x,) = demo_model()
    compiled = optcc.compile(model, ["bn_reparam", "int8_decomposition"], example_inputs=(x,))
    out = export_onnx(compiled, tmp_path / "q.onnx", (x,), fold=True)  # as optcc export writes it
    assert "MatMulInteger" in standard_domains_only(out)
    with torch.no_grad():
        expected = compiled(x)
    (got,) = ort_outputs(out, (x,))
    assert output_error([expected], [got]) <= 1e-4  # fp32 convolutions in ORT's order


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=1.0,
                             num_classes=3).eval()


def test_linear_attention_golden(tmp_path, golden):
    model, x = tiny_vit(), torch.randn(1, 3, 16, 16)
    compiled = optcc.compile(model, [("attention_to_linear", {"feature_map": "elu1"})], example_inputs=(x,))
    path = export_onnx(compiled, tmp_path / "linear.onnx", (x,))
    assert "Softmax" not in standard_domains_only(path)
    golden("onnx", "linear_attention_elu1", onnx_text(path))
    with torch.no_grad():
        expected = compiled(x)
    (got,) = ort_outputs(path, (x,))
    assert output_error([expected], [got]) <= 1e-5


def test_token_merge_golden(tmp_path, golden):
    model, x = tiny_vit(), torch.randn(1, 3, 16, 16)
    compiled = optcc.compile(model, ["canonicalize_attention", ("token_pruning", {"r": 1})], example_inputs=(x,))
    assert compiled.report["token_pruning"].status == "applied"
    path = export_onnx(compiled, tmp_path / "tome.onnx", (x,))
    assert "ScatterElements" in standard_domains_only(path)
    golden("onnx", "token_merge_r1", onnx_text(path))
    with torch.no_grad():
        expected = compiled(x)
    (got,) = ort_outputs(path, (x,))
    assert output_error([expected], [got]) <= 1e-5
