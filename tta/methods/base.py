"""The :class:`Adapter` base class of every method behind :func:`tta.adapt`, and the pieces
the methods share: argument checks, the optimizers of the reference configurations, entropy.

A method follows the vocabulary of tent's reference ``tent.py``: *configure* the model (which
layers normalise how, which parameters train), *collect* the parameters it updates, *check*
that the model suits it, *forward and adapt* on each batch, and *reset* to the state right
after :func:`tta.adapt`.
"""
from __future__ import annotations

import copy
import inspect
import math
import numbers
from typing import Any, ClassVar, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from tta.surgery import adaptive_layers
from tta.surgery import reset as reset_stats

__all__ = ["Adapter", "softmax_entropy", "make_optimizer", "OPTIMIZERS"]

# Optimizer defaults of the reference configurations (tent's cifar10c.py/conf.py; the ImageNet
# runs of the EATA and SAR repositories): Adam, lr 1e-3, betas (0.9, 0.999), no weight decay
# for CIFAR; SGD, lr 0.00025, momentum 0.9 for ImageNet.
OPTIMIZERS = ("adam", "sgd")
_DEFAULT_LR = {"adam": 1e-3, "sgd": 0.00025}


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, none: bool = False) -> float | None:
    """``value`` as a float (NumPy scalars too); ValueError naming ``name`` when it is not a
    finite number within [low, high] (``(low, high]`` with ``low_open``)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' or None' if none else ''}, got {value!r}")
    number = float(value)
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and number > high:
        raise ValueError(f"{name} must be <= {high:g}, got {value!r}")
    return number


def check_int(name: str, value: Any, *, low: int = 1, none: bool = False) -> int | None:
    """``value`` as an int >= ``low`` (NumPy integers too); ValueError otherwise."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{' or None' if none else ''}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def softmax_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of the softmax of ``logits`` (N, C), per sample: shape (N,).

    Computed in at least float32 (fp16/bf16 logits are upcast), as
    ``-(softmax(z) * log_softmax(z)).sum(1)`` like tent's reference ``softmax_entropy``."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def make_optimizer(params: list[Tensor], optimizer: str, lr: float | None, *, betas: tuple[float, float],
                   momentum: float, nesterov: bool, dampening: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` or ``torch.optim.SGD`` over ``params`` as tent's ``setup_optimizer``
    builds them; ``lr=None`` takes the reference default of the optimizer (Adam 1e-3, SGD
    0.00025)."""
    lr = _DEFAULT_LR[optimizer] if lr is None else lr
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=nesterov)


def check_optimizer_args(optimizer: Any, lr: Any, betas: Any, momentum: Any, nesterov: Any,
                         dampening: Any, weight_decay: Any) -> dict[str, Any]:
    """Validated optimizer arguments (see :func:`make_optimizer`)."""
    optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
    betas = tuple(check_number("betas", b, low=0.0, high=1.0) for b in betas)
    if max(betas) >= 1.0:
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
    nesterov = check_bool("nesterov", nesterov)
    momentum = check_number("momentum", momentum, low=0.0)
    dampening = check_number("dampening", dampening, low=0.0, high=1.0)
    if optimizer == "sgd" and nesterov and (momentum == 0.0 or dampening != 0.0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening 0 "
                         f"(got momentum={momentum}, dampening={dampening})")
    return {"optimizer": optimizer, "lr": check_number("lr", lr, low=0.0, low_open=True, none=True),
            "betas": betas, "momentum": momentum, "nesterov": nesterov, "dampening": dampening,
            "weight_decay": check_number("weight_decay", weight_decay, low=0.0)}


class Adapter(nn.Module):
    """A model wrapped by a test-time adaptation method (returned by :func:`tta.adapt`).

    ``adapter(x)`` adapts on the batch ``x`` (float (N, C, H, W), what the model takes) as the
    method prescribes and returns logits for ``x`` (N, num_classes). ``adapter.reset()``
    returns the model, the optimizer and the method's own state to the state right after
    :func:`tta.adapt`. The wrapped model is changed in place and is ``adapter.model``.

    Subclasses set :attr:`name` and :attr:`needs_grad`, configure the model in ``__init__``
    (then call :meth:`_snapshot`), and implement :meth:`forward`; methods with state beyond
    the model and optimizer override :meth:`reset_state`.

    Attributes:
        needs_grad: whether the method computes gradients (the evaluation loop enables them
            only for such methods; the method enables them itself inside ``forward``).
        optimizer: the optimizer of gradient methods (None otherwise).
        hparams: the method's hyper-parameters after validation, as recorded in results.
    """

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = False
    # the hyper-parameter that takes in-distribution (clean) images, if any (EATA's Fisher)
    source_images: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"tta.adapt: model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__()
        self.model = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.hparams: dict[str, Any] = {}
        self._model_state: dict[str, Tensor] | None = None
        self._optimizer_state: dict[str, Any] | None = None

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The method's keyword arguments with their default values."""
        signature = inspect.signature(cls.__init__)
        return {name: p.default for name, p in signature.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def _snapshot(self) -> None:
        """Record the state that :meth:`reset` returns to (call at the end of ``__init__``)."""
        self._model_state = copy.deepcopy(self.model.state_dict())
        if self.optimizer is not None:
            self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the state right after :func:`tta.adapt`: weights, BatchNorm statistics
        (source copies included), optimizer and the method's own state."""
        if self._model_state is None:
            raise RuntimeError(f"{type(self).__name__}: no snapshot to reset to (call _snapshot() in __init__)")
        if adaptive_layers(self.model):
            reset_stats(self.model)  # drops the saved source copies of EMA/recalibration
        self.model.load_state_dict(self._model_state)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))
        self.reset_state()

    def reset_state(self) -> None:
        """Reset the method's own state (moving averages, buffers); nothing by default."""

    def _adapt_steps(self, x: Any) -> Tensor:
        """``forward`` of the gradient methods (tent's ``Tent.forward``): check ``x``, reset
        first when ``hparams["episodic"]``, then ``hparams["steps"]`` times
        ``self._forward_and_adapt(x)``; the logits of the last step."""
        x = self._check_input(x)
        if self.hparams["episodic"]:
            self.reset()
        for _ in range(self.hparams["steps"]):
            logits = self._forward_and_adapt(x)
        return logits

    def fit(self, data: Iterable[Any]) -> "Adapter":
        """Offline adaptation on unlabelled ``data`` before prediction; only methods that have
        such a phase (``recalibrate``) implement it."""
        raise NotImplementedError(f"method {self.name!r} adapts online in forward(); it has no fit()")

    def _check_input(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: input must be a tensor (N, ...), got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{self.name}: input must have a batch dimension, got shape {tuple(x.shape)}")
        if self.needs_grad and torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.name} computes gradients: do not call it under torch.inference_mode() "
                               "(torch.no_grad() is fine)")
        return x

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


def norm_affine_params(model: nn.Module, kinds: tuple[type, ...]) -> tuple[list[nn.Parameter], list[str]]:
    """The scale (``weight``) and shift (``bias``) parameters of every module of one of
    ``kinds``, with their names, in ``named_modules`` order (tent's ``collect_params``)."""
    params, names = [], []
    for module_name, module in model.named_modules():
        if isinstance(module, kinds):
            for param_name in ("weight", "bias"):
                param = getattr(module, param_name, None)
                if isinstance(param, nn.Parameter):
                    params.append(param)
                    names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return params, names
