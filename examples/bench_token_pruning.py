"""CPU speed of token_pruning (ToMe merging) against eager PyTorch and Inductor: timm ViTs.

For each model (timm ``vit_small_patch16_224`` / ``vit_base_patch16_224``, random weights:
speed does not depend on them) at 224x224, each batch and each ``r`` (tokens merged per
block; ``r = 0`` is the unpruned graph through optcc), every contender runs in this one
process, interleaved round-robin (``optcc.bench.calibrate`` / ``time_interleaved``), and is
summarised by the median of its runs:

* ``eager``: the timm model as given (unpruned), under ``torch.no_grad()``;
* ``Inductor``: ``torch.compile(model)``, default backend and mode (unpruned);
* ``optcc-eager r``: ``optcc.compile(model, [("token_pruning", {"r": r})], target="eager")``;
* ``optcc-inductor r``: the same with ``target="inductor"``.

All the contenders of one (model, batch) - both baselines and every ``r`` - are timed in
one round-robin, so the ratios of a row share their baselines' runs. The table shows
speed ratios (images/s of one over images/s of the other, >1 = faster), never absolute
times; "FLOPs removed" is the pass's own count (``stats["flops_removed"]``: the fraction
of the blocks' attention + MLP FLOPs).

Goals, at the ToMe paper's setting (ViT-B/16, r = 13): ``target="eager"`` >= 1.8x eager,
``target="inductor"`` >= 1.6x Inductor alone. Where the time goes into the GEMMs (a CPU), the
speed-up is bounded by the FLOPs: ``1 / (1 - FLOPs removed)`` (r = 13 on ViT-B: 41% removed,
at most about 1.7x).

    .venv/bin/python examples/bench_token_pruning.py [--runs 9] [--large-runs 5] [--seconds 1.0]
        [--threads N] [--models vit_small_patch16_224,vit_base_patch16_224] [--batches 8,32]
        [--rs 0,8,13,16] [--quick] [--profile vit_base_patch16_224:8:13] [--markdown FILE]

``--large-runs`` applies to batches of 32 and more (one call of ViT-B at batch 32 takes
seconds on a small CPU). ``--profile MODEL:BATCH:R`` profiles optcc-eager on that case with
``torch.profiler`` and prints the top ops by self CPU time. ``--quick`` is a smoke test
(ViT-S, batch 2, r = 13, 2 runs). The full run takes about 20 minutes on 2 cores with a warm
Inductor cache (more on a cold one: each optcc-inductor build compiles a new graph).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import optcc  # noqa: E402
from optcc.bench import calibrate, time_interleaved  # noqa: E402
from optcc.hardware import cpu_summary  # noqa: E402
from optcc.pass_manager import output_error  # noqa: E402

GOAL_MODEL, GOAL_R = "vit_base_patch16_224", 13
GOAL_EAGER, GOAL_INDUCTOR = 1.8, 1.6


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


def create(name: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def pruned(model, x, r: int, target: str):
    compiled = optcc.compile(model, [("token_pruning", {"r": r})], example_inputs=(x,), target=target)
    record = compiled.report["token_pruning"]
    return compiled, record.stats


@torch.no_grad()
def group(name: str, batch: int, rs: list[int], runs: int, seconds: float) -> tuple[list[dict], list[str]]:
    """Time eager, Inductor and optcc-{eager,inductor} at every r on one (model, batch)."""
    model = create(name)
    x = torch.randn(batch, 3, 224, 224)
    reference = model(x)
    notes: list[str] = []
    fns = {"eager": lambda: model(x)}
    compile_s: dict[str, float] = {}

    say(f"{name} batch {batch}: torch.compile ...")
    start = time.perf_counter()
    inductor = torch.compile(model)
    inductor(x)
    compile_s["Inductor"] = time.perf_counter() - start
    fns["Inductor"] = lambda: inductor(x)

    stats: dict[int, dict] = {}
    for r in rs:
        for target in ("eager", "inductor"):
            label = f"optcc-{target} r={r}"
            say(f"{name} batch {batch}: {label} ...")
            start = time.perf_counter()
            try:
                compiled, st = pruned(model, x, r, target)
                out = compiled(x)
            except Exception as exc:  # report it, keep the other contenders
                text = str(exc).strip().splitlines()
                notes.append(f"{name} batch {batch} {label} failed: {type(exc).__name__}: {text[0] if text else ''}")
                continue
            compile_s[label] = time.perf_counter() - start
            stats[r] = st
            if r > 0 and not st.get("matches"):
                notes.append(f"{name} batch {batch} r={r}: token_pruning left the model unchanged: "
                             f"{st.get('message', '')}")
            if r == 0:
                err = output_error([reference], [out])
                if err > 1e-3:
                    notes.append(f"{name} batch {batch} {label}: unpruned output differs from eager ({err:.1e})")
            fns[label] = lambda c=compiled: c(x)

    say(f"{name} batch {batch}: warm-up ...")
    for fn in fns.values():
        fn()
    iterations = calibrate(fns["eager"], seconds)
    say(f"{name} batch {batch}: timing {len(fns)} contenders, {runs} runs x {iterations} calls each ...")
    times = time_interleaved(fns, runs=runs, iterations=iterations)
    med = {k: statistics.median(t) for k, t in times.items()}
    spread = {k: (max(t) - min(t)) / med[k] if len(t) > 1 else float("nan") for k, t in times.items()}
    eager_ips = batch / med["eager"] * 1e3
    notes.append(f"{name} batch {batch}: {runs} runs x {iterations} calls; for reference only, eager "
                 f"{eager_ips:.1f} images/s, Inductor {batch / med['Inductor'] * 1e3:.1f} images/s; "
                 f"compile s (incl. first call): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in compile_s.items()))

    rows = []
    for r in rs:
        e, i = f"optcc-eager r={r}", f"optcc-inductor r={r}"
        row = {"model": name, "batch": batch, "r": r, "runs": runs,
               "flops": stats.get(r, {}).get("flops_removed"),
               "tokens": (stats.get(r, {}).get("tokens") or [None])[-1]}
        row["oe/eager"] = med["eager"] / med[e] if e in med else None
        row["oi/inductor"] = med["Inductor"] / med[i] if i in med else None
        row["oi/eager"] = med["eager"] / med[i] if i in med else None
        row["inductor/eager"] = med["eager"] / med["Inductor"]
        row["spread"] = max(spread[k] for k in ("eager", "Inductor", e, i) if k in spread)
        rows.append(row)
    return rows, notes


def fmt(value, pattern="{:.2f}x") -> str:
    return "-" if value is None else pattern.format(value)


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | batch | r | tokens out | FLOPs removed | optcc-eager / eager | "
             "optcc-inductor / Inductor | optcc-inductor / eager | Inductor / eager | runs | max spread |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['r']} | {fmt(row['tokens'], '{}')} | "
            f"{fmt(row['flops'], '{:.1%}')} | {fmt(row['oe/eager'])} | {fmt(row['oi/inductor'])} | "
            f"{fmt(row['oi/eager'])} | {fmt(row['inductor/eager'])} | {row['runs']} | {row['spread']:.0%} |")
    return lines


def goals(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["model"] != GOAL_MODEL or row["r"] != GOAL_R:
            continue
        for key, goal, what in (("oe/eager", GOAL_EAGER, 'target="eager" vs eager'),
                                ("oi/inductor", GOAL_INDUCTOR, 'target="inductor" vs Inductor alone')):
            value = row[key]
            verdict = "no result" if value is None else ("met" if value >= goal else "NOT met")
            lines.append(f"- {GOAL_MODEL} batch {row['batch']} r={GOAL_R}, {what}: {fmt(value)} "
                         f"(goal >= {goal}x): {verdict}")
    return lines or [f"- no {GOAL_MODEL} r={GOAL_R} row in this run: goals not evaluated"]


@torch.no_grad()
def profile(case: str, rows: int = 20) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    name, batch, r = case.split(":")
    batch, r = int(batch), int(r)
    model = create(name)
    x = torch.randn(batch, 3, 224, 224)
    compiled, _ = pruned(model, x, r, "eager")
    for _ in range(2):
        compiled(x)
    calls = 3
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            compiled(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\ntorch.profiler, optcc-eager {name} batch {batch} r={r}, {calls} calls: top ops by self CPU time\n")
    print("| op | self CPU % | self CPU ms / call | calls / call |")
    print("|---|---|---|---|")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]:
        print(f"| {e.key} | {e.self_cpu_time_total / total:.1%} | {e.self_cpu_time_total / calls / 1e3:.2f} | "
              f"{e.count / calls:g} |")
    optcc_ops = [e for e in events if e.key.startswith("optcc::")]
    if optcc_ops:
        share = sum(e.self_cpu_time_total for e in optcc_ops) / total
        cpu_total = sum(e.cpu_time_total for e in optcc_ops if e.key in ("optcc::tome_plan", "optcc::token_merge"))
        print(f"\noptcc:: ops together: {share:.1%} of self CPU time; optcc::tome_plan + optcc::token_merge "
              f"including their children: {cpu_total / calls / 1e3:.1f} ms / call of "
              f"{total / calls / 1e3:.1f} ms / call")


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def report(args, rows: list[dict], notes: list[str], started: float, final: bool) -> list[str]:
    minutes = (time.perf_counter() - started) / 60
    return [f"token_pruning (ToMe, r tokens per block) on timm ViTs at 224, random weights, "
            f"torch.no_grad(), {torch.get_num_threads()} threads; speed ratios of medians of interleaved "
            f"runs (>1 = faster); {args.runs} runs for batches < 32, {args.large_runs} for batches >= 32, "
            f"each run >= {args.seconds} s" + ("" if final else " (partial: still running)"), "",
            *table(rows), "",
            f"Goals ({GOAL_MODEL}, r={GOAL_R}):", *goals(rows), "", "Notes:",
            *[f"- {n}" for n in notes],
            "- max spread: (max - min) / median of the runs, the worst of the row's four contenders",
            f"- load average {'after' if final else 'now'}: {load()}; {minutes:.1f} min{'' if final else ' so far'}, "
            f"peak RSS {peak_rss_gib():.1f} GiB"]


def write(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="interleaved runs (batches below 32)")
    parser.add_argument("--large-runs", type=int, default=5, help="interleaved runs for batches of 32 and more")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed run (at least one call)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--rs", default="0,8,13,16")
    parser.add_argument("--quick", action="store_true", help="smoke test: ViT-S, batch 2, r=13, 2 runs")
    parser.add_argument("--profile", metavar="MODEL:BATCH:R", help="profile optcc-eager on this case")
    parser.add_argument("--no-bench", action="store_true", help="only --profile")
    parser.add_argument("--markdown", help="also write the table and notes to this file")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.rs = "vit_small_patch16_224", "2", "13"
        args.runs = args.large_runs = 2
        args.seconds = 0.2
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    rs = [int(r) for r in args.rs.split(",")]

    out = [f"CPU: {cpu_summary()}; torch {torch.__version__}", f"load average before: {load()}", ""]
    print("\n".join(out), flush=True)
    if not args.no_bench:
        rows, notes = [], []
        started = time.perf_counter()
        for name in models:
            for batch in batches:
                runs = args.large_runs if batch >= 32 else args.runs
                r_rows, r_notes = group(name, batch, rs, runs, args.seconds)
                torch._dynamo.reset()  # free this group's compiled code before the next
                gc.collect()
                rows += r_rows
                notes += r_notes
                print("\n".join(table(r_rows)[2:]), flush=True)  # progress: rows as they come
                if args.markdown:  # what is done so far survives an interrupted run
                    write(args.markdown, out + report(args, rows, notes, started, final=False))
        body = report(args, rows, notes, started, final=True)
        print("\n" + "\n".join(body), flush=True)
        if args.markdown:
            write(args.markdown, out + body)
    if args.profile:
        profile(args.profile)


if __name__ == "__main__":
    main()
