"""Model specs: the strings the CLI (and benchmarks) turn into a model and its inputs.

``load_model(spec)`` returns ``(model, example_inputs)``, where ``model`` is an eval-mode
``torch.nn.Module`` or a ``torch.export.ExportedProgram`` and ``example_inputs`` a tuple
of positional inputs. Accepted specs:

* ``demo``: a small built-in CNN (no download) with the structures optcc's exact passes
  target: conv+BatchNorm+ReLU blocks, a residual block, a depthwise and a grouped conv,
  global pooling and a linear head. Weights and BatchNorm statistics are deterministic
  and non-trivial, so folding them changes real numbers;
* ``timm:NAME`` or ``timm:NAME@BATCH``: ``timm.create_model(NAME, pretrained=False)``,
  with the input size of its ``pretrained_cfg``;
* ``path/to/file.py:FACTORY``: imports the file and calls ``FACTORY()``, which returns a
  model or a ``(model, example_inputs)`` pair;
* ``path/to/file.pt2``: a ``torch.export.save`` archive, with random inputs of the shapes
  it was exported with;
* ``path/to/file.onnx``: an ONNX model (:mod:`optcc.onnx_io`), with random inputs of its
  graph's input shapes; a symbolic dimension is 1, or ``batch`` for the first one.

Every problem raises :class:`ModelSpecError` with one line that says what to do.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from torch.export import ExportedProgram

DEMO_INPUT_SIZE = 96

SPEC_HELP = (
    "a model spec is 'demo', 'timm:NAME[@BATCH]', 'path/to/file.py:FACTORY', 'path/to/model.pt2' "
    "or 'path/to/model.onnx'"
)


class ModelSpecError(ValueError):
    """A model spec that cannot be turned into a model; the message says what to do."""


# ----------------------------------------------------------------------------------------
# The demo model


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True):
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvBNReLU(channels, channels)
        self.conv2 = ConvBNReLU(channels, channels, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


class DemoNet(nn.Module):
    """A small CNN with what BatchNorm folding and block fusion look for."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            ConvBNReLU(3, w, stride=2),                  # stem
            ResidualBlock(w),
            ConvBNReLU(w, w, groups=w),                  # depthwise
            ConvBNReLU(w, 2 * w, kernel=1),              # pointwise
            ConvBNReLU(2 * w, 2 * w, stride=2),
            ConvBNReLU(2 * w, 2 * w, groups=4),          # grouped
            ResidualBlock(2 * w),
            ConvBNReLU(2 * w, 4 * w, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def demo_model(batch: int = 1) -> tuple[nn.Module, tuple]:
    """The built-in demo model (eval mode) and an input of shape [batch, 3, 96, 96].

    Built under a fixed seed without touching the caller's random state, so every call
    gives the same weights and input.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DemoNet()
        # Freshly initialised BatchNorm is the identity (mean 0, var 1, gamma 1, beta 0):
        # folding it would prove nothing, so give it statistics like a trained network's.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias, 0.0, 0.1)
        x = torch.randn(batch, 3, DEMO_INPUT_SIZE, DEMO_INPUT_SIZE)
    return model.eval(), (x,)


# ----------------------------------------------------------------------------------------
# Spec parsing


def load_model(spec: str, *, batch: int | None = None) -> tuple[nn.Module | ExportedProgram, tuple]:
    """Turn a model spec (see module docstring) into ``(model, example_inputs)``.

    ``batch`` overrides the batch size of ``demo`` and ``timm:`` models and a symbolic
    batch dimension of an ONNX model; the other forms bring their own inputs.
    """
    spec = spec.strip()
    if batch is not None and batch < 1:
        raise ModelSpecError(f"batch size must be at least 1, got {batch}")
    if spec == "demo":
        return demo_model(batch or 1)
    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):], batch)
    if spec.lower().endswith(".onnx"):
        return _load_onnx(Path(spec), batch)
    if batch is not None:
        raise ModelSpecError(
            f"--batch applies to 'demo', 'timm:' and ONNX models; '{spec}' brings its own inputs"
        )
    file_part, _, factory = spec.rpartition(":")
    if file_part.endswith(".py"):
        return _load_factory(Path(file_part), factory)
    if spec.endswith(".py"):
        raise ModelSpecError(
            f"name the function that builds the model: '{spec}:FACTORY' (it returns a model "
            "or (model, example_inputs))"
        )
    if spec.endswith(".pt2"):
        return _load_pt2(Path(spec))
    raise ModelSpecError(f"cannot read model spec '{spec}': {SPEC_HELP}")


def _load_timm(rest: str, batch: int | None) -> tuple[nn.Module, tuple]:
    name, _, batch_text = rest.partition("@")
    if batch_text:
        if not batch_text.isdigit() or int(batch_text) < 1:
            raise ModelSpecError(f"batch size in 'timm:{rest}' must be a positive integer")
        batch = batch or int(batch_text)  # an explicit --batch wins over the spec
    if not name:
        raise ModelSpecError("name the timm model: 'timm:NAME', e.g. 'timm:resnet18'")
    try:
        import timm
    except ImportError:
        raise ModelSpecError("timm is not installed: pip install timm") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelSpecError(f"unknown timm model '{name}'{hint}")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # reproducible random weights, hence reproducible errors
            model = timm.create_model(name, pretrained=False).eval()
    except Exception as exc:
        raise ModelSpecError(f"timm could not build '{name}': {type(exc).__name__}: {_first_line(exc)}") from exc
    input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(batch or 1, *input_size)
    return model, (x,)


def _load_factory(path: Path, factory: str) -> tuple[nn.Module, tuple]:
    if not factory:
        raise ModelSpecError(f"name the function that builds the model: '{path}:FACTORY'")
    if not path.is_file():
        raise ModelSpecError(f"no such file: {path}")
    # A name of our own so that the user's file never shadows an installed module.
    module_name = "optcc_user_model_" + re.sub(r"\W", "_", str(path.resolve()))
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ModelSpecError(f"importing {path} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module_name)
        known = f" (functions defined there: {', '.join(names)})" if names else ""
        raise ModelSpecError(f"{path} has no function '{factory}'{known}")
    try:
        built = fn()
    except Exception as exc:
        raise ModelSpecError(f"{path}:{factory}() failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    model, inputs = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
    if isinstance(model, ExportedProgram):
        return model, inputs if inputs is not None else _inputs_of_program(model, f"{path}:{factory}")
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{path}:{factory}() must return a torch.nn.Module or (model, example_inputs), "
            f"got {type(built).__name__}"
        )
    if inputs is None:
        raise ModelSpecError(
            f"{path}:{factory}() returned a model without inputs; return (model, example_inputs) "
            "so optcc knows the shapes to compile for"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    elif not isinstance(inputs, tuple):
        raise ModelSpecError(
            f"{path}:{factory}(): example_inputs must be a tensor or a tuple of positional inputs, "
            f"got {type(inputs).__name__}"
        )
    # Every command optimizes for inference: BatchNorm folds only in eval mode.
    return model.eval(), inputs


def _load_onnx(path: Path, batch: int | None) -> tuple[nn.Module, tuple]:
    from .onnx_io import OnnxError, load_onnx

    try:
        return load_onnx(path, batch=batch)
    except OnnxError as exc:
        raise ModelSpecError(str(exc)) from exc


# Archive members whose loading would run code from the file (pickled Python objects,
# TorchBind objects, AOTInductor shared libraries).
_UNSAFE_MEMBERS = re.compile(r"(^|/)data/(aotinductor/|constants/(custom_obj_|opaque_obj_))")


def _load_pt2(path: Path) -> tuple[ExportedProgram, tuple]:
    if not path.is_file():
        raise ModelSpecError(f"no such file: {path}")
    save_hint = "save one with torch.export.save(torch.export.export(model, inputs), 'model.pt2')"
    if not zipfile.is_zipfile(path):
        raise ModelSpecError(f"{path} is not a torch.export archive; {save_hint}")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    members = {name.split("/", 1)[-1] for name in names}
    if "data.pkl" in members:
        raise ModelSpecError(
            f"{path} is a torch.save checkpoint, which optcc does not unpickle; {save_hint}"
        )
    if not ({"archive_format", "serialized_exported_program.json"} & members):
        raise ModelSpecError(f"{path} is a zip file but not a torch.export archive; {save_hint}")
    unsafe = [name for name in names if _UNSAFE_MEMBERS.search(name)]
    if unsafe:
        raise ModelSpecError(
            f"{path} holds code that loading would run ({unsafe[0]}); optcc loads only plain "
            "torch.export.save archives"
        )
    try:
        with _weights_only_loads():
            program = torch.export.load(path)
    except Exception as exc:
        raise ModelSpecError(f"{path} could not be loaded: {type(exc).__name__}: {_first_line(exc)}") from exc
    if not isinstance(program, ExportedProgram):
        raise ModelSpecError(f"{path} does not hold an ExportedProgram; {save_hint}")
    return program, _inputs_of_program(program, str(path))


@contextmanager
def _weights_only_loads():
    """Force every torch.load inside torch.export.load to refuse arbitrary pickled objects.

    torch.export.load asks for ``weights_only=False`` on some members; torch honours
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` over that, so a crafted archive cannot run code.
    """
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _inputs_of_program(program: ExportedProgram, where: str) -> tuple:
    from .ir import example_inputs_of

    args, kwargs = example_inputs_of(program)
    if kwargs:
        raise ModelSpecError(
            f"{where} takes keyword inputs ({', '.join(kwargs)}); the optcc CLI passes positional "
            "inputs only: export the model with positional arguments"
        )
    return args


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
