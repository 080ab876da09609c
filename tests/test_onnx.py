"""Reading and writing ONNX (optcc/onnx_io.py): round trips through optcc's passes, the
importer's op semantics checked against onnxruntime, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
from helpers import count, randomize_bn
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.cli import main
from optcc.models import load_model
from optcc.onnx_io import OnnxError, export_onnx, load_onnx
from optcc.pass_manager import output_error

BN = "aten._native_batch_norm_legit_no_training"


class ConvBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def ort_run(path, *inputs) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})


@pytest.fixture(scope="module")
def net_and_onnx(tmp_path_factory):
    """A conv+BN model and its ONNX file with the BatchNormalization kept (optimize=False)."""
    torch.manual_seed(0)
    model, x = randomize_bn(ConvBNNet()).eval(), torch.randn(2, 3, 8, 8)
    path = tmp_path_factory.mktemp("onnx") / "convbn.onnx"
    torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False, report=False).save(str(path))
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    return model, x, path


def test_round_trip_model_to_onnx_to_optcc(net_and_onnx):
    model, x, path = net_and_onnx
    imported, (example,) = load_onnx(path)
    assert example.shape == x.shape and not imported.training
    compiled = optcc.compile(imported, ["bn_reparam"], example_inputs=(x,), target="eager", verify=True)
    assert compiled.report["bn_reparam"].status == "applied"
    assert count(compiled.graph_module, BN) == 0  # the ONNX BatchNormalization folded into the Conv
    with torch.no_grad():
        assert output_error([model(x)], [compiled(x)]) <= 1e-5


def test_written_file_runs_in_onnxruntime_and_matches(net_and_onnx, tmp_path):
    model, x, _ = net_and_onnx
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager")
    path = export_onnx(compiled, tmp_path / "folded.onnx")
    written = onnx.load(str(path))
    onnx.checker.check_model(written)
    assert not any(n.op_type == "BatchNormalization" for n in written.graph.node)  # what optcc made
    with torch.no_grad():
        expected = model(x)
    (got,) = ort_run(path, x)
    assert output_error([expected], [torch.from_numpy(got)]) <= 1e-5
    from onnx.reference import ReferenceEvaluator

    (reference,) = ReferenceEvaluator(written).run(None, {written.graph.input[0].name: x.numpy()})
    assert output_error([expected], [torch.from_numpy(reference)]) <= 1e-5


def test_export_needs_inputs_for_a_plain_module(tmp_path):
    with pytest.raises(OnnxError, match="needs example_inputs"):
        export_onnx(ConvBNNet().eval(), tmp_path / "x.onnx")


# ----------------------------------------------------------------------------------------
# The importer's op semantics against onnxruntime, on a graph written by hand


def _handmade_model(path) -> None:
    """A token model exercising the shape arithmetic exporters write (Shape/Gather/Concat
    into Reshape), Gemm, MatMul by a constant, Softmax, LayerNormalization, Slice, Clip."""
    rng = np.random.default_rng(0)

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    inits = [
        const("w", rng.standard_normal((8, 8)).astype(np.float32)),
        const("gemm_w", rng.standard_normal((6, 8)).astype(np.float32)),
        const("gemm_b", rng.standard_normal(6).astype(np.float32)),
        const("ln_scale", rng.uniform(0.5, 1.5, 8).astype(np.float32)),
        const("ln_bias", rng.standard_normal(8).astype(np.float32)),
        const("zero", np.array(0, dtype=np.int64)), const("one", np.array([1], dtype=np.int64)),
        const("minus_one", np.array([-1], dtype=np.int64)), const("axes0", np.array([0], dtype=np.int64)),
        const("starts", np.array([1], dtype=np.int64)), const("ends", np.array([2 ** 62], dtype=np.int64)),
        const("axis_last", np.array([-1], dtype=np.int64)), const("two", np.array([2], dtype=np.int64)),
        const("lo", np.array(-1.5, dtype=np.float32)), const("hi", np.array(1.5, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "ln_scale", "ln_bias"], ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("Shape", ["n"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus_one", "two"], ["heads_shape"], axis=0),
        helper.make_node("Reshape", ["n", "heads_shape"], ["split"]),  # [B, 4L, 2]
        helper.make_node("Softmax", ["split"], ["soft"], axis=-1),
        helper.make_node("Reshape", ["soft", "shape"], ["back"]),
        helper.make_node("Slice", ["back", "starts", "ends", "one"], ["tail"]),  # drop the first token
        helper.make_node("ReduceMean", ["tail", "one"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "gemm_w", "gemm_b"], ["logits"], transB=1),
        helper.make_node("Clip", ["logits", "lo", "hi"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "handmade",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 6])], inits)
    # IR version 10: what torch.onnx writes, and what the pinned onnxruntime reads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_importer_matches_onnxruntime_and_symbolic_dims(tmp_path):
    path = tmp_path / "handmade.onnx"
    _handmade_model(path)
    module, (x,) = load_onnx(path, batch=3)
    assert x.shape == (3, 5, 8)  # the symbolic batch took the requested size
    assert load_onnx(path)[1][0].shape == (1, 5, 8)  # and 1 by default
    (expected,) = ort_run(path, x)
    with torch.no_grad():
        assert output_error([torch.from_numpy(expected)], [module(x)]) <= 1e-5
        compiled = optcc.compile(module, example_inputs=(x,), target="eager", verify=True)
        assert output_error([torch.from_numpy(expected)], [compiled(x)]) <= 1e-5
    ops = optcc.op_counts(compiled.graph_module)
    assert ops["aten.linear"] == 2  # MatMul by a constant and Gemm became linear
    assert "aten.gather" not in ops  # shape arithmetic was evaluated while tracing


def test_onnx_model_spec_in_the_cli(net_and_onnx, capsys):
    model, x, path = net_and_onnx
    status = main(["dump", str(path), "--passes", "bn_reparam"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.startswith("graph(") and "aten.convolution" in out and BN not in out
    loaded, inputs = load_model(str(path), batch=5)
    assert inputs[0].shape == (2, 3, 8, 8)  # a fixed batch dimension is kept


def test_cli_export_writes_an_optimized_onnx_file(tmp_path, capsys):
    from optcc.models import demo_model

    out_file = tmp_path / "demo.onnx"
    status = main(["export", "demo", "--passes", "bn_reparam", "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.strip() == str(out_file) and "bn_reparam" in err
    written = onnx.load(str(out_file))
    assert not any(n.op_type == "BatchNormalization" for n in written.graph.node)
    model, (x,) = demo_model()
    with torch.no_grad():
        assert output_error([model(x)], [torch.from_numpy(ort_run(out_file, x)[0])]) <= 1e-5


def test_cli_opt_keeps_names_and_metadata_and_says_shapes_became_static(tmp_path, capsys):
    torch.manual_seed(0)
    model, x = randomize_bn(ConvBNNet()).eval(), torch.randn(2, 3, 8, 8)
    source = tmp_path / "named.onnx"
    torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False, report=False,
                      input_names=["image"], output_names=["scores"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}).save(str(source))
    proto = onnx.load(str(source))
    helper.set_model_props(proto, {"author": "someone"})
    proto.doc_string = "a conv net"
    onnx.save(proto, str(source))

    out = tmp_path / "opt.onnx"
    assert main(["opt", str(source), "-o", str(out), "--passes", "bn_reparam", "--batch", "2"]) == 0
    printed, err = capsys.readouterr()
    assert printed.strip() == str(out)
    assert "has static shapes: batch=2 (image, axis 0)" in err and "wrote" in err
    written = onnx.load(str(out))
    assert [i.name for i in written.graph.input] == ["image"]
    assert [o.name for o in written.graph.output] == ["scores"]
    assert written.doc_string == "a conv net"
    props = {p.key: p.value for p in written.metadata_props}
    assert props["author"] == "someone" and "bn_reparam" in props["optcc"]
    assert not any(n.op_type == "BatchNormalization" for n in written.graph.node)
    assert not any(n.op_type == "Constant" for n in written.graph.node)  # shape arithmetic folded
    (expected,) = ort_run(source, x)
    (got,) = ort_run(out, x)
    assert output_error([torch.from_numpy(expected)], [torch.from_numpy(got)]) <= 1e-5


@pytest.mark.parametrize("argv, message", [
    (["opt", "IN", "-o", "IN"], "is the input file"),
    (["opt", "IN", "-o", "out.txt"], "reads and writes ONNX files"),
    (["opt", "IN", "-o", "OUT", "--dim", "batch"], "--dim takes NAME=SIZE"),
    (["opt", "IN", "-o", "OUT", "--dim", "batch=0"], "--dim takes NAME=SIZE"),
])
def test_cli_opt_usage_errors(net_and_onnx, tmp_path, capsys, argv, message):
    _, _, path = net_and_onnx
    argv = [str(path) if a == "IN" else str(tmp_path / "out.onnx") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("optcc: error: ") and message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------
# Bad files: one clear error each (OnnxError from the API, exit status 2 from the CLI)


def _bad_files(tmp_path, good_path) -> dict:
    data = good_path.read_bytes()
    files = {
        "empty": (b"", "is empty"),
        "text": (b"hello, this is not a model\n" * 4, "not a readable ONNX file|not a valid ONNX model"),
        "truncated to 10%": (data[: len(data) // 10], "not a readable ONNX file|not a valid ONNX model"),
        "truncated to 60%": (data[: len(data) * 6 // 10], "not a readable ONNX file|not a valid ONNX model"),
        "truncated by one byte": (data[:-1], "not a readable ONNX file|not a valid ONNX model|without outputs"),
        "random bytes": (np.random.default_rng(0).bytes(2000), "not a readable ONNX file|not a valid ONNX model"),
    }
    written = {}
    for name, (content, message) in files.items():
        path = tmp_path / (name.replace(" ", "_").replace("%", "") + ".onnx")
        path.write_bytes(content)
        written[name] = (path, message)
    return written


def test_corrupt_and_truncated_files_raise_a_clear_error(net_and_onnx, tmp_path):
    _, _, good = net_and_onnx
    for name, (path, message) in _bad_files(tmp_path, good).items():
        with pytest.raises(OnnxError, match=message) as info:
            load_onnx(path)
        assert str(path) in str(info.value), name
        assert "re-export" in str(info.value), name  # says what to do


def test_every_cut_of_a_file_is_refused(net_and_onnx, tmp_path):
    """Truncation anywhere gives OnnxError, never another exception or a wrong model."""
    _, _, good = net_and_onnx
    data = good.read_bytes()
    path = tmp_path / "cut.onnx"
    for cut in range(0, len(data), max(1, len(data) // 40)):
        path.write_bytes(data[:cut])
        with pytest.raises(OnnxError):
            load_onnx(path)


def test_unsupported_op_names_it(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(OnnxError, match="uses ONNX ops optcc cannot import: Det; supported: .*Conv"):
        load_onnx(path)


@pytest.mark.parametrize("case", ["missing", "truncated", "empty"])
def test_cli_bad_onnx_file_exits_2_with_one_line(net_and_onnx, tmp_path, capsys, case):
    _, _, good = net_and_onnx
    path = tmp_path / f"{case}.onnx"
    if case == "truncated":
        path.write_bytes(good.read_bytes()[:300])
    elif case == "empty":
        path.write_bytes(b"")
    status = main(["dump", str(path)])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optcc: error: ") and str(path) in lines[0]
    assert "Traceback" not in err
