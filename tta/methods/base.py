"""The :class:`Adapter` base class of every method behind :func:`tta.adapt`, and the pieces
the methods share: argument checks, the optimizers of the reference configurations, entropy.

A method follows the vocabulary of tent's reference ``tent.py``: *configure* the model (which
layers normalise how, which parameters train), *collect* the parameters it updates, *check*
that the model suits it, *forward and adapt* on each batch, and *reset* to the state right
after :func:`tta.adapt`.
"""
from __future__ import annotations

import copy
import gc
import inspect
import itertools
import math
import numbers
import weakref
from typing import Any, ClassVar, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from tta.batchnorm import _AdaptiveBatchNormMixin
from tta.surgery import _TO_ADAPTIVE, _plain_type, adaptive_layers
from tta.surgery import reset as reset_stats

__all__ = ["Adapter", "softmax_entropy", "make_optimizer", "OPTIMIZERS", "INT_MAX"]

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
    try:  # float(10**400) raises OverflowError
        number = None if isinstance(value, bool) or not isinstance(value, numbers.Real) else float(value)
    except OverflowError:
        number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number{' or None' if none else ''}, got {value!r}")
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and number > high:
        raise ValueError(f"{name} must be <= {high:g}, got {value!r}")
    return number


# The largest int a hyper-parameter may take: torch's int64 (a seed must be < 2**63 for
# ``torch.Generator.manual_seed``; counts beyond it are meaningless).
INT_MAX = 2**63 - 1


