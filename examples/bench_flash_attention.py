"""Speed of the flash attention kernel against torch's attention, on a CUDA GPU.

    .venv/bin/python examples/bench_flash_attention.py [--batch 4] [--heads 16]
        [--seq 512,1024,2048,4096] [--head-dims 64,128] [--dtypes fp16,bf16] [--tiny]

Contenders, on the same inputs (``[B, H, L, D]``, self-attention, causal and not):

* ``triton``: :func:`optcc.kernels.flash_attention.flash_attention`;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` restricted to its
  FlashAttention-2 back end (``SDPBackend.FLASH_ATTENTION``);
* ``eager``: the math written out in torch ops (``softmax(Q K^T * scale) V``, scores
  materialised), as a model without fused attention runs it.

Times are medians of ``triton.testing.do_bench``; TFLOP/s count the two matrix products,
``4 * B * H * L * S * D`` floating-point operations, halved for causal attention (half of
the scores are masked). Each row also shows the largest deviation of the kernel's output
from SDPA's. Prints a markdown table.

Without CUDA the script runs the kernel in the Triton interpreter (``TRITON_INTERPRET=1``)
on tiny sizes, to show that it works end to end there; those times measure the interpreter
on the CPU, not the kernel, and the table says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must be set before the kernel module applies @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F
from optcc.kernels.flash_attention import flash_attention

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def eager_attention(q, k, v, is_causal):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if is_causal:
        seq_q, seq_k = scores.shape[-2:]
        visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sdpa_flash(q, k, v, is_causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def sdpa_default(q, k, v, is_causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def time_ms(fn, runs: int) -> float:
    """Median milliseconds of ``fn()``: do_bench on a GPU, wall clock in the interpreter."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    fn()  # first call rewrites the kernel for the interpreter
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def attention_flops(batch, heads, seq, head_dim, is_causal) -> float:
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if is_causal else flops


def bench_case(args, dtype, head_dim, seq, is_causal) -> dict:
    device = "cuda" if CUDA else "cpu"
    # On the CPU SDPA has no FlashAttention back end: compare with its default one.
    sdpa = sdpa_flash if CUDA else sdpa_default
    shape = (args.batch, args.heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        error = (flash_attention(q, k, v, is_causal=is_causal).float()
                 - sdpa(q, k, v, is_causal).float()).abs().max().item()
        return {
            "error": error,
            "flops": attention_flops(args.batch, args.heads, seq, head_dim, is_causal),
            "triton": time_ms(lambda: flash_attention(q, k, v, is_causal=is_causal), args.runs),
            "sdpa": time_ms(lambda: sdpa(q, k, v, is_causal), args.runs),
            "eager": time_ms(lambda: eager_attention(q, k, v, is_causal), args.runs),
        }


def run(args) -> list[dict]:
    rows = []
    for dtype_name in args.dtypes.split(","):
        for head_dim in map(int, args.head_dims.split(",")):
            for seq in map(int, args.seq.split(",")):
                for is_causal in (False, True):
                    result = bench_case(args, DTYPES[dtype_name], head_dim, seq, is_causal)
                    rows.append(dict(dtype=dtype_name, head_dim=head_dim, seq=seq, causal=is_causal, **result))
                    if CUDA:
                        torch.cuda.empty_cache()
    return rows


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def markdown(rows: list[dict], args) -> str:
    sdpa_name = "SDPA (FA2)" if CUDA else "SDPA"
    lines = [
        (f"| dtype | D | B x H | L = S | causal | triton ms | {sdpa_name} ms | eager ms "
         f"| triton TFLOP/s | {sdpa_name} TFLOP/s | triton / {sdpa_name} time | eager / triton time | max abs diff |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dtype']} | {row['head_dim']} | {args.batch} x {args.heads} | {row['seq']} "
            f"| {'yes' if row['causal'] else 'no'} | {row['triton']:.3f} | {row['sdpa']:.3f} | {row['eager']:.3f} "
            f"| {tflops(row['flops'], row['triton']):.1f} | {tflops(row['flops'], row['sdpa']):.1f} "
            f"| {row['triton'] / row['sdpa']:.2f} | {row['eager'] / row['triton']:.2f} | {row['error']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", default="512,1024,2048,4096", help="sequence lengths, comma separated")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per contender in the interpreter")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes (B=1, H=2, L=64,128, D=64); the default without CUDA")
    args = parser.parse_args()
    if args.tiny or not CUDA:
        args.batch, args.heads, args.seq, args.head_dims = 1, 2, "64,128", "64"

    if CUDA:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print("NO CUDA: the kernel runs in the Triton interpreter (TRITON_INTERPRET=1) on the CPU.\n"
              "The times below measure the interpreter and torch on the CPU, NOT the kernel's speed;\n"
              "the TFLOP/s columns are meaningless here. Only the max abs diff column carries information.")
    print()
    print(markdown(run(args), args))


if __name__ == "__main__":
    main()
