"""`resnet18-like`: ResNet-18 in plain PyTorch (no torchvision), torchvision's module names.

What it is for: the convolutional case. Sparse-Linear rewrites must leave convolutions and
BatchNorm alone (or handle them on purpose), and analyses must cope with 4-D weights. ResNet-18
is the standard small CNN (11.7M parameters); torchvision itself is kept out of the environment
(its wheel breaks beside torch 2.13, see DESIGN.md), so this is a faithful re-implementation:
`conv1`, `bn1`, `layer{1-4}.{0,1}.conv1/bn1/conv2/bn2`, `layer{2-4}.0.downsample.{0,1}`, `fc`,
so torchvision ResNet-18 state dicts load unchanged.

BatchNorm is in eval mode with *non-trivial* running statistics and affine parameters (drawn
from the seed), not torchvision's fresh 0/1 values: with those BN is almost an identity and a
broken BN-folding or constant-propagation pass would go unnoticed. Forward takes images
[batch, 3, image, image] and returns logits [batch, classes]; `width` scales the channel counts
(64 for ResNet-18) so tests can build a small variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._spec import Spec, token_spec_fns

__all__ = ["ResNet", "ZOO"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """ResNet-18 layout (2 basic blocks per stage); `forward(images)` returns logits."""

    def __init__(self, cfg: dict):
        super().__init__()
        w = cfg["width"]
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = [w, 2 * w, 4 * w, 8 * w]
        cin = w
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, cfg["classes"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(cfg: dict) -> ResNet:
    model = ResNet(cfg)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # torchvision's init: He normal, fan_out, for the ReLU that follows.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.0)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(model.fc.weight, 0.0, 0.01)
    nn.init.normal_(model.fc.bias, 0.0, 0.01)
    return model


def _batch(cfg: dict, gen: torch.Generator) -> tuple:
    return (torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], generator=gen, dtype=torch.float32),)


def _validate(cfg: dict) -> None:
    if cfg["image"] < 32:
        raise ValueError(f"image ({cfg['image']}) must be at least 32 (ResNet downsamples 32x)")


_example, _calibration = token_spec_fns(_batch)

ZOO = {
    "resnet18-like": Spec(
        description="ResNet-18 classifier (224x224, BatchNorm in eval mode), random init",
        defaults={"image": 224, "width": 64, "classes": 1000, "batch": 1},
        build=_build, example=_example, calibration=_calibration,
        inputs="(images [batch, 3, image, image] float32,) positional",
        validate=_validate,
    ),
}
