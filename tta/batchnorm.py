"""BatchNorm layers whose normalisation statistics are switchable at test time.

A pretrained network normalises with the ``running_mean``/``running_var`` collected on its
training ("source") data. Under a distribution shift those are wrong; the layers here can
normalise with the statistics of the current batch, a blend of source and batch statistics
(Schneider et al. 2020), or an online (EMA) estimate, selected by the attribute ``stats``.

The ``state_dict`` keys are exactly torch's, so checkpoints load ``strict=True`` both ways.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["STATS", "AdaptiveBatchNorm1d", "AdaptiveBatchNorm2d", "AdaptiveBatchNorm3d"]

STATS = ("source", "batch", "blend", "ema")

# Marks "keep the current value" in set_stats (None is a meaningful value of alpha).
_KEEP: Any = object()


def _check_prior(prior: Any) -> float:
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not math.isfinite(prior) or prior < 0:
        raise ValueError(f"prior must be a finite number >= 0 (the source weight in samples), got {prior!r}")
    return float(prior)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_stats(stats: Any) -> str:
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    return stats


# stats='batch' on CPU without autograd: batch_moments + the eval kernel instead of the
# training kernel (faster, equal up to float rounding).
_BATCH_VIA_MOMENTS = True
# CPU fast path for inputs with at least this many values per (sample, channel) row.
_ROWS_MIN_SPATIAL = 8
# ... as long as no channel has mean^2 > _MAX_CONDITION * var (cancellation in E[x^2] - E[x]^2
# would then cost more than ~1e-5 relative accuracy); otherwise the native kernel is used.
_MAX_CONDITION = 100.0


def _row_moments(input: Tensor, n: int, c: int, spatial: int) -> tuple[Tensor, Tensor] | None:
    """Moments from float32 row sums and row norms (vectorised, one read), pooled in float64.

    The native CPU statistics kernel accumulates scalar doubles channel by channel, 3-5x slower
    than an eval-mode BatchNorm on mid-sized activations; contiguous row reductions are not.
    """
    rows = input.view(n * c, spatial)
    sums = torch.stack([rows.sum(1), torch.linalg.vector_norm(rows, dim=1).square()])
    totals = sums.double().view(2, n, c).sum(1) / (n * spatial)
    mean, var = totals[0], (totals[1] - totals[0].square()).clamp_min(0.0)
    if bool((mean.square() > _MAX_CONDITION * var).any()):
        return None
    return mean.to(input.dtype), var.to(input.dtype)


def batch_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``input`` (N, C, *), in float32 (float64 for double).

    Differentiable when ``input`` requires grad; otherwise the fastest accurate reduction.
    """
    acc = torch.promote_types(input.dtype, torch.float32)
    if torch.is_grad_enabled() and input.requires_grad:
        # Differentiable path (e.g. entropy minimisation through the statistics).
        dims = [0, *range(2, input.dim())]
        var, mean = torch.var_mean(input.to(acc), dims, correction=0)
        return mean, var
    n, c = input.shape[0], input.shape[1]
    spatial = input.numel() // max(n * c, 1)
    if (input.device.type == "cpu" and input.dtype == acc and spatial >= _ROWS_MIN_SPATIAL
            and input.is_contiguous()):
        moments = _row_moments(input, n, c, spatial)
        if moments is not None:
            return moments
    # One fused native kernel. Float32 scratch "running" tensors make it return float32
    # moments for fp16/bf16 input; momentum 0 means the scratch values are never used.
    scratch = torch.empty(2, c, dtype=acc, device=input.device)
    mean, var = torch.batch_norm_update_stats(input, scratch[0], scratch[1], 0.0)
    return mean, var


