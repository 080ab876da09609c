"""What the per-call model-state guard costs (optcc.guard), in one process.

    .venv/bin/python examples/bench_guard.py [--runs 15] [--sizes 10,100,1000]

1. timm ``mobileone_s0`` at batch 1, ``bn_reparam``, target eager: the compiled module
   with the default guard, with ``guard="full"`` (the walk over every tensor and module)
   and with ``guard=False``, timed interleaved (``optcc.bench.calibrate`` /
   ``time_interleaved``), medians. Also the guard's own cost measured right after a
   forward pass (the caches as a loop leaves them), median of as many samples.
2. The guard's cost alone (warm, median of many calls) as models grow:
   a chain of N ``Linear(8, 8)`` (the graph reads all 2N tensors), and a model whose
   graph reads two Linear layers while it holds N more it never calls (a model that
   grows in modules and tensors the graph does not read).
Speed is reported as ratios; microseconds only for the guard's own cost (indicative:
they depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import optcc  # noqa: E402
from optcc.bench import calibrate, time_interleaved  # noqa: E402
from optcc.guard import FullStateGuard  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.25, 4)
    return model


@torch.no_grad()
def mobileone(runs: int) -> list[str]:
    import timm

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobileone_s0", pretrained=False)).eval()
    x = torch.randn(1, 3, 224, 224)
    compiled = {level: optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager", guard=level)
                for level in (True, "full", False)}
    names = {True: "guard=True (default)", "full": 'guard="full"', False: "guard=False"}
    fns = {names[level]: (lambda c=c: c(x)) for level, c in compiled.items()}
    for fn in fns.values():
        fn()
        fn()
    iterations = calibrate(fns["guard=False"], 0.3)
    times = time_interleaved(fns, runs=runs, iterations=iterations)
    medians = {name: statistics.median(t) for name, t in times.items()}
    spread = max((max(t) - min(t)) / statistics.median(t) for t in times.values())

    # the guard alone, right after a forward pass of the unguarded module
    unguarded = compiled[False]
    guards = {"default": compiled[True].guard, "full": FullStateGuard(model)}
    in_loop: dict[str, list[float]] = {name: [] for name in guards}
    for _ in range(max(runs, 15)):
        for name, guard in guards.items():
            unguarded(x)
            start = time.perf_counter()
            changed = guard.changed()
            in_loop[name].append(time.perf_counter() - start)
            assert not changed
    tensors = len(list(model.parameters())) + len(list(model.buffers()))
    modules = len(list(model.modules()))
    base = medians["guard=False"]
    return [
        f"mobileone_s0, batch 1, bn_reparam, target eager: {tensors:,} tensors, {modules:,} modules, "
        f"the graph reads {compiled[True].guard.watched:,} tensors; {runs} interleaved runs x "
        f"{iterations} calls, max spread {spread:.0%}",
        "",
        "| guard | speed vs guard=False | guard's own cost after a forward pass (indicative) |",
        "|---|---|---|",
        f"| True (default) | {base / medians[names[True]]:.3f}x | "
        f"{statistics.median(in_loop['default']) * 1e6:,.0f} us |",
        f'| "full" | {base / medians[names["full"]]:.3f}x | {statistics.median(in_loop["full"]) * 1e6:,.0f} us |',
        "| False | 1.000x | - |",
    ]


class Chain(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n)])

    def forward(self, x):
        return self.layers(x)


class TwoUsed(nn.Module):
    """Calls two Linear layers; holds ``n`` more it never calls."""

    def __init__(self, n: int):
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
        self.unused = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))

    def forward(self, x):
        return self.second(self.first(x).relu())


def warm_cost_us(fn, calls: int = 300) -> float:
    fn()
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples) * 1e6


@torch.no_grad()
def scaling(sizes: list[int]) -> list[str]:
    rows = ["| model | modules | tensors | tensors the graph reads | default guard | guard=\"full\" |",
            "|---|---|---|---|---|---|"]
    x = torch.randn(1, 8)
    for label, factory in (("chain of N Linear", Chain), ("2 Linear used + N unused", TwoUsed)):
        for n in sizes:
            model = factory(n).eval()
            compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager")
            compiled(x)
            guard, full = compiled.guard, FullStateGuard(model)
            assert not guard.changed() and not full.changed()
            tensors = len(list(model.parameters())) + len(list(model.buffers()))
            rows.append(f"| {label.replace('N', str(n))} | {len(list(model.modules())):,} | {tensors:,} | "
                        f"{guard.watched:,} | {warm_cost_us(guard.changed):,.1f} us | "
                        f"{warm_cost_us(full.changed):,.1f} us |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--skip-mobileone", action="store_true")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; torch.backends.cpu.get_cpu_capability() = "
          f"{torch.backends.cpu.get_cpu_capability()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print()
    if not args.skip_mobileone:
        print("\n".join(mobileone(args.runs)), flush=True)
        print()
    print("The guard alone (warm, median), as the model grows:")
    print()
    print("\n".join(scaling([int(s) for s in args.sizes.split(",")])))


if __name__ == "__main__":
    main()
