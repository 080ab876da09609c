"""int8_decomposition (LLM.int8()): golden graphs, agreement with the torch reference,
planted outliers, weight memory, selection options and the cases left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import assert_left_alone, count, run_pipeline

import optcc
from optcc.dump import graph_text
from optcc.evaluation import constant_bytes
from optcc.kernels.int8_linear import collect_stats, int8_linear_reference, quantize_weight

INT8 = "optcc.int8_linear"
PASS = "int8_decomposition"


class Mlp(nn.Module):
    def __init__(self, d_in=64, hidden=96, d_out=48):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_out, bias=False)
        self.head = nn.Linear(d_out, 10)

    def forward(self, x):
        return self.head(self.fc2(self.act(self.fc1(x))))


class MatmulWithParameter(nn.Module):
    """``x @ W^T`` written as a matmul (mm + permute in the IR) and GPT-2's Conv1D ``addmm``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64) / 8)
        self.conv1d_weight = nn.Parameter(torch.randn(32, 24) / 6)  # [in, out]
        self.conv1d_bias = nn.Parameter(torch.randn(24))

    def forward(self, x):
        h = x @ self.w.t()
        return torch.addmm(self.conv1d_bias, h.reshape(-1, 32), self.conv1d_weight)


class MatmulOfActivations(nn.Module):
    def forward(self, x, y):
        return x @ y


def with_outliers(shape, columns=(3, 17), magnitude=40.0):
    """Activations with systematic outlier feature columns, as LLM.int8() describes them."""
    x = torch.randn(shape)
    x[..., list(columns)] *= magnitude
    return x


def reference_mlp(model: Mlp, x, threshold):
    """The same model computed with int8_linear_reference layer by layer."""
    def q(linear, h):
        wq, s = quantize_weight(linear.weight)
        return int8_linear_reference(h, wq, s, linear.bias, threshold)

    return q(model.head, q(model.fc2, model.act(q(model.fc1, x))))


def test_mlp_matches_reference_and_golden(golden):
    model = Mlp().eval()
    x = with_outliers((2, 5, 64))
    gm, report, error = run_pipeline(model, (x,), [PASS])
    record = report[PASS]
    assert record.matches == 3 and record.status == "applied"
    assert count(gm, INT8) == 3 and count(gm, "aten.linear") == 0
    assert record.stats["layers"] == ["fc1", "fc2", "head"]
    with torch.no_grad():
        expected = reference_mlp(model, x, 6.0)
        got = gm(x)[0]
    # Same quantization and scales; only the order of accumulation differs.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert 1e-4 < error < 5e-2  # approximate, and the pass manager measured it
    assert record.error == pytest.approx(error, rel=1e-6)
    golden(PASS, "mlp", graph_text(gm))


