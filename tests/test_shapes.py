"""New batch sizes and sequence lengths either run correctly or recompile - never a wrong
result or a crash - through optcc.compile and torch.compile(backend="optcc")."""

from __future__ import annotations

import pytest
import torch
from helpers import SmallConvBN as ConvNet
from helpers import randomize_bn

import optcc
from optcc.pass_manager import output_error


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, attn_implementation="sdpa")
    torch.manual_seed(0)
    return BertModel(config).eval()


def bert_inputs(batch: int, length: int) -> dict:
    ids = torch.randint(0, 100, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # padding that really masks
    return {"input_ids": ids, "attention_mask": mask}


def bert_error(model, compiled, kwargs) -> float:
    with torch.no_grad():
        expected, got = model(**kwargs), compiled(**kwargs)
    return output_error([expected.last_hidden_state, expected.pooler_output],
                        [got.last_hidden_state, got.pooler_output])


def test_bert_new_batch_and_sequence_length_with_optcc_compile():
    model = tiny_bert()
    compiled = optcc.compile(model, example_inputs=(), example_kwargs=bert_inputs(1, 8), target="eager")
    for batch, length in [(1, 8), (3, 8), (2, 13)]:
        assert bert_error(model, compiled, bert_inputs(batch, length)) <= 1e-5
    assert len(compiled.pipeline.cache) == 3  # one specialisation per input signature


def test_bert_new_sequence_length_with_torch_compile():
    model = tiny_bert()
    compiled = torch.compile(model, backend="optcc")
    for batch, length in [(1, 8), (1, 11), (2, 5)]:
        assert bert_error(model, compiled, bert_inputs(batch, length)) <= 1e-5




@pytest.mark.parametrize("entry", ["optcc.compile", "torch.compile"])
def test_conv_net_new_batch_and_image_size(entry):
    model, x = randomize_bn(ConvNet()).eval(), torch.randn(2, 3, 8, 8)
    if entry == "optcc.compile":
        compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(x,), target="eager")
    else:
        compiled = torch.compile(model, backend="optcc", options={"passes": ["bn_reparam"]})
    for shape in [(2, 3, 8, 8), (5, 3, 8, 8), (1, 3, 11, 7), (2, 3, 8, 8)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert output_error([model(x)], [compiled(x)]) <= 1e-5
