"""A small CIFAR-style ResNet family for 28 to 32 pixel images.

The shape follows He et al. (2016), "Deep Residual Learning for Image Recognition", section
4.2: a 3x3 stem, three stages of ``n`` basic blocks with ``width``, ``2 width`` and ``4 width``
channels (16/32/64 by default), global average pooling and a linear classifier; depth is
``6 n + 2`` (ResNet-8/14/20/32/...). The downsampling shortcut is a 1x1 convolution followed
by BatchNorm (their option B), so that every convolution is followed by a BatchNorm layer, which
is what test-time adaptation through BatchNorm statistics works on. Pooling is adaptive, so 28
and 32 pixel inputs both work.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tta.models.normalization import InputNormalization

__all__ = ["BasicBlock", "ResNet", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    r"""CIFAR-style ResNet of depth ``6 * blocks_per_stage + 2``.

    Args:
        depth: total number of weighted layers, ``6 n + 2`` (8, 14, 20, 32, 44, 56, ...).
        num_classes: number of outputs.
        in_channels: 1 (grey) or 3 (RGB) input channels.
        width: channels of the first stage; stages have ``width``, ``2 width``, ``4 width``.
        mean: per-channel input mean for the built-in :class:`InputNormalization`;
            ``None`` means no normalisation (the model then sees the [0, 1] data as is).
        std: per-channel input std, given together with ``mean``.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`, values in [0, 1], :math:`H, W \ge 8`
        - Output: :math:`(N, \text{num\_classes})` logits

    Examples::

        >>> model = ResNet(depth=20, num_classes=10, in_channels=1, mean=[0.286], std=[0.353])
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        if in_channels < 1 or num_classes < 1 or width < 1:
            raise ValueError(
                f"in_channels, num_classes and width must be >= 1, got {in_channels}, {num_classes}, {width}"
            )
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        blocks_per_stage = (depth - 2) // 6
        self.normalize: nn.Module = nn.Identity() if mean is None else InputNormalization(mean, std)  # type: ignore[arg-type]
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        channels = width
        for index, stage_width in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, stage_width, stride))
                channels = stage_width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as the identity,
        # which makes the first epochs at a high learning rate stable (Goyal et al., 2017).
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _make(depth: int):
    def build(num_classes: int = 10, in_channels: int = 3, weights: str | None = None, **kwargs) -> ResNet:
        model = ResNet(depth=depth, num_classes=num_classes, in_channels=in_channels, **kwargs)
        if weights is not None:
            from tta.models.checkpoint import load_weights

            load_weights(model, weights)
        return model

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"ResNet-{depth} (CIFAR shape); ``weights`` is an optional local checkpoint path."
    return build


resnet8 = _make(8)
resnet14 = _make(14)
resnet20 = _make(20)
resnet32 = _make(32)
resnet44 = _make(44)
resnet56 = _make(56)
