"""optcc's generated Triton kernels vs Inductor's vs eager, per region kind and end to end.

    python examples/bench_lowering.py                 # on a CUDA GPU: fp16 and bf16, do_bench
    TRITON_INTERPRET=1 python examples/bench_lowering.py --tiny   # anywhere: correctness only

For each region kind (pointwise chain, add + layer_norm, softmax, linear + bias + gelu,
linear + residual, conv + bias + relu, attention) a small module is compiled three ways:
eager PyTorch, ``torch.compile`` (Inductor's generated kernels) and ``optcc.compile(...,
target="triton")`` (optcc's kernels). Then ViT-B/16 and ResNet-50 end to end. Times come
from ``triton.testing.do_bench`` (median, CUDA events); the table reports ratios to
Inductor (>1 = faster than Inductor) and the max relative error against eager.
Without CUDA, ``--tiny`` runs the same comparisons on tiny shapes in Triton's
interpreter: its times measure the interpreter, not a kernel, and are not printed.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import optcc
from optcc.pass_manager import output_error


class Pointwise(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x * 1.5 + 0.5) * torch.tanh(x) - F.gelu(x)


class AddLayerNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = x + x * 0.5
        return self.norm(h), h


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x * 0.125, dim=-1)


class LinearGelu(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)

    def forward(self, x):
        return F.gelu(self.fc(x))


class LinearResidual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x) + x


class ConvRelu(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x) + x)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def cases(tiny: bool, dtype, device):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    rows, d, seq = (8, 32, 16) if tiny else (8192, 1024, 1024)
    yield "pointwise chain", Pointwise(), (t(rows, d),)
    yield "add + layer_norm", AddLayerNorm(d), (t(rows, d),)
    yield "softmax", Softmax(), (t(rows, d),)
    yield "linear + bias + gelu", LinearGelu(d), (t(rows, d),)
    yield "linear + residual", LinearResidual(d), (t(rows, d),)
    yield "conv + bias + relu", ConvRelu(8 if tiny else 64), (t(2, 8, 8, 8) if tiny else t(32, 64, 56, 56),)
    for head_dim in (64, 128):
        q = (t(1, 2, seq, head_dim) for _ in range(3)) if tiny else (t(4, 16, seq, head_dim) for _ in range(3))
        yield f"attention d={head_dim}", Attention(), tuple(q)
    if not tiny:
        import timm

        yield "ViT-B/16 b8", timm.create_model("vit_base_patch16_224"), (t(8, 3, 224, 224),)
        yield "ResNet-50 b32", timm.create_model("resnet50"), (t(32, 3, 224, 224),)


def flat(out):
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in the interpreter (no CUDA)")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny and TRITON_INTERPRET=1 to check correctness only")
    if args.tiny and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--tiny without CUDA needs TRITON_INTERPRET=1 in the environment")
    device = "cuda" if cuda else "cpu"
    timing = cuda and not args.tiny
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if cuda else [torch.float32]
    if timing:
        from triton.testing import do_bench
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print("# interpreter run: correctness only, no times")
    print("| region | dtype | optcc / Inductor | optcc / eager | Inductor / eager | optcc max rel. err |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        for name, model, inputs in cases(args.tiny, dtype, device):
            model = model.to(device=device, dtype=dtype).eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference = flat(model(*inputs))
                ours = optcc.compile(model, example_inputs=inputs, target="triton")
                error = output_error(reference, flat(ours(*inputs)))
                if not timing:
                    print(f"| {name} | {str(dtype)[6:]} | - | - | - | {error:.1e} |", flush=True)
                    continue
                inductor = torch.compile(model)
                inductor(*inputs)
                ms = {label: do_bench(lambda f=f: f(*inputs)) for label, f in
                      (("eager", model), ("inductor", inductor), ("optcc", ours))}
            print(f"| {name} | {str(dtype)[6:]} | {ms['inductor'] / ms['optcc']:.2f}x | "
                  f"{ms['eager'] / ms['optcc']:.2f}x | {ms['eager'] / ms['inductor']:.2f}x | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
