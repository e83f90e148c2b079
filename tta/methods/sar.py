"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023).

Reference: the authors' ``sar.py`` (``forward_and_adapt_sar``, ``collect_params``,
``configure_model``), ``sam.py`` (``SAM.first_step``/``second_step``) and ``main.py``
(hyper-parameters), github.com/mr-eggplant/SAR; the per-dataset settings of the online-TTA
benchmark of Marsden et al. (``classification/methods/sar.py``, ``cfgs/cifar10_c/sar.yaml``,
``cfgs/imagenet_c/sar.yaml``, ``conf.py``).
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.methods import register_method
from tta.methods.base import (Adapter, check_bool, check_int, check_number, check_optimizer_args,
                              make_optimizer, norm_affine_params, softmax_entropy)
from tta.methods.eata import EMA_DECAY, entropy_margin
from tta.methods.tent import configure_batch_statistics

__all__ = ["SAR", "SAR_EXCLUDE_LAYERS", "NORM_LAYERS"]

logger = logging.getLogger(__name__)

# The normalisation layers whose scale and shift SAR adapts (``configure_model``/``collect_params``;
# the benchmark adds BatchNorm1d): BatchNorm (batch statistics), LayerNorm and GroupNorm.
NORM_LAYERS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
# ``collect_params`` skips the layers whose module name contains 'layer4' (the last stage of a
# ResNet), 'blocks.9', 'blocks.10', 'blocks.11' (the top blocks of a ViT-Base) or 'norm.', and the
# module named 'norm' (a ViT's final LayerNorm): the same rule as fnmatch patterns.
SAR_EXCLUDE_LAYERS = ("*layer4*", "*blocks.9*", "*blocks.10*", "*blocks.11*", "*norm.*", "norm")
# SAM's ``first_step``: e = rho g / (||g|| + 1e-12)
_SAM_EPS = 1e-12


def _check_patterns(patterns: Any) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"exclude_layers must be a name pattern or a list of name patterns (possibly empty), "
                         f"got {patterns!r}")
    return tuple(patterns)


