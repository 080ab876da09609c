"""optcc's ONNX importer on ONNX's own backend model tests, and on single-node models.

Every model directory of ``onnx/backend/test/data/{pytorch-converted, pytorch-operator,
simple}`` (a ``model.onnx`` with ``test_data_set_*`` inputs and expected outputs) and every
``light/light_*.onnx`` model (input ``arange(n) / n`` as ONNX's runner makes it, expected
output ``light_*_output_0.pb``, and onnxruntime on the same input) is imported with
:class:`optcc.onnx_io.OnnxModule` and run. A model either matches, or is refused with one
clean one-line :class:`OnnxError` that names every op it cannot import; it is refused only
if it is listed in :data:`REFUSED` (and every model listed there must be refused), so a model
that stops importing, or starts, fails here. Any numerical mismatch fails.

Tolerance (fp32): ``|got - expected| <= RTOL * |expected| + ATOL * max(1, max|expected|)``
elementwise, NaN where expected is NaN; shapes and dtypes must match exactly.

The second half builds single-node models for the opset-dependent semantics and the
padding/pooling corners the corpus does not reach, compared with onnxruntime (or, where
onnxruntime has no kernel, the formula in the ONNX spec), and checks that what the importer
cannot honour is refused with the op, the opset and the setting named.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from optcc.onnx_io import SUPPORTED_OPS, OnnxError, OnnxModule, read_onnx

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
RTOL, ATOL = 1e-4, 1e-5

#: The models refused today, each with what its refusal names.
REFUSED = {
    # data-dependent shapes: Expand's shape is a graph input
    **{f"test_expand_shape_model{i}": "Expand (opset 9): input 1 ('shape') is computed from the graph inputs"
       for i in range(1, 5)},
    # training ops
    "test_gradient_of_add": "ai.onnx.preview.training::Gradient",
    "test_gradient_of_add_and_mul": "ai.onnx.preview.training::Gradient",
    # sequences (lists of tensors): not a torch.fx value
    "test_sequence_model1": "SequenceAt, SequenceEmpty, SequenceInsert",
    "test_sequence_model2": "SequenceAt, SequenceConstruct, SequenceErase",
    "test_sequence_model3": "SequenceAt, SequenceConstruct, SequenceErase, SequenceInsert",
    "test_sequence_model4": "ConcatFromSequence, SequenceConstruct",
    "test_sequence_model5": "ConcatFromSequence, SequenceConstruct",
    "test_sequence_model6": "SequenceLength, SplitToSequence",
    "test_sequence_model7": "SequenceAt, SplitToSequence",
    "test_sequence_model8": "SequenceLength, SplitToSequence",
    # strings
    **{f"test_strnorm_model_{s}": "StringNormalizer" for s in (
        "monday_casesensintive_lower", "monday_casesensintive_nochangecase", "monday_casesensintive_upper",
        "monday_empty_output", "monday_insensintive_upper_twodim", "nostopwords_nochangecase")},
}


def _corpus() -> list[tuple[str, str, Path]]:
    cases = []
    for folder in ("pytorch-converted", "pytorch-operator", "simple"):
        for model in sorted((DATA / folder).glob("*/model.onnx")):
            cases.append((folder, model.parent.name, model))
    for model in sorted((DATA / "light").glob("*.onnx")):
        cases.append(("light", model.stem, model))
    return cases


CORPUS = _corpus()


def _tensor(path) -> np.ndarray:
    return numpy_helper.to_array(onnx.load_tensor(str(path)))


def _data_sets(folder: str, model_path: Path, proto) -> list[tuple[list[np.ndarray], list[np.ndarray] | None]]:
    if folder != "light":
        return [([_tensor(p) for p in sorted(glob.glob(f"{d}/input_*.pb"))],
                 [_tensor(p) for p in sorted(glob.glob(f"{d}/output_*.pb"))])
                for d in sorted(glob.glob(f"{model_path.parent}/test_data_set_*"))]
    inits = {t.name for t in proto.graph.initializer}
    inputs = []
    for spec in proto.graph.input:  # what onnx.backend.test.runner feeds a light model
        if spec.name not in inits:
            shape = tuple(d.dim_value or 1 for d in spec.type.tensor_type.shape.dim)
            inputs.append((np.arange(int(np.prod(shape))).reshape(shape) / np.prod(shape)).astype(np.float32))
    expected = [model_path.with_name(f"{model_path.stem}_output_{i}.pb") for i in range(len(proto.graph.output))]
    return [(inputs, [_tensor(p) for p in expected] if all(p.exists() for p in expected) else None)]


def _onnxruntime(model_path: Path, proto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs)))


def assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    if expected.dtype == np.bool_ or np.issubdtype(expected.dtype, np.integer):
        assert np.array_equal(got, expected), f"{what}: values differ"
        return
    got64, exp64 = got.astype(np.float64), expected.astype(np.float64)
    nan = np.isnan(exp64)
    assert np.array_equal(np.isnan(got64), nan), f"{what}: NaN where expected is not (or not where it is)"
    infinite = np.isinf(exp64)
    assert np.array_equal(got64[infinite], exp64[infinite]), f"{what}: infinities differ"
    nan |= infinite
    scale = max(1.0, float(np.abs(exp64[~nan]).max(initial=0.0)))
    error = np.abs(got64 - exp64)[~nan]
    bound = (RTOL * np.abs(exp64) + ATOL * scale)[~nan]
    assert np.all(error <= bound), f"{what}: max error {error.max():.3g} (tolerance {bound.max():.3g})"


def _refusal_checked(name: str, proto, exc: OnnxError) -> None:
    message = str(exc)
    assert len(message.splitlines()) == 1, f"{name}: the refusal spans several lines: {message!r}"
    assert name in REFUSED, f"{name} is refused but not listed in REFUSED: {message}"
    unsupported = {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node}
    unsupported -= SUPPORTED_OPS
    head = message.split("; supported: ")[0]
    missing = [op for op in sorted(unsupported) if op not in head]
    assert not missing, f"{name}: the refusal does not name {missing}: {message}"
    assert REFUSED[name] in head, f"{name}: expected the refusal to name {REFUSED[name]!r}: {message}"


@pytest.mark.parametrize("folder,name,model_path", CORPUS, ids=[f"{f}/{n}" for f, n, _ in CORPUS])
def test_backend_model(folder, name, model_path):
    proto = read_onnx(model_path)
    try:
        module = OnnxModule(proto, source=name)
    except OnnxError as exc:
        _refusal_checked(name, proto, exc)
        return
    assert name not in REFUSED, f"{name} is listed in REFUSED but imports"
    for inputs, expected in _data_sets(folder, model_path, proto):
        with torch.no_grad():
            got = module(*[torch.from_numpy(x.copy()) for x in inputs])
        got = [t.numpy() for t in (got if isinstance(got, tuple) else (got,))]
        references = {"expected output": expected} if expected is not None else {}
        if folder == "light" or expected is None:
            references["onnxruntime"] = _onnxruntime(model_path, proto, inputs)
        for source, outputs in references.items():
            assert len(got) == len(outputs)
            for i, (g, e) in enumerate(zip(got, outputs)):
                assert_close(g, e, f"{name} output {i} vs {source}")


def test_refused_list_names_models_of_the_corpus():
    assert set(REFUSED) <= {name for _, name, _ in CORPUS}


# ----------------------------------------------------------------------------------------
# Single-node models


def _i64(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _f32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _node_model(op: str, x_shape, opset: int, constants=(), outputs: int = 1, **attrs):
    """``op(x, *constants)``; a constant of None is an absent optional input."""
    inits, names = [], ["x"]
    for i, value in enumerate(constants):
        names.append("" if value is None else f"c{i}")
        if value is not None:
            inits.append(numpy_helper.from_array(np.asarray(value), f"c{i}"))
    out_names = [f"y{i}" for i in range(outputs)]
    graph = helper.make_graph([helper.make_node(op, names, out_names, **attrs)], op,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_empty_tensor_value_info(o) for o in out_names], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run_both(model, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})
    with torch.no_grad():
        got = OnnxModule(model)(torch.from_numpy(x.copy()))
    return [t.numpy() for t in (got if isinstance(got, tuple) else (got,))], expected


_RNG = np.random.default_rng(0)
_W = _f32(_RNG.standard_normal((3, 2, 3, 2)))
_WT = _f32(_RNG.standard_normal((2, 3, 3, 3)))
NODE_CASES = [
    # Softmax family: opset < 13 coerces to 2-D at axis (default 1), 13 runs over axis (default -1)
    *[(op, (2, 3, 4, 5), opset, (), 1, ({} if axis is None else {"axis": axis}))
      for op in ("Softmax", "LogSoftmax", "Hardmax") for opset in (11, 13) for axis in (None, 0, 1, 2, -1, -3)],
    ("Softmax", (2, 1000, 1, 1), 9, (), 1, {}),  # squeezenet's head
    # Pad: attribute (opset 2-10) or inputs; constant/reflect/edge/wrap; negative pads crop; axes (18)
    *[("Pad", (2, 3, 4, 5), 11, (_i64(0, 1, 2, -1, 1, 0, 1, 2), _f32(1.5) if mode == "constant" else None), 1,
       {"mode": mode}) for mode in ("constant", "reflect", "edge")],
    *[("Pad", (2, 3, 4, 5), 18, (_i64(2, 3, 1, 1), None, _i64(1, -1)), 1, {"mode": mode})
      for mode in ("constant", "reflect", "edge")],
    ("Pad", (2, 3, 4, 5), 19, (_i64(0, 0, 2, 3, 0, 0, 1, 2),), 1, {"mode": "wrap"}),
    ("Pad", (2, 3, 4), 19, (_i64(1, 2, 0, 0, 1, 2),), 1, {"mode": "wrap"}),
    ("Pad", (2, 3), 11, (_i64(1, 1, 1, 1),), 1, {"mode": "reflect"}),
    ("Pad", (1, 2, 4, 4), 10, (), 1, {"mode": "edge", "pads": [0, 0, 3, 1, 0, 0, 2, 0]}),
    # Split: equal parts by output count (< 13), sizes input, num_outputs (18, last part smaller)
    ("Split", (2, 6), 11, (), 3, {"axis": 1}),
    ("Split", (2, 6), 13, (_i64(1, 2, 3),), 3, {"axis": 1}),
    ("Split", (2, 7), 18, (), 3, {"axis": 1, "num_outputs": 3}),
    # Slice with negative steps; Clip bounds as attributes (< 11) or optional inputs
    ("Slice", (5, 6), 13, (_i64(4, -1), _i64(0, 0), _i64(0, 1), _i64(-2, -2)), 1, {}),
    ("Slice", (5, 6), 13, (_i64(-1), _i64(-100), _i64(1), _i64(-1)), 1, {}),
    ("Clip", (3, 4), 6, (), 1, {"min": -0.5, "max": 0.3}),
    ("Clip", (3, 4), 6, (), 1, {"min": -0.5}),
    ("Clip", (3, 4), 13, (None, _f32(0.2)), 1, {}),
    # Flatten's axis runs to the rank
    *[("Flatten", (2, 3, 4), 13, (), 1, {"axis": axis}) for axis in (0, 3, -1)],
    # auto_pad SAME_* / VALID for convolution and pooling
    *[(op, (1, 2, 7, 8), 11, (_W,) if op == "Conv" else (), 1,
       {"auto_pad": pad, "strides": [s, s], **({} if op == "Conv" else {"kernel_shape": [3, 2]})})
      for op in ("Conv", "MaxPool", "AveragePool") for pad in ("SAME_UPPER", "SAME_LOWER", "VALID") for s in (1, 2)],
    ("AveragePool", (1, 2, 7, 8), 11, (), 1, {"auto_pad": "SAME_UPPER", "kernel_shape": [3, 2], "strides": [2, 2],
                                              "count_include_pad": 1}),
    # pooling: asymmetric pads, ceil_mode (a window starting in the right padding is dropped), count_include_pad
    *[("AveragePool", (1, 2, 7, 8), 19, (), 1, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": pads,
                                                "ceil_mode": ceil, "count_include_pad": cip})
      for pads in ([0, 1, 1, 0], [1, 1, 1, 1], [2, 0, 1, 2]) for ceil in (0, 1) for cip in (0, 1)],
    *[("MaxPool", (1, 2, 9, 8), 12, (), 1, {"kernel_shape": [3, 3], "strides": [2, 1], "pads": pads, "ceil_mode": ceil,
                                            "dilations": [2, 1]})
      for pads in ([0, 1, 1, 0], [1, 1, 1, 1], [2, 0, 1, 2]) for ceil in (0, 1)],
    # ConvTranspose with asymmetric pads
    ("ConvTranspose", (1, 2, 5, 5), 11, (_WT, _f32(_RNG.standard_normal(3))), 1,
     {"pads": [0, 1, 2, 1], "strides": [2, 2]}),
    ("ConvTranspose", (1, 2, 5, 5), 11, (_WT,), 1, {"pads": [1, 0, 0, 1], "strides": [2, 1], "output_padding": [1, 0]}),
    # ops added for the corpus, on settings it does not reach
    *[("LRN", (2, 7, 3, 3), 13, (), 1, {"size": size, "alpha": 0.3, "beta": 0.6, "bias": 1.5}) for size in (3, 5)],
    ("PRelu", (2, 3, 4), 16, (_f32(_RNG.standard_normal((3, 1))),), 1, {}),
    ("PRelu", (2, 3, 4), 16, (_f32(_RNG.standard_normal(4)),), 1, {}),
    ("Selu", (3, 4), 6, (), 1, {"alpha": 1.2, "gamma": 0.7}),
    ("Shrink", (10,), 9, (), 1, {"lambd": 0.4, "bias": 0.1}),
    ("Tile", (2, 3), 13, (_i64(2, 3),), 1, {}),
    ("Softsign", (3, 4), 13, (), 1, {}),
    # Dropout: identity, with a mask of ones when asked (opset 12: ratio input)
    ("Dropout", (3, 4), 13, (), 2, {}),
    ("Dropout", (3, 4), 12, (_f32(0.3),), 2, {}),
    # BatchNormalization's spatial=0 (opset 7-8): statistics per channel and position
    ("BatchNormalization", (2, 3, 4), 7, (_f32(_RNG.uniform(0.5, 1.5, (3, 4))), _f32(_RNG.standard_normal((3, 4))),
                                          _f32(_RNG.standard_normal((3, 4))), _f32(_RNG.uniform(0.5, 1.5, (3, 4)))),
     1, {"spatial": 0}),
    ("ReduceMean", (2, 3, 4), 18, (np.zeros(0, np.int64),), 1, {"noop_with_empty_axes": 1}),
    ("LayerNormalization", (2, 3, 4), 17, (_f32(np.full(4, 1.5)),), 1, {"axis": -2}),
    # Resize: the settings that are one of torch's interpolations, by sizes (up and down) or scales
    *[("Resize", (1, 2, 5, 6), 13, (None, None, _i64(*size)), 1, {"mode": mode, **attrs})
      for size in ((1, 2, 8, 9), (1, 2, 3, 4), (1, 2, 7, 2))
      for mode, attrs in (("nearest", {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
                          ("nearest", {"nearest_mode": "round_prefer_ceil"}),
                          ("linear", {}), ("linear", {"coordinate_transformation_mode": "align_corners"}),
                          ("linear", {"coordinate_transformation_mode": "pytorch_half_pixel"}),
                          ("cubic", {}), ("cubic", {"coordinate_transformation_mode": "align_corners"}))],
    *[("Resize", (1, 2, 5, 6), 13, (None, _f32([1, 1, *scale])), 1, {"mode": mode, **attrs})
      for scale in ((2.0, 1.5), (0.6, 1.7))
      for mode, attrs in (("nearest", {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
                          ("linear", {}), ("cubic", {}))],
    ("Resize", (1, 2, 5, 6), 11, (_f32([]), _f32([1, 1, 2, 2])), 1,
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    ("Resize", (1, 2, 7), 19, (None, None, _i64(1, 2, 12)), 1, {"mode": "linear"}),
    # reductions beyond the four basic ones, axes as an attribute (13) and as an input (18)
    *[(op, (2, 3, 4), opset, (_i64(1, -1),) if opset == 18 else (), 1, {} if opset == 18 else {"axes": [1, -1]})
      for op in ("ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp") for opset in (13, 18)],
    ("ReduceL2", (2, 3, 4), 18, (), 1, {"keepdims": 0}),
    # order and index ops (random values: no ties; ties are checked below)
    *[(op, (3, 4), 13, (), 1, attrs) for op in ("ArgMax", "ArgMin")
      for attrs in ({}, {"axis": 1, "keepdims": 0}, {"axis": -1, "select_last_index": 1})],
    *[("CumSum", (3, 4), 14, (_i64(axis),), 1, attrs) for axis in (0, -1)
      for attrs in ({}, {"exclusive": 1}, {"reverse": 1}, {"exclusive": 1, "reverse": 1})],
    *[("TopK", (3, 5), 11, (_i64(2),), 2, attrs) for attrs in ({}, {"largest": 0}, {"axis": 0})],
    *[("Trilu", (3, 4), 14, k, 1, attrs) for k in ((), (_i64(1),), (_i64(-1),)) for attrs in ({}, {"upper": 0})],
    ("Einsum", (2, 3, 4), 12, (_f32(_RNG.standard_normal((4, 5))),), 1, {"equation": "bij,jk->bik"}),
    ("Einsum", (2, 3, 4), 12, (), 1, {"equation": "bij->bji"}),
    ("ScatterElements", (3, 4), 18, (_i64(2, 0, 1, 0, 1, 2, 0, 1).reshape(2, 4), _f32(_RNG.standard_normal((2, 4)))),
     1, {"axis": 0}),
    *[("ScatterElements", (3, 4), 18, (_i64(1, 1, 3, 0, 1, 1).reshape(3, 2), _f32(_RNG.standard_normal((3, 2)))),
       1, {"axis": 1, "reduction": reduction}) for reduction in ("add", "mul", "max", "min")],
    ("ScatterND", (4, 3), 18, (_i64(1, -1).reshape(2, 1), _f32(_RNG.standard_normal((2, 3)))), 1, {}),
    ("ScatterND", (4, 3), 18, (_i64(1, 2, 1, 2, 0, 0).reshape(3, 2), _f32(_RNG.standard_normal(3))), 1,
     {"reduction": "add"}),
    ("DepthToSpace", (1, 8, 2, 3), 13, (), 1, {"blocksize": 2}),
    ("DepthToSpace", (1, 8, 2, 3), 13, (), 1, {"blocksize": 2, "mode": "CRD"}),
    ("SpaceToDepth", (1, 2, 4, 6), 13, (), 1, {"blocksize": 2}),
    ("Mean", (3, 4), 13, (_f32(_RNG.standard_normal((3, 4))), _f32(_RNG.standard_normal(4))), 1, {}),
    ("ThresholdedRelu", (3, 4), 10, (), 1, {"alpha": 0.3}),
    ("Mod", (3, 4), 13, (_f32(_RNG.uniform(0.5, 2.0, (3, 4)) * np.sign(_RNG.standard_normal((3, 4)))),), 1,
     {"fmod": 1}),
    # GatherElements / GatherND with negative indices and batch_dims
    ("GatherElements", (3, 4), 13, (_i64(0, -1, 2, 1, 3, 0).reshape(3, 2),), 1, {"axis": 1}),
    ("GatherElements", (3, 4), 13, (_i64(2, -1, 0, 1).reshape(1, 4),), 1, {}),
    ("GatherND", (2, 3, 4), 13, (_i64(0, 1, 1, -1, 1, 2).reshape(3, 2),), 1, {}),
    ("GatherND", (2, 3, 4), 13, (_i64(1, 0).reshape(2, 1),), 1, {}),
    ("GatherND", (2, 3, 4), 13, (_i64(2, 0, -1, 3).reshape(2, 1, 2),), 1, {"batch_dims": 1}),
    ("GatherND", (2, 3, 4), 12, (_i64(1, 0, 2, 1).reshape(2, 2),), 1, {"batch_dims": 1}),
    ("Resize", (1, 1, 3, 4, 5), 19, (None, None, _i64(1, 1, 5, 3, 7)), 1, {"mode": "linear"}),
]


@pytest.mark.parametrize("op,shape,opset,constants,outputs,attrs", NODE_CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(NODE_CASES)])
def test_node_matches_onnxruntime(op, shape, opset, constants, outputs, attrs):
    model = _node_model(op, shape, opset, constants, outputs, **attrs)
    x = _f32(np.random.default_rng(1).standard_normal(shape))
    got, expected = _run_both(model, x)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, f"{op} (opset {opset}) {attrs} output {i}")


@pytest.mark.parametrize("op,attrs", [("IsNaN", {}), ("IsInf", {}), ("IsInf", {"detect_negative": 0}),
                                      ("IsInf", {"detect_positive": 0}), ("Floor", {}), ("Ceil", {}), ("Round", {})])
def test_special_values_and_halves(op, attrs):
    """NaN, infinities and exact halves (Round: to even), which random inputs never hit."""
    x = _f32([np.nan, np.inf, -np.inf, 0.5, 1.5, -2.5, 2.4, -0.7, 3.0, -np.inf, np.nan, 2.5]).reshape(3, 4)
    got, expected = _run_both(_node_model(op, (3, 4), 20, **attrs), x)
    np.testing.assert_array_equal(got[0], expected[0])


@pytest.mark.parametrize("op,low,high", [("Tan", -1.2, 1.2), ("Asin", -0.95, 0.95), ("Acos", -0.95, 0.95),
                                         ("Atan", -3, 3), ("Sinh", -3, 3), ("Cosh", -3, 3), ("Asinh", -3, 3),
                                         ("Acosh", 1.0, 4.0), ("Atanh", -0.95, 0.95)])
def test_trigonometric_ops_on_their_domain(op, low, high):
    x = _f32(np.random.default_rng(2).uniform(low, high, (3, 4)))
    got, expected = _run_both(_node_model(op, (3, 4), 13), x)
    assert_close(got[0], expected[0], op)


def test_reduce_log_sum_of_positive_values():
    x = _f32(np.random.default_rng(3).uniform(0.1, 2.0, (2, 3, 4)))
    got, expected = _run_both(_node_model("ReduceLogSum", (2, 3, 4), 18, (_i64(1),)), x)
    assert_close(got[0], expected[0], "ReduceLogSum")


@pytest.mark.parametrize("op,attrs", [("ArgMax", {}), ("ArgMax", {"select_last_index": 1}), ("ArgMin", {}),
                                      ("ArgMin", {"select_last_index": 1}), ("TopK", {}), ("TopK", {"largest": 0})])
def test_ties_pick_the_index_onnx_names(op, attrs):
    """ArgMax/ArgMin: the first extreme index unless select_last_index; TopK: lower index first."""
    x = _f32([[1, 3, 3, 0, 3], [2, 2, 2, 2, 2], [0, -1, 5, -1, 5]])
    constants, outputs = ((_i64(3),), 2) if op == "TopK" else ((), 1)
    got, expected = _run_both(_node_model(op, x.shape, 13, constants, outputs, **({"axis": 1} | attrs)), x)
    for g, e in zip(got, expected):
        assert_close(g, e, f"{op} {attrs}")


def test_lrn_even_size_follows_the_spec():
    """onnxruntime only takes odd sizes; ONNX's window is [c - floor((size-1)/2), c + ceil((size-1)/2)]."""
    x = _f32(np.random.default_rng(2).standard_normal((2, 7, 3, 3)))
    for size in (2, 4, 5):
        model = _node_model("LRN", x.shape, 13, size=size, alpha=0.3, beta=0.6, bias=1.5)
        with torch.no_grad():
            got = OnnxModule(model)(torch.from_numpy(x)).numpy()
        square_sum = np.zeros_like(x)
        for c in range(x.shape[1]):
            low, high = max(0, c - (size - 1) // 2), min(x.shape[1] - 1, c + -(-(size - 1) // 2))
            square_sum[:, c] = (x[:, low:high + 1] ** 2).sum(axis=1)
        assert_close(got, x / (1.5 + 0.3 / size * square_sum) ** 0.6, f"LRN size {size}")


def test_legacy_broadcast_lines_b_up_from_axis():
    """Before opset 7, ``broadcast=1, axis=k`` aligns B with A's dimensions from k (onnxruntime
    has no kernel for those opsets)."""
    a = _f32(np.random.default_rng(3).standard_normal((2, 3, 4)))
    for b, axis, op, fn in ((_f32([1.0, 2.0, 3.0]), 1, "Add", np.add),
                            (_f32(np.arange(12).reshape(3, 4)), 1, "Mul", np.multiply),
                            (_f32([1.0, 2.0]), 0, "Sub", np.subtract),
                            (_f32(np.arange(1, 5)), None, "Div", np.divide)):
        attrs = {"broadcast": 1} if axis is None else {"broadcast": 1, "axis": axis}
        model = _node_model(op, a.shape, 6, (b,), **attrs)
        with torch.no_grad():
            got = OnnxModule(model)(torch.from_numpy(a)).numpy()
        aligned = b if axis is None else b.reshape(b.shape + (1,) * (a.ndim - axis - b.ndim))
        assert_close(got, fn(a, aligned).astype(np.float32), f"{op} broadcast axis={axis}")


def test_legacy_attribute_forms():
    """Opset-1 forms onnxruntime no longer runs: Reshape's shape, Slice's bounds and
    Concat's axis (default 1) as attributes."""
    x = _f32(np.random.default_rng(4).standard_normal((2, 3, 4)))
    for model, expected in (
        (_node_model("Reshape", x.shape, 1, shape=[0, -1]), x.reshape(2, 12)),
        (_node_model("Slice", x.shape, 1, starts=[1, -3], ends=[100, -1], axes=[1, 2]), x[:, 1:, -3:-1]),
        (_node_model("Concat", x.shape, 1), x),
    ):
        with torch.no_grad():
            assert_close(OnnxModule(model)(torch.from_numpy(x)).numpy(), expected, model.graph.node[0].op_type)


def _two_output_model(op, opset, shape, attrs, read_second: bool, constants=()):
    """``op`` with two declared outputs; the second feeds an Identity graph output when read."""
    inits, names = [], ["x"]
    for i, value in enumerate(constants):
        names.append("" if value is None else f"c{i}")
        if value is not None:
            inits.append(numpy_helper.from_array(np.asarray(value), f"c{i}"))
    nodes = [helper.make_node(op, names, ["y", "second"], **attrs)]
    outputs = [helper.make_empty_tensor_value_info("y")]
    if read_second:
        nodes.append(helper.make_node("Identity", ["second"], ["z"]))
        outputs.append(helper.make_empty_tensor_value_info("z"))
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


_BN_STATS = (_f32(np.ones(3)), _f32(np.zeros(3)), _f32(np.zeros(3)), _f32(np.ones(3)))
REFUSALS = [
    (_node_model("AveragePool", (1, 1, 8, 8), 19, kernel_shape=[2, 2], dilations=[2, 2]),
     r"AveragePool \(opset 19\): dilations=\[2, 2\] is not supported"),
    (_node_model("ConvTranspose", (1, 2, 5, 5), 11, (_WT,), auto_pad="SAME_UPPER"),
     r"ConvTranspose \(opset 11\): auto_pad='SAME_UPPER'"),
    (_node_model("ConvTranspose", (1, 2, 5, 5), 11, (_WT,), output_shape=[10, 10]),
     r"ConvTranspose \(opset 11\): attribute 'output_shape'"),
    (_node_model("Tile", (2, 3), 1, (_i64(2), _i64(0))), r"Tile \(opset 1\): version 1 of the op"),
    (_node_model("Pad", (2, 3), 1, paddings=[1, 1, 1, 1]), r"Pad \(opset 1\): version 1 of the op"),
    (_node_model("BatchNormalization", (2, 3, 4), 15, _BN_STATS, training_mode=1),
     r"BatchNormalization \(opset 15\): training mode"),
    (_node_model("BatchNormalization", (2, 3, 4), 6, _BN_STATS), r"BatchNormalization \(opset 6\): training mode"),
    (_two_output_model("BatchNormalization", 9, (2, 3, 4), {}, False, _BN_STATS),
     r"BatchNormalization \(opset 9\): training mode"),
    (_node_model("Dropout", (3, 4), 6), r"Dropout \(opset 6\): is_test=0"),
    (_node_model("Dropout", (3, 4), 13, (None, np.array(True))), r"Dropout \(opset 13\): training_mode=True"),
    (_two_output_model("Dropout", 9, (3, 4), {}, True), r"Dropout \(opset 9\): output 1 \(the mask"),
    (_two_output_model("MaxPool", 12, (1, 1, 4, 4), {"kernel_shape": [2, 2]}, True),
     r"MaxPool \(opset 12\): output 1 is not supported"),
    (_two_output_model("LayerNormalization", 17, (2, 4), {}, True, (_f32(np.ones(4)),)),
     r"LayerNormalization \(opset 17\): output 1 is not supported"),
    (_node_model("Cast", (2, 2), 21, to=TensorProto.FLOAT8E4M3FN), r"Cast \(opset 21\): cast to FLOAT8E4M3FN"),
    (_node_model("Gelu", (2, 2), 20, approximate="erf"), r"Gelu \(opset 20\): approximate='erf'"),
    (_node_model("Resize", (1, 2, 4, 4), 13, (None, None, _i64(1, 2, 8, 8))),
     r"Resize \(opset 13\): mode='nearest' with coordinate_transformation_mode='half_pixel' and "
     r"nearest_mode='round_prefer_floor' is not supported"),
    (_node_model("Resize", (1, 2, 4, 4), 13, (None, None, _i64(1, 2, 8, 8)), mode="cubic", cubic_coeff_a=-0.5),
     r"Resize \(opset 13\): cubic with cubic_coeff_a other than -0.75"),
    (_node_model("Resize", (1, 2, 4, 4), 18, (None, None, _i64(1, 2, 2, 2)), mode="linear", antialias=1),
     r"Resize \(opset 18\): antialias=1 is not supported"),
    (_node_model("Resize", (1, 2, 4, 4), 13, (_f32([0, 0, 0, 0, 1, 1, 1, 1]), None, _i64(1, 2, 2, 2)),
                 mode="linear", coordinate_transformation_mode="tf_crop_and_resize"),
     r"Resize \(opset 13\): mode='linear' with coordinate_transformation_mode='tf_crop_and_resize'"),
    (_node_model("Resize", (1, 2, 4, 4), 10, (_f32([1, 1, 2, 2]),)), r"Resize \(opset 10\): version 10 of the op"),
]


@pytest.mark.parametrize("model,message", REFUSALS,
                         ids=[f"{m.graph.node[0].op_type}-{i}" for i, (m, _) in enumerate(REFUSALS)])
def test_what_cannot_be_honoured_is_refused(model, message):
    with pytest.raises(OnnxError, match=message) as info:
        OnnxModule(model)
    assert len(str(info.value).splitlines()) == 1


def test_one_refusal_names_every_op_and_setting():
    nodes = [helper.make_node("Det", ["x"], ["a"]),
             helper.make_node("AveragePool", ["a"], ["b"], kernel_shape=[1], dilations=[2]),
             helper.make_node("Upsample", ["b", "s"], ["c"]),
             helper.make_node("Expand", ["c", "x_shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
                                           helper.make_tensor_value_info("x_shape", TensorProto.INT64, [2])],
                              [helper.make_empty_tensor_value_info("y")],
                              [numpy_helper.from_array(_f32([1, 1, 1]), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=8)
    with pytest.raises(OnnxError) as info:
        OnnxModule(model)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "cannot import: Det, Upsample; and op settings it cannot honour: " in message
    assert "AveragePool (opset 9): dilations=[2] is not supported" in message
    assert "Expand (opset 9): input 1 ('x_shape') is computed from the graph inputs' values" in message


def test_an_opset_newer_than_the_audited_one_is_refused():
    from optcc.onnx_io.ops import AUDITED_OPSET

    model = _node_model("Relu", (2,), 13)
    model.opset_import[0].version = AUDITED_OPSET + 1
    with pytest.raises(OnnxError, match=rf"Relu \(opset {AUDITED_OPSET + 1}\): opset .* newer"):
        OnnxModule(model)


def test_fold_time_constants_in_static_positions():
    """A float initializer read as Pad's constant_value is read as a number, and an Expand
    whose shape is computed from shapes folds at import."""
    x = _f32(np.random.default_rng(5).standard_normal((2, 3)))
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Concat", ["two", "s"], ["target"], axis=0),
             helper.make_node("Expand", ["x", "target"], ["e"]),
             helper.make_node("Pad", ["e", "pads", "value"], ["y"], mode="constant")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_empty_tensor_value_info("y")],
                              [numpy_helper.from_array(_i64(2), "two"),
                               numpy_helper.from_array(_i64(0, 1, 0, 0, 0, 2), "pads"),
                               numpy_helper.from_array(_f32(-7.0), "value")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    got, expected = _run_both(model, x)
    assert_close(got[0], expected[0], "Expand + Pad")
