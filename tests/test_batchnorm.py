"""AdaptiveBatchNorm1d/2d/3d against torch BatchNorm and hand computations."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.batchnorm import batch_moments

DIMS = [
    (tta.AdaptiveBatchNorm1d, nn.BatchNorm1d, (6, 5)),
    (tta.AdaptiveBatchNorm1d, nn.BatchNorm1d, (6, 5, 7)),
    (tta.AdaptiveBatchNorm2d, nn.BatchNorm2d, (6, 5, 4, 3)),
    (tta.AdaptiveBatchNorm3d, nn.BatchNorm3d, (6, 5, 2, 3, 4)),
]


def _pair(adaptive_cls, torch_cls, **kwargs):
    """A torch layer with non-trivial parameters/statistics and an adaptive copy of it."""
    ref = torch_cls(5, **kwargs)
    with torch.no_grad():
        if ref.affine:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        if ref.track_running_stats:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    layer = adaptive_cls(5, **kwargs)
    layer.load_state_dict(ref.state_dict())
    return ref, layer


def _reduce_dims(x):
    return [0, *range(2, x.dim())]


def _hand_normalize(x, mean, var, layer):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps)
    return y * layer.weight.view(shape) + layer.bias.view(shape)


@pytest.mark.parametrize("adaptive_cls,torch_cls,shape", DIMS)
def test_state_dict_keys_and_strict_round_trip(adaptive_cls, torch_cls, shape):
    ref, layer = _pair(adaptive_cls, torch_cls)
    assert list(layer.state_dict()) == list(ref.state_dict())
    # torch -> adaptive and adaptive -> torch, strict
    back = torch_cls(5)
    back.load_state_dict(layer.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    # the source copy stays out of the state_dict, also after an EMA step
    layer.set_stats("ema")
    layer(torch.randn(shape))
    assert layer.source_mean is not None
    assert list(layer.state_dict()) == list(ref.state_dict())
    assert isinstance(layer, torch_cls)


@pytest.mark.parametrize("adaptive_cls,torch_cls,shape", DIMS)
def test_source_eval_equals_torch_eval(adaptive_cls, torch_cls, shape):
    ref, layer = _pair(adaptive_cls, torch_cls)
    ref.eval(), layer.eval()
    x = torch.randn(shape) * 2 + 1
    assert torch.equal(layer(x), ref(x))
    assert layer.stats == "source"


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("adaptive_cls,torch_cls,shape", DIMS)
def test_source_train_equals_torch_train(adaptive_cls, torch_cls, shape, momentum):
    ref, layer = _pair(adaptive_cls, torch_cls, momentum=momentum)
    ref.train(), layer.train()
    for _ in range(3):
        x = (torch.randn(shape) * 2 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y_ref, y = ref(x), layer(x2)
        assert torch.equal(y, y_ref)
        (y_ref * y_ref.detach()).sum().backward()
        (y * y.detach()).sum().backward()
        assert torch.equal(x.grad, x2.grad)
    for k, v in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    assert torch.equal(layer.weight.grad, ref.weight.grad)


def test_torchvision_norm_layer_trains_exactly_like_torch():
    pytest.importorskip("torchvision")
    from torchvision.models.resnet import BasicBlock, ResNet

    # resnet18's code path with one block per stage (resnet18 has two): keeps the test fast
    torch.manual_seed(0)
    ref = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3)
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, norm_layer=tta.AdaptiveBatchNorm2d)
    for (k, v), v2 in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, v2), k  # same seed, same init (isinstance checks in torchvision hold)
    assert sum(isinstance(m, tta.AdaptiveBatchNorm2d) for m in model.modules()) == 12
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(4, 3, 16, 16, generator=gen)
        t = torch.randint(0, 3, (4,), generator=gen)
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            F.cross_entropy(m(x), t).backward()
            o.step()
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    ref.eval(), model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("adaptive_cls,torch_cls,shape", DIMS)
@pytest.mark.parametrize("train", [False, True])
def test_batch_equals_torch_train_output_without_touching_buffers(adaptive_cls, torch_cls, shape, train):
    ref, layer = _pair(adaptive_cls, torch_cls)
    layer.set_stats("batch")
    layer.train(train)
    ref.train()
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(shape) * 3 - 1
    y = layer(x)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-6)
    var, mean = torch.var_mean(x, _reduce_dims(x), correction=0)
    torch.testing.assert_close(y, _hand_normalize(x, mean, var, layer), rtol=1e-5, atol=1e-5)
    for k, v in before.items():
        assert torch.equal(layer.state_dict()[k], v), k
    assert layer.stats == "batch"


@pytest.mark.parametrize("adaptive_cls,torch_cls,shape", DIMS)
@pytest.mark.parametrize("pooled", [False, True])
def test_blend_matches_hand_formula(adaptive_cls, torch_cls, shape, pooled):
    ref, layer = _pair(adaptive_cls, torch_cls)
    layer.set_stats("blend", prior=10, pooled=pooled)
    layer.eval()
    x = torch.randn(shape) * 2 + 0.7
    n, N = shape[0], 10.0
    var_b, mean_b = torch.var_mean(x, _reduce_dims(x), correction=0)
    mean = (N * ref.running_mean + n * mean_b) / (N + n)
    var = (N * ref.running_var + n * var_b) / (N + n)
    if pooled:
        var = var + N * n / (N + n) ** 2 * (ref.running_mean - mean_b) ** 2
    y = layer(x)
    torch.testing.assert_close(y, _hand_normalize(x, mean, var, layer), rtol=1e-5, atol=1e-5)
    # the other convention: alpha = weight of the batch statistics = n / (N + n)
    layer.set_stats("blend", alpha=n / (N + n))
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)
    # nothing was written
    assert torch.equal(layer.running_mean, ref.running_mean)
    assert torch.equal(layer.running_var, ref.running_var)


def test_blend_limits_equal_source_and_batch():
    ref, layer = _pair(tta.AdaptiveBatchNorm2d, nn.BatchNorm2d)
    x = torch.randn(8, 5, 3, 3)
    ref.eval()
    layer.set_stats("blend", alpha=0.0)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-6, atol=1e-6)
    layer.set_stats("blend", alpha=None, prior=0)
    ref.train()
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stats", ["blend", "ema"])
def test_blend_and_ema_handle_one_sample(stats):
    ref, layer = _pair(tta.AdaptiveBatchNorm1d, nn.BatchNorm1d)
    layer.set_stats(stats, prior=4, momentum=0.2)
    x = torch.randn(1, 5)  # one value per channel: batch variance 0
    w = 1 / 5 if stats == "blend" else 0.2
    mean = (1 - w) * ref.running_mean + w * x[0]
    var = (1 - w) * ref.running_var
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, _hand_normalize(x, mean, var, layer), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 5), (1, 5, 1), (1, 5, 1, 1)])
def test_batch_with_one_value_per_channel_raises(shape):
    layer = {2: tta.AdaptiveBatchNorm1d, 3: tta.AdaptiveBatchNorm1d, 4: tta.AdaptiveBatchNorm2d}[len(shape)](5)
    layer.set_stats("batch")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(shape))


@pytest.mark.parametrize("adaptive_cls,torch_cls,shape", DIMS)
def test_ema_updates_then_normalizes_in_one_pass(adaptive_cls, torch_cls, shape):
    ref, layer = _pair(adaptive_cls, torch_cls)
    layer.set_stats("ema", momentum=0.3)
    mean, var = ref.running_mean.clone(), ref.running_var.clone()
    for step in range(3):
        x = torch.randn(shape) + step
        var_b, mean_b = torch.var_mean(x, _reduce_dims(x), correction=0)
        mean, var = 0.7 * mean + 0.3 * mean_b, 0.7 * var + 0.3 * var_b
        y = layer(x)
        torch.testing.assert_close(y, _hand_normalize(x, mean, var, layer), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-6, atol=1e-6)
    layer.restore_source_stats()
    assert torch.equal(layer.running_mean, ref.running_mean)
    assert torch.equal(layer.running_var, ref.running_var)
    assert layer.source_mean is None


@pytest.mark.parametrize("stats", ["batch", "blend", "ema"])
def test_train_and_eval_never_switch_stats(stats):
    ref, layer = _pair(tta.AdaptiveBatchNorm2d, nn.BatchNorm2d)
    layer.set_stats(stats)
    x = torch.randn(4, 5, 3, 3)
    outs = []
    for train in (False, True, False):
        layer.train(train)
        assert layer.stats == stats
        layer.restore_source_stats()
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    assert int(layer.num_batches_tracked) == 0
    ref.eval()
    assert not torch.allclose(outs[0], ref(x), atol=1e-3)  # really not the source statistics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_statistics_in_float32(dtype):
    ref, layer = _pair(tta.AdaptiveBatchNorm2d, nn.BatchNorm2d)
    conv = nn.Conv2d(3, 5, 3)
    x = torch.randn(8, 3, 6, 6) * 4 + 3
    mean, var = batch_moments(x.to(dtype))
    assert mean.dtype == var.dtype == torch.float32
    v64, m64 = torch.var_mean(x.to(dtype).double(), (0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), v64, rtol=1e-5, atol=1e-5)
    layer.set_stats("blend", prior=8)
    with torch.autocast("cpu", dtype=dtype):
        h = conv(x)
        y = layer(h)
    assert h.dtype == dtype and y.dtype == dtype
    hf = h.float()
    v, m = torch.var_mean(hf, (0, 2, 3), correction=0)
    expected = _hand_normalize(hf, (8 * ref.running_mean + 8 * m) / 16, (8 * ref.running_var + 8 * v) / 16, layer)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("stats", ["blend", "ema"])
def test_gradients_flow_through_blended_statistics(stats):
    ref, layer = _pair(tta.AdaptiveBatchNorm2d, nn.BatchNorm2d)
    layer.set_stats(stats, prior=6, momentum=0.25)
    x = torch.randn(6, 5, 3, 3, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w = 0.5 if stats == "blend" else 0.25
    var_b, mean_b = torch.var_mean(x2, (0, 2, 3), correction=0)
    expected = _hand_normalize(x2, (1 - w) * ref.running_mean + w * mean_b, (1 - w) * ref.running_var + w * var_b, layer)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    (y ** 3).sum().backward()
    (expected ** 3).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


def test_extra_repr_shows_stats_and_parameters():
    layer = tta.AdaptiveBatchNorm2d(4)
    assert "stats=source" in repr(layer)
    layer.set_stats("blend", prior=16)
    assert "stats=blend, prior=16" in repr(layer)
    layer.set_stats("blend", alpha=0.25, pooled=True)
    assert "alpha=0.25, pooled=True" in repr(layer) and "prior" not in repr(layer)
    layer.stats = "ema"
    assert "stats=ema, ema_momentum=0.1" in repr(layer)


def test_constructor_keywords_and_stats_attribute():
    layer = tta.AdaptiveBatchNorm1d(3, momentum=0.5, stats="blend", prior=4, alpha=0.3, ema_momentum=0.05, pooled=True)
    assert (layer.stats, layer.prior, layer.alpha, layer.ema_momentum, layer.pooled, layer.momentum) == (
        "blend", 4.0, 0.3, 0.05, True, 0.5)
    assert layer.stats_config() == {"stats": "blend", "prior": 4.0, "alpha": 0.3, "momentum": 0.05, "pooled": True,
                                     "variance": "biased", "moments": "both"}
    assert tta.STATS == ("source", "batch", "blend", "ema")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"stats": "running"}, ValueError, r"stats must be one of \('source', 'batch', 'blend', 'ema'\), got 'running'"),
        ({"stats": "blend", "prior": -1}, ValueError, "prior must be .* got -1"),
        ({"stats": "blend", "prior": float("nan")}, ValueError, "prior"),
        ({"stats": "blend", "alpha": 1.5}, ValueError, r"alpha must be a number in \[0, 1\], got 1.5"),
        ({"stats": "ema", "momentum": -0.1}, ValueError, "momentum"),
        ({"stats": "blend", "pooled": "yes"}, TypeError, "pooled must be a bool"),
    ],
)
def test_bad_configuration_raises_and_keeps_old(kwargs, error, match):
    layer = tta.AdaptiveBatchNorm2d(3)
    with pytest.raises(error, match=match):
        layer.set_stats(**kwargs)
    assert layer.stats_config() == {"stats": "source", "prior": 16.0, "alpha": None, "momentum": 0.1, "pooled": False,
                                     "variance": "biased", "moments": "both"}
    with pytest.raises(ValueError, match="stats must be one of"):
        layer.stats = "bogus"


@pytest.mark.parametrize("stats", ["blend", "ema"])
def test_untracked_layer_cannot_blend(stats):
    layer = tta.AdaptiveBatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        layer.set_stats(stats)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        tta.AdaptiveBatchNorm2d(3, track_running_stats=False, stats=stats)
    # source and batch both behave like torch's untracked layer (batch statistics)
    ref = nn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 2, 2)
    layer.eval()
    assert torch.equal(layer(x), ref(x))
    layer.set_stats("batch")
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stats", ["source", "batch", "blend", "ema"])
def test_wrong_input_rank_raises(stats):
    layer = tta.AdaptiveBatchNorm2d(3, stats=stats)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.randn(2, 3, 4))


def test_load_state_dict_makes_loaded_statistics_the_source():
    ref, layer = _pair(tta.AdaptiveBatchNorm2d, nn.BatchNorm2d)
    layer.set_stats("ema")
    layer(torch.randn(4, 5, 2, 2))
    assert layer.source_mean is not None
    other = nn.BatchNorm2d(5)
    with torch.no_grad():
        other.running_mean.fill_(3.0)
    layer.load_state_dict(other.state_dict())
    assert layer.source_mean is None
    layer(torch.randn(4, 5, 2, 2))
    layer.restore_source_stats()
    assert torch.equal(layer.running_mean, other.running_mean)


def test_empty_batch_uses_source_statistics():
    ref, layer = _pair(tta.AdaptiveBatchNorm2d, nn.BatchNorm2d)
    layer.set_stats("ema")
    y = layer(torch.randn(0, 5, 3, 3))
    assert y.shape == (0, 5, 3, 3)
    assert torch.equal(layer.running_mean, ref.running_mean)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("stats", ["source", "batch", "blend", "ema"])
def test_cuda_matches_cpu(stats):
    ref, layer = _pair(tta.AdaptiveBatchNorm2d, nn.BatchNorm2d)
    layer.set_stats(stats, prior=8, momentum=0.3, pooled=True)
    gpu = copy.deepcopy(layer).cuda()
    x = torch.randn(16, 5, 7, 7) * 2 + 1
    for _ in range(2):
        torch.testing.assert_close(gpu(x.cuda()).cpu(), layer(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.running_mean.cpu(), layer.running_mean, rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_statistics_in_float32(dtype):
    ref, layer = _pair(tta.AdaptiveBatchNorm2d, nn.BatchNorm2d)
    layer = layer.cuda()
    layer.set_stats("ema", momentum=0.5)
    conv = nn.Conv2d(3, 5, 3).cuda()
    x = torch.randn(16, 3, 9, 9, device="cuda") * 4 + 3
    mean, var = batch_moments(x.to(dtype))
    assert mean.dtype == var.dtype == torch.float32
    v64, m64 = torch.var_mean(x.to(dtype).double(), (0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), v64, rtol=1e-5, atol=1e-5)
    with torch.autocast("cuda", dtype=dtype):
        h = conv(x)
        y = layer(h)
    assert h.dtype == dtype and y.dtype == dtype
    hf = h.float()
    v, m = torch.var_mean(hf, (0, 2, 3), correction=0)
    src_m, src_v = ref.running_mean.cuda(), ref.running_var.cuda()
    expected = _hand_normalize(hf, (src_m + m) / 2, (src_v + v) / 2, layer)
    torch.testing.assert_close(layer.running_mean, (src_m + m) / 2, rtol=1e-5, atol=1e-5)
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)


_MOMENT_CASES = [(shape, layout) for shape in [(7, 3), (5, 3, 1, 1), (4, 3, 2, 2), (4, 3, 5, 5), (3, 6, 16, 9), (2, 3, 4, 4, 4)]
                 for layout in ["contiguous", "channels_last", "double"] if layout != "channels_last" or len(shape) == 4]


@pytest.mark.parametrize("shape,layout", _MOMENT_CASES)
@pytest.mark.parametrize("offset", [0.0, 5.0, 300.0])  # 300: badly conditioned, native fallback
def test_batch_moments_every_path_matches_float64(shape, offset, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * torch.linspace(0.1, 3, shape[1]).view(1, -1, *[1] * (len(shape) - 2)) + offset
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "double":
        x = x.double()
    mean, var = batch_moments(x)
    assert mean.dtype == var.dtype == (torch.float64 if layout == "double" else torch.float32)
    v64, m64 = torch.var_mean(x.double(), _reduce_dims(x), correction=0)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-6, atol=1e-6 * (1 + offset))
    torch.testing.assert_close(var.double(), v64, rtol=2e-5, atol=1e-7)
