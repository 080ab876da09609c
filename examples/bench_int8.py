"""CPU speed of int8_decomposition against fp32: BERT-base-sized linears and MiniLM end to end.

Every contender runs in this one process, interleaved round-robin (``optcc.bench``), and
is summarised by the median of its runs; the table shows speed ratios against fp32
(>1 = faster), never absolute times.

Linears (``[M, K] x [K, N]``, two planted outlier columns of magnitude 20):

* ``fp32``: ``torch.nn.functional.linear``;
* ``int8 op``: ``optcc::int8_linear`` (threshold 6): row quantization, fbgemm int8 GEMM on
  the sign-split rows (exact), outlier columns in fp32, dequantization and bias;
* ``fbgemm GEMM, sign split``: the exact int8 GEMM alone (already-quantized rows);
* ``fbgemm GEMM, one pass``: one fbgemm GEMM without the sign split - what fbgemm costs
  when 16-bit saturation is accepted (it is wrong wherever a pair of products saturates).

    .venv/bin/python examples/bench_int8.py [--runs 9] [--seconds 0.3]
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
from optcc.kernels.int8_linear import fbgemm_int_matmul, int8_linear, quantize_rows, quantize_weight  # noqa: E402
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
def linears(runs: int, seconds: float) -> None:
    print("| linear M x K x N | int8 op / fp32 | fbgemm GEMM, sign split / fp32 | fbgemm GEMM, one pass / fp32 | max spread | int8 op rel. error vs fp32 |")
    print("|---|---|---|---|---|---|")
    for m, k, n in [(128, 768, 3072), (128, 3072, 768), (256, 4096, 4096)]:
        x = torch.randn(m, k)
        x[:, [11, 500]] *= 20
        w = torch.randn(n, k) / k ** 0.5
        b = torch.randn(n)
        wq, scale = quantize_weight(w)
        xq, _ = quantize_rows(x)
        fns = {
            "fp32": lambda: F.linear(x, w, b),
            "int8 op": lambda: int8_linear(x, wq, scale, b, 6.0, False, "bench"),
            "split": lambda: fbgemm_int_matmul(xq, wq),
            "one pass": lambda: fbgemm_int_matmul(xq, wq, split_signs=False),
        }
        r, spread = ratios(fns, runs, seconds)
        error = output_error([F.linear(x, w, b)], [int8_linear(x, wq, scale, b, 6.0, False, "bench")])
        print(f"| {m} x {k} x {n} | {r['int8 op']:.2f}x | {r['split']:.2f}x | {r['one pass']:.2f}x | "
              f"{max(spread.values()):.0%} | {error:.1e} |")


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
    print(f"\nall-MiniLM-L6-v2 end to end, batch {batch[0].shape[0]} x {batch[0].shape[1]} tokens, "
          f"{torch.get_num_threads()} threads\n")
    print("| contender | speed vs eager fp32 | spread | cosine min vs fp32 |")
    print("|---|---|---|---|")
    for name, fn in contenders.items():
        cos = ev.embedding_agreement(reference, fn(*batch))["cosine_min"]
        print(f"| {name} | {r[name]:.2f}x | {spread[name]:.0%} | {cos:.5f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one timed run")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    linears(args.runs, args.seconds)
    minilm(args.runs, args.seconds)
