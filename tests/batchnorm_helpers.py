"""Shared pieces of the test_batchnorm_*.py files: a torch BatchNorm with non-trivial state and
independent float64 references."""
from __future__ import annotations

import torch
from torch import nn


def source_bn(num_features: int, cls: type = nn.BatchNorm2d) -> nn.Module:
    """A torch BatchNorm (eval mode) with seeded non-trivial weight, bias and running statistics."""
    torch.manual_seed(0)
    bn = cls(num_features)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn.eval()


def moments64(x: torch.Tensor, correction: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 per-channel mean and variance of x (N, C, *)."""
    var, mean = torch.var_mean(x.double(), [0, *range(2, x.dim())], correction=correction)
    return mean, var


def normalize64(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """float64 BatchNorm of x (N, C, *) with per-channel mean/var and optional affine."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x.double() - mean.double().view(shape)) / torch.sqrt(var.double().view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y
