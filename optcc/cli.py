"""The ``optcc`` command line: list passes, dump graphs, benchmark, and a demo.

    optcc passes
    optcc dump MODEL [--passes a,b] [--after-each] [--explain] [--format text|dot|svg|html|onnx|pt2|triton] [--out DIR]
    optcc bench MODEL [--passes a,b] [--runs N] [--batch N] [--targets eager,optcc-eager]
    optcc export MODEL [--passes a,b] --out model.onnx
    optcc opt in.onnx -o out.onnx [--passes a,b] [--dim NAME=SIZE]
    optcc tune MODEL --passes a,b --budget METRIC:MAX_DROP [--data FILE.pt] [--objective latency|flops] [--out DIR]
    optcc demo

MODEL is a model spec (see :mod:`optcc.models`): ``demo``, ``timm:NAME[@BATCH]``,
``path/to/file.py:FACTORY``, ``path/to/model.pt2`` or ``path/to/model.onnx``. ``--passes`` takes pass names
separated by commas, each optionally with options, ``token_pruning(r=8)``; without it
every exact pass runs, and ``--passes none`` runs none.

A user error (bad spec or file, unknown pass or option, bad flag, a model that cannot be
captured) prints one line ``optcc: error: ...`` and exits with status 2; ``--debug`` adds
the traceback.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from . import ir
from .budget import BudgetError
from .compiler import TargetError, default_passes
from .compiler import compile as optcc_compile
from .dump import graph_dot, graph_text, triton_text, write_dumps
from .models import SPEC_HELP, ModelSpecError, load_model
from .onnx_io import OnnxError
from .pass_base import OptionError, Pass, PassError, UnknownPassError, list_passes, make_pass
from .pass_manager import PassManager, PassOrderError, output_error

FORMATS = ("text", "dot", "svg", "html", "onnx", "pt2", "triton")


class UsageError(Exception):
    """A command line optcc cannot act on (argparse's complaints included)."""


# Errors the user can fix by changing the command or the model: one line, exit status 2.
# (A model that cannot be captured names the line of the model that stops torch.export.)
USER_ERRORS = (UsageError, ModelSpecError, UnknownPassError, OptionError, PassOrderError, TargetError, OnnxError,
               ir.CaptureError, BudgetError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we want one line
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ----------------------------------------------------------------------------------------
# Pass lists


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets: ``a(x=1, y=[1, 2]),b`` -> ``['a(x=1, y=[1, 2])', 'b']``."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise UsageError(f"unbalanced brackets in --passes '{text}'")
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _option_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string option: kernel=relu


def parse_passes(text: str | None) -> list[Pass] | None:
    """``--passes`` value -> configured passes; None means optcc's default (every exact pass)."""
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return []
    passes = []
    for item in _split_top_level(text):
        name, paren, rest = item.partition("(")
        options: dict[str, Any] = {}
        if paren:
            if not rest.endswith(")"):
                raise UsageError(f"pass '{item}': write options as name(key=value, ...)")
            for pair in _split_top_level(rest[:-1]):
                key, eq, value = pair.partition("=")
                if not eq or not key.strip():
                    raise UsageError(f"pass '{name.strip()}': option '{pair}' is not key=value")
                options[key.strip()] = _option_value(value.strip())
        passes.append(make_pass((name.strip(), options)))
    return passes


# ----------------------------------------------------------------------------------------
# Commands


def cmd_passes(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="optcc passes (exact ones run by default; approximate ones only when named)",
                  title_justify="left")
    table.add_column("pass")
    table.add_column("kind")
    table.add_column("summary")
    for name, exact, summary in list_passes():
        table.add_row(name, "exact" if exact else "approx", summary)
    Console(width=120, color_system=None).print(table)
    return 0


def _kernel_sources(gm) -> list[tuple[str, str]]:
    """The Triton source the lowering generates for each fused region of the final graph
    (what ``--format triton`` prints), for the page's last stage."""
    from optcc.lowering import with_regions
    from optcc.lowering.runtime import region_sources

    return region_sources(with_regions(gm))


def cmd_dump(args: argparse.Namespace) -> int:
    if args.format in ("svg", "html", "onnx", "pt2") and args.out is None:
        raise UsageError(f"--format {args.format} writes files: add --out DIR")
    passes = parse_passes(args.passes)
    passes = default_passes() if passes is None else passes
    model, inputs = load_model(args.model, batch=args.batch)
    gm = ir.capture(model, inputs)
    flat = ir.flat_inputs(gm, inputs)
    manager = PassManager(passes, verify=True, example_inputs=flat, dump_after_each=True)
    gm, report = manager.run(gm)
    stages = report.dumps if args.after_each else [("final", gm)]
    if args.explain:
        print(report.explain(), file=sys.stderr)

    if args.out is None:  # text or dot on stdout; the report goes to stderr, out of the way of pipes
        for i, (name, stage) in enumerate(stages):
            if args.after_each:
                print(f"{'//' if args.format == 'dot' else '#'} {i:02d} after {name}")
            render = {"text": graph_text, "triton": triton_text}.get(args.format)
            print(render(stage) if render else graph_dot(stage, name), end="")
        print(report.render(), file=sys.stderr)
        return 0

    print(report.render(), file=sys.stderr)
    # the page is a report of every pass, so it always has every stage
    kernels = _kernel_sources(gm) if args.format == "html" else []
    written = write_dumps(report.dumps if args.format == "html" else stages, args.format, Path(args.out), report,
                          kernels)
    for path in written:
        print(path)
    return 0


@contextmanager
def _threads(n: int | None):
    """Use ``n`` torch threads inside (and restore the count: main() may run in-process)."""
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import CONTENDERS, benchmark

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in CONTENDERS] or ([] if targets else [""])
    if unknown:
        raise UsageError(f"unknown contender '{unknown[0]}' in --targets; choose from: {', '.join(CONTENDERS)}")
    if args.runs < 1 or args.warmup < 0:
        raise UsageError("--runs must be at least 1 and --warmup at least 0")
    passes = parse_passes(args.passes)
    model, inputs = load_model(args.model, batch=args.batch)
    with _threads(args.threads):
        result = benchmark(model, inputs, passes, runs=args.runs, warmup=args.warmup, targets=targets,
                           seconds_per_run=args.seconds, model_name=args.model)
    print(result.render())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .onnx_io import export_onnx

    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"--out names the ONNX file to write, e.g. --out model.onnx (got '{args.out}')")
    passes = parse_passes(args.passes)
    model, inputs = load_model(args.model, batch=args.batch)
    compiled = optcc_compile(model, passes, example_inputs=inputs, target="eager", verify=True)
    if compiled.graph_module is None:
        raise ir.CaptureError(f"{args.model} could not be captured, so there is no optimized graph to export "
                              f"({compiled.report.notes[0]})")
    print(compiled.report.render(), file=sys.stderr)
    export_onnx(compiled, out, ir.flat_inputs(compiled.graph_module, inputs), fold=True)
    print(out)
    return 0