@register_method("sar")
class SAR(Adapter):
    r"""SAR (Niu et al., ICLR 2023): reliable entropy minimisation with sharpness-aware steps
    and model recovery.

    Update rule per batch ``x`` (repeated ``steps`` times; ``forward_and_adapt_sar``):

    1. ``z = f(x)`` (batch statistics in BatchNorm layers), ``H_i = H(softmax(z_i))``,
       ``E0 = margin_e0 ln C``; reliable samples ``S1 = {i : H_i < E0}`` (Eqn. 2);
       ``g = grad mean_{i in S1} H_i``.
    2. SAM ascent (``sam.py``): ``theta' = theta + rho g / (||g||_2 + 1e-12)``, the norm over all
       adapted parameters together (Eqn. 4).
    3. ``H'_i = H(softmax(f_{theta'}(x)_i))``, ``S2 = {i in S1 : H'_i < E0}``,
       ``L' = mean_{i in S2} H'_i``; its gradient at ``theta'``, then ``theta`` restored and one
       step of the base optimizer with that gradient.
    4. Model recovery: ``e <- 0.9 e + 0.1 L'`` (``e = L'`` at first; skipped when ``S2`` is empty);
       if ``e < reset_constant`` the weights and the optimizer go back to their state at
       :func:`tta.adapt` and ``e`` is cleared (``reset()`` of the reference and benchmark; the
       reference's ``SAR.forward`` then re-assigns the old ``e``, a quirk not followed here).

    As in the reference, an empty ``S1`` or ``S2`` gives a zero gradient (the reference's mean of
    nothing), and the base optimizer still steps (SGD momentum keeps moving the weights).
    The logits returned are those of the first forward pass of the (last) step, before its update.

    The adapted parameters are the scale and shift of every BatchNorm, LayerNorm and GroupNorm
    layer whose module name matches none of ``exclude_layers`` (the reference's rule by default:
    the last stage ``layer4*`` of a torchvision ResNet and the top blocks of a ViT-Base stay fixed;
    excluded BatchNorm layers still normalise with batch statistics). Models without BatchNorm
    (GroupNorm ResNets, LayerNorm ViTs, the SAR paper's models) are not converted. The model is
    kept in eval mode (Dropout off), as in the benchmark (the reference calls ``model.train()``).

    Defaults are the CIFAR-10-C setting of the online-TTA benchmark (``cfgs/cifar10_c/sar.yaml``;
    its ``SAR.setup_optimizer`` always uses SGD): SAM around SGD, lr 1e-3, momentum 0.9, no
    Nesterov, no weight decay, ``rho`` 0.05 (``sam.py``), ``margin_e0`` 0.4 (``main.py``),
    ``reset_constant`` 0.2 (``sar.py``, the benchmark's ``SAR.RESET_CONSTANT_EM``), 1 step. The
    ImageNet-C setting (SAR's ``main.py`` for batch size 64, ``cfgs/imagenet_c/sar.yaml``) is
    ``lr=0.00025`` (``0.00025 * 2 * batch_size / 64`` below batch size 32; ``0.001 * batch_size /
    64`` for a ViT-Base).

    Args:
        model: a classifier with BatchNorm, LayerNorm or GroupNorm layers (BatchNorm layers are
            converted in place to batch statistics).
        optimizer: the base optimizer, ``"sgd"`` (default) or ``"adam"``.
        lr: learning rate. Default 1e-3; None: 0.00025 for SGD, 1e-3 for Adam.
        betas, momentum, nesterov, dampening, weight_decay: the base optimizer's. Defaults
            (0.9, 0.999), 0.9, False, 0, 0.
        rho: SAM's neighbourhood radius (>= 0). Default 0.05.
        margin_e0: E0 as a fraction of ln C (> 0). Default 0.4.
        num_classes: C in E0 (int >= 2); None (default): the width of the logits.
        reset_constant: the recovery threshold e_0 on the moving average of ``L'`` (>= 0; 0 never
            recovers). Default 0.2.
        exclude_layers: ``fnmatch`` patterns of normalisation-layer module names not to adapt;
            default :data:`SAR_EXCLUDE_LAYERS`; ``()`` adapts them all. A list other than the
            default must have every pattern match some normalisation layer.
        steps: steps per batch (int >= 1). Default 1.
        episodic: reset before every batch. Default False.

    State kept: the adapted affine parameters, the base optimizer's state, the moving average
    :attr:`loss_ema` (None before the first value or after a recovery), and
    :attr:`num_recoveries`, the number of model recoveries since :func:`tta.adapt` or
    :meth:`reset` (which clears both); all of it in ``state_dict``. A parameter shared by
    several normalisation layers is updated once per step.
    """

    needs_grad = True
    state_attributes = ("loss_ema", "num_recoveries")

    def __init__(self, model: nn.Module, *, optimizer: str = "sgd", lr: float | None = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9,
                 nesterov: bool = False, dampening: float = 0.0, weight_decay: float = 0.0,
                 rho: float = 0.05, margin_e0: float = 0.4, num_classes: int | None = None,
                 reset_constant: float = 0.2, exclude_layers: str | Sequence[str] = SAR_EXCLUDE_LAYERS,
                 steps: int = 1, episodic: bool = False) -> None:
        super().__init__(model)
        opt = check_optimizer_args(optimizer, lr, betas, momentum, nesterov, dampening, weight_decay)
        exclude_layers = _check_patterns(exclude_layers)
        self.hparams = {**opt, "rho": check_number("rho", rho, low=0.0),
                        "margin_e0": check_number("margin_e0", margin_e0, low=0.0, low_open=True),
                        "num_classes": check_int("num_classes", num_classes, low=2, none=True),
                        "reset_constant": check_number("reset_constant", reset_constant, low=0.0),
                        "exclude_layers": exclude_layers,
                        "steps": check_int("steps", steps), "episodic": check_bool("episodic", episodic)}
        chosen = self._chosen_layers(exclude_layers)  # before anything changes (names survive convert)
        if any(isinstance(m, _BatchNorm) for m in model.modules()):
            configure_batch_statistics(model, self.name)
        else:
            model.eval()
            model.requires_grad_(False)
        params, names = norm_affine_params(model, NORM_LAYERS)
        keep = [i for i, name in enumerate(names) if name.rpartition(".")[0] in chosen]
        self.params, self.param_names = [params[i] for i in keep], [names[i] for i in keep]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = make_optimizer(self.params, **opt)
        self.reset_state()
        self._snapshot()

    def _chosen_layers(self, exclude: tuple[str, ...]) -> set[str]:
        """Names of the normalisation layers with a scale or shift that ``exclude`` spares."""
        _, names = norm_affine_params(self.model, NORM_LAYERS)
        layers = list(dict.fromkeys(name.rpartition(".")[0] for name in names))
        if not layers:
            raise ValueError("sar adapts the scale and shift of BatchNorm, LayerNorm or GroupNorm layers; "
                             "the model has none (or only affine=False ones)")
        shown = ", ".join(layers[:12]) + (", ..." if len(layers) > 12 else "")
        if exclude != SAR_EXCLUDE_LAYERS:
            unmatched = [p for p in exclude if not any(fnmatch.fnmatchcase(name, p) for name in layers)]
            if unmatched:
                raise ValueError(f"exclude_layers pattern(s) {unmatched} match no normalisation layer; "
                                 f"the layers are: {shown}")
        chosen = {name for name in layers if not any(fnmatch.fnmatchcase(name, p) for p in exclude)}
        if not chosen:
            raise ValueError(f"exclude_layers={list(exclude)!r} excludes every normalisation layer: {shown}")
        return chosen

    def reset_state(self) -> None:
        self.loss_ema: float | None = None
        self.num_recoveries = 0

    def _predict(self, x: Tensor) -> Tensor:
        return self._adapt_steps(x)

    @torch.enable_grad()  # adapt even when called under torch.no_grad(), like the reference
    def _forward_and_adapt(self, x: Tensor) -> Tensor:
        self.optimizer.zero_grad()
        logits = self.model(x)
        e_margin = entropy_margin(self.hparams["margin_e0"], self.hparams["num_classes"], logits)
        entropy = softmax_entropy(logits)
        reliable = entropy < e_margin
        _mean(entropy[reliable]).backward()
        saved = self._ascend()
        self.optimizer.zero_grad()
        entropy = softmax_entropy(self.model(x))[reliable]
        entropy = entropy[entropy < e_margin]
        loss = _mean(entropy)
        loss.backward()
        with torch.no_grad():
            for p, value in zip(self.params, saved):
                p.copy_(value)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if len(entropy):
            value = loss.item()
            self.loss_ema = value if self.loss_ema is None else EMA_DECAY * self.loss_ema + (1 - EMA_DECAY) * value
        if self.loss_ema is not None and self.loss_ema < self.hparams["reset_constant"]:
            logger.info("sar: moving average of the loss %.4g < %g: model recovery (reset)",
                        self.loss_ema, self.hparams["reset_constant"])
            recoveries = self.num_recoveries
            self.reset()
            self.num_recoveries = recoveries + 1
        return logits.detach()

    @torch.no_grad()
    def _ascend(self) -> list[Tensor]:
        """SAM's first step: move every parameter by ``rho g / (||g|| + 1e-12)``; returns the
        values before the move."""
        saved = [p.detach().clone() for p in self.params]
        moved = [p for p in self.params if p.grad is not None]
        if moved:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in moved]))
            scale = self.hparams["rho"] / (norm + _SAM_EPS)
            for p in moved:
                p.add_(p.grad * scale.to(p))
        return saved


def _mean(values: Tensor) -> Tensor:
    """The mean of ``values`` (n,); for n = 0 a zero that still back-propagates (zero gradients),
    where the reference back-propagates the NaN mean of nothing to the same zero gradients."""
    return values.mean(0) if len(values) else values.sum()
