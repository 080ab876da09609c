"""Speed of bn_reparam against timm's own re-parameterization, in one process, interleaved.

    .venv/bin/python examples/bench_reparam.py [--models repvgg_a0,mobileone_s0] [--batches 1,32]

Contenders: eager; timm-reparam (``timm.utils.reparameterize_model``, eager); Inductor on
the timm-reparameterized model (``torch.compile``); optcc bn_reparam with target eager and
target inductor (on the original, un-reparameterized model), each also with
``guard=False`` (no per-call check of the model's state: the contract of timm's one-shot
re-parameterization). Speed is reported as ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from timm.utils.model import reparameterize_model  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import optcc  # noqa: E402
from optcc.bench import BenchResult, Contender, measure  # noqa: E402
from optcc.pass_manager import output_error  # noqa: E402


def build(name: str, model, x):
    if name == "eager":
        return model
    if name == "timm-reparam":
        return reparameterize_model(copy.deepcopy(model))
    if name == "inductor(timm-reparam)":
        return torch.compile(reparameterize_model(copy.deepcopy(model)))
    target, _, unguarded = name.removeprefix("optcc-").partition("-")
    return optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target=target, guard=not unguarded)


@torch.no_grad()
def bench(model_name: str, batch: int, runs: int) -> BenchResult:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224)
    reference = pytree.tree_leaves(model(x))
    names = ["eager", "timm-reparam", "inductor(timm-reparam)", "optcc-eager", "optcc-inductor",
             "optcc-eager-unguarded", "optcc-inductor-unguarded"]
    contenders, calls = [], {}
    for name in names:
        start = time.perf_counter()
        fn = build(name, model, x)
        out = fn(x)
        contender = Contender(name, compile_seconds=time.perf_counter() - start,
                              error=output_error(reference, pytree.tree_leaves(out)))
        contenders.append(contender)
        calls[name] = lambda fn=fn: fn(x)
    iterations = measure(contenders, calls, runs=runs, seconds_per_run=0.3, warmup=2)
    return BenchResult(f"{model_name} batch {batch}", ["bn_reparam"], contenders, runs, iterations,
                       torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="repvgg_a0,mobileone_s0")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for model_name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            result = bench(model_name, batch, args.runs)
            print(result.render(), flush=True)
            r = {c.name: c for c in result.contenders}
            rows.append(
                f"| {model_name} | {batch} | "
                f"{result.ratio('optcc-eager', 'timm-reparam'):.2f}x | "
                f"{result.ratio('optcc-inductor', 'inductor(timm-reparam)'):.2f}x | "
                f"{result.ratio('optcc-eager-unguarded', 'timm-reparam'):.2f}x | "
                f"{result.ratio('optcc-inductor-unguarded', 'inductor(timm-reparam)'):.2f}x | "
                f"{result.ratio('optcc-eager'):.2f}x | {result.ratio('optcc-inductor'):.2f}x | "
                f"{max(c.spread for c in r.values()):.0%} | {r['optcc-eager'].error:.1e} |")
    print("\n| model | batch | optcc-eager / timm-reparam eager | optcc-inductor / Inductor(timm-reparam) "
          "| same, guard=False: eager | same, guard=False: inductor "
          "| optcc-eager / eager | optcc-inductor / eager | max spread | max rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
