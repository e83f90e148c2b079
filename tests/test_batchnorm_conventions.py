"""`variance="biased" | "unbiased"` and the reference implementations it reproduces.

Each reference is re-implemented here in float64 from its published code (docs/batchnorm.md,
"Reference implementations"), with torch's own BatchNorm where the reference uses it, and
compared with the adaptive layer in float32.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from batchnorm_helpers import moments64, normalize64, source_bn

C = 5


def _source_bn():
    return source_bn(C)


def _x(n=6, hw=3, seed=1):
    return torch.randn(n, C, hw, hw, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _adaptive(bn, **config):
    return tta.convert(copy.deepcopy(bn), **config)


def _batch_stats_via_momentum_one(x64):
    """What AlphaBatchNorm/BayesianBatchNorm read: a fresh train-mode torch BatchNorm with
    momentum 1 (running_mean = batch mean, running_var = *unbiased* batch variance)."""
    norm = nn.BatchNorm2d(C, affine=False, momentum=1.0).double().train()
    norm(x64)
    return norm.running_mean, norm.running_var


def _eval_bn(x64, bn, mean, var):
    return F.batch_norm(x64, mean, var, bn.weight.double(), bn.bias.double(), False, 0.0, bn.eps)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_alpha_batchnorm_is_blend_alpha_unbiased(alpha):
    """AlphaBatchNorm (Doebler et al., test-time-adaptation repo): (1 - alpha) source + alpha batch."""
    bn, x = _source_bn(), _x()
    x64 = x.double()
    mean_b, var_b = _batch_stats_via_momentum_one(x64)
    mean = (1 - alpha) * bn.running_mean.double() + alpha * mean_b
    var = (1 - alpha) * bn.running_var.double() + alpha * var_b
    expected = _eval_bn(x64, bn, mean, var)
    layer = _adaptive(bn, stats="blend", alpha=alpha, variance="unbiased")
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    biased = _adaptive(bn, stats="blend", alpha=alpha)  # the default differs on small maps
    assert (biased(x).double() - expected).abs().max() > 1e-3


@pytest.mark.parametrize("N", [0, 16, 64])
def test_bayesian_batchnorm_is_blend_prior_unbiased(N):
    """robusta's BayesianBatchNorm (Schneider et al. 2020): source weight p = N / (N + n)."""
    bn, x = _source_bn(), _x(n=8)
    x64 = x.double()
    p = N / (N + 8)
    mean_b, var_b = _batch_stats_via_momentum_one(x64)
    mean = p * bn.running_mean.double() + (1 - p) * mean_b
    var = p * bn.running_var.double() + (1 - p) * var_b
    expected = _eval_bn(x64, bn, mean, var)
    torch.testing.assert_close(_adaptive(bn, stats="blend", prior=N, variance="unbiased")(x).double(), expected,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_adaptive(bn, stats="blend", alpha=1 - p, variance="unbiased")(x).double(), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_ema_unbiased_writes_torch_train_mode_running_stats(momentum):
    """ema with variance='unbiased' updates running_mean/var exactly as torch's train mode
    (with the same momentum) and then normalises with them (one pass); for one layer this is
    EMABatchNorm's two passes (train-mode forward, then eval-mode forward)."""
    bn = _source_bn()
    layer = _adaptive(bn, stats="ema", momentum=momentum, variance="unbiased")
    ref = copy.deepcopy(bn).double()
    ref.momentum = momentum
    for step in range(3):
        x = _x(seed=step) + step
        ref.train()(x.double())  # pass 1: torch's running-statistics update
        expected = ref.eval()(x.double())  # pass 2: normalise with the updated statistics
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_mean.double(), ref.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.running_var.double(), ref.running_var, rtol=1e-6, atol=1e-6)


