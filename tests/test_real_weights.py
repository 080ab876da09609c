"""bn_reparam on a real ImageNet classifier (efficientnet_lite0, real weights) and real photos."""

import pytest
import torch
from helpers import count

import optcc
from optcc import zoo
from optcc.pass_manager import output_error


@pytest.mark.slow
def test_efficientnet_lite0_real_weights_fold_exactly():
    model = zoo.efficientnet_lite0()
    images = zoo.sample_images()
    compiled = optcc.compile(model, ["bn_reparam"], example_inputs=(images,), target="eager", verify=True)
    gm = compiled.graph_module
    assert count(gm, "aten._native_batch_norm_legit_no_training") == 0
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert batch_norms > 40 and compiled.report["bn_reparam"].stats["rules"]["conv_bn"] == batch_norms
    with torch.no_grad():
        expected = model(images)
        got = compiled(images)
    assert output_error([expected], [got]) <= 1e-5
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    # the classifier is real: it is confident on real photos, so top-1 agreement means something
    assert expected.softmax(-1).max(-1).values.max() > 0.3
