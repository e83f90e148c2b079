"""TENT: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021).

Reference: the authors' ``tent.py`` and ``cifar10c.py`` (github.com/DequanWang/tent). Per
test batch, ``steps`` times: forward with batch statistics in every BatchNorm layer, loss =
the softmax entropy averaged over the batch, one optimizer step on the BatchNorm scale and
shift only. The logits returned are those of the (last) forward pass, computed before its
update, as the reference ``forward_and_adapt`` returns them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tta.batchnorm import _AdaptiveBatchNormMixin
from tta.methods import register_method
from tta.methods.base import (Adapter, batchnorm_layers, check_bool, check_int, check_optimizer_args,
                              make_optimizer, norm_affine_params, softmax_entropy, start_from_source)
from tta.surgery import convert

__all__ = ["Tent", "configure_batch_statistics"]


def configure_batch_statistics(model: nn.Module, method: str, *, affine: bool = False) -> None:
    """Configure ``model`` as the entropy-minimisation references do: every BatchNorm layer
    normalises with the statistics of the current batch (and never updates its running
    statistics, which are the source ones), every parameter is frozen; the caller unfreezes
    what it trains.

    The references call ``model.train()``; tta keeps the model in eval mode instead, so Dropout
    and stochastic depth stay off (as the online-TTA benchmark of Marsden et al. does). For
    models without Dropout the two are the same computation.

    Raises:
        ValueError: no torch BatchNorm layer, or (``affine``: the method trains the BatchNorm
            scale and shift) none with a scale or shift; before ``model`` changes.
    """
    layers = batchnorm_layers(model)
    if affine and layers and not any(isinstance(getattr(m, k, None), nn.Parameter)
                                     for m in layers for k in ("weight", "bias")):
        raise ValueError(f"{method} updates the BatchNorm scale and shift, but the model's BatchNorm "
                         "layers have affine=False")
    try:
        convert(model, stats="batch")
    except ValueError as error:  # no torch BatchNorm layer
        raise ValueError(f"{method} adapts through BatchNorm layers: {error}") from None
    start_from_source(model)
    model.eval()
    model.requires_grad_(False)


@register_method("tent")
class Tent(Adapter):
    r"""TENT (Wang et al., ICLR 2021): minimise the prediction entropy on each test batch.

    Update rule per batch ``x`` (repeated ``steps`` times): ``z = f(x)`` with batch statistics,
    ``L = mean_i H(softmax(z_i))``, ``H(p) = -sum_c p_c log p_c``; one optimizer step on the
    BatchNorm affine parameters (scale gamma, shift beta); every other parameter is frozen.

    Defaults are the reference CIFAR-10-C configuration (``cfgs/tent.yaml``): Adam, lr 1e-3,
    betas (0.9, 0.999), no weight decay, 1 step, online (not episodic). The ImageNet-C setting is
    ``optimizer="sgd"`` (lr 0.00025, momentum 0.9; ``nesterov=True`` and dampening 0 are the
    reference ``conf.py`` defaults for SGD).

    Args:
        model: a classifier with torch BatchNorm layers (converted in place to batch statistics).
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: learning rate; None: 1e-3 for Adam, 0.00025 for SGD.
        betas: Adam's betas. Default (0.9, 0.999).
        momentum, nesterov, dampening: SGD's. Defaults 0.9, True, 0.
        weight_decay: Default 0.
        steps: optimizer steps per batch (int >= 1). Default 1.
        episodic: reset the model and optimizer before every batch. Default False.

    State kept: the adapted BatchNorm affine parameters and the optimizer state (both in
    ``state_dict``). A parameter shared by several BatchNorm layers is updated once per step.
    """

    needs_grad = True

    def __init__(self, model: nn.Module, *, optimizer: str = "adam", lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9,
                 nesterov: bool = True, dampening: float = 0.0, weight_decay: float = 0.0,
                 steps: int = 1, episodic: bool = False) -> None:
        super().__init__(model)
        opt = check_optimizer_args(optimizer, lr, betas, momentum, nesterov, dampening, weight_decay)
        self.hparams = {**opt, "steps": check_int("steps", steps), "episodic": check_bool("episodic", episodic)}
        configure_batch_statistics(model, self.name, affine=True)
        params, self.param_names = norm_affine_params(model, (_AdaptiveBatchNormMixin,))
        for p in params:
            p.requires_grad_(True)
        self.optimizer = make_optimizer(params, **opt)
        self._snapshot()

    def _predict(self, x: Tensor) -> Tensor:
        return self._adapt_steps(x)

    @torch.enable_grad()  # adapt even when called under torch.no_grad(), like the reference
    def _forward_and_adapt(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        loss = softmax_entropy(logits).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return logits.detach()
