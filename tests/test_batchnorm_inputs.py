"""Inputs that must give torch's behaviour or a clear error, and configuration precedence
(issue 8: items 10 and 11 and the list of inputs), against float64 computations."""
from __future__ import annotations

import copy
import inspect
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import tta
from batchnorm_helpers import moments64, normalize64, source_bn
from tta.batchnorm import _KEEP, _AdaptiveBatchNormMixin


def _layer(**config):
    bn = source_bn(3)
    return bn, tta.convert(copy.deepcopy(bn).train(), **config)


def _expected(x, bn, w):
    """float64: blend of bn's running statistics and x's batch statistics with batch weight w."""
    mean_b, var_b = moments64(x)
    mean = (1 - w) * bn.running_mean.double() + w * mean_b
    var = (1 - w) * bn.running_var.double() + w * var_b
    return normalize64(x, mean, var, bn.weight, bn.bias, bn.eps), mean, var


# ------------------------------------------------------------------------------ item 10
def test_functional_call_in_ema_updates_the_passed_buffers_only():
    """functional_call in ema mode used to save the *passed* running stats as the layer's
    source copy, and a later tta.reset wrote them into the layer."""
    bn, model = _layer(stats="ema", momentum=0.5)
    layer = model
    x = torch.randn(4, 3, 2, 2) * 2 + 3
    passed = {k: v.clone() + (5 if v.is_floating_point() else 0) for k, v in model.state_dict().items()}
    src = {k: passed[k].double() for k in ("running_mean", "running_var")}
    y = functional_call(model, passed, (x,))
    mean_b, var_b = moments64(x)
    torch.testing.assert_close(passed["running_mean"].double(), 0.5 * src["running_mean"] + 0.5 * mean_b)
    torch.testing.assert_close(passed["running_var"].double(), 0.5 * src["running_var"] + 0.5 * var_b)
    assert y.shape == x.shape
    assert layer.source_mean is None  # no copy of somebody else's tensors
    assert torch.equal(layer.running_mean, bn.running_mean) and torch.equal(layer.running_var, bn.running_var)
    tta.reset(model)
    assert torch.equal(layer.running_mean, bn.running_mean) and torch.equal(layer.running_var, bn.running_var)
    # the layer's own EMA still keeps (and reset restores) its own source statistics,
    # also with a functional_call in between
    expected, mean, var = _expected(x, bn, 0.5)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    functional_call(model, passed, (x,))
    torch.testing.assert_close(layer.running_mean.double(), mean)
    tta.reset(model)
    assert torch.equal(layer.running_mean, bn.running_mean) and torch.equal(layer.running_var, bn.running_var)


