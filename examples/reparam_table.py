"""bn_reparam on timm's re-parameterizable models: what it fused, compared with timm.

    .venv/bin/python examples/reparam_table.py [MODEL ...]     (MODEL: a timm name or "repmlp")

For each model (random weights with randomized BatchNorm statistics, except
efficientnet_lite0, which uses its real ImageNet weights): nodes and convolutions before
and after ``bn_reparam``, the convolutions of timm's own ``reparameterize_model`` result
(captured the same way), BatchNorms left, and the max relative output error against
eager. Prints a Markdown table (the one in docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from timm.utils.model import reparameterize_model  # noqa: E402

import optcc  # noqa: E402
from optcc import zoo  # noqa: E402
from optcc.pass_manager import output_error  # noqa: E402

MODELS = {  # name -> input size (small where the model accepts it, to keep this quick)
    "repvgg_a0": 224, "repvgg_b0": 224, "mobileone_s0": 224, "fastvit_t8": 256,
    "efficientvit_m0": 224, "levit_128s": 224, "resnet50": 224, "efficientnet_lite0": 224,
}
CONV, BN = "aten.convolution", "aten._native_batch_norm_legit_no_training"


def randomized(name: str) -> torch.nn.Module:
    if name == "efficientnet_lite0":
        return zoo.efficientnet_lite0()
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, pretrained=False).eval())


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    return model


def row(name: str, size: int) -> str:
    model = randomized(name)
    x = zoo.sample_images(size, crops_per_image=0)[:1] if name == "efficientnet_lite0" else torch.randn(1, 3, size, size)
    before = optcc.capture(model, (x,))
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager")
    after = compiled.graph_module
    timm_graph = optcc.capture(reparameterize_model(copy.deepcopy(model)), (x,))
    with torch.no_grad():
        error = output_error([model(x)], [compiled(x)])
    ops_b, ops_a, ops_t = optcc.op_counts(before), optcc.op_counts(after), optcc.op_counts(timm_graph)
    missed = compiled.report["bn_reparam"].stats.get("missed", {})
    print(f"{name}: missed {missed}", file=sys.stderr)
    return (f"| {name} | {size} | {len(before.graph.nodes)} -> {len(after.graph.nodes)} | "
            f"{ops_b[CONV]} -> {ops_a[CONV]} | {ops_t[CONV]} | {ops_b[BN]} -> {ops_a[BN]} | {ops_t[BN]} | "
            f"{error:.1e} |")


def repmlp_row() -> str:
    """A RepMLPNet block (not in timm): its deploy form keeps every conv but the local
    perceptron's branches, which RepMLP merges into ``fc3``."""
    from optcc.testing.blocks import RepMLPBlock

    torch.manual_seed(0)
    block = randomize_bn(RepMLPBlock(64, 14, 14, num_sharesets=4, reparam_conv_k=(1, 3, 5)).eval())
    x = torch.randn(1, 64, 56, 56)
    before = optcc.capture(block, (x,))
    compiled = optcc.compile(block, ["bn_reparam"], example_inputs=(x,), target="eager")
    with torch.no_grad():
        error = output_error([block(x)], [compiled(x)])
    ops_b, ops_a = optcc.op_counts(before), optcc.op_counts(compiled.graph_module)
    deploy_convs = sum(isinstance(m, torch.nn.Conv2d) for m in block.modules()) - len(block.reparam_conv_k)
    return (f"| RepMLP block (64 ch, 14x14 windows, 4 share sets, k 1/3/5) | 56 | "
            f"{len(before.graph.nodes)} -> {len(compiled.graph_module.graph.nodes)} | "
            f"{ops_b[CONV]} -> {ops_a[CONV]} | {deploy_convs} (RepMLP's deploy form) | "
            f"{ops_b[BN]} -> {ops_a.get(BN, 0)} | 0 | {error:.1e} |")


def main(names: list[str]) -> None:
    print("| model | input | nodes before -> after | convs before -> after | convs, timm reparameterized "
          "| BN before -> after | BN, timm | max rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names or [*MODELS, "repmlp"]:
        print(repmlp_row() if name == "repmlp" else row(name, MODELS.get(name, 224)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
