"""Graph dumps: text (one node a line), Graphviz dot/svg, and an HTML page per pipeline.

The text form is what golden tests compare, so it is deterministic and names only what
a pass changes: node names, ops, argument structure, shapes and dtypes (never tensor
values)::

    graph(x: f32[1, 3, 8, 8]):
      %conv_weight: f32[8, 3, 3, 3] = constant
      %convolution: f32[1, 8, 8, 8] = aten.convolution(%x, %conv_weight, %conv_bias, [1, 1], ...)
      return (%relu,)

A fused region prints as one node followed by its reference subgraph in braces (text)
or as a cluster of its ops (dot/svg).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .ir import op_name
from .regions import REGION_KEY, is_region, region_module

log = logging.getLogger("optcc")


def configure_logs(spec: str | None = None) -> None:
    """Switch on optcc's log output the way TORCH_LOGS switches on Inductor's:
    ``OPTCC_LOGS=passes`` (one line a pass) or ``OPTCC_LOGS=all`` (every optcc logger)."""
    names = {n.strip() for n in (spec if spec is not None else os.environ.get("OPTCC_LOGS", "")).split(",") if n.strip()}
    unknown = names - {"passes", "all"}
    if unknown:
        raise ValueError(f"OPTCC_LOGS: unknown log(s) {sorted(unknown)}; known: all, passes")
    if names:
        logger = log if "all" in names else logging.getLogger("optcc.passes")
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
            logger.addHandler(handler)


configure_logs()

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "b8",
}


def type_text(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{_DTYPES.get(val.dtype, str(val.dtype).replace('torch.', ''))}[{dims}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(type_text(v) for v in val) + ")"
    if isinstance(val, (torch.SymInt, int)):
        return "int"
    if isinstance(val, (torch.SymFloat, float)):
        return "float"
    return "?" if val is None else type(val).__name__


def _arg_text(arg: Any, names: dict[str, str] | None = None) -> str:
    if isinstance(arg, fx.Node):
        return f"%{names.get(arg.name, arg.name) if names else arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_arg_text(a, names) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, torch.dtype):
        return _DTYPES.get(arg, str(arg))
    if isinstance(arg, float):
        return repr(arg)
    return str(arg)


def node_text(node: fx.Node, names: dict[str, str] | None = None) -> str:
    """One line for ``node``; ``names`` renames nodes (a region's inputs to the outer args)."""
    typ = type_text(node.meta.get("val"))
    if node.op == "placeholder":
        return f"%{node.name}: {typ} = input"
    if node.op == "get_attr":
        return f"%{node.name}: {typ} = constant"
    if node.op == "output":
        return f"return {_arg_text(node.args[0], names)}"
    args = [_arg_text(a, names) for a in node.args] + [f"{k}={_arg_text(v, names)}" for k, v in node.kwargs.items()]
    if is_region(node):
        return f"%{node.name}: {typ} = region {node.meta[REGION_KEY]}({', '.join(args)})"
    return f"%{node.name}: {typ} = {op_name(node)}({', '.join(args)})"


def _body_lines(gm: fx.GraphModule, indent: str, names: dict[str, str] | None = None) -> list[str]:
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if is_region(node):
            sub = region_module(gm, node)
            # Inside the braces a region's inputs are called by the outer values they are.
            placeholders = [n.name for n in sub.graph.nodes if n.op == "placeholder"]
            inner_names = {p: _arg_text(a, names)[1:] for p, a in zip(placeholders, node.args)}
            lines.append(f"{indent}{node_text(node, names)} {{")
            lines += _body_lines(sub, indent + "    ", inner_names)
            lines.append(f"{indent}}}")
        else:
            lines.append(indent + node_text(node, names))
    return lines


def graph_text(gm: fx.GraphModule) -> str:
    inputs = ", ".join(
        f"{n.name}: {type_text(n.meta.get('val'))}" for n in gm.graph.nodes if n.op == "placeholder"
    )
    return "\n".join([f"graph({inputs}):", *_body_lines(gm, "  ")]) + "\n"


# ----------------------------------------------------------------------------------------
# Graphviz

_COLORS = {"placeholder": "#cfe8ff", "get_attr": "#eeeeee", "output": "#cfe8ff"}


def _dot_node(ident: str, node: fx.Node, indent: str) -> str:
    if node.op == "call_function":
        label = f"{op_name(node)}\\n{type_text(node.meta.get('val'))}"
        color = "#fff2cc"
    else:
        label = f"{node.op}: {node.name}\\n{type_text(node.meta.get('val'))}" if node.op != "output" else "output"
        color = _COLORS.get(node.op, "#ffffff")
    return f'{indent}"{ident}" [label="{label}", fillcolor="{color}"];'


def graph_dot(gm: fx.GraphModule, title: str = "graph") -> str:
    """Graphviz source; constants are folded into their users' labels to keep it readable,
    and each fused region is drawn as a cluster of its reference ops."""
    from .dump_layout import drawn_nodes

    lines = [f'digraph "{title}" {{', "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10];']
    region_of = {n.name: n for n in gm.graph.nodes if is_region(n)}
    open_region = None
    for d in drawn_nodes(gm):  # a region's ops come one after another
        if d.region != open_region:
            if open_region:
                lines.append("  }")
            if d.region:
                lines.append(f'  subgraph "cluster_{d.region}" {{')
                lines.append(f'    label="{d.region}: {region_of[d.region].meta[REGION_KEY]}"; style="rounded,filled"; fillcolor="#e6f2e6"; color="#4d8f4d";')
            open_region = d.region
        indent = "    " if d.region else "  "
        lines.append(_dot_node(d.ident, d.node, indent))
        lines += [f'{indent}"{source}" -> "{d.ident}";' for source in d.inputs]
    if open_region:
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def triton_text(gm: fx.GraphModule) -> str:
    """The Triton source generated for every fused region of ``gm`` (``--format triton``);
    regions are formed first where no pass formed them, as ``target="triton"`` does."""
    from optcc.lowering import with_regions
    from optcc.lowering.runtime import region_sources

    parts = [f"# ---- {name}\n{source}" for name, source in region_sources(with_regions(gm))]
    return "\n".join(parts) if parts else "# no fused regions: nothing in this graph fuses into a kernel\n"


# ----------------------------------------------------------------------------------------
# Writing a pipeline's dumps


def write_dumps(stages: list[tuple[str, fx.GraphModule]], fmt: str, out_dir: Path, report: Any = None,
                kernels: list[tuple[str, str]] = ()) -> list[Path]:
    """Write one file per stage (``00_captured.txt``, ``01_bn_reparam.txt``...) or one HTML page
    (``dump.html``, :mod:`optcc.dump_html`; ``report`` is the run's :class:`~optcc.report.Report`).

    ``fmt="svg"`` is drawn by :mod:`optcc.dump_layout`, so it needs no Graphviz.
    """
    from .dump_html import write_html
    from .dump_layout import draw_svg

    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        return [write_html(stages, out_dir / "dump.html", report, kernels)]
    written: list[Path] = []
    for i, (name, gm) in enumerate(stages):
        stem = out_dir / f"{i:02d}_{name}"
        if fmt == "text":
            path = stem.with_suffix(".txt")
            path.write_text(graph_text(gm))
        elif fmt == "triton":
            path = stem.with_suffix(".py")
            path.write_text(triton_text(gm))
        elif fmt == "dot":
            path = stem.with_suffix(".dot")
            path.write_text(graph_dot(gm, name))
        elif fmt == "svg":
            path = stem.with_suffix(".svg")
            path.write_text(draw_svg(gm, name))
        elif fmt == "onnx":  # one model per stage, to open side by side in Netron
            from .onnx_io import OnnxError, export_onnx

            path = stem.with_suffix(".onnx")
            try:
                export_onnx(gm, path)
            except OnnxError as exc:
                warnings.warn(f"optcc dump: stage {i:02d} ({name}) has no ONNX form and was not written: {exc}",
                              stacklevel=2)
                continue
        elif fmt == "pt2":  # one torch.export program per stage, for Model Explorer
            from .ir import save_program

            path = stem.with_suffix(".pt2")
            try:
                save_program(gm, path)
            except Exception as exc:  # an export failure of one stage must not lose the others
                warnings.warn(f"optcc dump: stage {i:02d} ({name}) could not be exported as a torch.export program "
                              f"and was not written: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                              stacklevel=2)
                continue
        else:
            raise ValueError(f"unknown dump format '{fmt}'; choose text, dot, svg, html, onnx, pt2 or triton")
        written.append(path)
    return written
