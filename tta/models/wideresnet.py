"""WideResNet-28-10 with the exact parameter names of RobustBench's CIFAR-10 "Standard" model.

The layout (module names, pre-activation blocks, a 1x1 ``convShortcut`` only where the channel
count changes, a final ``bn1`` + ``fc``, no input normalisation) was read from RobustBench's
``robustbench/model_zoo/architectures/wide_resnet.py`` (itself based on TRADES), so a user's
``Standard.pt`` loads with ``strict=True``. Our own implementation; facts only are taken.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideBasicBlock", "WideResNet", "wide_resnet28_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # Present only when channels change, as in the RobustBench checkpoint key set.
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        # When the shape changes, the shortcut sees the pre-activated input as well.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class _Stage(nn.Module):
    # RobustBench's "NetworkBlock": a container whose blocks live under ``layer``.
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    r"""WideResNet of depth ``6 n + 4`` and widening factor ``k`` (Zagoruyko & Komodakis, 2016).

    Args:
        depth: ``6 n + 4`` (28 gives 4 blocks per stage).
        widen_factor: channel multiplier ``k``; stages have 16k, 32k, 64k channels.
        num_classes: number of outputs.
        in_channels: input channels (3 for CIFAR).
        drop_rate: dropout between the two convolutions of a block.

    Shape:
        - Input: :math:`(N, C_{in}, 32, 32)` in [0, 1] (RobustBench's Standard model takes
          unnormalised [0, 1] input)
        - Output: :math:`(N, \text{num\_classes})`

    Examples::

        >>> model = WideResNet(28, 10)
        >>> model.load_state_dict(tta.models.extract_state_dict(tta.models.load_checkpoint("Standard.pt")))
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        blocks = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _Stage(blocks, channels[0], channels[1], 1, drop_rate)
        self.block2 = _Stage(blocks, channels[1], channels[2], 2, drop_rate)
        self.block3 = _Stage(blocks, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(torch.flatten(out, 1))


def wide_resnet28_10(num_classes: int = 10, in_channels: int = 3, weights: str | None = None, **kwargs) -> WideResNet:
    """WideResNet-28-10; ``weights`` is an optional local checkpoint (e.g. RobustBench ``Standard.pt``)."""
    model = WideResNet(depth=28, widen_factor=10, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if weights is not None:
        from tta.models.checkpoint import load_weights

        load_weights(model, weights)
    return model
