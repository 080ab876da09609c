"""Speed of block_fusion on models whose attention is written by hand, and on CNNs.

    .venv/bin/python examples/bench_attention.py [--seq 128,256,576,1024] [--runs 7] [--cnn]

Contenders (same process, interleaved, medians; see optcc.bench): eager; torch.compile
(Inductor) on the model; optcc with ``bn_reparam, block_fusion`` lowered to eager and to
Inductor. Models:

* timm ``vit_small_patch16_224`` with ``fused_attn=False`` (``q @ k.T * scale``), the image
  size chosen so the token count is near the sequence length;
* a transformers BERT (4 layers, hidden 512, 8 heads) with ``attn_implementation="eager"``;
* with ``--cnn``: ``efficientnet_lite0`` and ``resnet50`` at batch 1, where block_fusion finds
  no attention and must cost nothing.

Prints one table per configuration and a markdown summary of the speed ratios.
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from optcc.bench import benchmark  # noqa: E402

PASSES = ["bn_reparam", "block_fusion"]


def vit(seq: int):
    import timm

    side = max(1, round(math.sqrt(seq - 1)))
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=16 * side).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return f"ViT-S/16 hand-written attention, {side * side + 1} tokens", model, (torch.randn(1, 3, 16 * side, 16 * side),)


def bert(seq: int):
    import transformers

    config = transformers.BertConfig(num_hidden_layers=4, hidden_size=512, num_attention_heads=8,
                                     intermediate_size=2048, max_position_embeddings=max(512, seq),
                                     attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    return f"BERT-4L-512 eager attention, {seq} tokens", model, (torch.randint(0, 1000, (1, seq)),)


def cnn(name: str):
    import timm

    return f"{name} batch 1", timm.create_model(name, pretrained=False).eval(), (torch.randn(1, 3, 224, 224),)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", default="128,256,576,1024")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--models", default="vit,bert")
    parser.add_argument("--cnn", action="store_true", help="also efficientnet_lite0 and resnet50")
    args = parser.parse_args()
    torch.manual_seed(0)
    configs = [(m, int(s)) for m in args.models.split(",") if m for s in args.seq.split(",")]
    rows = []
    jobs = [lambda m=m, s=s: {"vit": vit, "bert": bert}[m](s) for m, s in configs]
    if args.cnn:
        jobs += [lambda n=n: cnn(n) for n in ("efficientnet_lite0", "resnet50")]
    for job in jobs:
        label, model, inputs = job()
        result = benchmark(model, inputs, PASSES, runs=args.runs, seconds_per_run=0.5, model_name=label)
        print(result.render(), flush=True)
        ratio = {name: result.ratio(name) for name in ("optcc-eager", "torch.compile", "optcc-inductor")}
        vs_inductor = result.ratio("optcc-inductor", "torch.compile")
        spread = max(c.spread for c in result.contenders if c.times_ms)
        error = max(c.error for c in result.contenders if c.error is not None)
        rows.append(f"| {label} | {ratio['optcc-eager']:.2f}x | {ratio['torch.compile']:.2f}x | "
                    f"{ratio['optcc-inductor']:.2f}x | {vs_inductor:.2f}x | {spread:.0%} | {error:.1e} |")
    print("\n| model | optcc-eager / eager | torch.compile / eager | optcc-inductor / eager "
          "| optcc-inductor / torch.compile | max spread | max rel. error |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
