"""attention_to_linear on all-MiniLM-L6-v2's real weights: sentence-embedding agreement per feature map.

Every attention layer of the 6-layer encoder becomes linear attention; the mean-pooled
sentence embeddings of ``optcc/data/sentences.txt`` are compared with the softmax
model's (cosine per sentence, and whether each sentence's nearest neighbour among the
scored sentences stays the same). Hedgehog is shown at its identity initialisation and
after calibration (layer-wise attention transfer) on the first half of the sentences;
every number is scored on the other sentences, which calibration never sees.

    .venv/bin/python examples/linear_attention_minilm.py [--steps 200] [--batch 24] [--calibrated-only]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import optcc  # noqa: E402
from optcc import evaluation as ev  # noqa: E402
from optcc.hardware import cpu_summary  # noqa: E402


def la_maps() -> tuple[str, ...]:
    from optcc.kernels.linear_attention import FEATURE_MAPS

    return FEATURE_MAPS


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.t()
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="Adam steps per layer for calibration")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--calibrated-only", action="store_true", help="only the calibrated hedgehog row")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, tokenizer = ev.load_minilm()
    encoder = ev.MeanPooledEncoder(model).eval()
    texts = ev.sentences()
    batches = ev.tokenize(tokenizer, texts, args.batch)  # one padded length: the graph's shapes are static
    calibration, scored = batches[:len(batches) // 2], batches[len(batches) // 2:]
    half = len(calibration) * args.batch
    count = len(texts) - half
    reference = ev.embed(encoder, scored, count)
    neighbours = nearest_neighbours(reference)
    print(f"# all-MiniLM-L6-v2, {count} scored sentences, calibration on {half} others ({cpu_summary()})\n")
    print("| feature map | calibrated | cosine mean | cosine min | same nearest neighbour | layer error before -> after |")
    print("|---|---|---|---|---|---|")
    settings = [] if args.calibrated_only else [(fm, None) for fm in la_maps()]
    settings.append(("hedgehog", calibration))
    for feature_map, batches in settings:
        start = time.perf_counter()
        options = {"feature_map": feature_map}
        if batches is not None:
            options.update(calibrate=list(batches), steps=args.steps)
        compiled = optcc.compile(encoder, example_inputs=scored[0], target="eager",
                                 passes=["canonicalize_attention", ("attention_to_linear", options)])
        record = compiled.report["attention_to_linear"]
        assert record.matches == 6, record.message
        got = ev.embed(compiled, scored, count)
        agreement = ev.embedding_agreement(reference, got)
        same = float((nearest_neighbours(got) == neighbours).double().mean())
        rows = record.stats.get("calibration") or []
        errors = (f"{sum(r['error_before'] for r in rows) / len(rows):.3f} -> "
                  f"{sum(r['error_after'] for r in rows) / len(rows):.3f}") if rows else "-"
        print(f"| {feature_map} | {'yes' if batches is not None else 'no'} | {agreement['cosine_mean']:.4f} | "
              f"{agreement['cosine_min']:.4f} | {same:.1%} | {errors} |", flush=True)
        del compiled
        print(f"<!-- {feature_map}: {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
