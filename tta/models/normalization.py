"""Input normalisation as a module inside the model, so that data stay in [0, 1].

Two forms, chosen so that checkpoints keep their key names:

* :class:`InputNormalization` is a layer that a model owns (our small ResNets hold one
  as ``normalize``). Its ``mean`` and ``std`` are *non-persistent* buffers: they are
  architecture hyperparameters (constructor arguments recorded with the model's kwargs),
  not learned weights, so they never appear in a ``state_dict``.
* :class:`Normalized` wraps a model that has no normalisation of its own (torchvision
  classifiers). Its ``state_dict`` keys are the inner model's keys under ``model.``, and its
  :meth:`Normalized.load_state_dict` also accepts the bare keys of the inner model, so a
  user's checkpoint saved from the unwrapped model still loads with ``strict=True``; so does
  a checkpoint of RobustBench's ``normalize_model(model, mean, std)`` (``normalize.mean``,
  ``normalize.std``, ``model.*``: its ImageNet models), whose mean/std must equal ours.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["InputNormalization", "Normalized", "IMAGENET_MEAN", "IMAGENET_STD"]

# The channel statistics torchvision's ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_channel_tensor(values: float | Sequence[float], what: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    if tensor.numel() == 0:
        raise ValueError(f"{what} must have at least one value, got {values!r}")
    return tensor


class InputNormalization(nn.Module):
    r"""Subtracts a per-channel mean and divides by a per-channel std.

    .. math:: y_c = \frac{x_c - \mathrm{mean}_c}{\mathrm{std}_c}

    Args:
        mean: one value per channel (or a single value for all channels).
        std: one value per channel (or a single value), all > 0.

    Shape:
        - Input: :math:`(N, C, *)` with values in [0, 1]
        - Output: same shape as the input

    Examples::

        >>> norm = InputNormalization([0.2860], [0.3530])
        >>> norm(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 1, 28, 28])
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        mean_t = _as_channel_tensor(mean, "mean")
        std_t = _as_channel_tensor(std, "std")
        if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
            raise ValueError(
                f"mean and std must have the same number of channels, got {len(mean_t)} and {len(std_t)}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be > 0, got {std!r}")
        # Non-persistent: not part of the state_dict, so checkpoint keys stay exactly
        # those of the learned weights; the values come from the constructor arguments.
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        channels = self.mean.shape[1]
        if input.dim() < 2 or (channels > 1 and input.shape[1] != channels):
            raise ValueError(
                f"expected input of shape (N, {channels}, ...), got {tuple(input.shape)}"
            )
        shape = (1, -1) + (1,) * (input.dim() - 2)
        mean = self.mean.view(shape).to(dtype=input.dtype)
        std = self.std.view(shape).to(dtype=input.dtype)
        return (input - mean) / std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Normalized(nn.Module):
    r"""Wraps ``model`` so that it takes [0, 1] images: ``model(normalize(x))``.

    The ``state_dict`` keys are the inner model's keys prefixed with ``model.``;
    :meth:`load_state_dict` additionally accepts a state_dict with the bare keys of the inner
    model (none of them starting with ``model.``) and loads it into the inner model, so strict
    key matching of the user's own checkpoint is preserved.

    Args:
        model: the classifier that expects normalised input.
        mean: per-channel mean of the data the classifier was trained on.
        std: per-channel std of that data.

    Examples::

        >>> net = Normalized(torchvision.models.resnet18(), IMAGENET_MEAN, IMAGENET_STD)
        >>> net.load_state_dict(torchvision_resnet18_state_dict)  # bare keys work
    """

    def __init__(self, model: nn.Module, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.model = model

    def forward(self, input: torch.Tensor) -> Any:
        return self.model(self.normalize(input))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Also accepts RobustBench's ``normalize_model`` layout, whose ``normalize.mean`` and
        ``normalize.std`` are persistent: they are checked against this model's values (a
        ``ValueError`` names both when they differ) and not loaded."""
        state = dict(state_dict)
        for key in ("mean", "std"):
            given = state.pop(f"normalize.{key}", None)
            own = getattr(self.normalize, key)
            if given is not None and (given.numel() != own.numel() or not torch.allclose(
                    given.detach().flatten().double().cpu(), own.flatten().double().cpu())):
                raise ValueError(f"the checkpoint's normalize.{key} {given.flatten().tolist()} differs "
                                 f"from this model's input {key} {own.flatten().tolist()}: build the "
                                 f"model with {key}={given.flatten().tolist()}")
        if state and not any(key.startswith("model.") for key in state):
            return self.model.load_state_dict(state, strict=strict, assign=assign)
        return super().load_state_dict(state, strict=strict, assign=assign)