def test_matmul_and_addmm_with_constant_weights(golden):
    model = MatmulWithParameter().eval()
    x = with_outliers((3, 4, 64), columns=(9,))
    gm, report, error = run_pipeline(model, (x,), [PASS])
    assert report[PASS].matches == 2
    assert count(gm, "aten.mm") == 0 and count(gm, "aten.addmm") == 0 and count(gm, INT8) == 2
    with torch.no_grad():
        wq, s = quantize_weight(model.w)
        h = int8_linear_reference(x, wq, s, None, 6.0)
        wq2, s2 = quantize_weight(model.conv1d_weight.t())
        expected = int8_linear_reference(h.reshape(-1, 32), wq2, s2, model.conv1d_bias, 6.0)
    torch.testing.assert_close(gm(x)[0], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert error < 5e-2
    golden(PASS, "matmul_addmm", graph_text(gm))


def test_decomposition_matters_with_planted_outliers():
    """With a few outlier columns of magnitude 60, quantizing them with the rest ruins the row."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(256, 256)).eval()
    x = with_outliers((64, 256), columns=(5, 99, 200), magnitude=60.0)
    errors = {}
    for threshold in (6.0, 0.0):
        _, report, error = run_pipeline(model, (x,), [(PASS, {"threshold": threshold})])
        errors[threshold] = error
    assert errors[6.0] < 0.01
    assert errors[0.0] > 5 * errors[6.0]


def test_int8_fraction_and_outlier_columns_recorded():
    model = nn.Sequential(nn.Linear(128, 64)).eval()
    x = with_outliers((32, 128), columns=(3, 17))
    compiled = optcc.compile(model, [PASS], example_inputs=(x,), target="eager")
    with collect_stats() as stats:
        compiled(x)
    (layer,) = stats.values()
    assert layer.outlier_columns == {3, 17}
    assert layer.int8_values == 32 * (128 - 2) and layer.values == 32 * 128


def test_fp32_weights_leave_the_graph():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    x = torch.randn(4, 512)
    before = constant_bytes(optcc.capture(model, (x,)))
    gm, report, _ = run_pipeline(model, (x,), [PASS])
    after = constant_bytes(gm)
    assert not any(t.dtype == torch.float32 and t.dim() == 2 for t in gm.buffers())
    assert after / before <= 0.26
    stats = report[PASS].stats
    assert stats["weight_bytes_int8"] / stats["weight_bytes_fp32"] <= 0.26
    # running the pass alone (without the pass manager's clean-up) frees them too
    gm = optcc.capture(model, (x,))
    optcc.get_pass(PASS)()(gm)
    assert constant_bytes(gm) == after


def test_weight_only_mode():
    model = Mlp().eval()
    x = with_outliers((3, 64))
    gm, report, error = run_pipeline(model, (x,), [(PASS, {"weight_only": True})])
    assert report[PASS].matches == 3
    with torch.no_grad():
        def q(linear, h):
            wq, s = quantize_weight(linear.weight)
            return nn.functional.linear(h, wq.float() * s[:, None], linear.bias)
        expected = q(model.head, q(model.fc2, model.act(q(model.fc1, x))))
    torch.testing.assert_close(gm(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_skip_pattern_keeps_the_head_in_fp32(golden):
    model = Mlp().eval()
    x = torch.randn(2, 64)
    gm, report, _ = run_pipeline(model, (x,), [(PASS, {"skip": ("head",)})])
    assert report[PASS].matches == 2
    assert report[PASS].stats["missed"] == {"int8_linear: matches a skip pattern": 1}
    assert count(gm, "aten.linear") == 1 and count(gm, INT8) == 2
    golden(PASS, "skip_head", graph_text(gm))


def test_include_pattern_and_minimum_size():
    model = Mlp().eval()
    x = torch.randn(2, 64)
    _, report, _ = run_pipeline(model, (x,), [(PASS, {"include": "fc*"})])
    assert report[PASS].stats["layers"] == ["fc1", "fc2"]
    _, report, _ = run_pipeline(model, (x,), [(PASS, {"min_weight_elements": 64 * 96})])
    assert report[PASS].stats["layers"] == ["fc1"]
    assert report[PASS].stats["missed"] == {"int8_linear: weight smaller than min_weight_elements": 2}


def test_module_path_selects_inside_nested_modules():
    model = nn.Sequential(Mlp(), Mlp(10, 16, 64)).eval()
    _, report, _ = run_pipeline(model, (torch.randn(2, 64),), [(PASS, {"skip": "1.*"})])
    assert report[PASS].stats["layers"] == ["0.fc1", "0.fc2", "0.head"]


def test_matmul_of_two_activations_is_left_alone(golden):
    inputs = (torch.randn(4, 8), torch.randn(8, 5))
    gm = assert_left_alone(MatmulOfActivations(), inputs, PASS, "int8_linear: the weight is not a constant")
    golden(PASS, "negative_matmul_of_activations", graph_text(gm))


def test_approximate_pass_runs_only_when_named():
    assert PASS not in [p.name for p in optcc.default_passes()]
    assert optcc.get_pass(PASS).exact is False


def test_threshold_none_means_no_decomposition():
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    x = with_outliers((8, 64))
    gm, _, _ = run_pipeline(model, (x,), [(PASS, {"threshold": None})])
    with torch.no_grad():
        wq, s = quantize_weight(model[0].weight)
        expected = int8_linear_reference(x, wq, s, model[0].bias, 0.0)
    torch.testing.assert_close(gm(x)[0], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_minilm_real_weights_keep_embeddings():
    """all-MiniLM-L6-v2 with its real weights on one batch of the evaluation sentences."""
    from optcc import evaluation as ev

    model, tokenizer = ev.load_minilm()
    encoder = ev.MeanPooledEncoder(model).eval()
    batch = ev.tokenize(tokenizer, ev.sentences()[:16], batch_size=16)
    reference = ev.embed(encoder, batch, 16)
    compiled = optcc.compile(encoder, [PASS], example_inputs=batch[0], target="eager")
    with collect_stats() as stats:
        got = ev.embed(compiled, batch, 16)
    agreement = ev.embedding_agreement(reference, got)
    summary = ev.int8_summary(stats)
    assert summary["layers"] == 36
    assert agreement["cosine_mean"] > 0.998 and agreement["cosine_min"] > 0.99
    assert 0.99 < summary["int8_fraction"] < 1.0
    assert compiled.report[PASS].error < 0.1


def test_report_names_the_cpu_kernel_and_a_forced_kernel_is_in_the_graph():
    from optcc.hardware import cpu
    from optcc.kernels import int8_cpu

    torch.manual_seed(0)
    model, x = Mlp().eval(), with_outliers((4, 64))
    auto = optcc.compile(model, [PASS], example_inputs=(x,), target="eager")
    stats = auto.report[PASS].stats
    assert stats["cpu_kernel"] == int8_cpu.choose("auto").kernel.name
    assert cpu().capability in stats["cpu_kernel_reason"]
    assert "kernel=" not in graph_text(auto.graph_module)  # auto leaves the graph as it reads
    forced = optcc.compile(model, [(PASS, {"cpu_kernel": "fp32"})], example_inputs=(x,), target="eager")
    assert forced.report[PASS].stats["cpu_kernel"] == "fp32"
    assert "cpu_kernel='fp32'" in graph_text(forced.graph_module) or "cpu_kernel=fp32" in graph_text(forced.graph_module)
    with collect_stats() as seen:
        y = forced(x)
    assert {k for layer in seen.values() for k in layer.kernels} == {"fp32"}
    torch.testing.assert_close(y, auto(x), rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_inductor_target_runs_the_int8_op():
    # Inductor calls a custom op through FallbackKernel.create(kernel, *args, **kwargs): an
    # op argument named "kernel" collided with it; the op's argument is cpu_kernel.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(4, 64)
    spec = [("int8_decomposition", {"cpu_kernel": "fp32"})]
    eager = optcc.compile(model, spec, example_inputs=(x,), target="eager")
    inductor = optcc.compile(model, spec, example_inputs=(x,), target="inductor")
    with torch.no_grad():
        assert torch.allclose(inductor(x), eager(x), rtol=1e-5, atol=1e-6)
    assert inductor.report["int8_decomposition"].matches == 2
