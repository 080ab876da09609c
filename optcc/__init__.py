"""optcc: a compiler-style graph optimization pipeline for PyTorch models.

    compiled = optcc.compile(model, passes=["bn_reparam"], example_inputs=(x,))
    print(compiled.report)

See README.md and docs/architecture.md. The function lives in :mod:`optcc.compiler`; the
error classes users catch are exported here (``optcc.InputMismatchError``,
``optcc.TargetError``, ``optcc.CaptureError``, ``optcc.PassOrderError``, ``optcc.OptionError``,
``optcc.OnnxError``, ``optcc.BudgetError``).
"""

from .budget import Budget, BudgetError, BudgetResult, BudgetWarning
from .compiler import InputMismatchError, OptimizedModule, Pipeline, TargetError, compile, default_passes
from .dump import graph_dot, graph_text
from .ir import CaptureError, capture, op_counts
from .onnx_io import OnnxError
from .pass_base import (
    OptionError,
    Pass,
    PassError,
    PassResult,
    UnknownPassError,
    get_pass,
    list_passes,
    register_pass,
)
from .pass_manager import PassManager, PassOrderError
from .report import PassRecord, Report

__version__ = "0.1.0"

__all__ = [
    "Budget", "BudgetError", "BudgetResult", "BudgetWarning", "CaptureError", "InputMismatchError", "OnnxError", "OptimizedModule", "OptionError", "Pass", "PassError", "PassManager",
    "PassOrderError", "PassRecord", "PassResult", "Pipeline", "Report", "TargetError",
    "UnknownPassError", "capture", "compile", "default_passes", "get_pass", "graph_dot",
    "graph_text", "list_passes", "op_counts", "register_pass",
]
