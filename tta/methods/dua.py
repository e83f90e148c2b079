"""DUA: dynamic unsupervised adaptation (Mirza, Micorek, Possegger & Bischof, CVPR 2022).

Reference: the authors' ``methods/dua.py``, ``utils/rotation.py`` and ``main.py`` defaults
(github.com/jmiemirza/DUA). Only the BatchNorm running statistics change, one test sample at a
time: ``num_copies`` augmented copies of the sample (random crop with zero padding, horizontal
flip, rotation by a random multiple of 90 degrees) pass through the model with every BatchNorm
layer in train mode, so torch updates its running statistics (unbiased variance) with the
momentum ``m_k + floor``, where ``m_k = m_(k-1) * decay`` from ``m_0 = momentum`` (0.1); then
the sample is predicted in eval mode with the updated statistics.

The reference evaluates the labelled test set after every update and keeps the statistics with
the lowest error; that needs labels, so tta keeps the last statistics (label-free).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tta.batchnorm import _AdaptiveBatchNormMixin
from tta.methods import register_method
from tta.methods.base import Adapter, batchnorm_layers, check_int, check_number, check_seed, start_from_source
from tta.surgery import convert

__all__ = ["DUA", "dua_augment"]


def dua_augment(image: Tensor, copies: int, generator: torch.Generator) -> Tensor:
    """``copies`` augmented versions of one image (C, H, W) as a batch (copies, C, H, W): a
    random H x W crop of the image zero-padded by H/8 on every side (4 pixels at 32 px, as the
    reference's ``RandomCrop(32, padding=4)``), a horizontal flip with probability 0.5, and a
    rotation by 0, 90, 180 or 270 degrees drawn uniformly (the reference's ``rotate_batch``)."""
    c, h, w = image.shape
    pad = max(1, round(h / 8))
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    out = []
    for _ in range(copies):
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
        crop = padded[:, top:top + h, left:left + w]
        if float(torch.rand((), generator=generator)) < 0.5:
            crop = crop.flip(-1)
        k = int(torch.randint(0, 4, (), generator=generator))
        out.append(torch.rot90(crop, k, (-2, -1)) if h == w else crop)
    return torch.stack(out)


@register_method("dua")
class DUA(Adapter):
    """DUA (Mirza et al., CVPR 2022): update the BatchNorm statistics from augmented copies of
    each incoming sample with a decaying momentum; no gradients.

    Defaults are the reference's (``main.py``): 64 copies, start momentum 0.1, decay 0.94,
    floor 0.005, adaptation on the first 80 samples of the stream (then the statistics stay).

    Args:
        model: a classifier with torch BatchNorm layers (converted in place).
        num_copies: augmented copies per sample (int >= 2). Default 64.
        momentum: start momentum m_0 in (0, 1]. Default 0.1.
        decay: momentum decay factor in (0, 1]. Default 0.94.
        floor: minimum momentum added to every step, in [0, 1). Default 0.005.
        num_samples: adapt on the first this many samples of the stream, then only predict
            (None: every sample). Default 80.
        seed: seeds the augmentations (an int in [0, 2**63)). Default 0.

    State kept (all in ``state_dict``): the running statistics, the number of samples adapted
    on, the current momentum, the generator. A batch of n samples is processed as n single
    samples in order.
    """

    state_attributes = ("num_adapted", "_momentum", "_generator")

    def __init__(self, model: nn.Module, *, num_copies: int = 64, momentum: float = 0.1,
                 decay: float = 0.94, floor: float = 0.005, num_samples: int | None = 80,
                 seed: int = 0) -> None:
        super().__init__(model)
        self.hparams = {"num_copies": check_int("num_copies", num_copies, low=2),
                        "momentum": check_number("momentum", momentum, low=0.0, high=1.0, low_open=True),
                        "decay": check_number("decay", decay, low=0.0, high=1.0, low_open=True),
                        "floor": check_number("floor", floor, low=0.0, high=1.0),
                        "num_samples": check_int("num_samples", num_samples, none=True),
                        "seed": check_seed(seed)}
        if self.hparams["floor"] >= 1.0:
            raise ValueError(f"floor must be < 1, got {floor!r}")
        layers = {id(m) for m in batchnorm_layers(model) if m.running_mean is None}
        untracked = [name for name, m in model.named_modules() if id(m) in layers]
        if untracked:
            raise ValueError("dua updates running statistics, but these BatchNorm layers have "
                             f"track_running_stats=False: {untracked}")
        convert(model, stats="source")
        start_from_source(model)
        model.eval()
        self._generator = torch.Generator().manual_seed(self.hparams["seed"])
        self.reset_state()
        self._snapshot()

    def reset_state(self) -> None:
        self.num_adapted = 0
        self._momentum = self.hparams["momentum"]
        self._generator.manual_seed(self.hparams["seed"])

    @torch.no_grad()
    def _adapt_on(self, image: Tensor) -> None:
        self._momentum *= self.hparams["decay"]
        batch = dua_augment(image, self.hparams["num_copies"], self._generator)
        layers = [m for m in self.model.modules() if isinstance(m, _AdaptiveBatchNormMixin)]
        saved = [(m.momentum, m.training) for m in layers]
        try:
            for m in layers:  # torch train-mode BatchNorm: running <- (1 - m) running + m batch
                m.momentum = self._momentum + self.hparams["floor"]
                m.train()
            self.model(batch)
        finally:
            for m, (momentum, training) in zip(layers, saved):
                m.momentum, m.training = momentum, training
        self.num_adapted += 1

    @torch.no_grad()
    def _predict(self, x: Tensor) -> Tensor:
        limit = self.hparams["num_samples"]
        count = len(x) if limit is None else max(0, min(len(x), limit - self.num_adapted))
        outputs = []
        for i in range(count):  # adapt on each sample, then predict it
            self._adapt_on(x[i])
            outputs.append(self.model(x[i:i + 1]))
        if count < len(x):  # eval-mode predictions do not depend on the batch: one pass
            outputs.append(self.model(x[count:]))
        return torch.cat(outputs)