class _AdaptiveBatchNormMixin:
    """Shared implementation of AdaptiveBatchNorm1d/2d/3d (mixed into the torch classes)."""

    # Input ranks accepted; None accepts any rank >= 2 (set on layers converted from
    # SyncBatchNorm, which accepts any rank).
    _input_dims: tuple[int, ...] | None = None
    source_mean: Tensor | None
    source_var: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        stats: str = "source",
        prior: float = 16.0,
        alpha: float | None = None,
        ema_momentum: float = 0.1,
        pooled: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)  # type: ignore[call-arg]
        # Copy of the source statistics, taken lazily before the first write by EMA or
        # recalibration; outside the state_dict so the keys stay torch's.
        self.register_buffer("source_mean", None, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("source_var", None, persistent=False)  # type: ignore[attr-defined]
        self._stats = "source"
        self.prior = 16.0
        self.alpha: float | None = None
        self.ema_momentum = 0.1
        self.pooled = False
        self.set_stats(stats, prior=prior, alpha=alpha, momentum=ema_momentum, pooled=pooled)

    # ------------------------------------------------------------------ configuration
    @property
    def stats(self) -> str:
        """Which statistics normalise the input: one of :data:`STATS`."""
        return self._stats

    @stats.setter
    def stats(self, value: str) -> None:
        self.set_stats(value)

    def set_stats(
        self,
        stats: str | None = None,
        *,
        prior: float = _KEEP,
        alpha: float | None = _KEEP,
        momentum: float = _KEEP,
        pooled: bool = _KEEP,
    ) -> None:
        """Choose the statistics source and its parameters; omitted arguments are kept.

        Args:
            stats: one of ``"source"``, ``"batch"``, ``"blend"``, ``"ema"``.
            prior: prior strength N of ``blend``: the source statistics count as N samples.
            alpha: fixed weight of the batch statistics in ``blend`` (overrides ``prior``);
                ``None`` uses ``prior``.
            momentum: EMA momentum m (stored as ``ema_momentum``; the layer's own torch
                ``momentum`` for train-mode running statistics is not touched).
            pooled: add the between-distribution term to the blended variance.
        """
        new_stats = self._stats if stats is None else _check_stats(stats)
        new_prior = self.prior if prior is _KEEP else _check_prior(prior)
        new_alpha = self.alpha if alpha is _KEEP else (None if alpha is None else _check_fraction("alpha", alpha))
        new_momentum = self.ema_momentum if momentum is _KEEP else _check_fraction("momentum", momentum)
        if pooled is not _KEEP and not isinstance(pooled, bool):
            raise TypeError(f"pooled must be a bool, got {pooled!r}")
        new_pooled = self.pooled if pooled is _KEEP else pooled
        if new_stats in ("blend", "ema") and self.running_mean is None:  # type: ignore[attr-defined]
            raise ValueError(
                f"stats={new_stats!r} needs running statistics, but this layer has "
                "track_running_stats=False; use 'source' or 'batch'"
            )
        self._stats = new_stats
        self.prior = new_prior
        self.alpha = new_alpha
        self.ema_momentum = new_momentum
        self.pooled = new_pooled

    def stats_config(self) -> dict[str, Any]:
        """The arguments of :meth:`set_stats` that reproduce the current configuration."""
        return {
            "stats": self._stats,
            "prior": self.prior,
            "alpha": self.alpha,
            "momentum": self.ema_momentum,
            "pooled": self.pooled,
        }

    # ------------------------------------------------------------------ source copy
    @torch.no_grad()
    def save_source_stats(self) -> None:
        """Keep a copy of the running statistics (once) before they are overwritten."""
        if self.source_mean is None and self.running_mean is not None:  # type: ignore[attr-defined]
            self.source_mean = self.running_mean.clone()  # type: ignore[attr-defined]
            self.source_var = self.running_var.clone()  # type: ignore[attr-defined]

    @torch.no_grad()
    def restore_source_stats(self) -> None:
        """Put back the running statistics saved before the first EMA step or recalibration."""
        if self.source_mean is not None:
            self.running_mean.copy_(self.source_mean)  # type: ignore[attr-defined]
            self.running_var.copy_(self.source_var)  # type: ignore[attr-defined]
            self.source_mean = None
            self.source_var = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        # Loaded running statistics are the new source statistics.
        if prefix + "running_mean" in state_dict:
            self.source_mean = None
            self.source_var = None

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, input: Tensor) -> None:
        dims = self._input_dims
        if dims is None:
            if input.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        elif input.dim() not in dims:
            want = " or ".join(f"{d}D" for d in dims)
            raise ValueError(f"expected {want} input (got {input.dim()}D input)")

    def _normalize(self, input: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        if mean.requires_grad or var.requires_grad:
            # native eval-mode batch_norm has no gradient for mean/var: spell it out.
            shape = (1, -1) + (1,) * (input.dim() - 2)
            scale = torch.rsqrt(var + self.eps)  # type: ignore[attr-defined]
            if self.weight is not None:  # type: ignore[attr-defined]
                scale = scale * self.weight  # type: ignore[attr-defined]
            shift = -mean * scale
            if self.bias is not None:  # type: ignore[attr-defined]
                shift = shift + self.bias  # type: ignore[attr-defined]
            out = input * scale.view(shape) + shift.view(shape)
            return out.to(input.dtype)
        # Same dtype as the layer's parameters/buffers (float32 under autocast).
        reference = self.running_mean if self.running_mean is not None else self.weight  # type: ignore[attr-defined]
        stat_dtype = mean.dtype if reference is None else reference.dtype
        return F.batch_norm(
            input,
            mean.to(stat_dtype),
            var.to(stat_dtype),
            self.weight,  # type: ignore[attr-defined]
            self.bias,  # type: ignore[attr-defined]
            False,
            0.0,
            self.eps,  # type: ignore[attr-defined]
        )

    def forward(self, input: Tensor) -> Tensor:
        stats = self._stats
        if stats == "source":
            # Exactly torch: running statistics in eval mode, batch statistics (and
            # running-statistics updates) in train mode.
            return super().forward(input)  # type: ignore[misc]
        self._check_input_dim(input)
        values_per_channel = input.numel() // max(input.shape[1], 1)
        if stats == "batch":
            if values_per_channel <= 1:
                raise ValueError(
                    f"stats='batch' needs more than 1 value per channel to compute batch statistics, "
                    f"got input of shape {tuple(input.shape)}; use 'blend' or 'ema' for single samples"
                )
            if (torch.is_grad_enabled() and input.requires_grad) or not _BATCH_VIA_MOMENTS or input.device.type != "cpu":
                # The native training kernel without running buffers: torch's train-mode
                # output and gradients, running statistics untouched.
                return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)  # type: ignore[attr-defined]
            # On CPU without autograd, our moments + the eval kernel are faster than the
            # training kernel, and equal to it up to float rounding.
            return self._normalize(input, *batch_moments(input))
        source_mean = self.running_mean.float() if self.running_mean.dtype != torch.float64 else self.running_mean  # type: ignore[attr-defined]
        source_var = self.running_var.float() if self.running_var.dtype != torch.float64 else self.running_var  # type: ignore[attr-defined]
        if values_per_channel == 0:  # empty batch: nothing to adapt to
            return self._normalize(input, source_mean, source_var)
        batch_mean, batch_var = batch_moments(input)
        if stats == "blend":
            n = input.shape[0]
            weight = self.alpha if self.alpha is not None else n / (self.prior + n)
            mean = torch.lerp(source_mean, batch_mean, weight)
            var = torch.lerp(source_var, batch_var, weight)
            if self.pooled:
                # Variance of the mixture: add the spread between the two means.
                var = var + (weight * (1.0 - weight)) * (source_mean - batch_mean).square()
            return self._normalize(input, mean, var)
        # ema: update the estimate with this batch, then normalise with the updated estimate.
        m = self.ema_momentum
        mean = torch.lerp(source_mean, batch_mean, m)
        var = torch.lerp(source_var, batch_var, m)
        self.save_source_stats()
        with torch.no_grad():
            self.running_mean.copy_(mean)  # type: ignore[attr-defined]
            self.running_var.copy_(var)  # type: ignore[attr-defined]
        return self._normalize(input, mean, var)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", stats={self._stats}"  # type: ignore[misc]
        if self._stats == "blend":
            s += f", prior={self.prior:g}" if self.alpha is None else f", alpha={self.alpha:g}"
            if self.pooled:
                s += ", pooled=True"
        elif self._stats == "ema":
            s += f", ema_momentum={self.ema_momentum:g}"
        return s


