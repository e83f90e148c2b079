"""The two AugMix models of RobustBench's CIFAR corruption leaderboards, with its key names.

Hendrycks et al., "AugMix: A Simple Data Processing Method to Improve Robustness and
Uncertainty", ICLR 2020; RobustBench names ``Hendrycks2020AugMix_WRN`` (WRN-40-2, CIFAR-10-C and
CIFAR-100-C) and ``Hendrycks2020AugMix_ResNeXt`` (ResNeXt-29, CIFAR-10-C and CIFAR-100-C).
The facts below were read from RobustBench's ``robustbench/model_zoo/cifar10.py``,
``cifar100.py`` and ``architectures/{wide_resnet,resnext}.py`` (our own implementation):

* both classes register persistent buffers ``mu`` and ``sigma`` of shape (1, 3, 1, 1), value 0.5,
  and compute ``(x - mu) / sigma`` on [0, 1] input before the network;
* the WRN is RobustBench's ``WideResNet(depth=40, widen_factor=2, sub_block1=False)`` (the
  layout of :class:`tta.models.wideresnet.WideResNet`);
* the ResNeXt is ``CifarResNeXt(ResNeXtBottleneck, depth=29, cardinality=4, base_width=32)``:
  stem ``conv_1_3x3``/``bn_1``, stages ``stage_1..3`` of bottlenecks (``conv_reduce``,
  ``bn_reduce``, grouped ``conv_conv``, ``bn``, ``conv_expand``, ``bn_expand`` and a
  ``downsample`` = Sequential(1x1 conv, BN) in the first block of a stage), 8x8 average pooling,
  ``classifier``.

RobustBench's released checkpoints of these models lack ``mu``/``sigma`` (its ``load_model``
lists them as known failures of a strict load and falls back to ``strict=False``). Here they
load strictly: a state_dict without ``mu``/``sigma`` gets the architecture's constants, one with
them must hold exactly those (else ``ValueError``); every other key must match.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.models.checkpoint import load_weights
from tta.models.wideresnet import WideResNet

__all__ = ["AUGMIX_MEAN", "AUGMIX_STD", "AugMixWideResNet", "ResNeXtBottleneck", "CifarResNeXt",
           "wide_resnet40_2", "resnext29_32x4d"]

AUGMIX_MEAN = (0.5, 0.5, 0.5)  # RobustBench's mu of both AugMix models
AUGMIX_STD = (0.5, 0.5, 0.5)  # and sigma


class _MuSigma(nn.Module):
    """Persistent ``mu``/``sigma`` buffers (RobustBench's names) and their strict loading."""

    mu: torch.Tensor
    sigma: torch.Tensor

    def _register_mu_sigma(self) -> None:
        self.register_buffer("mu", torch.tensor(AUGMIX_MEAN).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor(AUGMIX_STD).view(1, 3, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu) / self.sigma

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        state = dict(state_dict)
        for key in ("mu", "sigma"):
            own = getattr(self, key)
            given = state.setdefault(key, own.clone())
            if given.shape != own.shape or not torch.equal(given.to(own.device, own.dtype), own):
                raise ValueError(f"the checkpoint's {key} {given.flatten().tolist()} differs from "
                                 f"{type(self).__name__}'s fixed {key} {own.flatten().tolist()} "
                                 f"(RobustBench's AugMix models normalise with 0.5/0.5)")
        return super().load_state_dict(state, strict=strict, assign=assign)


class AugMixWideResNet(_MuSigma, WideResNet):
    r"""RobustBench's ``Hendrycks2020AugMixWRNNet``: ``(x - 0.5) / 0.5``, then a WideResNet.

    Shape: input :math:`(N, 3, 32, 32)` in [0, 1]; output :math:`(N, \text{num\_classes})`.
    """

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10, in_channels: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__(depth, widen_factor, num_classes, in_channels, drop_rate)
        self._register_mu_sigma()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalize(x))


class ResNeXtBottleneck(nn.Module):
    """ResNeXt block C (Xie et al., 2017): 1x1 reduce, grouped 3x3, 1x1 expand (x4), residual."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, cardinality: int, base_width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = int(math.floor(planes * base_width / 64.0)) * cardinality
        self.conv_reduce = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(width)
        self.conv_conv = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv_expand = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)), inplace=True)
        out = F.relu(self.bn(self.conv_conv(out)), inplace=True)
        out = self.bn_expand(self.conv_expand(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + out, inplace=True)


class CifarResNeXt(_MuSigma):
    r"""RobustBench's ``Hendrycks2020AugMixResNeXtNet``: ``(x - 0.5) / 0.5``, then a CIFAR ResNeXt
    of depth ``9 n + 2`` with stages of 64/128/256 planes (x4 outputs).

    Args:
        depth: 29 (3 blocks per stage), 38, 47, ...
        cardinality: groups of the 3x3 convolution (4 in RobustBench's model).
        base_width: channels per group at 64 planes (32 in RobustBench's model).
        num_classes: 10 (CIFAR-10) or 100 (CIFAR-100).
        in_channels: 3.

    Shape: input :math:`(N, 3, 32, 32)` in [0, 1]; output :math:`(N, \text{num\_classes})`.
    """

    def __init__(self, depth: int = 29, cardinality: int = 4, base_width: int = 32, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"depth must be 9n + 2 with n >= 1 (11, 20, 29, ...), got {depth}")
        blocks = (depth - 2) // 9
        self._register_mu_sigma()
        self.conv_1_3x3 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2)):
            out = planes * ResNeXtBottleneck.expansion
            downsample = None
            if stride != 1 or in_planes != out:
                downsample = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            layers = [ResNeXtBottleneck(in_planes, planes, cardinality, base_width, stride, downsample)]
            layers += [ResNeXtBottleneck(out, planes, cardinality, base_width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            in_planes = out
        self.stage_1, self.stage_2, self.stage_3 = stages
        self.classifier = nn.Linear(in_planes, num_classes)
        for module in self.modules():  # RobustBench's init: N(0, 2 / fan_out) convolutions
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_1(self.conv_1_3x3(self.normalize(x))), inplace=True)
        out = self.stage_3(self.stage_2(self.stage_1(out)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def wide_resnet40_2(num_classes: int = 10, in_channels: int = 3, weights: Any = None, **kwargs: Any) -> AugMixWideResNet:
    """WRN-40-2 of AugMix (RobustBench ``Hendrycks2020AugMix_WRN``: ``num_classes`` 10 for
    CIFAR-10-C, 100 for CIFAR-100-C); ``weights``: a local checkpoint, loaded strictly."""
    model = AugMixWideResNet(40, 2, num_classes, in_channels, **kwargs)
    return model if weights is None else load_weights(model, weights)


def resnext29_32x4d(num_classes: int = 10, in_channels: int = 3, weights: Any = None, **kwargs: Any) -> CifarResNeXt:
    """ResNeXt-29 of AugMix (RobustBench ``Hendrycks2020AugMix_ResNeXt``: ``CifarResNeXt(depth=29,
    cardinality=4, base_width=32)``, i.e. 4 groups of 32 channels in the first stage; the name
    follows the AugMix paper, not torchvision's groups-x-width convention); ``weights``: a local
    checkpoint, loaded strictly."""
    model = CifarResNeXt(29, 4, 32, num_classes, in_channels, **kwargs)
    return model if weights is None else load_weights(model, weights)
