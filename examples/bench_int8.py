"""CPU speed of int8_decomposition against fp32: BERT-base-sized linears and MiniLM end to end.

Every contender runs in this one process, interleaved round-robin (``optcc.bench``), and
is summarised by the median of its runs; the table shows speed ratios against fp32
(>1 = faster), never absolute times.

Linears (``[M, K] x [K, N]``, two planted outlier columns of magnitude 20):

* ``fp32``: ``torch.nn.functional.linear``;
* ``bf16``: the same in bf16 (for reference: what a lower-precision float path would give);
* ``int8 op``: ``optcc::int8_linear`` (threshold 6) with the kernel ``auto`` picks on this
  CPU: row quantization, the integer GEMM, outlier columns in fp32, dequantization, bias;
* ``GEMM <kernel>``: each CPU integer GEMM of ``optcc.kernels.int8_cpu`` alone, on
  already-quantized rows, for every kernel that is exact on this CPU (the probe decides;
  the others are listed with the reason).

    .venv/bin/python examples/bench_int8.py [--runs 9] [--seconds 0.3] [--threads N] [--skip onednn]
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import optcc  # noqa: E402
from optcc import evaluation as ev  # noqa: E402
from optcc.bench import calibrate, time_interleaved  # noqa: E402
from optcc.hardware import cpu_summary  # noqa: E402
from optcc.kernels import int8_cpu  # noqa: E402
from optcc.kernels.int8_linear import int8_linear, quantize_rows, quantize_weight  # noqa: E402
from optcc.pass_manager import output_error  # noqa: E402


def ratios(fns: dict, runs: int, seconds: float) -> tuple[dict, dict]:
    for fn in fns.values():
        fn()
    iterations = calibrate(next(iter(fns.values())), seconds)
    times = time_interleaved(fns, runs=runs, iterations=iterations)
    medians = {name: statistics.median(t) for name, t in times.items()}
    spreads = {name: (max(t) - min(t)) / medians[name] for name, t in times.items()}
    base = next(iter(medians.values()))
    return {name: base / m for name, m in medians.items()}, spreads


@torch.no_grad()
def linears(runs: int, seconds: float, skip: set[str]) -> None:
    kernels = [name for name in int8_cpu.KERNELS if int8_cpu.probe(name) is None and name != "fp32" and name not in skip]
    if skip:
        print(f"left out: {', '.join(sorted(skip))} (--skip)")
    for name in int8_cpu.KERNELS:
        if int8_cpu.probe(name) is not None:
            print(f"GEMM {name}: {int8_cpu.probe(name)}")
    print(f"int8 op kernel (auto): {int8_cpu.choose().kernel.name}: {int8_cpu.choose().reason}\n")
    columns = ["int8 op"] + [f"GEMM {k}" for k in kernels] + ["bf16"]
    print("| linear M x K x N | " + " | ".join(f"{c} / fp32" for c in columns) + " | max spread | int8 op rel. error vs fp32 |")
    print("|---" * (len(columns) + 3) + "|")
    for m, k, n in [(128, 768, 3072), (128, 3072, 768), (256, 4096, 4096)]:
        x = torch.randn(m, k)
        x[:, [11, 500]] *= 20
        w = torch.randn(n, k) / k ** 0.5
        b = torch.randn(n)
        wq, scale = quantize_weight(w)
        xq, _ = quantize_rows(x)
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        fns = {"fp32": lambda: F.linear(x, w, b), "int8 op": lambda: int8_linear(x, wq, scale, b, 6.0, False, "bench")}
        for name in kernels:
            kernel = int8_cpu.KERNELS[name]
            operand = xq.to(torch.int8) if kernel.reads_int8 else xq
            fns[f"GEMM {name}"] = lambda kernel=kernel, operand=operand: kernel.run(operand, wq, scale)
        fns["bf16"] = lambda: F.linear(xb, wb, bb)
        r, spread = ratios(fns, runs, seconds)
        error = output_error([F.linear(x, w, b)], [int8_linear(x, wq, scale, b, 6.0, False, "bench")])
        print(f"| {m} x {k} x {n} | " + " | ".join(f"{r[c]:.2f}x" for c in columns)
              + f" | {max(spread.values()):.0%} | {error:.1e} |")


@torch.no_grad()
def minilm(runs: int, seconds: float) -> None:
    model, tokenizer = ev.load_minilm()
    encoder = ev.MeanPooledEncoder(model).eval()
    batch = ev.tokenize(tokenizer, ev.sentences()[:24], batch_size=24)[0]
    contenders = {
        "eager": encoder,
        "optcc-eager, no passes": optcc.compile(encoder, [], example_inputs=batch, target="eager"),
        "optcc-eager, int8_decomposition": optcc.compile(encoder, ["int8_decomposition"], example_inputs=batch,
                                                         target="eager"),
    }
    reference = encoder(*batch)
    fns = {name: (lambda fn=fn: fn(*batch)) for name, fn in contenders.items()}
    r, spread = ratios(fns, runs, seconds)
    print(f"\nall-MiniLM-L6-v2 end to end, batch {batch[0].shape[0]} x {batch[0].shape[1]} tokens\n")
    print("| contender | speed vs eager fp32 | spread | cosine mean / min vs fp32 |")
    print("|---|---|---|---|")
    for name, fn in contenders.items():
        cos = ev.embedding_agreement(reference, fn(*batch))
        print(f"| {name} | {r[name]:.2f}x | {spread[name]:.0%} | {cos['cosine_mean']:.5f} / {cos['cosine_min']:.5f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one timed run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 resists a busy machine)")
    parser.add_argument("--skip", default="", help="GEMM kernels to leave out, comma-separated (oneDNN's takes "
                                                   "seconds a call on VNNI CPUs without AMX)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    print(f"CPU: {cpu_summary()}\n")
    linears(args.runs, args.seconds, {k for k in args.skip.split(",") if k})
    minilm(args.runs, args.seconds)
