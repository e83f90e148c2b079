"""BatchNorm layers whose normalisation statistics are switchable at test time.

A pretrained network normalises with the ``running_mean``/``running_var`` collected on its
training ("source") data. Under a distribution shift those are wrong; the layers here can
normalise with the statistics of the current batch, a blend of source and batch statistics
(Schneider et al. 2020), or an online (EMA) estimate, selected by the attribute ``stats``.

The ``state_dict`` keys are exactly torch's, so checkpoints load ``strict=True`` both ways.
"""
from __future__ import annotations

import enum
import functools
import math
import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["STATS", "VARIANCES", "MOMENTS", "AdaptiveBatchNorm1d", "AdaptiveBatchNorm2d", "AdaptiveBatchNorm3d"]

STATS = ("source", "batch", "blend", "ema")
VARIANCES = ("biased", "unbiased")
# which moments adapt, the other keeps the running value (partly adaptive BN, Schneider et al. 2020)
MOMENTS = ("both", "mean", "var")


class _Keep(enum.Enum):
    """Default of the ``set_stats`` arguments: keep the current value (``None`` is a value of alpha)."""

    KEEP = "keep"

    def __repr__(self) -> str:
        return "<keep current>"


_KEEP: Any = _Keep.KEEP


def _check_number(name: str, value: Any, low: float, high: float = math.inf, meaning: str = "") -> float:
    """``value`` as a float; Python and NumPy reals are accepted (bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{meaning}, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range, e.g. 10**400
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        valid = f"a finite number >= {low:g}" if high == math.inf else f"a number in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {valid}{meaning}, got {value!r}")
    return number


def _check_prior(prior: Any) -> float:
    return _check_number("prior", prior, 0.0, meaning=" (the source weight in samples)")


def _check_fraction(name: str, value: Any) -> float:
    return _check_number(name, value, 0.0, 1.0)


def _check_stats(stats: Any) -> str:
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    return stats


def _check_moments(moments: Any) -> str:
    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
    return moments


def _check_variance(variance: Any) -> str:
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    return variance


# stats='batch' on CPU without autograd: batch_moments + the eval kernel instead of the
# training kernel (faster, equal up to float rounding).
_BATCH_VIA_MOMENTS = True
# CPU fast path for inputs with at least this many values per (sample, channel) row.
_ROWS_MIN_SPATIAL = 8
# Rows are summed in chunks of at most this many values (float32 partial sums, pooled in
# float64), so the rounding error does not grow with the row length.
_CHUNK = 128
# Channels with mean^2 > _MAX_CONDITION * var are summed again, shifted by their mean: in
# E[x^2] - E[x]^2 the error of the float32 sums is amplified by 1 + mean^2/var.
_MAX_CONDITION = 10.0


@functools.lru_cache(maxsize=256)
def _chunk_length(spatial: int) -> int:
    """The largest divisor of ``spatial`` <= _CHUNK if it is >= _CHUNK/4, else _CHUNK (rows then
    end in a shorter chunk)."""
    first = -(-spatial // _CHUNK)
    return next((spatial // k for k in range(first, 4 * first + 1) if spatial % k == 0), _CHUNK)


def _row_sums(input: Tensor, n: int, spatial: int) -> Tensor:
    """(2, C) float64 sums of ``input`` (N, C, *) and of its squares per channel: vectorised
    float32 sums over chunks of at most _CHUNK values, pooled in float64."""
    rows = input.reshape(-1, spatial)
    length = _chunk_length(spatial)
    whole = spatial - spatial % length
    parts = [rows[:, :whole].unflatten(1, (-1, length))] + ([rows[:, whole:]] if whole < spatial else [])
    total = 0
    for part in parts:
        sums = torch.stack([part.sum(-1), torch.linalg.vector_norm(part, dim=-1).square()])
        total = total + sums.double().view(2, n, input.shape[1], -1).sum((1, 3))
    return total  # type: ignore[return-value]


def _row_moments(input: Tensor, n: int, spatial: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance from row sums (see :func:`batch_moments`)."""
    count = n * spatial
    totals = _row_sums(input, n, spatial) / count
    mean, var = totals[0], (totals[1] - totals[0].square()).clamp_min(0.0)
    ill = mean.square() > _MAX_CONDITION * var
    if bool(ill.any()):
        # Sum those channels again about their mean estimate: then the condition is ~1.
        channels = ill.nonzero().view(-1)
        shift = mean[channels].to(input.dtype)
        part = input.index_select(1, channels)
        part -= shift.view(1, -1, *[1] * (input.dim() - 2))
        shifted = _row_sums(part, n, spatial) / count
        mean[channels] = shift.double() + shifted[0]
        var[channels] = (shifted[1] - shifted[0].square()).clamp_min(0.0)
    return mean.to(input.dtype), var.to(input.dtype)