def test_rotta_robust_bn_is_ema_biased():
    """RoTTA's RobustBN (momentum 0.05): biased batch variance, update then normalise."""
    bn = _source_bn()
    layer = _adaptive(bn, stats="ema", momentum=0.05)
    mean, var = bn.running_mean.double(), bn.running_var.double()
    w, b = bn.weight.double().view(1, -1, 1, 1), bn.bias.double().view(1, -1, 1, 1)
    for step in range(3):
        x64 = (_x(seed=step) * (1 + step)).double()
        b_var, b_mean = torch.var_mean(x64, dim=[0, 2, 3], unbiased=False)
        mean, var = 0.95 * mean + 0.05 * b_mean, 0.95 * var + 0.05 * b_var
        expected = (x64 - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps) * w + b
        torch.testing.assert_close(layer(x64.float()).double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_tent_and_torch_train_mode_are_batch_biased(train):
    """tent: train-mode BatchNorm without running statistics (batch mean, biased variance)."""
    bn, x = _source_bn(), _x()
    tent_bn = copy.deepcopy(bn).double().train()
    tent_bn.track_running_stats, tent_bn.running_mean, tent_bn.running_var = False, None, None
    expected = tent_bn(x.double())
    torch.testing.assert_close(_adaptive(bn, stats="batch").train(train)(x).double(), expected, rtol=1e-5, atol=1e-5)
    # the unbiased variant divides by n*H*W - 1 = 53
    mean, var = moments64(x, correction=1)
    torch.testing.assert_close(_adaptive(bn, stats="batch", variance="unbiased").train(train)(x).double(),
                               _eval_bn(x.double(), bn, mean, var), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stats", ["batch", "blend", "ema"])
def test_unbiased_with_gradients(stats):
    """The unbiased variance is differentiable like the biased one (TENT-like methods)."""
    bn = _source_bn()
    layer = _adaptive(bn, stats=stats, alpha=0.5, momentum=0.5, variance="unbiased")
    x = _x().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    mean_b, var_b = moments64(x64, correction=1)
    w = 1.0 if stats == "batch" else 0.5
    mean = (1 - w) * bn.running_mean.double() + w * mean_b
    var = (1 - w) * bn.running_var.double() + w * var_b
    expected = normalize64(x64, mean, var, bn.weight, bn.bias, bn.eps)
    y = layer(x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    (y ** 3).sum().backward()
    (expected ** 3).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


def test_unbiased_needs_two_values_per_channel():
    layer = tta.AdaptiveBatchNorm1d(3, stats="blend", variance="unbiased")
    with pytest.raises(ValueError, match="variance='unbiased' needs more than 1 value per channel.*variance='biased'"):
        layer(torch.randn(1, 3))
    layer.set_stats(variance="biased")
    assert layer(torch.randn(1, 3)).shape == (1, 3)


def test_variance_is_configured_like_the_other_parameters():
    layer = tta.AdaptiveBatchNorm2d(3, stats="ema", variance="unbiased")
    assert layer.variance == "unbiased" and layer.stats_config()["variance"] == "unbiased"
    assert "variance=unbiased" in repr(layer)
    layer.set_stats("blend", prior=4)  # kept
    assert layer.variance == "unbiased"
    with pytest.raises(ValueError, match=r"variance must be one of \('biased', 'unbiased'\), got 'sample'"):
        layer.set_stats(variance="sample")
    assert layer.stats_config() == {"stats": "blend", "prior": 4.0, "alpha": None, "momentum": 0.1,
                                    "pooled": False, "variance": "unbiased", "moments": "both"}
    assert tta.batchnorm.VARIANCES == ("biased", "unbiased")


# --- moments: adapt only the mean or only the variance (Schneider et al. 2020, partly adaptive) --

@pytest.mark.parametrize("stats", ["batch", "blend", "ema"])
@pytest.mark.parametrize("moments", ["mean", "var"])
def test_only_one_moment_adapts(stats, moments):
    torch.manual_seed(0)
    bn = tta.AdaptiveBatchNorm2d(3, stats=stats, prior=4, ema_momentum=0.25, moments=moments).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    src_mean, src_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 0.7
    mean_b = x.mean((0, 2, 3))
    var_b = ((x - mean_b.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    w = {"batch": 1.0, "blend": 6 / (4 + 6), "ema": 0.25}[stats]
    mean = (1 - w) * src_mean + w * mean_b if moments == "mean" else src_mean
    var = (1 - w) * src_var + w * var_b if moments == "var" else src_var
    expected = ((x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
                * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(bn(x), expected, rtol=1e-12, atol=1e-12)
    if stats == "ema":  # only the adapted moment is written
        torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=1e-15)
        torch.testing.assert_close(bn.running_var, var, rtol=0, atol=1e-15)
    assert f"moments={moments}" in repr(bn)


def test_moments_need_running_statistics_and_bad_values_are_refused():
    with pytest.raises(ValueError, match=r"moments must be one of \('both', 'mean', 'var'\)"):
        tta.AdaptiveBatchNorm2d(3, moments="variance")
    with pytest.raises(ValueError, match="track_running_stats=False"):
        tta.AdaptiveBatchNorm2d(3, track_running_stats=False, stats="batch", moments="mean")
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        tta.convert(net, stats="batch", moments="mean")
    assert type(net[0]) is torch.nn.BatchNorm2d  # refused before any change
