"""tta.convert / revert / set_stats / use_stats / reset."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import tta


class MyBatchNorm2d(nn.BatchNorm2d):
    """A subclass from "another library": convert must leave it alone."""


def _net(**bn_kwargs) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, **bn_kwargs),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, eps=1e-3, momentum=0.3, **bn_kwargs)),
        nn.Flatten(2),
        nn.BatchNorm1d(6, **bn_kwargs),
        nn.Unflatten(2, (1, 1, -1)),
        nn.BatchNorm3d(6, **bn_kwargs),
        nn.Flatten(),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_convert_replaces_shares_and_carries_everything():
    net = _net()
    x = torch.randn(4, 3, 7, 7)
    before = net.eval()(x)
    net[3][1].train()  # mixed train flags are carried per layer
    old = _bns(net)
    old_flags = [m.training for m in old]
    assert old_flags == [False, True, False, False]
    out = tta.convert(net, stats="source")
    assert out is net
    new = _bns(net)
    assert [type(m) for m in new] == [tta.AdaptiveBatchNorm2d, tta.AdaptiveBatchNorm2d,
                                      tta.AdaptiveBatchNorm1d, tta.AdaptiveBatchNorm3d]
    for a, b, flag in zip(old, new, old_flags):
        assert a is not b
        assert b.weight is a.weight and b.bias is a.bias
        assert b.running_mean is a.running_mean and b.running_var is a.running_var
        assert b.num_batches_tracked is a.num_batches_tracked
        assert (b.eps, b.momentum, b.affine, b.track_running_stats) == (a.eps, a.momentum, a.affine, a.track_running_stats)
        assert b.training == flag
        assert b.stats == "source"
    net.eval()
    assert torch.equal(net(x), before)


def test_convert_default_is_blend_prior_16_and_reconfigures_adaptive_layers():
    net = tta.convert(_net())
    assert all(m.stats_config() == {"stats": "blend", "prior": 16.0, "alpha": None, "momentum": 0.1, "pooled": False,
                                   "variance": "biased", "moments": "both"}
               for m in _bns(net))
    tta.convert(net, stats="ema", momentum=0.05)
    assert all((m.stats, m.ema_momentum) == ("ema", 0.05) for m in _bns(net))


def test_convert_carries_dtype_and_device():
    net = _net().double()
    tta.convert(net, stats="batch")
    for m in _bns(net):
        assert m.weight.dtype == m.running_mean.dtype == torch.float64
        assert m.weight.device.type == "cpu"
    y = net.eval()(torch.randn(2, 3, 7, 7, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_checkpoints_load_strict_both_ways():
    plain = _net()
    converted = tta.convert(_net(), stats="blend")
    converted.load_state_dict(plain.state_dict(), strict=True)
    fresh = _net()
    for m in _bns(fresh):
        nn.init.zeros_(m.running_mean)
    fresh.load_state_dict(converted.state_dict(), strict=True)
    for a, b in zip(_bns(fresh), _bns(plain)):
        assert torch.equal(a.running_mean, b.running_mean)


def test_sync_batchnorm_is_converted_and_reverted():
    net = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4), nn.Unflatten(1, (4, 1, 1)), nn.SyncBatchNorm(4, eps=1e-3))
    with torch.no_grad():
        net[1].running_mean.fill_(0.5)
    tta.convert(net, stats="blend", prior=2)
    assert type(net[1]) is tta.AdaptiveBatchNorm2d and type(net[3]) is tta.AdaptiveBatchNorm2d
    assert net[3].eps == 1e-3
    net.eval()
    x = torch.randn(5, 3)
    y = net(x)  # 2D and 4D input both accepted, as SyncBatchNorm does
    h = net[0](x)
    var_b, mean_b = torch.var_mean(h, 0, correction=0)
    w = 5 / 7
    expected = (h - ((1 - w) * 0.5 + w * mean_b)) / torch.sqrt((1 - w) * 1.0 + w * var_b + 1e-5)
    torch.testing.assert_close(net[1](h), expected, rtol=1e-5, atol=1e-5)
    assert y.shape == (5, 4, 1, 1)
    tta.revert(net)
    assert type(net[1]) is nn.SyncBatchNorm and type(net[3]) is nn.SyncBatchNorm
    assert torch.equal(net[1].running_mean, torch.full((4,), 0.5))


def test_other_batchnorm_classes_left_alone_with_one_warning(caplog):
    torchvision = pytest.importorskip("torchvision")
    frozen = torchvision.ops.FrozenBatchNorm2d
    net = nn.Sequential(nn.Conv2d(3, 4, 1), MyBatchNorm2d(4), frozen(4), MyBatchNorm2d(4), nn.BatchNorm2d(4))
    with caplog.at_level(logging.WARNING, logger="tta.surgery"):
        tta.convert(net)
    assert type(net[1]) is MyBatchNorm2d and type(net[2]) is frozen and type(net[3]) is MyBatchNorm2d
    assert type(net[4]) is tta.AdaptiveBatchNorm2d
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "3" in msg and "MyBatchNorm2d x2" in msg and "FrozenBatchNorm2d x1" in msg


def test_model_without_batchnorm_raises():
    with pytest.raises(ValueError, match="no torch BatchNorm1d/2d/3d or SyncBatchNorm"):
        tta.convert(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    with pytest.raises(ValueError, match=r"MyBatchNorm2d"):
        tta.convert(nn.Sequential(MyBatchNorm2d(2)))


def test_bad_arguments_leave_model_untouched():
    net = _net()
    with pytest.raises(ValueError, match="stats must be one of"):
        tta.convert(net, stats="adabn")
    with pytest.raises(ValueError, match="prior"):
        tta.convert(net, prior=-2)
    assert all(type(m) is not tta.AdaptiveBatchNorm2d for m in net.modules())
    untracked = _net(track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        tta.convert(untracked, stats="blend")
    assert not tta.surgery.adaptive_layers(untracked)
    tta.convert(untracked, stats="batch")  # fine without running statistics
    with pytest.raises(ValueError, match="track_running_stats=False"):
        tta.set_stats(untracked, "ema")
    assert all(m.stats == "batch" for m in _bns(untracked))


def test_bare_layer_and_shared_layer():
    bn = nn.BatchNorm2d(3)
    new = tta.convert(bn, stats="batch")
    assert type(new) is tta.AdaptiveBatchNorm2d and new.weight is bn.weight
    assert type(tta.revert(new)) is nn.BatchNorm2d
    shared = nn.BatchNorm1d(2)
    net = nn.Sequential(shared, nn.Sequential(shared))
    tta.convert(net)
    assert net[0] is net[1][0] and type(net[0]) is tta.AdaptiveBatchNorm1d


def test_set_stats_and_use_stats_restore_on_exit_and_on_error():
    net = tta.convert(_net(), stats="blend", prior=8, pooled=True)
    x = torch.randn(4, 3, 7, 7)
    net.eval()
    blended = net(x)
    with tta.use_stats(net, "source") as inner:
        assert inner is net
        assert all(m.stats == "source" for m in _bns(net))
        torch.testing.assert_close(net(x), _net().eval()(x), rtol=0, atol=0)
    assert all(m.stats_config()["stats"] == "blend" and m.prior == 8 and m.pooled for m in _bns(net))
    with pytest.raises(RuntimeError, match="boom"):
        with tta.use_stats(net, "blend", alpha=0.5, pooled=False):
            assert all(m.alpha == 0.5 and not m.pooled for m in _bns(net))
            raise RuntimeError("boom")
    assert all(m.alpha is None and m.pooled and m.prior == 8 for m in _bns(net))
    torch.testing.assert_close(net(x), blended, rtol=0, atol=0)
    assert tta.set_stats(net, "batch") is net
    assert all(m.stats == "batch" and m.prior == 8 for m in _bns(net))
    net.train(), net.eval()
    assert all(m.stats == "batch" for m in _bns(net))
    with pytest.raises(ValueError, match="stats must be one of"):
        tta.set_stats(net, "nope")
    with pytest.raises(TypeError):
        tta.set_stats(net, "blend", prir=3)


def test_reset_restores_source_after_ema_and_keeps_stats_setting():
    net = tta.convert(_net(), stats="ema", momentum=0.5).eval()
    source = [m.running_mean.clone() for m in _bns(net)]
    for _ in range(2):
        net(torch.randn(4, 3, 7, 7) * 3)
    assert not torch.equal(_bns(net)[0].running_mean, source[0])
    assert tta.reset(net) is net
    for m, s in zip(_bns(net), source):
        assert torch.equal(m.running_mean, s)
        assert m.stats == "ema"


def test_revert_keeps_current_running_stats_and_loads_into_original():
    net = tta.convert(_net(), stats="ema", momentum=0.5).eval()
    net(torch.randn(4, 3, 7, 7))
    adapted = [m.running_mean.clone() for m in _bns(net)]
    tta.revert(net)
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in _bns(net))
    for m, a in zip(_bns(net), adapted):
        assert torch.equal(m.running_mean, a)
    _net().load_state_dict(net.state_dict(), strict=True)


def test_model_level_api_requires_converted_model():
    for fn in (tta.reset, tta.revert, lambda m: tta.set_stats(m, "batch")):
        with pytest.raises(ValueError, match="tta"):
            fn(_net())
    with pytest.raises(ValueError, match="convert"):
        with tta.use_stats(_net(), "batch"):
            pass


def _three_channel():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def _buffers(layer):
    return {k: None if v is None else v.clone() for k, v in layer._buffers.items()}


def _assert_same_buffers(layer, saved):
    assert set(layer._buffers) == set(saved)
    for k, v in saved.items():
        cur = layer._buffers[k]
        assert (cur is None and v is None) or torch.equal(cur, v), k


def test_use_stats_restores_buffers_source_copy_and_reset_semantics():
    oracle = _three_channel()  # torch's own BatchNorm: the training statistics
    net = tta.convert(_three_channel(), stats="source")
    x = torch.randn(8, 3, 5, 5)
    shifted = x * 3 + 2
    expected = oracle(x)
    saved = _buffers(net[1])
    with tta.use_stats(net, "ema", momentum=0.5):
        net(shifted), net(shifted)
        assert not torch.equal(net[1].running_mean, saved["running_mean"])  # EMA wrote into the buffers
    _assert_same_buffers(net[1], saved)
    assert net[1].source_mean is None
    with tta.use_stats(net, "source"):
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    # also when the block raises; train-mode updates (num_batches_tracked) inside are undone too
    with pytest.raises(RuntimeError, match="boom"):
        with tta.use_stats(net, "ema"):
            net(shifted)
            net.train()(shifted)
            net.eval()
            raise RuntimeError("boom")
    with tta.use_stats(net, "source"):
        net.train()(shifted)
        assert net[1].num_batches_tracked.item() == 1
        net.eval()
    _assert_same_buffers(net[1], saved)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    # a source copy taken before the block survives it unchanged, and reset still reaches it
    tta.set_stats(net, "ema", momentum=0.5)
    net(shifted)
    adapted = _buffers(net[1])
    with tta.use_stats(net, "ema"):
        net(x)
        tta.reset(net)
    _assert_same_buffers(net[1], adapted)
    tta.reset(net)
    assert net[1].source_mean is None
    tta.set_stats(net, "source")
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    _assert_same_buffers(net[1], saved)


def _blend64(h, bn, w):
    """Independent float64 blend of source and batch statistics with batch weight w."""
    h = h.double()
    var_b, mean_b = torch.var_mean(h, (0, 2, 3), correction=0)
    mean = (1 - w) * bn.running_mean.double() + w * mean_b
    var = (1 - w) * bn.running_var.double() + w * var_b
    shape = (1, -1, 1, 1)
    return (h - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.double().view(shape) \
        + bn.bias.double().view(shape)


def test_explicit_prior_or_alpha_wins_at_model_level():
    net = tta.convert(_three_channel(), stats="blend", alpha=0.3)
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    h = net[0](x)
    tta.set_stats(net, "blend", prior=4)  # an explicit prior replaces the kept alpha
    torch.testing.assert_close(net(x).double(), _blend64(h, net[1], 8 / 12), rtol=1e-5, atol=1e-5)
    with tta.use_stats(net, "blend", alpha=0.5):  # an explicit alpha replaces the kept prior
        torch.testing.assert_close(net(x).double(), _blend64(h, net[1], 0.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(x).double(), _blend64(h, net[1], 8 / 12), rtol=1e-5, atol=1e-5)
    tta.convert(net, stats="blend", prior=8)
    torch.testing.assert_close(net(x).double(), _blend64(h, net[1], 0.5), rtol=1e-5, atol=1e-5)


def test_variance_is_passed_through_and_signatures_are_readable():
    import inspect

    net = tta.convert(_net(), stats="blend", variance="unbiased")
    assert all(m.stats_config()["variance"] == "unbiased" for m in _bns(net))
    with tta.use_stats(net, "batch", variance="biased"):
        assert all(m.stats_config()["variance"] == "biased" for m in _bns(net))
    assert all(m.stats_config()["variance"] == "unbiased" and m.stats == "blend" for m in _bns(net))
    tta.set_stats(net, "ema")
    assert all(m.stats_config()["variance"] == "unbiased" for m in _bns(net))
    with pytest.raises(ValueError, match="variance"):
        tta.set_stats(net, "blend", variance="sample")
    assert all(m.stats == "ema" for m in _bns(net))
    for fn in (tta.set_stats, tta.use_stats, tta.convert):
        text = str(inspect.signature(fn))
        assert "variance" in text and "object at 0x" not in text, text


def test_instance_norm_is_not_reported_as_batchnorm_left_alone(caplog):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4, track_running_stats=True), nn.BatchNorm2d(4))
    with caplog.at_level(logging.WARNING, logger="tta.surgery"):
        tta.convert(net)
    assert type(net[1]) is nn.InstanceNorm2d and type(net[2]) is tta.AdaptiveBatchNorm2d
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(ValueError, match="no torch BatchNorm") as info:
        tta.convert(nn.Sequential(nn.InstanceNorm1d(2)))
    assert "InstanceNorm" not in str(info.value)
