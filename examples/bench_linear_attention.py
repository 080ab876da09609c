"""CPU speed of linear attention (``optcc::linear_attention``) against softmax attention.

Two tables, every contender of a row timed in this one process, interleaved round-robin
(``optcc.bench.calibrate`` / ``time_interleaved``), summarised by the median of its runs and
shown as a speed ratio (>1 = linear is faster), never as an absolute time:

1. **Attention alone**, ``[1, 12, N, 64]`` self-attention at N = 256, 1k, 4k, 16k tokens,
   non-causal and causal: ``torch.nn.functional.scaled_dot_product_attention`` (its CPU
   flash kernel) against the op with the ``elu1`` map (F = 64 features per head) and the
   ``hedgehog`` map (F = 128: the calibrated form). Goals: faster than SDPA from 1k tokens
   and >= 50x at 16k (non-causal); faster than causal SDPA from 4k.
2. **End to end**, timm ``vit_small_patch16_224`` built at 1024x1024 (64 x 64 patches + the
   class token = 4,097 tokens; random weights, speed does not depend on them) with every
   attention layer linear (``attention_to_linear``, ``elu1``): eager timm and Inductor
   (``torch.compile`` default) against ``optcc.compile(..., target="eager")`` and
   ``target="inductor"``, and (a second approximation on top, its own column) the eager
   target with ``int8_decomposition`` added. Goal: >= 3x eager with attention_to_linear alone.

Each row also gives the largest deviation of the linear output from softmax attention's,
relative to the largest |softmax output| - to show the op really computed something, not
as an accuracy figure (random inputs; accuracy on real weights is in
``examples/linear_attention_accuracy.py``).

    .venv/bin/python examples/bench_linear_attention.py [--runs 7] [--seconds 0.5] [--threads N]
        [--tokens 256,1024,4096,16384] [--skip-vit] [--vit-runs 5] [--quick] [--markdown FILE]

``--quick`` is a smoke test (N = 256, 1024, 2 runs, ViT at 256x256). The full run takes about
15 minutes on 2 cores (softmax attention at 16k tokens is seconds per call).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import optcc  # noqa: E402
from optcc.bench import calibrate, load_average, time_interleaved  # noqa: E402
from optcc.hardware import cpu_summary  # noqa: E402
from optcc.kernels import linear_attention as la  # noqa: E402

HEADS, HEAD_DIM = 12, 64


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def relative_deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def time_row(calls: dict, *, runs: int, seconds: float) -> dict[str, float]:
    """Median ms per call of each contender, interleaved (ms stay inside this script)."""
    for fn in calls.values():
        fn()
    iterations = calibrate(next(iter(calls.values())), seconds)
    times = time_interleaved(calls, runs=runs, iterations=iterations)
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.no_grad()
def attention_rows(tokens: list[int], *, runs: int, seconds: float) -> list[dict]:
    rows = []
    for causal in (False, True):
        for n in tokens:
            gen = torch.Generator().manual_seed(n)
            q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3))
            hedgehog = la.hedgehog_init(HEADS, HEAD_DIM)
            calls = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                "elu1": lambda: la.linear_attention(q, k, v, feature_map="elu1", causal=causal),
                "hedgehog": lambda: la.linear_attention(q, k, v, feature_map="hedgehog", params=hedgehog,
                                                        causal=causal),
            }
            say(f"attention N={n} causal={causal}: timing {runs} runs")
            reference = calls["sdpa"]()
            deviation = relative_deviation(calls["elu1"](), reference)
            median = time_row(calls, runs=runs, seconds=seconds)
            rows.append({"tokens": n, "causal": causal, "elu1": median["sdpa"] / median["elu1"],
                         "hedgehog": median["sdpa"] / median["hedgehog"], "deviation": deviation})
            say(f"  elu1 {rows[-1]['elu1']:.2f}x  hedgehog {rows[-1]['hedgehog']:.2f}x of SDPA")
    return rows


@torch.no_grad()
def vit_row(image: int, *, runs: int, seconds: float) -> dict:
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=image).eval()
    x = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(0))
    tokens = (image // 16) ** 2 + 1
    passes = [("attention_to_linear", {"feature_map": "elu1"})]
    say(f"ViT-S/16 at {image}x{image} ({tokens} tokens): compiling")
    builds = {"eager": lambda: model, "inductor": lambda: torch.compile(model),
              "optcc-eager": lambda: optcc.compile(model, passes, example_inputs=(x,), target="eager"),
              "optcc-inductor": lambda: optcc.compile(model, passes, example_inputs=(x,), target="inductor"),
              "optcc-eager+int8": lambda: optcc.compile(model, passes + ["int8_decomposition"], example_inputs=(x,),
                                                        target="eager")}
    calls, outputs, converted = {}, {}, None
    for name, build in builds.items():
        start = time.perf_counter()
        fn = build()
        outputs[name] = fn(x)
        if name.startswith("optcc") and converted is None:
            converted = fn.report["attention_to_linear"].stats["matches"]
        say(f"  {name}: built and run once in {time.perf_counter() - start:.1f} s")
        calls[name] = lambda fn=fn: fn(x)
    say(f"  timing {runs} runs")
    median = time_row(calls, runs=runs, seconds=seconds)
    return {"image": image, "tokens": tokens, "layers": converted,
            "optcc-eager / eager": median["eager"] / median["optcc-eager"],
            "optcc-inductor / eager": median["eager"] / median["optcc-inductor"],
            "optcc-inductor / Inductor": median["inductor"] / median["optcc-inductor"],
            "Inductor / eager": median["eager"] / median["inductor"],
            "optcc-eager+int8 / eager": median["eager"] / median["optcc-eager+int8"],
            "deviation": relative_deviation(outputs["optcc-eager"], outputs["eager"])}


def markdown(attention: list[dict], vit: dict | None, *, runs: int, vit_runs: int, load: float | None) -> str:
    lines = [f"CPU: {cpu_summary()}; load average before: "
             f"{'n/a' if load is None else f'{load:.1f}'}; medians of {runs} interleaved runs.", "",
             "| tokens | form | elu1 / SDPA | hedgehog / SDPA | max deviation (elu1, relative) |",
             "|---|---|---|---|---|"]
    for r in attention:
        lines.append(f"| {r['tokens']} | {'causal' if r['causal'] else 'non-causal'} | {r['elu1']:.2f}x | "
                     f"{r['hedgehog']:.2f}x | {r['deviation']:.2f} |")
    if vit:
        lines += ["", f"ViT-S/16 at {vit['image']}x{vit['image']} ({vit['tokens']} tokens, batch 1), "
                      f"{vit['layers']} of 12 attention layers linear (elu1); medians of {vit_runs} runs:", "",
                  "| optcc-eager / eager | optcc-inductor / eager | optcc-inductor / Inductor | Inductor / eager "
                  "| optcc-eager + int8_decomposition / eager |",
                  "|---|---|---|---|---|",
                  f"| {vit['optcc-eager / eager']:.2f}x | {vit['optcc-inductor / eager']:.2f}x | "
                  f"{vit['optcc-inductor / Inductor']:.2f}x | {vit['Inductor / eager']:.2f}x | "
                  f"{vit['optcc-eager+int8 / eager']:.2f}x |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--vit-runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="target seconds per timed run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", default="256,1024,4096,16384")
    parser.add_argument("--image", type=int, default=1024)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.runs, args.vit_runs, args.image, args.seconds = "256,1024", 2, 2, 256, 0.1
    warnings.filterwarnings("ignore", category=UserWarning)
    load = load_average()
    attention = attention_rows([int(t) for t in args.tokens.split(",")], runs=args.runs, seconds=args.seconds)
    vit = None if args.skip_vit else vit_row(args.image, runs=args.vit_runs, seconds=args.seconds)
    text = markdown(attention, vit, runs=args.runs, vit_runs=args.vit_runs, load=load)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