def batch_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``input`` (N, C, *), reduced over all dims but C.

    Returns float32 tensors of shape (C,) for float32/fp16/bf16 input, float64 for double.

    * With autograd (``input.requires_grad``) or under ``torch.compile``: ``torch.var_mean``
      in float32 (differentiable; branch-free, so the graph has no data-dependent break).
    * CPU, contiguous float32/float64 input with >= 8 values per (sample, channel) row:
      vectorised row sums and row norms over chunks of <= 128 values in the input dtype,
      pooled in float64; channels with ``mean^2 > 10 var`` are summed again shifted by their
      mean. Relative error of the variance <= 1e-5 for every row length (measured maximum
      4.7e-6 over row lengths 9 to 512x512, batch sizes 1 to 128, normal, uniform,
      exponential, half-rectified and 90-99%-constant data and ``mean^2/var`` from 0 to 1e4;
      torch's double-accumulating kernel: 1e-7), several times faster than that kernel.
    * Otherwise (CUDA, fp16/bf16, channels-last, tiny rows): the native fused kernel
      ``torch.batch_norm_update_stats`` with float32 accumulators.
    """
    acc = torch.promote_types(input.dtype, torch.float32)
    if (torch.is_grad_enabled() and input.requires_grad) or torch.compiler.is_compiling():
        var, mean = torch.var_mean(input.to(acc), [0, *range(2, input.dim())], correction=0)
        return mean, var
    n, c = input.shape[0], input.shape[1]
    spatial = input.numel() // max(n * c, 1)
    if (input.device.type == "cpu" and input.dtype == acc and spatial >= _ROWS_MIN_SPATIAL
            and input.is_contiguous()):
        return _row_moments(input, n, spatial)
    # One fused native kernel. Float32 scratch "running" tensors make it return float32
    # moments for fp16/bf16 input; momentum 0 means the scratch values are never used.
    scratch = torch.empty(2, c, dtype=acc, device=input.device)
    mean, var = torch.batch_norm_update_stats(input, scratch[0], scratch[1], 0.0)
    return mean, var


def _same_dtype(*tensors: Tensor) -> list[Tensor]:
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return [t.to(dtype) for t in tensors]


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
        variance: str = "biased",
        moments: str = "both",
        **kwargs: Any,
    ) -> None:
        # kwargs: further arguments of the installed torch's BatchNorm (e.g. bias=False).
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)  # type: ignore[call-arg]
        # Copy of the source statistics, taken lazily before the first write by EMA or
        # recalibration; outside the state_dict so the keys stay torch's.
        self.register_buffer("source_mean", None, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("source_var", None, persistent=False)  # type: ignore[attr-defined]
        # Float32 EMA estimate for fp16/bf16 running buffers: (running_mean, running_var,
        # copies of what was written to them, mean, var); valid element by element where the
        # buffers still hold what was written (checked by content: writes through ``.data``
        # do not bump ``_version``).
        self._ema_shadow: tuple[Any, ...] | None = None
        self._stats = "source"
        self.prior = 16.0
        self.alpha: float | None = None
        self.ema_momentum = 0.1
        self.pooled = False
        self.variance = "biased"
        self.moments = "both"
        self.set_stats(stats, prior=prior, alpha=alpha, momentum=ema_momentum, pooled=pooled, variance=variance,
                       moments=moments)

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
        variance: str = _KEEP,
        moments: str = _KEEP,
    ) -> None:
        """Choose the statistics source and its parameters; omitted arguments are kept.

        Args:
            stats: one of ``"source"``, ``"batch"``, ``"blend"``, ``"ema"``; ``None`` keeps it.
            prior: prior strength N of ``blend`` (Schneider et al. 2020): the source
                statistics count as N samples. An explicit ``prior`` clears a kept ``alpha``.
            alpha: fixed weight of the batch statistics in ``blend``; overrides ``prior``
                (also when both are given); ``None`` uses ``prior``.
            momentum: EMA momentum m in [0, 1] (stored as ``ema_momentum``; the layer's own
                torch ``momentum`` for train-mode running statistics is not touched).
            pooled: add the between-distribution term to the blended variance.
            variance: ``"biased"`` (divide by n*H*W; torch's normalisation) or
                ``"unbiased"`` (by n*H*W - 1; torch's ``running_var``) batch variance in
                ``batch``, ``blend`` and ``ema``.
            moments: which moments adapt in ``batch``, ``blend`` and ``ema``: ``"both"``,
                only the ``"mean"`` (the variance stays the running variance) or only the
                ``"var"`` (the mean stays the running mean); the partly adaptive BN of
                Schneider et al. 2020. Anything but ``"both"`` needs running statistics.

        Numbers may be Python or NumPy reals. Nothing changes when an argument is bad.

        Raises:
            TypeError: ``prior``/``alpha``/``momentum`` not a real number, ``pooled`` not a bool.
            ValueError: bad ``stats``/``variance``, ``prior`` < 0 or not finite, ``alpha`` or
                ``momentum`` outside [0, 1], ``blend``/``ema`` with ``track_running_stats=False``.
        """
        new_stats = self._stats if stats is None else _check_stats(stats)
        new_prior = self.prior if prior is _KEEP else _check_prior(prior)
        if alpha is _KEEP:
            new_alpha = None if prior is not _KEEP else self.alpha
        else:
            new_alpha = None if alpha is None else _check_fraction("alpha", alpha)
        new_momentum = self.ema_momentum if momentum is _KEEP else _check_fraction("momentum", momentum)
        if pooled is not _KEEP and not isinstance(pooled, (bool, np.bool_)):
            raise TypeError(f"pooled must be a bool, got {pooled!r}")
        new_pooled = self.pooled if pooled is _KEEP else bool(pooled)
        new_variance = self.variance if variance is _KEEP else _check_variance(variance)
        new_moments = self.moments if moments is _KEEP else _check_moments(moments)
        if new_moments != "both" and new_stats != "source" and self.running_mean is None:  # type: ignore[attr-defined]
            raise ValueError(f"moments={new_moments!r} keeps the other moment from the running statistics, "
                             "but this layer has track_running_stats=False; use moments='both'")
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
        self.variance = new_variance
        self.moments = new_moments
        self._adopt_buffers()

    def stats_config(self) -> dict[str, Any]:
        """The arguments of :meth:`set_stats` that reproduce the current configuration."""
        return {
            "stats": self._stats,
            "prior": self.prior,
            "alpha": self.alpha,
            "momentum": self.ema_momentum,
            "pooled": self.pooled,
            "variance": self.variance,
            "moments": self.moments,
        }

    # ------------------------------------------------------------------ own buffers
    # The layer's "own" running buffers are recorded whenever they are legitimately set
    # (construction, set_stats, assignment, load_state_dict, .to()/.half()). Inside
    # torch.func.functional_call the running buffers are the caller's tensors: EMA writes
    # them (as torch's train mode does) but takes no source copy of them.
    def _adopt_buffers(self) -> None:
        vars(self)["_own"] = (self._buffers.get("running_mean"), self._buffers.get("running_var"))  # type: ignore[attr-defined]

    def _owns_buffers(self) -> bool:
        own = vars(self).get("_own")
        return own is None or (own[0] is self.running_mean and own[1] is self.running_var)  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        stats_buffer = name in ("running_mean", "running_var")
        if stats_buffer and value is not self._buffers.get(name) and "source_mean" in self._buffers:  # type: ignore[attr-defined]
            # New running statistics are the new source statistics.
            self._buffers["source_mean"] = self._buffers["source_var"] = None  # type: ignore[attr-defined]
        super().__setattr__(name, value)
        if stats_buffer:
            self._adopt_buffers()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        self._adopt_buffers()
        return result

    # ------------------------------------------------------------------ source copy
    @torch.no_grad()
    def save_source_stats(self) -> None:
        """Keep a copy of the running statistics (once) before they are overwritten.

        Does nothing inside ``torch.func.functional_call`` (the running buffers are then the
        caller's tensors, not the layer's).
        """
        if self.source_mean is None and self.running_mean is not None and self._owns_buffers():  # type: ignore[attr-defined]
            self._buffers["source_mean"] = self.running_mean.clone()  # type: ignore[attr-defined]
            self._buffers["source_var"] = self.running_var.clone()  # type: ignore[attr-defined]

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
        self._adopt_buffers()

    # ------------------------------------------------------------------ running statistics
    def _running_stats(self) -> tuple[Tensor, Tensor]:
        """``running_mean``/``running_var`` in float32 (float64 buffers stay float64); for
        fp16/bf16 buffers the float32 EMA estimate for the elements that still hold what EMA
        wrote (compared by content, C elements, no device synchronisation)."""
        mean, var = self.running_mean, self.running_var  # type: ignore[attr-defined]
        acc = torch.promote_types(mean.dtype, torch.float32)
        shadow = self._ema_shadow
        if shadow is None or torch.compiler.is_compiling() or shadow[0] is not mean or shadow[1] is not var:
            return mean.to(acc), var.to(acc)
        written_mean, written_var, ema_mean, ema_var = shadow[2:]
        return (torch.where(mean == written_mean, ema_mean, mean.to(acc)),
                torch.where(var == written_var, ema_var, var.to(acc)))

    @torch.no_grad()
    def _write_running(self, mean: Tensor, var: Tensor) -> None:
        """Store the EMA estimate in the running buffers (after saving the source copy).

        fp16/bf16 buffers get the estimate rounded and clipped to their finite range; the
        layer keeps the float32 estimate (not in the state_dict) for its next steps.
        """
        self.save_source_stats()
        running_mean, running_var = self.running_mean, self.running_var  # type: ignore[attr-defined]
        if torch.finfo(running_mean.dtype).bits >= torch.finfo(mean.dtype).bits:
            running_mean.copy_(mean)
            running_var.copy_(var)
            return
        largest = torch.finfo(running_mean.dtype).max
        running_mean.copy_(mean.clamp(-largest, largest))
        running_var.copy_(var.clamp(max=largest))
        if not torch.compiler.is_compiling() and self._owns_buffers():
            self._ema_shadow = (running_mean, running_var, running_mean.clone(), running_var.clone(),
                                mean.detach(), var.detach())

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, input: Tensor) -> None:
        dims = self._input_dims
        if dims is None:
            if input.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        elif input.dim() not in dims:
            want = " or ".join(f"{d}D" for d in dims)
            raise ValueError(f"expected {want} input (got {input.dim()}D input)")

    def _too_few_values(self, input: Tensor) -> ValueError:
        if self._stats == "batch":
            need = "stats='batch' needs more than 1 value per channel to compute batch statistics"
        else:
            need = f"stats={self._stats!r} with variance='unbiased' needs more than 1 value per channel"
        if self.running_mean is None:  # type: ignore[attr-defined]
            hint = ("this layer has track_running_stats=False, so there are no running statistics to "
                    "fall back on: pass more than one value per channel (more samples or a larger input)")
        elif self._stats == "batch":
            hint = "use 'blend' or 'ema' (they accept one value per channel), or 'source' in eval mode"
        else:
            hint = "use variance='biased' (the batch variance is then 0)"
        return ValueError(f"{need}, got input of shape {tuple(input.shape)}; {hint}")

    def _normalize(self, input: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """Normalise with per-channel ``mean``/``var`` kept in float32 (float64 for double
        input) up to the normalisation, whatever the dtype of input, parameters and buffers."""
        weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
        if mean.requires_grad or var.requires_grad:
            # native eval-mode batch_norm has no gradient for mean/var: spell it out.
            shape = (1, -1) + (1,) * (input.dim() - 2)
            scale = torch.rsqrt(var + self.eps)  # type: ignore[attr-defined]
            if weight is not None:
                scale = scale * weight
            shift = -mean * scale
            if bias is not None:
                shift = shift + bias
            return (input * scale.view(shape) + shift.view(shape)).to(input.dtype)
        # fp16/bf16 input with float32 statistics and parameters: torch's mixed-type kernel.
        acc = torch.promote_types(input.dtype, torch.float32)
        return F.batch_norm(
            input,
            mean.to(acc),
            var.to(acc),
            None if weight is None else weight.to(acc),
            None if bias is None else bias.to(acc),
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
        values = input.numel() // max(input.shape[1], 1)  # per channel: n * H * W
        unbiased = self.variance == "unbiased"
        if stats == "batch" and self.moments == "both":
            if values == 1:
                raise self._too_few_values(input)
            if values == 0 or not unbiased and (torch.compiler.is_compiling() or not _BATCH_VIA_MOMENTS
                                                or (torch.is_grad_enabled() and input.requires_grad)
                                                or input.device.type != "cpu"):
                # The native training kernel without running buffers: torch's train-mode
                # output (also for an empty batch) and gradients, running statistics untouched.
                w, b = self.weight, self.bias  # type: ignore[attr-defined]
                return F.batch_norm(input, None, None, w, b, True, 0.0, self.eps)  # type: ignore[attr-defined]
            # On CPU without autograd, our moments + the eval kernel are faster than the
            # training kernel, and equal to it up to float rounding.
            mean, var = batch_moments(input)
            return self._normalize(input, mean, var * (values / (values - 1)) if unbiased else var)
        source_mean, source_var = self._running_stats()
        if values == 0:  # empty batch: nothing to adapt to
            return self._normalize(input, source_mean, source_var)
        if (unbiased or stats == "batch") and values == 1:
            raise self._too_few_values(input)
        batch_mean, batch_var = batch_moments(input)
        if unbiased:
            batch_var = batch_var * (values / (values - 1))
        source_mean, source_var, batch_mean, batch_var = _same_dtype(source_mean, source_var, batch_mean, batch_var)
        if self.moments == "mean":  # partly adaptive: keep the running variance
            batch_var = source_var
        elif self.moments == "var":  # keep the running mean
            batch_mean = source_mean
        if stats == "batch":
            return self._normalize(input, batch_mean, batch_var)
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
        self._write_running(mean, var)
        return self._normalize(input, mean, var)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", stats={self._stats}"  # type: ignore[misc]
        if self._stats == "blend":
            s += f", prior={self.prior:g}" if self.alpha is None else f", alpha={self.alpha:g}"
            if self.pooled:
                s += ", pooled=True"
        elif self._stats == "ema":
            s += f", ema_momentum={self.ema_momentum:g}"
        if self._stats != "source" and self.variance != "biased":
            s += f", variance={self.variance}"
        if self._stats != "source" and self.moments != "both":
            s += f", moments={self.moments}"
        return s


_DOC = r"""Applies Batch Normalization over a {rank} input with switchable statistics.

    A subclass of :class:`torch.nn.{base}` with the same arguments, parameters and
    ``state_dict`` keys, plus the attribute ``stats`` that picks the normalisation
    statistics (``mean``, ``var`` per channel; ``n`` = number of samples in the batch):

    * ``"source"``: torch semantics: running statistics in eval mode; in train mode batch
      statistics and running-statistics updates, exactly like torch (the default, so the
      layer can be a model's ``norm_layer``).
    * ``"batch"``: the batch mean and variance, in both modes, running statistics untouched
      (with ``variance="biased"``: torch's train-mode output, as tent uses it).
    * ``"blend"``: ``w = n / (prior + n)`` (or ``w = alpha``), ``mean = (1 - w) mean_src +
      w mean_batch``, likewise ``var`` (Schneider et al. 2020); with ``pooled=True`` the
      variance also gets ``w (1 - w) (mean_src - mean_batch)^2``.
    * ``"ema"``: ``mean <- (1 - m) mean + m mean_batch`` (likewise the variance,
      ``m = ema_momentum``), written into the running buffers, then used to normalise the
      same batch: one forward pass.

    The batch variance is the biased one (divide by n*H*W) or, with ``variance="unbiased"``,
    the unbiased one (n*H*W - 1; torch's ``running_var`` convention, used by
    BayesianBatchNorm and AlphaBatchNorm). ``model.train()``/``model.eval()`` never change
    ``stats``. Statistics stay float32 up to the normalisation for fp16/bf16 inputs, parameters
    or buffers (autocast or ``.half()``); fp16/bf16 running buffers receive the EMA estimate
    rounded and clipped to their range while the layer keeps it in float32. The running
    statistics that EMA or recalibration overwrite are copied once into the non-persistent
    buffers ``source_mean``/``source_var``; :meth:`restore_source_stats` (``tta.reset``) puts
    them back. An empty batch gives an empty output; ``"batch"`` raises ``ValueError`` on one
    value per channel.

    Args:
        num_features: number of channels C.
        eps, momentum, affine, track_running_stats, device, dtype: as in torch
            (``momentum`` is torch's running-statistics momentum for train mode).
        stats: one of ``"source"``, ``"batch"``, ``"blend"``, ``"ema"``. Default: ``"source"``.
        prior: prior strength N of ``"blend"`` in samples. Default: 16.
        alpha: fixed weight of the batch statistics in ``"blend"``; overrides ``prior``.
        ema_momentum: momentum m of ``"ema"``. Default: 0.1.
        pooled: add the between-distribution variance term in ``"blend"``. Default: False.
        variance: ``"biased"`` or ``"unbiased"`` batch variance. Default: ``"biased"``.
        moments: ``"both"``, ``"mean"`` or ``"var"``: which moments adapt (the other one
            keeps the running value). Default: ``"both"``.
        **kwargs: further arguments of the installed torch's ``{base}`` (e.g. ``bias=False``).

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
