"""CoTTA: continual test-time adaptation (Wang, Fink, Van Gool & Dai, CVPR 2022).

Reference: the authors' ``cifar/cotta.py`` and ``cifar/my_transforms.py``
(github.com/qinenergy/cotta) and their CIFAR-10-C configuration ``cfgs/cifar10/cotta.yaml``.
A student and a weight-averaged teacher (both normalising with batch statistics) and a frozen
copy of the source model (the anchor):

1. the anchor's mean max-softmax confidence on the batch decides the pseudo-labels: below
   ``ap`` the teacher's logits averaged over ``num_augmentations`` augmented copies of the
   batch, otherwise the teacher's logits on the batch itself;
2. the student takes one optimizer step on the cross-entropy between the teacher's soft
   pseudo-labels and its own predictions, ``mean_i -sum_c softmax(t_i)_c log softmax(s_i)_c``;
3. the teacher moves towards the student: ``theta_t <- mt theta_t + (1 - mt) theta_s``;
4. stochastic restore: each trainable weight element returns to its source value with
   probability ``rst``.

The returned logits are the teacher's pseudo-label logits of step 1 (the reference returns
``outputs_ema``). The reference computes the augmented teacher predictions on every batch and
then may not use them; tta computes them only when they are used (same result, fewer passes).
"""
from __future__ import annotations

import copy

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from tta.methods import register_method
from tta.methods.base import (Adapter, check_bool, check_int, check_number, check_optimizer_args,
                              check_seed, make_optimizer)
from tta.methods.tent import configure_batch_statistics

__all__ = ["CoTTA", "cotta_augment"]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high, generator=generator))


def cotta_augment(x: Tensor, generator: torch.Generator, noise_std: float = 0.005) -> Tensor:
    """One random draw of CoTTA's test-time augmentation, applied to the whole batch ``x``
    (float (N, C, H, W) in [0, 1], C in {1, 3}), like the reference's ``get_tta_transforms``
    (non-``soft`` ranges) applied to a batch tensor.

    In order: clip to [0, 1]; colour jitter with brightness, contrast, saturation in
    [0.6, 1.4], [0.7, 1.3], [0.5, 1.5], hue in [-0.06, 0.06] and gamma in [0.7, 1.3] in random
    order (saturation and hue leave one-channel images unchanged, as torchvision does); edge
    padding by H/2; a random affine map (rotation within +-15 degrees, translation up to 1/16
    of the padded size, scale in [0.9, 1.1], bilinear); Gaussian blur (5x5 kernel, sigma in
    [0.001, 0.5]); centre crop back to H x W; horizontal flip with probability 0.5; additive
    Gaussian noise (std ``noise_std``); clip to [0, 1]. All randomness comes from ``generator``.
    """
    h, w = x.shape[-2:]
    out = x.clamp(0.0, 1.0)
    for op in torch.randperm(5, generator=generator).tolist():
        if op == 0:
            out = TF.adjust_brightness(out, _uniform(generator, 0.6, 1.4))
        elif op == 1:
            out = TF.adjust_contrast(out, _uniform(generator, 0.7, 1.3))
        elif op == 2:
            out = TF.adjust_saturation(out, _uniform(generator, 0.5, 1.5)) if out.shape[1] == 3 else out
        elif op == 3:
            out = TF.adjust_hue(out, _uniform(generator, -0.06, 0.06)) if out.shape[1] == 3 else out
        else:  # the reference clamps before gamma to avoid NaN gradients after contrast
            out = TF.adjust_gamma(out.clamp(1e-8, 1.0), _uniform(generator, 0.7, 1.3))
    pad_h, pad_w = h // 2, w // 2
    out = TF.pad(out, [pad_w, pad_h, pad_w, pad_h], padding_mode="edge")
    angle = _uniform(generator, -15.0, 15.0)
    max_dx, max_dy = out.shape[-1] / 16, out.shape[-2] / 16  # RandomAffine's translate=(1/16, 1/16)
    translate = [round(_uniform(generator, -max_dx, max_dx)), round(_uniform(generator, -max_dy, max_dy))]
    scale = _uniform(generator, 0.9, 1.1)
    out = TF.affine(out, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                    interpolation=TF.InterpolationMode.BILINEAR)
    sigma = _uniform(generator, 0.001, 0.5)
    out = TF.gaussian_blur(out, kernel_size=[5, 5], sigma=[sigma, sigma])
    out = TF.center_crop(out, [h, w])
    if float(torch.rand((), generator=generator)) < 0.5:
        out = out.flip(-1)
    noise = torch.randn(out.shape, generator=generator, dtype=out.dtype) * noise_std
    return (out + noise.to(out.device)).clamp(0.0, 1.0)


