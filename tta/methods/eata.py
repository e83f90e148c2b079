"""EATA and ETA: efficient (anti-forgetting) test-time adaptation (Niu et al., ICML 2022).

Reference: the authors' ``eata.py`` (``EATA.forward``, ``forward_and_adapt_eata``,
``update_model_probs``) and ``main.py`` (Fisher computation, hyper-parameters),
github.com/mr-eggplant/EATA; the per-dataset settings of the online-TTA benchmark of Marsden et
al. (``classification/methods/eata.py``, ``cfgs/cifar10_c/eata.yaml``, ``cfgs/imagenet_c/eata.yaml``,
``conf.py``). ETA is EATA without the Fisher regulariser (the reference's ``--algorithm eta``).
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta.batchnorm import _AdaptiveBatchNormMixin
from tta.methods import register_method
from tta.methods.base import (Adapter, check_bool, check_int, check_number, check_optimizer_args,
                              make_optimizer, norm_affine_params, softmax_entropy)
from tta.methods.tent import configure_batch_statistics

__all__ = ["ETA", "EATA", "entropy_margin", "select_samples", "fisher_diagonal"]

logger = logging.getLogger(__name__)

# Weight of the past in the moving averages of EATA's probability vector (``update_model_probs``)
# and SAR's loss (``update_ema``): ``ema <- 0.9 ema + 0.1 new`` in both references.
EMA_DECAY = 0.9


def entropy_margin(margin_e0: float, num_classes: int | None, logits: Tensor) -> float:
    """The entropy threshold ``E0 = margin_e0 * ln(C)`` (nats) of EATA (Eqn. 3) and SAR
    (Eqn. 2); ``C = num_classes``, or the width of ``logits`` (N, C) when None (the
    benchmark's ``EATA.MARGIN_E0 * math.log(num_classes)``; the references' 0.4 ln 1000)."""
    return margin_e0 * math.log(num_classes if num_classes is not None else logits.shape[1])


@torch.no_grad()
def select_samples(logits: Tensor, e_margin: float, d_margin: float,
                   probs_ema: Tensor | None) -> tuple[Tensor, Tensor]:
    """EATA's two sample filters (``forward_and_adapt_eata``), as boolean masks of shape (N,).

    ``reliable``: entropy of ``softmax(logits)`` < ``e_margin`` (Eqn. 3). ``selected``: reliable
    and, when the moving-average probability vector ``probs_ema`` (C,) exists, with
    ``|cos(probs_ema, softmax(logits_i))| < d_margin`` (non-redundant, Eqn. 5); without it
    (first batch, or after a reset) every reliable sample is selected.
    """
    reliable = softmax_entropy(logits) < e_margin
    if probs_ema is None:
        return reliable, reliable.clone()
    cosine = F.cosine_similarity(probs_ema.unsqueeze(0), logits.softmax(1), dim=1)
    return reliable, reliable & (cosine.abs() < d_margin)


def _fisher_inputs(images: Tensor | Iterable[Any], batch_size: int) -> Iterator[Tensor]:
    """The input batches of ``fisher_images``: a tensor split into ``batch_size`` chunks, or
    the items of an iterable (tensors or (input, target, ...) tuples; targets unused)."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    for batch in images:
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        if not isinstance(batch, Tensor) or batch.dim() < 2 or not batch.is_floating_point():
            what = f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, Tensor) else type(batch).__name__
            raise TypeError(f"eata: fisher_images must yield float input batches (N, C, H, W) or "
                            f"(input, target) tuples, got {what}")
        if len(batch):
            yield batch


@torch.enable_grad()
def fisher_diagonal(model: nn.Module, params: list[Tensor], batches: Iterable[Tensor]) -> list[Tensor]:
    """The diagonal Fisher information of ``params`` as EATA's ``main.py`` estimates it.

    Per batch: pseudo-labels ``y = argmax f(x)``, ``L = cross_entropy(f(x), y)`` (mean over the
    batch), squared gradient ``(dL/dtheta)^2``; the squares are summed over the batches and
    divided by the number of batches. ``model`` is configured as for adaptation (batch
    statistics), as in the reference. Each batch is moved to the device of ``params``.

    Returns:
        one tensor per parameter, same shape and dtype.

    Raises:
        ValueError: ``batches`` holds no image.
    """
    squares = [torch.zeros_like(p) for p in params]
    count = 0
    from tqdm.auto import tqdm

    for x in tqdm(batches, desc="eata: Fisher information", leave=False, disable=None):
        logits = model(x.to(params[0].device, non_blocking=True))
        loss = F.cross_entropy(logits, logits.argmax(1))
        for square, grad in zip(squares, torch.autograd.grad(loss, params)):
            square += grad.detach() ** 2
        count += 1
    if count == 0:
        raise ValueError("eata: fisher_images holds no image")
    logger.info("eata: Fisher information from %d batches", count)
    return [square / count for square in squares]