_DOC = r"""Applies Batch Normalization over a {rank} input with switchable statistics.

    A subclass of :class:`torch.nn.{base}` with the same arguments, parameters and
    ``state_dict`` keys, plus the attribute ``stats`` that picks the normalisation
    statistics (``mean``, ``var`` per channel; ``n`` = number of samples in the batch):

    * ``"source"``: torch semantics: running statistics in eval mode; in train mode batch
      statistics and running-statistics updates, exactly like torch (the default, so the
      layer can be a model's ``norm_layer``).
    * ``"batch"``: the batch mean and biased variance, in both modes, running statistics
      untouched (torch's train-mode output).
    * ``"blend"``: ``w = n / (prior + n)`` (or ``w = alpha``), ``mean = (1 - w) mean_src +
      w mean_batch``, likewise ``var``; with ``pooled=True`` the variance also gets
      ``w (1 - w) (mean_src - mean_batch)^2``.
    * ``"ema"``: ``mean <- (1 - m) mean + m mean_batch`` (likewise the biased variance,
      ``m = ema_momentum``), written into the running buffers, then used to normalise the
      same batch: one forward pass.

    ``model.train()``/``model.eval()`` never change ``stats``. Batch statistics are computed
    in float32 for fp16/bf16 inputs (autocast). The running statistics that EMA or
    recalibration overwrite are copied once into the non-persistent buffers
    ``source_mean``/``source_var``; :meth:`restore_source_stats` (``tta.reset``) puts them back.

    Args:
        num_features: number of channels C.
        eps, momentum, affine, track_running_stats, device, dtype: as in torch
            (``momentum`` is torch's running-statistics momentum for train mode).
        stats: one of ``"source"``, ``"batch"``, ``"blend"``, ``"ema"``. Default: ``"source"``.
        prior: prior strength N of ``"blend"`` in samples. Default: 16.
        alpha: fixed weight of the batch statistics in ``"blend"``; overrides ``prior``.
        ema_momentum: momentum m of ``"ema"``. Default: 0.1.
        pooled: add the between-distribution variance term in ``"blend"``. Default: False.

    Shape:
        - Input: {shape}
        - Output: same shape as input

    Examples::

        >>> bn = tta.{name}(8, stats="blend", prior=16)
        >>> out = bn(torch.randn({example}))
    """


class AdaptiveBatchNorm1d(_AdaptiveBatchNormMixin, nn.BatchNorm1d):
    _input_dims = (2, 3)
    __doc__ = _DOC.format(rank="2D or 3D", base="BatchNorm1d", shape=":math:`(N, C)` or :math:`(N, C, L)`",
                          name="AdaptiveBatchNorm1d", example="4, 8")


class AdaptiveBatchNorm2d(_AdaptiveBatchNormMixin, nn.BatchNorm2d):
    _input_dims = (4,)
    __doc__ = _DOC.format(rank="4D", base="BatchNorm2d", shape=":math:`(N, C, H, W)`",
                          name="AdaptiveBatchNorm2d", example="4, 8, 5, 5")


class AdaptiveBatchNorm3d(_AdaptiveBatchNormMixin, nn.BatchNorm3d):
    _input_dims = (5,)
    __doc__ = _DOC.format(rank="5D", base="BatchNorm3d", shape=":math:`(N, C, D, H, W)`",
                          name="AdaptiveBatchNorm3d", example="4, 8, 3, 5, 5")
