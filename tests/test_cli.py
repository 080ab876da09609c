"""The optcc command line, run in-process through ``main`` (plus one run of the console script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optcc.cli
import optcc.dump
from optcc.cli import main, parse_passes

BN_OP = "_native_batch_norm_legit_no_training"


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


FACTORY_FILE = """
import torch

def build():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    return model, (torch.randn(1, 3, 8, 8),)

def no_inputs():
    return torch.nn.Linear(2, 2)
"""


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_passes_lists_registered_passes(capsys):
    status, out, _ = run(capsys, "passes")
    assert status == 0
    assert "bn_reparam" in out and "exact" in out
    assert "Fold eval-mode BatchNorm" in out


def test_dump_demo_text_folds_batchnorm(capsys):
    status, out, err = run(capsys, "dump", "demo", "--passes", "bn_reparam")
    assert status == 0
    assert out.startswith("graph(x: f32[1, 3, 96, 96]):")
    assert BN_OP not in out and "aten.convolution" in out
    # The report (stderr, so that stdout pipes clean graph text) has the op-count table.
    assert "op counts changed by each pass" in err
    assert f"aten.{BN_OP}" in err and "applied" in err


def test_dump_after_each_writes_one_file_per_stage(capsys, tmp_path):
    status, out, _ = run(capsys, "dump", "demo", "--passes", "bn_reparam", "--after-each", "--out", str(tmp_path))
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_captured.txt", "01_bn_reparam.txt"]
    assert BN_OP in (tmp_path / "00_captured.txt").read_text()  # the graph before the pass
    assert BN_OP not in (tmp_path / "01_bn_reparam.txt").read_text()
    assert "00_captured.txt" in out


def test_dump_after_each_to_stdout_has_a_header_per_stage(capsys):
    status, out, _ = run(capsys, "dump", "demo", "--passes", "bn_reparam", "--after-each")
    assert status == 0
    assert "# 00 after captured" in out and "# 01 after bn_reparam" in out
    captured, folded = out.split("# 01 after bn_reparam")
    assert BN_OP in captured and BN_OP not in folded


@pytest.mark.parametrize("fmt, files, marker", [
    ("dot", ["00_captured.dot", "01_bn_reparam.dot"], "digraph"),
    ("html", ["dump.html"], "<!doctype html>"),
    ("onnx", ["00_captured.onnx", "01_bn_reparam.onnx"], None),
    ("pt2", ["00_captured.pt2", "01_bn_reparam.pt2"], None),
])
def test_dump_dot_and_html_write_files(capsys, tmp_path, fmt, files, marker):
    status, _, _ = run(capsys, "dump", "demo", "--passes", "bn_reparam", "--after-each",
                       "--format", fmt, "--out", str(tmp_path))
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    if fmt == "onnx":  # one model per stage: the BatchNormalization nodes are gone after bn_reparam
        import onnx

        ops = [[n.op_type for n in onnx.load(str(tmp_path / f)).graph.node] for f in files]
        assert "BatchNormalization" in ops[0] and "BatchNormalization" not in ops[1] and "Conv" in ops[1]
        return
    if fmt == "pt2":  # one torch.export program per stage, each running as its stage does
        programs = [torch.export.load(str(tmp_path / f)) for f in files]
        ops = [{str(n.target) for n in p.graph.nodes if n.op == "call_function"} for p in programs]
        assert any("batch_norm" in o for o in ops[0]) and not any("batch_norm" in o for o in ops[1])
        x = torch.randn(1, 3, 96, 96)  # the demo model's input
        torch.testing.assert_close(programs[1].module()(x), programs[0].module()(x), rtol=1e-4, atol=1e-4)
        return
    text = (tmp_path / files[0]).read_text()
    assert marker in text
    if fmt == "html":  # the final stage carries the Triton source of each fused region
        assert "generated Triton kernels" in text and "@triton.jit" in text


def test_dump_svg_is_drawn_without_graphviz(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries"))  # no `dot` to be found
    status, _, err = run(capsys, "dump", "demo", "--passes", "none", "--format", "svg", "--out", str(tmp_path / "d"))
    assert status == 0, err
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["00_final.svg"]
    svg = (tmp_path / "d" / "00_final.svg").read_text()
    assert svg.lstrip().startswith("<svg") and svg.count("<rect") > 10  # a box per op of the demo model
    assert "Graphviz" not in err


def test_dump_no_passes_keeps_batchnorm(capsys):
    status, out, _ = run(capsys, "dump", "demo", "--passes", "none")
    assert status == 0
    assert BN_OP in out


def test_dump_pt2_round_trip(capsys, tmp_path):
    program = torch.export.export(ConvBN().eval(), (torch.randn(1, 3, 8, 8),))
    path = tmp_path / "convbn.pt2"
    torch.export.save(program, path)
    status, out, err = run(capsys, "dump", str(path), "--passes", "bn_reparam")
    assert status == 0, err
    assert "graph(x: f32[1, 3, 8, 8])" in out
    assert BN_OP not in out


def test_dump_file_factory(capsys, tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(FACTORY_FILE)
    status, out, err = run(capsys, "dump", f"{path}:build", "--passes", "bn_reparam")
    assert status == 0, err
    assert BN_OP not in out and "aten.relu" in out


def _error_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    factory = tmp_path / "mymodel.py"
    factory.write_text(FACTORY_FILE)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"this is not a zip archive")
    checkpoint = tmp_path / "weights.pt2"
    torch.save(ConvBN().state_dict(), checkpoint)
    return {
        "unknown pass": (["dump", "demo", "--passes", "bn_reparam,nosuchpass"], "unknown pass 'nosuchpass'; known passes: "),
        "bad option": (["dump", "demo", "--passes", "bn_reparam(nope=1)"], "has no option 'nope'"),
        "missing file": (["dump", str(tmp_path / "absent.py") + ":build"], "no such file"),
        "missing pt2": (["dump", str(tmp_path / "absent.pt2")], "no such file"),
        "no factory": (["dump", f"{factory}:nofactory"], "has no function 'nofactory' (functions defined there: build, no_inputs)"),
        "factory without inputs": (["dump", f"{factory}:no_inputs"], "returned a model without inputs"),
        "bad format": (["dump", "demo", "--format", "png"], "invalid choice: 'png'"),
        "svg needs out": (["dump", "demo", "--format", "svg"], "add --out DIR"),
        "not a pt2": (["dump", str(junk)], "is not a torch.export archive"),
        "pickle checkpoint": (["dump", str(checkpoint)], "does not unpickle"),
        "unknown timm model": (["dump", "timm:resnet181"], "unknown timm model 'resnet181'; did you mean resnet18"),
        "bad spec": (["dump", "nonsense"], "a model spec is"),
        "no command": ([], "required"),
        "bad contender": (["bench", "demo", "--targets", "eager,tvm"], "unknown contender 'tvm'"),
    }


ERROR_CASES = ["unknown pass", "bad option", "missing file", "missing pt2", "no factory",
               "factory without inputs", "bad format", "svg needs out", "not a pt2", "pickle checkpoint",
               "unknown timm model", "bad spec", "no command", "bad contender"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_errors_print_one_line_and_exit_2(capsys, tmp_path, case):
    argv, message = _error_cases(tmp_path)[case]
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("optcc: error: ")
    assert message in lines[0]
    assert "Traceback" not in err


def test_debug_flag_shows_the_traceback(capsys):
    for argv in (["--debug", "dump", "demo", "--passes", "nosuchpass"],
                 ["dump", "demo", "--passes", "nosuchpass", "--debug"]):
        status, _, err = run(capsys, *argv)
        assert status == 2
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("optcc: error: unknown pass")


def test_parse_passes():
    assert parse_passes(None) is None
    assert parse_passes("none") == [] and parse_passes("") == []
    assert [p.name for p in parse_passes(" bn_reparam ")] == ["bn_reparam"]
    with pytest.raises(optcc.cli.UsageError):
        parse_passes("bn_reparam(")


def test_bench_command_prints_ratios(capsys, tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(FACTORY_FILE)
    status, out, err = run(capsys, "bench", f"{path}:build", "--passes", "bn_reparam",
                           "--targets", "eager,optcc-eager", "--runs", "5", "--seconds", "0.01", "--threads", "1")
    assert status == 0, err
    assert "vs eager" in out and "optcc-eager" in out and "optcc-eager vs eager:" in out
    assert "compiling optcc-eager" in err


def test_demo_command(capsys):
    status, out, _ = run(capsys, "demo", "--target", "eager", "--runs", "2")
    assert status == 0
    assert "bn_reparam" in out and "max relative output error against eager PyTorch" in out
    assert "optcc-eager" in out and "vs eager" in out


def test_console_script_runs():
    script = shutil.which("optcc", path=str(Path(sys.executable).parent)) or shutil.which("optcc")
    assert script, "the optcc console script is not installed (pip install -e .)"
    result = subprocess.run([script, "passes"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bn_reparam" in result.stdout


def test_timm_not_installed_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    status, _, err = run(capsys, "dump", "timm:resnet18")
    assert status == 2 and err.strip() == "optcc: error: timm is not installed: pip install timm"


def test_pt2_with_compiled_code_is_refused(capsys, tmp_path):
    import zipfile

    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/archive_format", "pt2")
        archive.writestr("model/data/aotinductor/model/model.so", b"\x7fELF")
    status, _, err = run(capsys, "dump", str(path))
    assert status == 2
    assert "holds code that loading would run" in err and len(err.strip().splitlines()) == 1


def test_dump_triton_prints_the_generated_kernels(capsys):
    status, out, _ = run(capsys, "dump", "demo", "--passes", "bn_reparam,block_fusion", "--format", "triton")
    assert status == 0
    assert out.count("# ---- ") >= 1 and "@triton.jit" in out and "tl.store(" in out
