"""Accuracy of int8_decomposition (LLM.int8()) on real weights and on planted outliers.

* all-MiniLM-L6-v2 (real weights) on optcc's evaluation sentences: cosine similarity of
  the mean-pooled sentence embeddings with the fp32 model, with the outlier decomposition
  (threshold 6) and without it (threshold 0: every column in int8), the fraction of
  activation values multiplied in int8, the outlier columns per layer and the memory of
  the linear weights against fp32;
* a small GPT-2 with planted outlier features: next-token loss on a fixed text.

    .venv/bin/python examples/int8_minilm.py
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import optcc  # noqa: E402
from optcc import evaluation as ev  # noqa: E402
from optcc.kernels.int8_linear import collect_stats  # noqa: E402
from optcc.pass_manager import output_error  # noqa: E402

PASS = "int8_decomposition"


def minilm_table() -> None:
    model, tokenizer = ev.load_minilm()
    encoder = ev.MeanPooledEncoder(model).eval()
    texts = ev.sentences()
    batches = ev.tokenize(tokenizer, texts)
    reference = ev.embed(encoder, batches, len(texts))
    fp32_graph = optcc.capture(encoder, batches[0])
    print(f"all-MiniLM-L6-v2, {len(texts)} sentences, batches of {batches[0][0].shape[0]} x "
          f"{batches[0][0].shape[1]} tokens\n")
    print("| setting | cosine mean | cosine min | values in int8 | linear weight bytes vs fp32 | all constants vs fp32 |")
    print("|---|---|---|---|---|---|")
    outliers_per_layer = None
    for label, options in [("threshold 6.0 (decomposition)", {"threshold": 6.0}),
                           ("threshold 0 (all int8)", {"threshold": 0.0}),
                           ("weight-only int8", {"weight_only": True})]:
        compiled = optcc.compile(encoder, [(PASS, options)], example_inputs=batches[0], target="eager")
        with collect_stats() as stats:
            got = ev.embed(compiled, batches, len(texts))
        agreement = ev.embedding_agreement(reference, got)
        summary = ev.int8_summary(stats)
        record = compiled.report[PASS].stats
        weight_ratio = record["weight_bytes_int8"] / record["weight_bytes_fp32"]
        graph = compiled.graph_module if hasattr(compiled, "graph_module") else None
        const_ratio = ev.constant_bytes(graph) / ev.constant_bytes(fp32_graph) if graph is not None else float("nan")
        fraction = "-" if options.get("weight_only") else f"{summary['int8_fraction']:.4%}"
        print(f"| {label} | {agreement['cosine_mean']:.5f} | {agreement['cosine_min']:.4f} | {fraction} | "
              f"{weight_ratio:.3f}x | {const_ratio:.3f}x |")
        if options.get("threshold") == 6.0:
            outliers_per_layer = summary["outlier_columns"]
    print("\nOutlier columns (threshold 6.0) per layer, over all sentences:\n")
    print("| layer | q/k/v input | attention output | intermediate | FFN output |")
    print("|---|---|---|---|---|")
    for i in range(6):
        prefix = f"encoder.encoder.layer.{i}."
        def cols(name):
            c = outliers_per_layer.get(prefix + name, [])
            return f"{len(c)} {c}" if c else "0"
        print(f"| {i} | {cols('attention.self.query')} | {cols('attention.output.dense')} | "
              f"{cols('intermediate.dense')} | {cols('output.dense')} |")


def gpt2_table() -> None:
    lm = ev.gpt2_with_planted_outliers()
    tokens = ev.byte_tokens()
    with torch.no_grad():
        reference = lm(tokens)
    print(f"\nGPT-2 (2 layers, width 256, random weights, LayerNorm gain x40 on dims 7/100/201), "
          f"{tokens.shape[1]} byte tokens\n")
    print("| setting | loss | loss change | max rel. logit error | values in int8 |")
    print("|---|---|---|---|---|")
    base = ev.lm_loss(lm, tokens)
    print(f"| fp32 | {base:.4f} | - | - | - |")
    for label, threshold in [("threshold 6.0 (decomposition)", 6.0), ("threshold 0 (all int8)", 0.0)]:
        compiled = optcc.compile(lm, [(PASS, {"threshold": threshold})], example_inputs=(tokens,), target="eager")
        with collect_stats() as stats:
            loss = ev.lm_loss(compiled, tokens)
            logits = compiled(tokens)
        error = output_error([reference], [logits])
        print(f"| {label} | {loss:.4f} | {loss - base:+.4f} | {error:.2e} | "
              f"{ev.int8_summary(stats)['int8_fraction']:.2%} |")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    minilm_table()
    gpt2_table()
