"""One read of unlabelled batches, two forward passes per batch: the raw material of the
label-free diagnosis, accuracy estimate and prior choice.

Per batch ``x`` (inputs only: a target in an ``(input, target)`` batch is never read):

1. **source pass**: every BatchNorm layer normalises with its running statistics (torch eval
   mode); forward pre-hooks pool the exact per-channel moments of each layer's input
   (:class:`tta.recalibration._Moments`, float64) and keep the moments of this batch;
2. **batch pass** (optional): every BatchNorm layer normalises with the statistics of this
   batch (biased variance: torch's train-mode output, ``stats="batch"``), without writing any
   statistic (the hooks hand the batch moments to the eval-mode forward through the running
   buffers, which are put back right after);
3. **configured pass** (only when asked and the model is neither source- nor batch-configured,
   e.g. ``blend`` with prior N): the model as configured.

The model runs in eval mode without gradients; its train flags, ``stats`` configurations and
buffers are restored on exit, also on errors.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.batchnorm import _AdaptiveBatchNormMixin, batch_moments
from tta.recalibration import _Moments
from tta.surgery import _restore, _snapshot, adaptive_layers

__all__ = ["Observation", "observe", "configuration", "batchnorm_layers", "unlabelled", "hooked"]

logger = logging.getLogger(__name__)

# Configurations whose predictions one of the first two passes already gives.
_PASS_OF = {"source": "source", "batch": "batch"}


def batchnorm_layers(model: nn.Module) -> dict[nn.Module, str]:
    """Every BatchNorm layer of ``model`` with running statistics -> its name (module order)."""
    layers = {m: name or type(m).__name__ for name, m in model.named_modules()
              if isinstance(m, _BatchNorm) and m.running_mean is not None}
    if not layers:
        raise ValueError("model has no BatchNorm layer with running statistics (track_running_stats=True); "
                         "the label-free tools read the source statistics from them")
    return layers


def configuration(model: nn.Module) -> str:
    """How ``model`` normalises in eval mode: ``"source"`` (a plain torch model, or every adaptive
    layer with ``stats="source"``), ``"batch"``, ``"blend(prior=N)"``, ``"blend(alpha=a)"``
    (``pooled`` and ``variance`` options appended), ``"ema"``, or ``"mixed"`` when the adaptive
    layers differ."""
    names = set()
    for layer in adaptive_layers(model):
        config = layer.stats_config()
        name = config["stats"]
        if name == "blend":
            name = f"blend(alpha={config['alpha']:g})" if config["alpha"] is not None else f"blend(prior={config['prior']:g})"
            name = name[:-1] + (", pooled=True" if config["pooled"] else "") + ")"
        if name in ("batch", "ema") or name.startswith("blend"):
            if config["variance"] != "biased":
                name = f"{name}[{config['variance']}]"
        names.add(name)
    if not names:
        return "source"
    return names.pop() if len(names) == 1 else "mixed"


def unlabelled(batches: Iterable[Any], what: str, max_batches: int | None = None) -> Iterator[Tensor]:
    """The input tensors of ``batches``: tensors, or the first element of tuples/lists (the
    target is never indexed); empty batches are skipped; at most ``max_batches`` are pulled."""
    if isinstance(batches, Tensor):
        raise TypeError(f"{what}: batches must be an iterable of input tensors (a list, a DataLoader), got a single "
                        f"tensor of shape {tuple(batches.shape)}; pass [x] or x.split(batch_size)")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"{what}: max_batches must be a positive int or None, got {max_batches!r}")
    for batch in itertools.islice(batches, max_batches):
        if isinstance(batch, (tuple, list)):
            if len(batch) == 0:
                raise ValueError(f"{what}: got an empty tuple as a batch")
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(f"{what}: batches must be input tensors or (input, ...) tuples, got {type(batch).__name__}")
        if batch.numel():
            yield batch


@dataclass
class Observation:
    """What :func:`observe` saw. Lists have one entry per (non-empty) batch, in order.

    Attributes:
        names: BatchNorm layer names in forward order (first call), shape-free.
        reference: layer name -> (mean, var) float64 (C,): the layer's running statistics,
            i.e. the source statistics of a model that was not recalibrated.
        eps: layer name -> the layer's ``eps``.
        moments: layer name -> pooled exact moments of the layer's input over all batches
            (source pass).
        batch_moments: per batch, layer name -> (mean, biased var) float64 (C,) of that batch.
        sample_sums: per batch, layer name -> (sum, sum of squares) float64 (C,) over the
            batch's samples of each sample's own channel mean (its spatial average): the
            between-sample spread used by :func:`tta.select_prior`.
        sizes: samples per batch.
        source_logits: per batch, (n, K) float32 logits with source statistics.
        batch_logits: per batch, (n, K) logits with batch statistics (empty if not asked).
        logits: per batch, the configured model's logits (``source_logits`` or
            ``batch_logits`` when it is configured so; empty if not asked).
        config: :func:`configuration` of the model.
    """

    names: list[str]
    reference: dict[str, tuple[Tensor, Tensor]]
    eps: dict[str, float]
    moments: dict[str, _Moments]
    batch_moments: list[dict[str, tuple[Tensor, Tensor]]] = field(default_factory=list)
    sample_sums: list[dict[str, tuple[Tensor, Tensor]]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    source_logits: list[Tensor] = field(default_factory=list)
    batch_logits: list[Tensor] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)
    config: str = "source"

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)


def _source(layers: Iterable[nn.Module]) -> None:
    for m in layers:
        if isinstance(m, _AdaptiveBatchNormMixin):
            m.set_stats("source")


@contextlib.contextmanager
def hooked(model: nn.Module, layers: Iterable[nn.Module], hook: Any) -> Iterator[Any]:
    """``hook`` as a forward pre-hook on ``layers``, ``model`` in eval mode, adaptive layers on
    ``source``; on exit the hooks are removed and buffers, ``stats`` configurations and train
    flags restored (also on errors). Yields the buffer snapshot (:func:`tta.surgery._snapshot`)."""
    saved = _snapshot(layers)
    training = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(hook) for m in layers]
    model.eval()
    try:
        _source(layers)
        yield saved
    finally:
        for h in hooks:
            h.remove()
        _restore(saved)
        for m, flag in training.items():
            m.training = flag


def _device(model: nn.Module, layers: Iterable[nn.Module]) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return next(iter(layers)).running_mean.device


@torch.no_grad()
def observe(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    batch_pass: bool = True,
    configured_pass: bool = False,
    max_batches: int | None = None,
    progress: bool = False,
    what: str = "observe",
) -> Observation:
    """Run the source pass (and the batch pass, and the configured pass) over ``batches``.

    Args:
        model: any torch model with BatchNorm layers (plain or converted with :func:`tta.convert`).
        batches: iterable of input tensors (N, C, H, W) or ``(input, ...)`` tuples; read once.
        batch_pass: also run the batch-statistics pass.
        configured_pass: also run the model as configured when that is not ``source`` or
            ``batch`` (``ema`` and ``mixed`` are refused: their predictions depend on the
            order of the batches and on state this function must not change).
        max_batches: read at most this many batches.
        progress: tqdm progress bar.

    Raises:
        TypeError / ValueError: bad ``batches``; no batches; a model without BatchNorm layers
            with running statistics; ``configured_pass`` on an ``ema``/``mixed`` model.
    """
    layers = batchnorm_layers(model)
    config = configuration(model)
    own_pass = configured_pass and config not in _PASS_OF
    batch_pass = batch_pass or (configured_pass and config == "batch")
    if own_pass and (config.startswith("ema") or config == "mixed"):
        raise ValueError(f"{what}: cannot evaluate a model configured as {config!r} batch by batch (its statistics "
                         "depend on the stream); configure it as 'source', 'batch' or 'blend', or pass its logits")
    obs = Observation(
        names=[],
        reference={n: (m.running_mean.detach().double().clone(), m.running_var.detach().double().clone())
                   for m, n in layers.items()},
        eps={n: float(m.eps) for m, n in layers.items()},
        moments={n: _Moments(m) for m, n in layers.items()},
        config=config,
    )
    device = _device(model, layers)
    mode: dict[str, Any] = {"pass": "source", "current": {}, "sums": {}}

    def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
        input = args[0]
        name = layers[layer]
        if mode["pass"] == "source":
            if name not in obs.names:
                obs.names.append(name)
            if input.numel():
                mean, var = obs.moments[name].add(input)
                mode["current"][name] = (mean.double(), var.double())
                means = input.reshape(input.shape[0], input.shape[1], -1).mean(2, dtype=torch.float64)
                mode["sums"][name] = (means.sum(0), means.square().sum(0))
        elif mode["pass"] == "batch" and input.numel():
            mean, var = batch_moments(input)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)

    bar = unlabelled(batches, what, max_batches)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=what, leave=False)
    with hooked(model, layers, hook) as saved:
        for x in bar:
            x = x.to(device, non_blocking=True)
            mode["pass"], mode["current"], mode["sums"] = "source", {}, {}
            _source(layers)
            obs.source_logits.append(model(x).float().cpu())
            obs.batch_moments.append(mode["current"])
            obs.sample_sums.append(mode["sums"])
            obs.sizes.append(x.shape[0])
            if batch_pass:
                mode["pass"] = "batch"
                obs.batch_logits.append(model(x).float().cpu())
            _restore(saved)  # running buffers and stats configurations
            if own_pass:
                mode["pass"] = "configured"
                obs.logits.append(model(x).float().cpu())
    if not obs.sizes:
        raise ValueError(f"{what}: batches yielded no (non-empty) batch")
    if configured_pass and config in _PASS_OF:
        obs.logits = obs.source_logits if config == "source" else obs.batch_logits
    logger.debug("%s: %d batches, %d samples, %d BatchNorm layers", what, len(obs.sizes), obs.num_samples, len(obs.names))
    return obs