def check_int(name: str, value: Any, *, low: int = 1, high: int = INT_MAX, none: bool = False) -> int | None:
    """``value`` as an int in [low, high] (NumPy integers too); ValueError naming ``name`` otherwise."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        valid = f">= {low} and < 2**63" if high == INT_MAX else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {valid}{' or None' if none else ''}, got {value!r}")
    return int(value)


def check_seed(seed: Any) -> int:
    """A random seed: an int with 0 <= seed < 2**63 (what ``torch.Generator.manual_seed`` takes)."""
    return check_int("seed", seed, low=0)


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


# Every module of a model wrapped by a live adapter -> a weak reference to that adapter. Weak on
# both sides: a deleted adapter or model leaves no entry, and a deep copy of the model is free.
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[Adapter]]" = weakref.WeakKeyDictionary()


def _owned_part(model: nn.Module) -> tuple[str, "Adapter"] | None:
    """The first module of ``model`` (name, owner) wrapped by a live adapter, if any."""
    for name, module in model.named_modules():
        ref = _OWNERS.get(module)
        owner = None if ref is None else ref()
        if owner is not None:
            return name, owner
    return None


def _inference_mode_error(name: str) -> RuntimeError:
    return RuntimeError(f"{name} computes gradients: do not build or call it under torch.inference_mode() "
                        "(torch.no_grad() is fine)")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class Adapter(nn.Module):
    """A model wrapped by a test-time adaptation method (returned by :func:`tta.adapt`).

    ``adapter(x)`` adapts on the batch ``x`` (float (N, C, H, W), what the model takes) as the
    method prescribes and returns logits for ``x`` (N, num_classes). An empty batch (N = 0)
    carries no information: it returns the model's empty logits and changes nothing.
    ``adapter.reset()`` returns the model (weights, BatchNorm statistics and configuration,
    train/eval flags, ``requires_grad``), the optimizer and the method's own state to the state
    right after :func:`tta.adapt`. The wrapped model is changed in place and is ``adapter.model``.

    Ownership: a model (or any of its modules) belongs to one live adapter. Adapting it again,
    or passing an adapter as the model, raises ``ValueError`` before anything changes: adapt a
    fresh copy of the source model (``copy.deepcopy``), or call :meth:`release` on the adapter
    first (it then refuses to run: forward, reset, fit, load_state_dict, ``to``/``half``/``cuda``,
    ``apply``, ``requires_grad_``, ``zero_grad`` raise RuntimeError); deleting the adapter
    releases the model too. A copy of a live adapter (``copy.deepcopy``, pickle, ``torch.save``
    of the whole adapter then ``torch.load``) owns its copied model.

    ``adapter.train()``/``adapter.eval()`` set only the adapter's own ``training`` flag: the
    wrapped model keeps the mode the method configured (eval for every built-in method), so they
    never change what the method computes.

    ``state_dict()`` holds the model's (and a method's other modules') parameters and buffers
    plus, under ``_extra_state``, the method name, its hyper-parameters, the optimizer state and
    the method's own state (:attr:`state_attributes`: window buffer, moving averages, counters,
    random generators), as tensors, numbers and lists (``torch.load(weights_only=True)`` reads
    it). ``load_state_dict`` into an adapter built by :func:`tta.adapt` with the same method and
    hyper-parameters on a copy of the same source model continues exactly where the saved one
    was; :meth:`reset` then returns to the loading adapter's own start, which is the saved one's
    start (the extra state records ``start_hash``, a content hash of the model's parameters and
    buffers right after :func:`tta.adapt`, and a state of another start raises ValueError).

    Subclasses set :attr:`name`, :attr:`needs_grad` and :attr:`state_attributes`; in
    ``__init__`` they check every argument and the model before they change it, configure the
    model, then call :meth:`_snapshot`; they implement :meth:`_predict` (a non-empty batch);
    methods with state beyond the model and optimizer override :meth:`reset_state`.

    Attributes:
        needs_grad: whether the method computes gradients (the evaluation loop enables them
            only for such methods; the method enables them itself inside ``forward``).
        state_attributes: names of the attributes that hold the method's own state (tensors,
            numbers, lists of tensors, ``torch.Generator``), carried by ``state_dict``.
        optimizer: the optimizer of gradient methods (None otherwise).
        hparams: the method's hyper-parameters after validation, as recorded in results.
    """

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = False
    # the hyper-parameter that takes in-distribution (clean) images, if any (EATA's Fisher)
    source_images: ClassVar[str | None] = None
    state_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.check_model(model)
        super().__init__()
        self.model = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.hparams: dict[str, Any] = {}
        self._model_state: dict[str, Tensor] | None = None
        self._optimizer_state: dict[str, Any] | None = None
        self._flags: tuple[list[Any], list[Any], list[Any]] | None = None
        self._released = False
        self._start_hash: str | None = None

    @classmethod
    def check_model(cls, model: Any) -> None:
        """The checks of every method before it changes ``model``.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ValueError: ``model`` is an :class:`Adapter`, or it (or one of its modules) is wrapped
                by a live adapter.
            RuntimeError: a gradient method built under ``torch.inference_mode()``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"tta.adapt: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, Adapter):
            raise ValueError(f"tta.adapt: model is already a tta.Adapter (method {model.name!r}); adapt the source "
                             "model itself, once: pass a fresh copy of it (copy.deepcopy), or take the model back "
                             "with adapter.release()")
        if cls.needs_grad and torch.is_inference_mode_enabled():
            raise _inference_mode_error(cls.name)
        owned = _owned_part(model)
        if owned is not None:
            gc.collect()  # an adapter deleted inside a reference cycle may not be freed yet
            owned = _owned_part(model)
        if owned is not None:
            where = "this model" if not owned[0] else f"this model's module {owned[0]!r}"
            raise ValueError(f"tta.adapt: {where} is already wrapped by a live {owned[1].name!r} adapter, which "
                             "changed it in place and would compute differently if it were adapted again; adapt a "
                             "fresh copy of the source model (copy.deepcopy before the first tta.adapt), or call "
                             "release() on that adapter first (it then refuses to run)")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The method's keyword arguments with their default values."""
        signature = inspect.signature(cls.__init__)
        return {name: p.default for name, p in signature.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def _snapshot(self) -> None:
        """Record the state that :meth:`reset` returns to and take ownership of the model
        (call at the end of ``__init__``)."""
        self._model_state = copy.deepcopy(self.model.state_dict())
        if self.optimizer is not None:
            self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self._flags = ([(m, m.training) for m in self.modules() if m is not self],
                       [(p, p.requires_grad) for p in self.parameters()],
                       [(layer, layer.stats_config()) for layer in adaptive_layers(self)])
        self._own()

    def _own(self) -> None:
        owner = weakref.ref(self)
        for module in self.model.modules():
            _OWNERS[module] = owner

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copy.deepcopy and pickle (torch.load of a saved adapter) build a live adapter on a copy
        # of the model: it owns that copy, like the adapter built by tta.adapt owns its model
        super().__setstate__(state)
        if not self._released and self._model_state is not None:
            self._own()

    def start_hash(self) -> str:
        """Content hash (sha256 hex) of the model's parameters and buffers right after
        :func:`tta.adapt` (the state :meth:`reset` returns to), by name, dtype, shape and value."""
        if self._start_hash is None:
            if self._model_state is None:
                raise RuntimeError(f"{type(self).__name__}: no snapshot (call _snapshot() in __init__)")
            from tta.evaluation.results import content_hash  # lazy: tta.evaluation imports tta.methods
            self._start_hash = content_hash(list(self._model_state), *self._model_state.values())
        return self._start_hash

    def release(self) -> nn.Module:
        """Give up the model: it may be adapted again (as it is now: adapted), and this adapter
        refuses to run or reset from now on (RuntimeError). Returns ``self.model``."""
        for module in self.model.modules():
            ref = _OWNERS.get(module)
            if ref is not None and ref() is self:
                del _OWNERS[module]
        self._released = True
        return self.model

    def _check_usable(self) -> None:
        if self._released:
            raise RuntimeError(f"this {self.name!r} adapter was released (adapter.release()) and no longer owns its "
                               "model; build a new one with tta.adapt")

    # every nn.Module entry point that changes the model refuses on a released adapter:
    # _apply is behind to()/cuda()/cpu()/half()/float()/double()/type()/share_memory()
    def _apply(self, *args: Any, **kwargs: Any) -> "Adapter":
        self._check_usable()
        return super()._apply(*args, **kwargs)

    def apply(self, fn: Any) -> "Adapter":
        self._check_usable()
        return super().apply(fn)

    def requires_grad_(self, requires_grad: bool = True) -> "Adapter":
        self._check_usable()
        return super().requires_grad_(requires_grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._check_usable()
        super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; RuntimeError on a released adapter, ValueError (before
        anything changes) for the state of another method, other hyper-parameters or another
        start (see the class docstring)."""
        self._check_usable()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> "Adapter":
        """Set the adapter's own ``training`` flag only (also ``eval()``): the wrapped model
        keeps the mode the method configured, so this never changes what the method computes.
        Switch the model itself with ``adapter.model.train()`` if needed; :meth:`reset` puts
        its flags back."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        self.training = mode
        return self

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the state right after :func:`tta.adapt`: weights, BatchNorm statistics
        (source copies included) and stats configuration, train/eval flags, ``requires_grad``,
        optimizer and the method's own state."""
        self._check_usable()
        if self._model_state is None or self._flags is None:
            raise RuntimeError(f"{type(self).__name__}: no snapshot to reset to (call _snapshot() in __init__)")
        if adaptive_layers(self.model):
            reset_stats(self.model)  # drops the saved source copies of EMA/recalibration
        self.model.load_state_dict(self._model_state)
        modules, params, layers = self._flags
        for module, training in modules:
            module.training = training
        for param, requires_grad in params:
            param.requires_grad_(requires_grad)
        for layer, config in layers:
            layer.set_stats(**config)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))
        self.reset_state()

    def reset_state(self) -> None:
        """Reset the method's own state (moving averages, buffers); nothing by default."""

    def get_extra_state(self) -> dict[str, Any]:
        """The method's state beyond parameters and buffers (the ``_extra_state`` entry of
        :meth:`state_dict`): method name, hyper-parameters, optimizer state and the attributes
        of :attr:`state_attributes` (a ``torch.Generator`` as its state tensor); copies."""
        state = {"method": self.name, "hparams": dict(self.hparams), "start_hash": self.start_hash(),
                 "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}
        for name in self.state_attributes:
            value = getattr(self, name)
            state[name] = value.get_state() if isinstance(value, torch.Generator) else value
        return copy.deepcopy(state)

    def set_extra_state(self, state: Any) -> None:
        """Load what :meth:`get_extra_state` saved (called by :meth:`load_state_dict`).

        Raises:
            ValueError: the state is not of this method, or of other hyper-parameters, or of an
                adapter with another start (:meth:`start_hash`: other source weights); before
                anything changes.
        """
        keys = {"method", "hparams", "start_hash", "optimizer", *self.state_attributes}
        if not isinstance(state, dict) or set(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"load_state_dict: the extra state of a {self.name!r} adapter has the keys "
                             f"{sorted(keys)}, got {got}")
        if state["method"] != self.name or state["hparams"] != self.hparams:
            raise ValueError(f"load_state_dict: the state is of a {state['method']!r} adapter with hyper-parameters "
                             f"{state['hparams']}, but this is a {self.name!r} adapter with {self.hparams}; build "
                             "it with tta.adapt(<copy of the source model>, <same method>, <same hyper-parameters>)")
        if state["start_hash"] != self.start_hash():
            raise ValueError(f"load_state_dict: the state is of a {self.name!r} adapter that started from other weights "
                             f"(start_hash {state['start_hash']!r}) than this one (start_hash {self.start_hash()!r}); "
                             "build it with tta.adapt(<copy of the same source model>, ...)")
        state = copy.deepcopy(state)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        tensor = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        for name in self.state_attributes:
            current, value = getattr(self, name), state[name]
            if isinstance(current, torch.Generator):
                current.set_state(value.cpu())
            else:
                setattr(self, name, value if tensor is None else _to_device(value, tensor.device))

    def forward(self, x: Tensor) -> Tensor:
        """Adapt on ``x`` (N, ...) and return its logits (N, K); see the class docstring.

        An empty batch returns the model's empty logits (computed in eval mode without
        gradients) and changes nothing: weights, statistics, optimizer, counters, generators.

        Raises:
            TypeError: ``x`` is not a tensor. ValueError: no batch dimension.
            RuntimeError: a gradient method under ``torch.inference_mode()``; a released adapter.
        """
        x = self._check_input(x)
        if len(x) == 0:
            return self._predict_empty(x)
        return self._predict(x)

    @torch.no_grad()
    def _predict_empty(self, x: Tensor) -> Tensor:
        training = [(m, m.training) for m in self.model.modules()]
        self.model.eval()  # no train-mode BatchNorm counter moves
        try:
            return self.model(x)
        finally:
            for module, flag in training:
                module.training = flag

    def _predict(self, x: Tensor) -> Tensor:
        """Adapt on the non-empty batch ``x`` (already checked) and return its logits."""
        raise NotImplementedError

    def _adapt_steps(self, x: Tensor) -> Tensor:
        """``_predict`` of the gradient methods (tent's ``Tent.forward``): reset first when
        ``hparams["episodic"]``, then ``hparams["steps"]`` times ``self._forward_and_adapt(x)``;
        the logits of the last step."""
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
        self._check_usable()
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: input must be a tensor (N, ...), got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{self.name}: input must have a batch dimension, got shape {tuple(x.shape)}")
        if self.needs_grad and torch.is_inference_mode_enabled():
            raise _inference_mode_error(self.name)
        return x

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


def norm_affine_params(model: nn.Module, kinds: tuple[type, ...]) -> tuple[list[nn.Parameter], list[str]]:
    """The scale (``weight``) and shift (``bias``) parameters of every module of one of
    ``kinds``, with their names, in ``named_modules`` order (tent's ``collect_params``). A
    parameter shared by several modules (tied) is listed once, under its first name, so that
    it is updated once per step."""
    params, names, seen = [], [], set()
    for module_name, module in model.named_modules():
        if isinstance(module, kinds):
            for param_name in ("weight", "bias"):
                param = getattr(module, param_name, None)
                if isinstance(param, nn.Parameter) and id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
                    names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return params, names


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers :func:`tta.convert` makes (or keeps) adaptive: exact torch
    ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and adaptive layers; for checks before any change."""
    return [m for m in model.modules() if _plain_type(m) in _TO_ADAPTIVE or isinstance(m, _AdaptiveBatchNormMixin)]


def start_from_source(model: nn.Module) -> None:
    """Put the saved source statistics of every adaptive layer back (an earlier EMA adapter or
    recalibration overwrote its running statistics): every method starts from the source."""
    if adaptive_layers(model):
        reset_stats(model)
