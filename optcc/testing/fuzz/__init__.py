"""Differential fuzzing: random small models from the op vocabulary the passes rewrite.

:func:`model_specs` is a hypothesis strategy for :class:`ModelSpec`, a plain description
of a model (an input shape and a list of blocks) that hypothesis can shrink and print;
:func:`build_model` turns one into an eval-mode ``nn.Module`` with random weights,
random BatchNorm statistics and a random input. :func:`differential_check` captures the
model once and runs every registered exact pass alone, and the default exact pipeline,
each on its own copy of the graph with ``verify=False`` (so that a wrong pass is not
hidden by rollback), and returns every disagreement with eager PyTorch.

The vocabulary: conv (1x1/kxk, strided, dilated, grouped, depthwise, padded or not,
transposed) with or without BatchNorm and activation; standalone BatchNorm; residual
blocks; multi-branch blocks (RepVGG kxk+1x1+identity, ACNet kxk+1xk+kx1, DBB 1x1->avg-pool
branch, concatenated branches); constant scale/shift and SLAB RepBN; pooling; linear
heads; token streams with linear (+ token BatchNorm), layer_norm, MLPs, token mixing,
reshapes/transposes, and attention in several idioms (``q @ k.transpose * scale ->
softmax -> @ v``, ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) with and
without masks.

A failure is printed as a ``ModelSpec(...)`` that can be pasted into a regression test.
"""

from __future__ import annotations

from .oracle import STATS, FuzzStats, check_spec, differential_check, float64_error, run_examples
from .strategies import image_block, model_specs, token_block
from .vocabulary import (
    ACTIVATIONS,
    ATTENTION_IDIOMS,
    MASKS,
    VOCABULARY,
    Block,
    ModelSpec,
    VocabularyBlock,
    block,
    build_model,
    randomize_state,
)

__all__ = ["ACTIVATIONS", "ATTENTION_IDIOMS", "MASKS", "STATS", "VOCABULARY", "Block", "FuzzStats", "ModelSpec",
           "VocabularyBlock", "block", "build_model", "check_spec", "differential_check", "float64_error",
           "image_block", "model_specs", "randomize_state", "run_examples", "token_block"]