def test_source_copy_follows_moves_and_new_buffers():
    bn, layer = _layer(stats="ema")
    layer(torch.randn(4, 3, 2, 2))
    layer.double()  # the copy moves with the buffers
    layer(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    layer.restore_source_stats()
    torch.testing.assert_close(layer.running_mean, bn.running_mean.double(), rtol=0, atol=0)
    layer(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    layer.running_mean = torch.zeros(3, dtype=torch.float64)  # new statistics: the new source
    layer.running_var = torch.ones(3, dtype=torch.float64)
    assert layer.source_mean is None
    layer(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    layer.restore_source_stats()
    assert torch.equal(layer.running_mean, torch.zeros(3, dtype=torch.float64))
    clone = pickle.loads(pickle.dumps(copy.deepcopy(layer)))
    clone(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    clone.restore_source_stats()
    assert torch.equal(clone.running_mean, torch.zeros(3, dtype=torch.float64))


# ------------------------------------------------------------------------------ item 11
def test_explicit_prior_wins_over_kept_alpha_and_explicit_alpha_over_kept_prior():
    bn, model = _layer(stats="blend", alpha=0.3)
    x = torch.randn(6, 3, 2, 2) * 2 + 1
    tta.set_stats(model, "blend", prior=0)  # used to keep alpha=0.3 silently
    assert model.alpha is None and model.prior == 0.0
    torch.testing.assert_close(model(x).double(), _expected(x, bn, 1.0)[0], rtol=1e-5, atol=1e-5)
    model.set_stats(prior=6)
    torch.testing.assert_close(model(x).double(), _expected(x, bn, 0.5)[0], rtol=1e-5, atol=1e-5)
    model.set_stats(alpha=0.25)  # explicit alpha, kept prior
    assert (model.alpha, model.prior) == (0.25, 6.0)
    torch.testing.assert_close(model(x).double(), _expected(x, bn, 0.25)[0], rtol=1e-5, atol=1e-5)
    model.set_stats(prior=2, alpha=0.75)  # both explicit: alpha wins, prior is kept for later
    assert (model.alpha, model.prior) == (0.75, 2.0)
    torch.testing.assert_close(model(x).double(), _expected(x, bn, 0.75)[0], rtol=1e-5, atol=1e-5)
    model.set_stats(momentum=0.2)  # neither given: both kept
    assert (model.alpha, model.prior) == (0.75, 2.0)
    with tta.use_stats(model, "blend", prior=6):
        assert model.alpha is None
    assert (model.alpha, model.prior) == (0.75, 2.0)


# ------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize("stats", ["batch", "blend", "ema"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_batch_returns_empty_like_torch(stats, shape):
    bn, layer = _layer(stats=stats)
    x = torch.randn(shape)
    y = layer(x)
    ref = copy.deepcopy(bn).train()(x)
    assert y.shape == ref.shape == x.shape and y.dtype == ref.dtype
    assert torch.equal(layer.running_mean, bn.running_mean) and layer.source_mean is None


def test_one_value_per_channel_errors_say_what_is_possible():
    layer = tta.AdaptiveBatchNorm1d(3, stats="batch")
    with pytest.raises(ValueError, match="more than 1 value per channel.*got input of shape \\(1, 3\\); use 'blend' or 'ema'"):
        layer(torch.randn(1, 3))
    untracked = tta.AdaptiveBatchNorm1d(3, stats="batch", track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False") as info:
        untracked(torch.randn(1, 3))
    assert "blend" not in str(info.value) and "ema" not in str(info.value)
    assert "more than one value per channel" in str(info.value)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        untracked.set_stats("blend")  # what the old message suggested


def test_numpy_scalars_are_numbers():
    bn, layer = _layer(stats="blend", prior=np.float32(6), momentum=np.float64(0.5))
    assert layer.prior == 6.0 and type(layer.prior) is float and layer.ema_momentum == 0.5
    x = torch.randn(6, 3, 2, 2)
    torch.testing.assert_close(layer(x).double(), _expected(x, bn, 0.5)[0], rtol=1e-5, atol=1e-5)
    layer.set_stats(alpha=np.float16(0.25), pooled=np.bool_(False))
    assert layer.alpha == 0.25 and layer.pooled is False
    layer.set_stats(prior=np.int64(4))
    assert layer.prior == 4.0 and layer.alpha is None
    new = tta.AdaptiveBatchNorm2d(3, stats="ema", prior=np.int32(2), ema_momentum=np.float32(0.125))
    assert (new.prior, new.ema_momentum) == (2.0, 0.125)
    before = layer.stats_config()
    for kwargs, error in [({"prior": np.float32(-1)}, ValueError), ({"alpha": np.float64(1.5)}, ValueError),
                          ({"momentum": np.float32("nan")}, ValueError), ({"prior": "16"}, TypeError),
                          ({"alpha": True}, TypeError), ({"momentum": torch.tensor(0.1)}, TypeError)]:
        with pytest.raises(error, match=next(iter(kwargs))):
            layer.set_stats(**kwargs)
    assert layer.stats_config() == before


def test_constructor_accepts_every_torch_argument():
    ref = nn.BatchNorm2d(3, bias=False)
    layer = tta.AdaptiveBatchNorm2d(3, bias=False, stats="blend", alpha=0.5)
    assert layer.bias is None and list(layer.state_dict()) == list(ref.state_dict())
    assert "bias=False" in repr(layer)
    layer.load_state_dict(source_bn(3).state_dict(), strict=False)
    x = torch.randn(4, 3, 2, 2)
    mean_b, var_b = moments64(x)
    mean = 0.5 * layer.running_mean.double() + 0.5 * mean_b
    var = 0.5 * layer.running_var.double() + 0.5 * var_b
    expected = normalize64(x, mean, var, layer.weight, None)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="no_such_argument"):  # torch's own error
        tta.AdaptiveBatchNorm2d(3, no_such_argument=1)

    class FutureBatchNorm2d(nn.BatchNorm2d):  # a torch version with a new keyword
        def __init__(self, *args, new_option=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.new_option = new_option

    class Adaptive(_AdaptiveBatchNormMixin, FutureBatchNorm2d):
        _input_dims = (4,)

    assert Adaptive(3, new_option="x", stats="batch").new_option == "x"


def test_keep_sentinel_is_readable():
    assert repr(_KEEP) == "<keep current>"
    for fn in (tta.set_stats, tta.use_stats, tta.AdaptiveBatchNorm2d.set_stats):
        signature = str(inspect.signature(fn))
        assert "object at 0x" not in signature and "prior: 'float' = <keep current>" in signature
    assert copy.deepcopy(_KEEP) is _KEEP and pickle.loads(pickle.dumps(_KEEP)) is _KEEP
