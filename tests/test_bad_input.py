"""Bad input gets one clear error that names the problem - from the Python API, the
torch.compile backend and the CLI (exit status 2, no traceback without --debug) - and
never a wrong result. Files are loaded without running code from them."""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from helpers import randomize_bn

import optcc
from optcc import pass_base
from optcc.cli import main
from optcc.compiler import InputMismatchError
from optcc.pass_manager import output_error


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


class DataDependent(nn.Module):
    """Branches on a tensor's value: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        return y * 2 if y.sum().item() > 0 else y - 1


class WithOptions(optcc.Pass):
    """A pass with typed options (for the option checks)."""

    name = "with_options_for_test"
    exact = False

    @dataclass
    class Options:
        threshold: float = 6.0
        kernel: str = "relu"

    def run(self, gm):
        return optcc.PassResult(gm, False, {})


@pytest.fixture
def registered_test_pass(monkeypatch):
    monkeypatch.setitem(pass_base._REGISTRY, WithOptions.name, WithOptions)


def run_cli(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_user_error(status, out, err, message):
    assert status == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optcc: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------
# Passes and options


def test_unknown_pass_and_options_through_the_api(registered_test_pass):
    model, x = ConvNet().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(optcc.UnknownPassError, match="unknown pass 'bn_fold'; known passes: .*bn_reparam"):
        optcc.compile(model, ["bn_fold"], example_inputs=(x,))
    with pytest.raises(optcc.OptionError, match="has no option 'treshold' \\(its options: kernel, threshold\\)"):
        optcc.compile(model, [(WithOptions.name, {"treshold": 1.0})], example_inputs=(x,))
    with pytest.raises(optcc.OptionError, match="option 'threshold' of pass 'with_options_for_test' must be float, "
                                                "got str 'high'"):
        optcc.compile(model, [(WithOptions.name, {"threshold": "high"})], example_inputs=(x,))
    with pytest.raises(TypeError, match="a pass is given as a name, a \\(name, options-dict\\) pair or a Pass"):
        optcc.compile(model, [("bn_reparam", "threshold=1")], example_inputs=(x,))
    with pytest.raises(optcc.TargetError, match="unknown target 'cuda'"):
        optcc.compile(model, example_inputs=(x,), target="cuda")


def test_backend_refuses_unknown_pass_and_option_types(registered_test_pass):
    torch._dynamo.reset()
    for options, message in [({"passes": ["bn_fold"]}, "unknown pass 'bn_fold'"),
                             ({"passes": [(WithOptions.name, {"threshold": "x"})]}, "must be float, got str"),
                             ({"pass": ["bn_reparam"]}, "unknown optcc backend option")]:
        compiled = torch.compile(ConvNet().eval(), backend="optcc", options=options)
        with pytest.raises(Exception, match=message):
            compiled(torch.randn(1, 3, 8, 8))
        torch._dynamo.reset()


@pytest.mark.parametrize("passes, message", [
    ("bn_fold", "unknown pass 'bn_fold'"),
    ("with_options_for_test(treshold=1.0)", "has no option 'treshold'"),
    ("with_options_for_test(threshold='high')", "must be float, got str 'high'"),
    ("with_options_for_test(threshold=1.0", "unbalanced brackets"),
])
def test_cli_bad_passes(capsys, registered_test_pass, passes, message):
    assert_one_line_user_error(*run_cli(capsys, "dump", "demo", "--passes", passes), message)


# ----------------------------------------------------------------------------------------
# Models that cannot be captured


def test_model_that_fails_to_capture_runs_eagerly_with_a_warning_or_fails_fast():
    model, x = DataDependent().eval(), torch.randn(2, 4)
    with pytest.warns(UserWarning, match=r"could not trace the model at .*test_bad_input.py:\d+ in forward.*"
                                         r"uses a tensor's value as a Python value.*running the model eagerly"):
        compiled = optcc.compile(model, example_inputs=(x,), target="eager")
    assert compiled.graph_module is None
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    with pytest.raises(optcc.CaptureError, match="could not trace the model"):
        optcc.compile(model, example_inputs=(x,), target="eager", fail_fast=True)


def test_cli_model_that_fails_to_capture_exits_2(capsys, tmp_path):
    path = tmp_path / "branchy.py"
    path.write_text(
        "import torch\n\n"
        "class Branchy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2 if x.sum().item() > 0 else x - 1\n\n"
        "def build():\n"
        "    return Branchy(), (torch.randn(2, 4),)\n")
    status, out, err = run_cli(capsys, "dump", f"{path}:build")
    assert_one_line_user_error(status, out, err, "could not trace the model at")
    assert "branchy.py:5" in err  # the model's own line


# ----------------------------------------------------------------------------------------
# Inputs to a compiled module


@pytest.fixture
def compiled_convnet():
    model = randomize_bn(ConvNet()).eval()
    return model, optcc.compile(model, ["bn_reparam"], example_inputs=(torch.randn(2, 3, 8, 8),), target="eager")


@pytest.mark.parametrize("inputs, model_says", [
    ((torch.randn(2, 3, 8, 8, dtype=torch.float64),), "Input type"),  # wrong dtype
    ((torch.randn(2, 5, 8, 8),), "expected input"),  # wrong channel count
    ((torch.randn(8),), "Expected 3D"),  # wrong rank
    ((torch.randn(2, 3, 8, 8), torch.randn(2)), "positional argument"),  # wrong count
])
def test_inputs_the_model_cannot_run_give_a_clear_error(compiled_convnet, inputs, model_says):
    model, compiled = compiled_convnet
    with pytest.raises(InputMismatchError) as info:
        compiled(*inputs)
    message = str(info.value)
    assert "cannot run on the inputs" in message and "compiled for (float32[2, 3, 8, 8]@cpu)" in message
    assert model_says in message  # the model's own error
    assert len(compiled.pipeline.cache) == 1  # nothing cached for the bad inputs
    with torch.no_grad():  # and the module still works
        x = torch.randn(2, 3, 8, 8)
        assert output_error([model(x)], [compiled(x)]) <= 1e-5


def test_inputs_the_model_can_run_are_specialised_for(compiled_convnet):
    """A new shape compiles a specialisation and is correct; then the BatchNorm2d model's
    own check rejects an unbatched image, and so does the compiled module."""
    model, compiled = compiled_convnet
    for x in (torch.randn(5, 3, 6, 10), torch.randn(1, 3, 1, 1)):
        with torch.no_grad():
            assert output_error([model(x)], [compiled(x)]) <= 1e-5
    with pytest.raises(InputMismatchError, match="ValueError: expected 4D input \\(got 3D input\\)"):
        compiled(torch.randn(3, 8, 8))


def test_backend_with_a_wrong_dtype_raises_the_model_error():
    torch._dynamo.reset()
    model = ConvNet().eval()
    compiled = torch.compile(model, backend="optcc")
    compiled(torch.randn(1, 3, 8, 8))
    with pytest.raises(Exception, match="Input type|should be the same|expected"):
        compiled(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------
# Files and model specs on the command line


class Payload:
    """Unpickling this creates a directory: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _pt2_with_pickle_payload(tmp_path):
    source = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),)), source)
    marker = tmp_path / "code_ran"
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(crafted, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(("sample_inputs/model.pt", "weights/weight_0")):
                data = buffer.getvalue()
            dst.writestr(item, data)
    return crafted, marker


def test_pt2_with_a_pickle_payload_is_refused_without_running_it(capsys, tmp_path):
    crafted, marker = _pt2_with_pickle_payload(tmp_path)
    status, out, err = run_cli(capsys, "dump", str(crafted))
    assert_one_line_user_error(status, out, err, "could not be loaded")
    assert not marker.exists()


def _spec_cases(tmp_path):
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),)), good)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_zip = tmp_path / "weights.pt2"
    not_zip.write_bytes(b"\x80\x04not a zip")
    directory = tmp_path / "folder.pt2"
    directory.mkdir()
    broken_factory = tmp_path / "broken.py"
    broken_factory.write_text("import torch\nraise RuntimeError('factory module is broken')\n")
    return {
        "truncated pt2": ([str(truncated)], "is not a torch.export archive"),
        "pt2 that is not a zip": ([str(not_zip)], "is not a torch.export archive"),
        "pt2 that is a directory": ([str(directory)], "no such file"),
        "missing onnx": ([str(tmp_path / "absent.onnx")], "no such file"),
        "unimportable factory file": ([f"{broken_factory}:build"], "importing"),
        "py without factory": ([str(broken_factory)], "name the function that builds the model"),
        "timm without a name": (["timm:"], "name the timm model"),
        "unknown spec": (["resnet50"], "a model spec is"),
        "zero batch": (["demo", "--batch", "0"], "batch size must be at least 1"),
        "batch for a pt2": ([str(good), "--batch", "2"], "--batch applies to"),
    }


CASES = ["truncated pt2", "pt2 that is not a zip", "pt2 that is a directory", "missing onnx",
         "unimportable factory file", "py without factory", "timm without a name", "unknown spec", "zero batch",
         "batch for a pt2"]


@pytest.mark.parametrize("case", CASES)
def test_cli_model_specs_that_do_not_resolve(capsys, tmp_path, case):
    argv, message = _spec_cases(tmp_path)[case]
    assert_one_line_user_error(*run_cli(capsys, "dump", *argv), message)


def test_debug_shows_the_traceback_for_a_bad_file(capsys, tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"garbage")
    status, _, err = run_cli(capsys, "--debug", "dump", str(path))
    assert status == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("optcc: error: ")
