"""Near misses carry their node and the model's source line: the report's "left alone"
section and ``optcc dump --explain``."""

from __future__ import annotations

import torch
import torch.nn as nn

import optcc
from optcc.cli import main


class ActivationMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, y):
        h = self.fc(x)
        return h @ y  # no constant weight: int8_decomposition must leave it alone


def inputs():
    return torch.randn(4, 16), torch.randn(16, 8)


def test_near_miss_names_its_node_and_source_line():
    compiled = optcc.compile(ActivationMatmul().eval(), ["int8_decomposition"], example_inputs=inputs(), target="eager")
    record = compiled.report["int8_decomposition"]
    assert record.matches == 1
    (miss,) = record.stats["near_misses"]
    assert miss.rule == "int8_linear" and miss.reason == "the weight is not a constant"
    assert miss.node == "mm"
    assert miss.source.startswith("test_explain.py:") and "h @ y" in miss.source
    text = str(compiled.report)
    assert "int8_decomposition: left alone" in text
    assert "1 x int8_linear: the weight is not a constant at %mm (test_explain.py:" in text


def test_dump_explain_prints_every_near_miss(capsys, tmp_path):
    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import torch, torch.nn as nn\n"
        "class M(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.softmax(x @ x.transpose(-1, -2), dim=1) @ x  # softmax over the wrong axis\n"
        "def factory():\n"
        "    return M().eval(), (torch.randn(2, 6, 8),)\n"
    )
    status = main(["dump", f"{model_file}:factory", "--passes", "canonicalize_attention", "--explain"])
    _, err = capsys.readouterr()
    assert status == 0
    assert "canonicalize_attention: 0 rewrite(s), 1 near miss(es)" in err
    line = next(line for line in err.splitlines() if line.startswith("  attention:"))
    assert "at %" in line and "model.py:4" in line