@register_method("eta")
class ETA(Adapter):
    r"""ETA (Niu et al., ICML 2022): reliable, non-redundant, re-weighted entropy minimisation.

    Update rule per batch ``x`` (repeated ``steps`` times; ``forward_and_adapt_eata`` of the
    reference): ``z = f(x)`` with batch statistics, ``H_i = H(softmax(z_i))``;
    ``E0 = margin_e0 ln C``; sample i is *reliable* if ``H_i < E0`` and *selected* if also
    ``|cos(m, softmax(z_i))| < d_margin``, where ``m`` is the moving average of the selected
    samples' probabilities (no redundancy filter while ``m`` does not exist yet); the loss is
    ``mean_{i selected} H_i / exp(H_i - E0)`` (the weight is a constant; Eqn. 3), one optimizer
    step on the BatchNorm affine parameters, and ``m <- 0.9 m + 0.1 mean_{i selected} softmax(z_i)``
    (Eqn. 4; ``m`` = that mean when it does not exist). When no sample is selected there is no step
    (the gradients are still zeroed) and ``m`` is unchanged. The logits returned are those of the
    (last) forward pass, before its update. The reference's ``reset()`` keeps ``m``; here, as in
    the benchmark, :meth:`reset` (and ``episodic``) clears it.

    Defaults are the CIFAR-10-C setting of the online-TTA benchmark (``cfgs/cifar10_c/eta.yaml``):
    Adam, lr 1e-3, betas (0.9, 0.999), no weight decay, ``d_margin`` 0.4, ``margin_e0`` 0.4 (its
    ``conf.py``), 1 step; as :class:`tta.methods.tent.Tent`. The ImageNet-C setting (EATA's
    ``main.py``, ``cfgs/imagenet_c/eta.yaml``) is ``optimizer="sgd"`` (lr 0.00025, momentum 0.9;
    the authors' script uses ``nesterov=False``, the benchmark ``nesterov=True``), ``d_margin=0.05``.

    Args:
        model: a classifier with torch BatchNorm layers (converted in place to batch statistics).
        optimizer, lr, betas, momentum, nesterov, dampening, weight_decay, steps, episodic:
            as :class:`tta.methods.tent.Tent`.
        margin_e0: E0 as a fraction of ln C (> 0). Default 0.4 (Eqn. 3 and ``main.py``).
        d_margin: cosine-similarity threshold epsilon of the redundancy filter (>= 0; Eqn. 5).
        num_classes: C in E0 (int >= 2); None (default): the width of the logits.

    State kept: the adapted BatchNorm affine parameters, the optimizer state, the moving-average
    probability vector :attr:`probs_ema` (C,) (None before the first selected sample), and the
    sample counts since :func:`tta.adapt` or :meth:`reset`: :attr:`num_reliable` (the reference's
    ``num_samples_update_1``) and :attr:`num_selected` (reliable and non-redundant,
    ``num_samples_update_2``), counted once per step. :meth:`reset` clears all of them. All of
    it is in ``state_dict``. A parameter shared by several BatchNorm layers is updated once.
    """

    needs_grad = True
    state_attributes = ("probs_ema", "num_reliable", "num_selected")

    def __init__(self, model: nn.Module, *, optimizer: str = "adam", lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9,
                 nesterov: bool = True, dampening: float = 0.0, weight_decay: float = 0.0,
                 margin_e0: float = 0.4, d_margin: float = 0.4, num_classes: int | None = None,
                 steps: int = 1, episodic: bool = False) -> None:
        super().__init__(model)
        self.hparams = _check_eta(optimizer=optimizer, lr=lr, betas=betas, momentum=momentum, nesterov=nesterov,
                                  dampening=dampening, weight_decay=weight_decay, margin_e0=margin_e0,
                                  d_margin=d_margin, num_classes=num_classes, steps=steps, episodic=episodic)
        self._configure()

    def _configure(self) -> None:
        self.params, self.param_names = _configure_batchnorm(self.model, self.name)
        self.optimizer = make_optimizer(self.params, **{k: self.hparams[k] for k in _OPTIMIZER_ARGS})
        self.reset_state()
        self._snapshot()

    def reset_state(self) -> None:
        self.probs_ema: Tensor | None = None
        self.num_reliable = 0
        self.num_selected = 0

    def _predict(self, x: Tensor) -> Tensor:
        return self._adapt_steps(x)

    def regularizer(self) -> Tensor | float:
        """The term added to the loss (0 for ETA; the Fisher penalty for EATA)."""
        return 0.0

    @torch.enable_grad()  # adapt even when called under torch.no_grad(), like the reference
    def _forward_and_adapt(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        e_margin = entropy_margin(self.hparams["margin_e0"], self.hparams["num_classes"], logits)
        reliable, selected = select_samples(logits, e_margin, self.hparams["d_margin"], self.probs_ema)
        self.num_reliable += int(reliable.sum())
        self.num_selected += int(selected.sum())
        if selected.any():
            entropy = softmax_entropy(logits[selected])
            weight = 1 / torch.exp(entropy.detach() - e_margin)  # Eqn. 3
            loss = (entropy * weight).mean(0) + self.regularizer()
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                probs = logits[selected].softmax(1).mean(0)
                self.probs_ema = probs if self.probs_ema is None else (
                    EMA_DECAY * self.probs_ema + (1 - EMA_DECAY) * probs)
        self.optimizer.zero_grad()
        return logits.detach()


@register_method("eata")
class EATA(ETA):
    r"""EATA (Niu et al., ICML 2022): ETA plus a Fisher regulariser against forgetting (Eqn. 8-9).

    The loss of :class:`ETA` plus ``fisher_alpha * sum_k F_k (theta_k - theta*_k)^2`` over the
    BatchNorm affine parameters (only on batches with a selected sample, as the reference), where
    ``theta*`` are the parameter values at :func:`tta.adapt` and ``F`` the diagonal Fisher
    information estimated there by :func:`fisher_diagonal` on ``fisher_images`` (in-distribution,
    e.g. clean, images; EATA uses 2000 clean ImageNet validation images, the benchmark 2000 source
    training images: ``fisher_size``/``SOURCE.NUM_SAMPLES``), with the model configured as for
    adaptation (batch statistics), pseudo-labels from the model's own argmax, squared gradients of
    the batch-mean cross-entropy summed over the batches and divided by their number (``main.py``).

    Defaults as :class:`ETA` plus ``fisher_alpha`` 1.0 (``cfgs/cifar10_c/eata.yaml``); the
    ImageNet-C setting adds ``fisher_alpha=2000`` (``main.py``, ``cfgs/imagenet_c/eata.yaml``).

    Args:
        fisher_images: required. A float tensor (N, C, H, W), split into batches of
            ``fisher_batch_size``, or an iterable of batches (tensors or (input, target, ...)
            tuples; targets unused). Batches are moved to the parameters' device. Recorded in
            :attr:`hparams` as the number of images used.
        fisher_alpha: the trade-off beta of Eqn. 8 (> 0; use ``"eta"`` for none).
        fisher_batch_size: the batch size for a tensor ``fisher_images`` (int >= 1). Default 64,
            the test batch size of EATA's ``main.py`` and of tta's evaluation (both references
            use the test batch size; the benchmark's CIFAR-10-C one is 200). The estimate
            depends on it (batch statistics, squared batch-mean gradients).
        others: see :class:`ETA`.

    The Fisher information is computed on a copy of the model, so that a bad ``fisher_images``
    raises before ``model`` is changed.

    State kept: as :class:`ETA`, plus :attr:`fishers` and :attr:`anchors` (one tensor per
    parameter of :attr:`param_names`), computed once in :func:`tta.adapt` and kept by :meth:`reset`
    (in ``state_dict`` too).

    Raises:
        ValueError: ``fisher_images`` missing or empty, or a bad hyper-parameter.
        TypeError: ``fisher_images`` of a wrong type or yielding something else than batches.
    """

    source_images = "fisher_images"
    state_attributes = ETA.state_attributes + ("fishers", "anchors")

    def __init__(self, model: nn.Module, *, optimizer: str = "adam", lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9,
                 nesterov: bool = True, dampening: float = 0.0, weight_decay: float = 0.0,
                 margin_e0: float = 0.4, d_margin: float = 0.4, num_classes: int | None = None,
                 fisher_alpha: float = 1.0, fisher_images: Tensor | Iterable[Any] | None = None,
                 fisher_batch_size: int = 64, steps: int = 1, episodic: bool = False) -> None:
        eta = {name: value for name, value in locals().items() if name in ETA.defaults()}
        _check_eta(**eta)  # every check before the (costly) Fisher computation
        fisher = {"fisher_alpha": check_number("fisher_alpha", fisher_alpha, low=0.0, low_open=True),
                  "fisher_images": 0, "fisher_batch_size": check_int("fisher_batch_size", fisher_batch_size)}
        _check_fisher_images(fisher_images)
        self.check_model(model)
        # on a configured copy: a bad batch raises with `model` untouched
        probe = copy.deepcopy(model)
        probe_params, _ = _configure_batchnorm(probe, self.name)
        fishers = fisher_diagonal(probe, probe_params, _counted(
            _fisher_inputs(fisher_images, fisher["fisher_batch_size"]), fisher))
        del probe, probe_params
        super().__init__(model, **eta)
        self.hparams.update(fisher)
        self.fishers = fishers
        self.anchors = [p.detach().clone() for p in self.params]

    def regularizer(self) -> Tensor:
        return self.hparams["fisher_alpha"] * sum(
            (fisher * (p - anchor) ** 2).sum() for p, fisher, anchor in zip(self.params, self.fishers, self.anchors))


def _configure_batchnorm(model: nn.Module, method: str) -> tuple[list[nn.Parameter], list[str]]:
    """:func:`configure_batch_statistics`, then the BatchNorm scale and shift unfrozen (tent's
    ``collect_params``); a model without them raises before it is changed."""
    configure_batch_statistics(model, method, affine=True)
    params, names = norm_affine_params(model, (_AdaptiveBatchNormMixin,))
    for p in params:
        p.requires_grad_(True)
    return params, names


def _counted(batches: Iterator[Tensor], record: dict[str, Any]) -> Iterator[Tensor]:
    for batch in batches:
        record["fisher_images"] += len(batch)
        yield batch


_OPTIMIZER_ARGS = ("optimizer", "lr", "betas", "momentum", "nesterov", "dampening", "weight_decay")


def _check_eta(*, margin_e0: Any, d_margin: Any, num_classes: Any, steps: Any, episodic: Any,
               **optimizer: Any) -> dict[str, Any]:
    """The validated hyper-parameters of :class:`ETA`."""
    return {**check_optimizer_args(**optimizer),
            "margin_e0": check_number("margin_e0", margin_e0, low=0.0, low_open=True),
            "d_margin": check_number("d_margin", d_margin, low=0.0),
            "num_classes": check_int("num_classes", num_classes, low=2, none=True),
            "steps": check_int("steps", steps), "episodic": check_bool("episodic", episodic)}


def _check_fisher_images(images: Any) -> None:
    if images is None:
        raise ValueError("eata needs fisher_images: in-distribution (e.g. clean) inputs to estimate the Fisher "
                         "information of its regulariser, as a float tensor (N, C, H, W) or an iterable of batches "
                         "(e.g. tta.adapt(model, 'eata', fisher_images=clean_images)); EATA uses 2000 images. "
                         "Method 'eta' is EATA without the regulariser")
    if isinstance(images, Tensor):
        if images.dim() < 2 or not images.is_floating_point() or len(images) == 0:
            raise ValueError(f"eata: fisher_images must be a non-empty float tensor (N, C, H, W), got "
                             f"{images.dtype} of shape {tuple(images.shape)}")
    elif isinstance(images, (str, bytes, Mapping)) or not isinstance(images, Iterable):
        raise TypeError(f"eata: fisher_images must be a float tensor (N, C, H, W) or an iterable of batches, "
                        f"got {type(images).__name__}")