@register_method("cotta")
class CoTTA(Adapter):
    """CoTTA (Wang et al., CVPR 2022): mean-teacher self-training with augmentation-averaged
    pseudo-labels and stochastic restore, for continual streams.

    Defaults are the reference CIFAR-10-C configuration (``cfgs/cifar10/cotta.yaml``): Adam,
    lr 1e-3, betas (0.9, 0.999), teacher momentum ``mt`` 0.999, restore probability ``rst``
    0.01, confidence threshold ``ap`` 0.92, 32 augmentations. The ImageNet-C configuration of
    the online-TTA benchmark (Marsden et al.) is SGD, lr 0.01, ``rst`` 0.001, ``ap`` 0.1.

    Args:
        model: a classifier with torch BatchNorm layers (converted in place to batch
            statistics); every ``weight``/``bias`` parameter of the model is trained, as in
            the reference's ``configure_model``/``collect_params``.
        optimizer, lr, betas, momentum, nesterov, dampening, weight_decay: as in ``tent``.
        mt: teacher EMA momentum in [0, 1].
        rst: stochastic-restore probability in [0, 1].
        ap: anchor-confidence threshold in [0, 1] below which the augmentation average is used.
        num_augmentations: augmented copies averaged (int >= 1). Default 32.
        steps: optimizer steps per batch. Default 1.
        episodic: reset before every batch. Default False.
        seed: seeds the augmentations and the restore masks (reproducible runs; an int in
            [0, 2**63)). Default 0.

    State kept (all in ``state_dict``): the student's and the teacher's weights, the optimizer
    state, the random generator. Memory: three copies of the model (student, teacher, anchor).
    A parameter shared by several modules is trained once per step.
    """

    needs_grad = True
    state_attributes = ("_generator",)

    def __init__(self, model: nn.Module, *, optimizer: str = "adam", lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9,
                 nesterov: bool = True, dampening: float = 0.0, weight_decay: float = 0.0,
                 mt: float = 0.999, rst: float = 0.01, ap: float = 0.92, num_augmentations: int = 32,
                 steps: int = 1, episodic: bool = False, seed: int = 0) -> None:
        super().__init__(model)
        opt = check_optimizer_args(optimizer, lr, betas, momentum, nesterov, dampening, weight_decay)
        self.hparams = {**opt, "mt": check_number("mt", mt, low=0.0, high=1.0),
                        "rst": check_number("rst", rst, low=0.0, high=1.0),
                        "ap": check_number("ap", ap, low=0.0, high=1.0),
                        "num_augmentations": check_int("num_augmentations", num_augmentations),
                        "steps": check_int("steps", steps), "episodic": check_bool("episodic", episodic),
                        "seed": check_seed(seed)}
        # named_parameters lists a parameter shared by several modules (tied) once
        self.param_names = [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in ("weight", "bias")]
        if not self.param_names:
            raise ValueError("cotta trains the weight and bias parameters of the model, but it has none")
        # the copies first: a model that cannot be copied raises before it is changed
        teacher = copy.deepcopy(model)
        for copied in (teacher, model):
            configure_batch_statistics(copied, self.name)
        self.anchor = copy.deepcopy(teacher)
        self.teacher = teacher
        params = [dict(model.named_parameters())[name] for name in self.param_names]
        for p in params:
            p.requires_grad_(True)
        self.optimizer = make_optimizer(params, **opt)
        self._source = [p.detach().clone() for p in params]
        self._generator = torch.Generator().manual_seed(self.hparams["seed"])
        self._snapshot()

    def reset_state(self) -> None:
        # the reference re-copies teacher and anchor from the reset student
        self.teacher.load_state_dict(self.model.state_dict())
        self._generator.manual_seed(self.hparams["seed"])

    def _predict(self, x: Tensor) -> Tensor:
        return self._adapt_steps(x)

    @torch.enable_grad()
    def _forward_and_adapt(self, x: Tensor) -> Tensor:
        student = self.model(x)
        with torch.no_grad():
            confidence = self.anchor(x).softmax(1).max(1).values.mean()
            if confidence < self.hparams["ap"]:
                # augmentation-averaged teacher logits (the reference averages logits)
                teacher = torch.stack([self.teacher(cotta_augment(x, self._generator))
                                       for _ in range(self.hparams["num_augmentations"])]).mean(0)
            else:
                teacher = self.teacher(x)
        loss = -(teacher.softmax(1) * student.log_softmax(1)).sum(1).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            mt = self.hparams["mt"]
            for t, s in zip(self.teacher.parameters(), self.model.parameters()):
                t.mul_(mt).add_(s, alpha=1.0 - mt)
            if self.hparams["rst"] > 0:
                for param, source in zip(self.optimizer.param_groups[0]["params"], self._source):
                    restore = torch.rand(param.shape, generator=self._generator) < self.hparams["rst"]
                    param.copy_(torch.where(restore.to(param.device), source, param))
        return teacher