def _symbolic_dims(proto) -> list[tuple[str, int, str]]:
    """``(input, axis, name)`` of every dimension of the graph's inputs without a fixed size."""
    initializers = {t.name for t in proto.graph.initializer}
    found = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                found.append((value.name, axis, dim.dim_param or "?"))
    return found


def _parse_dims(items: Sequence[str] | None) -> dict[str, int]:
    dims = {}
    for item in items or []:
        name, sep, size = item.partition("=")
        if not sep or not name or not size.isdigit() or int(size) < 1:
            raise UsageError(f"--dim takes NAME=SIZE with a positive SIZE, e.g. --dim sequence=128 (got '{item}')")
        dims[name] = int(size)
    return dims


def _parse_shapes(items: Sequence[str] | None) -> dict[str, list[int]]:
    shapes = {}
    for item in items or []:
        name, sep, text = item.rpartition("=")
        sizes = text.replace("x", ",").split(",")
        if not sep or not name or not all(size.isdigit() and int(size) > 0 for size in sizes):
            raise UsageError(f"--shape takes INPUT=D0,D1,... with positive sizes, e.g. --shape x=1,3,48,320 "
                             f"(got '{item}')")
        shapes[name] = [int(size) for size in sizes]
    return shapes


def cmd_opt(args: argparse.Namespace) -> int:
    """ONNX to ONNX: read, capture, run the passes (verified), write with the original's
    input/output names and metadata."""
    from .onnx_io import export_onnx, read_onnx
    from .onnx_io.reader import OnnxModule

    source, out = Path(args.model), Path(args.out)
    if source.suffix.lower() != ".onnx" or out.suffix.lower() != ".onnx":
        raise UsageError(f"optcc opt reads and writes ONNX files: optcc opt in.onnx -o out.onnx "
                         f"(got '{args.model}' and '{args.out}')")
    if out.resolve() == source.resolve():
        raise UsageError(f"-o {args.out} is the input file; write the optimized model to another path")
    start = time.perf_counter()

    def stage(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {text}", file=sys.stderr, flush=True)

    dims, shapes = _parse_dims(args.dim), _parse_shapes(args.shape)
    proto = read_onnx(source)
    stage(f"read {source}: {len(proto.graph.node)} nodes, opset "
          f"{max((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')), default='?')}")
    module = OnnxModule(proto, source=str(source))
    inputs = module.example_inputs(dims, 1, args.batch, shapes)
    fixed = _symbolic_dims(proto)
    if fixed:
        sizes = {name: x.shape for name, x in zip(module.input_names, inputs)}
        listed = ", ".join(f"{dim}={sizes[name][axis]} ({name}, axis {axis})" for name, axis, dim in fixed)
        warnings.warn(f"optcc: {out} has static shapes: {listed} (optcc's graphs are captured at fixed sizes; "
                      f"choose them with --shape, --dim or --batch)")
    passes = parse_passes(args.passes)
    names = ", ".join(p.name for p in (default_passes() if passes is None else passes)) or "none"
    stage(f"capturing and running passes: {names}")
    compiled = optcc_compile(module, passes, example_inputs=inputs, target="eager", verify=True)
    if compiled.graph_module is None:
        raise ir.CaptureError(f"{source} could not be captured, so there is no optimized graph to write "
                              f"({compiled.report.notes[0]})")
    print(compiled.report.render(), file=sys.stderr)
    stage(f"writing {out}")
    note = f"optimized by optcc with passes: {names}"
    export_onnx(compiled, out, ir.flat_inputs(compiled.graph_module, inputs), like=proto, note=note, fold=True)
    import onnx

    stage(f"wrote {out}: {len(onnx.load(str(out), load_external_data=False).graph.node)} nodes")
    print(out)
    return 0


def _budget_batches(args: argparse.Namespace, inputs: tuple) -> tuple[list, list]:
    """Calibration and held-out batches: ``--data`` (a ``torch.save``d list of input tuples,
    the last ``--heldout`` of them held out), else random batches shaped like ``inputs``."""
    if args.data:
        try:
            batches = torch.load(args.data, weights_only=True)
        except Exception as exc:
            raise UsageError(f"--data {args.data}: cannot read it with torch.load ({_first_line(exc)}); save a list "
                             f"of input tuples with torch.save") from exc
        if not isinstance(batches, (list, tuple)) or len(batches) <= args.heldout:
            raise UsageError(f"--data {args.data} must hold a list of more than --heldout={args.heldout} batches")
        batches = [tuple(b) if isinstance(b, (list, tuple)) else (b,) for b in batches]
        return batches[:len(batches) - args.heldout], batches[len(batches) - args.heldout:]
    generator = torch.Generator().manual_seed(0)

    def like(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point():
            return torch.randn(x.shape, generator=generator, dtype=x.dtype)
        high = int(x.max().item()) + 1 if x.numel() else 1
        return torch.randint(0, max(high, 1), x.shape, generator=generator, dtype=x.dtype)

    batches = [tuple(like(x) for x in inputs) for _ in range(args.batches + args.heldout)]
    return batches[:args.batches], batches[args.batches:]


def cmd_tune(args: argparse.Namespace) -> int:
    from .budget import METRICS, OBJECTIVES, Budget

    metric, _, drop = args.budget.partition(":")
    try:
        max_drop = float(drop)
    except ValueError:
        raise UsageError(f"--budget takes METRIC:MAX_DROP, e.g. cosine:0.02 (got '{args.budget}')") from None
    if metric not in METRICS:
        raise UsageError(f"--budget metric '{metric}' is not one of {', '.join(METRICS)}")
    if args.objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    if args.batches < 1 or args.heldout < 0:
        raise UsageError("--batches must be at least 1 and --heldout at least 0")
    passes = parse_passes(args.passes)
    model, inputs = load_model(args.model, batch=args.batch)
    data, heldout = _budget_batches(args, inputs)
    budget = Budget(metric, max_drop=max_drop, data=data, heldout=heldout, objective=args.objective,
                    cache=not args.no_cache, out=args.out, margin=args.margin)
    with torch.no_grad():
        compiled = optcc_compile(model, passes, example_inputs=data[0], target=args.target, budget=budget)
    print(compiled.report.render())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .bench import BenchResult, Contender, load_average, contention_notes, measure
    from .models import demo_model

    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    load = load_average()
    model, inputs = demo_model()
    print("optcc demo: a small CNN (conv+BatchNorm+ReLU blocks, residuals, depthwise and grouped "
          f"convs), input {list(inputs[0].shape)}; compiling with every exact pass, target={args.target} ...",
          file=sys.stderr, flush=True)
    with _threads(args.threads), torch.no_grad():
        start = time.perf_counter()
        compiled = optcc_compile(model, example_inputs=inputs, target=args.target, verify=True)
        got = pytree.tree_leaves(compiled(*inputs))
        compile_seconds = time.perf_counter() - start
        expected = pytree.tree_leaves(model(*inputs))
        print(compiled.report.render())
        error = output_error(expected, got)
        print(f"\nmax relative output error against eager PyTorch: {error:.1e}")

        eager = Contender("eager")
        optimized = Contender(f"optcc-{compiled.pipeline.target}", compile_seconds=compile_seconds, error=error)
        calls = {eager.name: lambda: model(*inputs), optimized.name: lambda: compiled(*inputs)}
        iterations = measure([eager, optimized], calls, runs=args.runs, seconds_per_run=0.1, warmup=2)
        result = BenchResult("demo", [repr(p) for p in compiled.pipeline.passes], [eager, optimized],
                             args.runs, iterations, torch.get_num_threads())
    result.notes += contention_notes(result, load)
    print()
    print(result.render())
    return 0


# ----------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optcc", description="A compiler-style graph optimization pipeline for PyTorch models.",
                     epilog=f"MODEL: {SPEC_HELP}.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    # The subcommands accept --debug too, without overriding it when it came first.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("passes", parents=[common], help="list the registered passes")
    p.set_defaults(func=cmd_passes)

    passes_help = ("comma-separated pass names, each optionally with options: name(key=value); "
                   "default: every exact pass; 'none': no passes")
    p = sub.add_parser("dump", parents=[common], help="capture MODEL, run passes, dump the graphs",
                       description="Capture MODEL, run the passes and dump the graph. Without --out the "
                                   "graph goes to stdout and the per-pass report to stderr.")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("--passes", help=passes_help)
    p.add_argument("--after-each", action="store_true", help="dump the graph after every pass, not just the final one")
    p.add_argument("--format", default="text", choices=FORMATS, help="text (default), dot, svg, html, onnx (one model per stage, for Netron), pt2 (one torch.export program per stage, for Model Explorer; load with optcc imported), or triton (the generated kernel of every fused region)")
    p.add_argument("--out", metavar="DIR", help="write files to DIR (NN_stage.ext, or dump.html)")
    p.add_argument("--batch", type=int, help="batch size for demo and timm: models")
    p.add_argument("--explain", action="store_true",
                   help="print every rewrite a pass left alone, with why, its node and the model's source line")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("bench", parents=[common], help="time optcc against eager PyTorch and torch.compile")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("--passes", help=passes_help)
    p.add_argument("--runs", type=int, default=7, help="timed runs per contender (median is reported; default 7)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per contender first (default 3)")
    p.add_argument("--batch", type=int, help="batch size for demo and timm: models")
    p.add_argument("--targets", default="eager,torch.compile,optcc-eager,optcc-inductor",
                   help="contenders, comma-separated (default: all four)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--seconds", type=float, default=0.15, help="length of one timed run in seconds (default 0.15)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", parents=[common], help="optimize MODEL and write the result as ONNX",
                       description="Capture MODEL, run the passes (verified on example inputs) and write the "
                                   "rewritten graph as an ONNX file.")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("--passes", help=passes_help)
    p.add_argument("--out", metavar="FILE.onnx", required=True, help="the ONNX file to write")
    p.add_argument("--batch", type=int, help="batch size for demo, timm: and ONNX models")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("opt", parents=[common], help="optimize an ONNX file into another ONNX file",
                       description="Read IN.onnx, run the passes (verified on example inputs) and write OUT.onnx "
                                   "with the original's input and output names and metadata.")
    p.add_argument("model", metavar="IN.onnx", help="the ONNX file to optimize")
    p.add_argument("-o", "--out", metavar="OUT.onnx", required=True, help="the ONNX file to write")
    p.add_argument("--passes", help=passes_help)
    p.add_argument("--batch", type=int, help="size of the inputs' first symbolic dimension (default 1)")
    p.add_argument("--dim", action="append", metavar="NAME=SIZE",
                   help="size of the symbolic dimension NAME (repeatable; default 1)")
    p.add_argument("--shape", action="append", metavar="INPUT=D0,D1,...",
                   help="the whole shape of input INPUT, for dimensions without a name (repeatable)")
    p.set_defaults(func=cmd_opt)

    p = sub.add_parser("tune", parents=[common], help="choose the approximate passes' settings within an accuracy budget",
                       description="Search the per-layer settings of the approximate passes named in --passes for "
                                   "the fastest that keep the metric within the budget (optcc.budget), and print "
                                   "what was chosen and tried.")
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    p.add_argument("--passes", required=True, help=passes_help)
    p.add_argument("--budget", required=True, metavar="METRIC:MAX_DROP",
                   help="cosine, top1 or perplexity, and the largest drop allowed, e.g. cosine:0.02")
    p.add_argument("--data", metavar="FILE.pt", help="a torch.save'd list of input tuples (default: random batches "
                                                       "shaped like the model's example inputs)")
    p.add_argument("--batches", type=int, default=4, help="random calibration batches (default 4)")
    p.add_argument("--heldout", type=int, default=1, help="batches held out of the search (default 1)")
    p.add_argument("--objective", default="latency", help="latency (timed here, default) or flops (counted)")
    p.add_argument("--target", default="inductor", help="optcc target the latency is timed on: inductor (default) "
                                                        "or eager")
    p.add_argument("--batch", type=int, help="batch size for demo and timm: models")
    p.add_argument("--out", metavar="DIR", help="write the Pareto table (budget.md) and plot (budget.svg) to DIR")
    p.add_argument("--margin", type=float, default=0.0,
                   help="fraction of MAX_DROP held back on the calibration data (default 0)")
    p.add_argument("--no-cache", action="store_true", help="measure everything again (default: reuse the cache)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", parents=[common], help="optimize the built-in demo model and time it")
    p.add_argument("--runs", type=int, default=5, help="timed runs (default 5)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--target", default="auto", help="optcc target: auto (default), eager, inductor, triton")
    p.set_defaults(func=cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    text = str(message)
    if text.startswith("optcc: "):  # optcc's own warnings are sentences, not code locations
        print(f"optcc: warning: {text[len('optcc: '):]}", file=sys.stderr)
    else:
        _original_showwarning(message, category, filename, lineno, file, line)


_original_showwarning = warnings.showwarning


class _WithoutPartialGraphs:
    """stderr, less the partial graph torch.export prints before raising a tracing error.

    That dump is hundreds of lines for a real model; the error line optcc prints names the
    model's line instead (``--debug`` shows everything).
    """

    def __init__(self, stream):
        self.stream = stream
        self.dropped = False

    def write(self, text: str) -> int:
        if text.lstrip("\n").startswith("def forward("):
            self.dropped = True
            return len(text)
        if self.dropped and text == "\n":  # the newline print() adds after the dump
            self.dropped = False
            return len(text)
        self.dropped = False
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"optcc: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    # Inductor logs that it found no CUDA runtime on every CPU compile; that is expected here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(
            sys.stderr if args.debug else _WithoutPartialGraphs(sys.stderr)):
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except KeyboardInterrupt:
            return 130
        except Exception as exc:
            if isinstance(exc, USER_ERRORS):
                status, text = 2, _first_line(exc)
            elif isinstance(exc, PassError):
                status, text = 1, _first_line(exc)
            else:  # a bug, in optcc or below it: say so, and where to look
                status, text = 1, f"{type(exc).__name__}: {_first_line(exc)}"
                if not args.debug:
                    text += " (rerun with --debug for the traceback)"
            if args.debug:
                traceback.print_exception(exc)
            print(f"optcc: error: {text}", file=sys.stderr)
        return status
