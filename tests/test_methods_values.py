"""Values of the statistics methods through ``tta.adapt`` against float64 re-derivations
written out here (docs/batchnorm.md, docs/methods.md): ``blend``/``ema`` with
``variance="unbiased"``, ``batch`` with ``window=k``, ``moments="mean"|"var"``; and which
methods the evaluation loop runs with gradients enabled.

The model is a two-layer CNN whose float64 forward pass is written out functionally
(:func:`forward64`); each test gives it a per-layer normalisation rule. Nothing here calls
tta's BatchNorm code to compute an expected value.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.evaluation import Cell
from tta.evaluation.runner import evaluate

EPS = 1e-5
LAYERS = ("bn1", "bn2")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine, 2 threads per process oversubscribe it
    (a forward pass of the small models here gets 10-30x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(nn.Module):
    """conv(3->4) BN ReLU conv(4->6, stride 2) BN ReLU mean-pool linear(6->5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def make_net(seed: int = 0) -> Net:
    """A Net with non-trivial source statistics and affine parameters, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = Net()
        for bn in (net.bn1, net.bn2):
            c = bn.num_features
            bn.running_mean.copy_(0.3 * torch.randn(c))
            bn.running_var.copy_(0.5 + torch.rand(c))
            bn.weight.data.copy_(1 + 0.2 * torch.randn(c))
            bn.bias.data.copy_(0.1 * torch.randn(c))
    return net.eval()


def batches(sizes, seed: int = 1, shift: float = 0.7, size: int = 4) -> list[torch.Tensor]:
    """Shifted inputs (a mean offset and a scale, so that test statistics differ from the
    source ones), float32 (n, 3, size, size); small images, so that n*H*W is small and the
    variance convention (factor n*H*W / (n*H*W - 1)) changes the outputs clearly."""
    g = torch.Generator().manual_seed(seed)
    return [shift + 1.5 * torch.randn(n, 3, size, size, generator=g) for n in sizes]


def forward64(net: Net, x: torch.Tensor, norm) -> torch.Tensor:
    """The Net's forward pass in float64; ``norm(name, h)`` normalises layer ``name``."""
    p = {k: v.detach().double() for k, v in net.state_dict().items()}
    h = F.conv2d(x.double(), p["conv1.weight"], p["conv1.bias"], padding=1)
    h = F.relu(norm("bn1", h))
    h = F.conv2d(h, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1)
    h = F.relu(norm("bn2", h))
    return F.linear(h.mean((2, 3)), p["fc.weight"], p["fc.bias"])


def source64(net: Net) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (getattr(net, name).running_mean.double().clone(), getattr(net, name).running_var.double().clone())
            for name in LAYERS}


def moments64(h: torch.Tensor, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance over the n*H*W values of each channel (float64)."""
    values = h.transpose(0, 1).reshape(h.shape[1], -1)
    m = values.shape[1]
    mean = values.sum(1) / m
    var = ((values - mean[:, None]) ** 2).sum(1) / (m - 1 if unbiased else m)
    return mean, var


def affine64(net: Net, name: str, h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    bn = getattr(net, name)
    shape = (1, -1, 1, 1)
    return ((h - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS) * bn.weight.detach().double().view(shape)
            + bn.bias.detach().double().view(shape))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.detach().double(), expected, rtol=1e-5, atol=1e-5)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The two expectations are far apart compared with the tolerance of :func:`close`."""
    return (a - b).abs().max().item() > 1e-4


# --- (a) variance="unbiased" through the blend and ema methods ----------------------------

@pytest.mark.parametrize("prior", [16.0, 3.0])
def test_blend_unbiased_equals_float64_rederivation(prior):
    net = make_net()
    source = source64(net)
    adapter = tta.adapt(copy.deepcopy(net), "blend", prior=prior, variance="unbiased")

    def blend(unbiased):
        def norm(name, h):
            mu_s, var_s = source[name]
            mu_b, var_b = moments64(h, unbiased=unbiased)  # unbiased: var * nHW / (nHW - 1)
            w = h.shape[0] / (prior + h.shape[0])           # n samples, not n*H*W values
            return affine64(net, name, h, (1 - w) * mu_s + w * mu_b, (1 - w) * var_s + w * var_b)
        return norm

    gap = 0.0  # how far the biased convention is from the expected outputs
    with torch.no_grad():
        for x in batches([4, 1, 2]):
            expected = forward64(net, x, blend(True))
            gap = max(gap, (expected - forward64(net, x, blend(False))).abs().max().item())
            close(adapter(x), expected)
    assert gap > 1e-4  # the convention matters here: the biased variance would fail close()
    for name in LAYERS:  # blend never writes the running statistics
        layer = getattr(adapter.model, name)
        assert torch.equal(layer.running_mean.double(), source[name][0])
        assert torch.equal(layer.running_var.double(), source[name][1])


def test_ema_unbiased_equals_float64_running_update_and_torch_train_mode():
    m = 0.3
    net = make_net()
    adapter = tta.adapt(copy.deepcopy(net), "ema", momentum=m, variance="unbiased")
    state = source64(net)  # the float64 estimate, updated below

    def ema(name, h):
        mu, var = state[name]
        mu_b, var_b = moments64(h, unbiased=True)
        state[name] = ((1 - m) * mu + m * mu_b, (1 - m) * var + m * var_b)
        return affine64(net, name, h, *state[name])  # the updated estimate, same batch

    xs = batches([4, 2, 3])
    with torch.no_grad():
        for x in xs:
            close(adapter(x), forward64(net, x, ema))
    for name in LAYERS:
        layer = getattr(adapter.model, name)
        close(layer.running_mean, state[name][0])
        close(layer.running_var, state[name][1])

    # the first layer after one batch: torch's train-mode running-buffer update, momentum m
    torch_bn = copy.deepcopy(net.bn1).train()
    torch_bn.momentum = m
    fresh = tta.adapt(copy.deepcopy(net), "ema", momentum=m, variance="unbiased")
    with torch.no_grad():
        torch_bn(net.conv1(xs[0]))
        fresh(xs[0])
    torch.testing.assert_close(fresh.model.bn1.running_mean, torch_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fresh.model.bn1.running_var, torch_bn.running_var, rtol=1e-5, atol=1e-6)

    adapter.reset()  # back to the source statistics
    for name in LAYERS:
        assert torch.equal(getattr(adapter.model, name).running_var, getattr(net, name).running_var)


# --- (b) batch with window=k: statistics of the last k samples -----------------------------

@pytest.mark.parametrize("sizes, window", [([1] * 7, 4), ([2] * 5, 5), ([2] * 4, 3), ([1, 2, 1, 1], 2)])
def test_batch_window_uses_the_last_k_samples(sizes, window):
    net = make_net()
    adapter = tta.adapt(copy.deepcopy(net), "batch", window=window)

    def batch_norm(name, h):
        return affine64(net, name, h, *moments64(h))  # biased: torch's train-mode output

    seen: list[torch.Tensor] = []
    with torch.no_grad():
        for x in batches(sizes):
            seen.extend(x)
            last = torch.stack(seen[-window:])  # the last k samples of the stream, this batch included
            expected = forward64(net, last, batch_norm)[-len(x):]
            if len(last) > len(x):  # the window is not the batch alone
                assert differs(expected, forward64(net, x, batch_norm))
            close(adapter(x), expected)
    adapter.reset()  # the window is emptied: the next prediction uses this batch alone
    x = batches([1], seed=5)[0]
    with torch.no_grad():
        close(adapter(x), forward64(net, x, batch_norm))


# --- (d) moments="mean" / "var" through tta.adapt -------------------------------------------

@pytest.mark.parametrize("moments", ["mean", "var"])
def test_blend_moments_against_float64(moments):
    prior = 4.0
    net = make_net()
    source = source64(net)
    adapter = tta.adapt(copy.deepcopy(net), "blend", prior=prior, moments=moments)

    def blend(which):
        def norm(name, h):
            mu_s, var_s = source[name]
            mu_b, var_b = moments64(h)
            w = h.shape[0] / (prior + h.shape[0])
            mu = (1 - w) * mu_s + w * mu_b if which in ("both", "mean") else mu_s
            var = (1 - w) * var_s + w * var_b if which in ("both", "var") else var_s
            return affine64(net, name, h, mu, var)
        return norm

    with torch.no_grad():
        for x in batches([4, 2]):
            expected = forward64(net, x, blend(moments))
            assert differs(expected, forward64(net, x, blend("both")))
            close(adapter(x), expected)


@pytest.mark.parametrize("moments", ["mean", "var"])
def test_ema_moments_against_float64(moments):
    m = 0.4
    net = make_net()
    adapter = tta.adapt(copy.deepcopy(net), "ema", momentum=m, moments=moments)
    state = source64(net)
    source = source64(net)

    def ema(name, h):
        mu, var = state[name]
        mu_b, var_b = moments64(h)
        if moments == "mean":
            mu = (1 - m) * mu + m * mu_b
        else:
            var = (1 - m) * var + m * var_b
        state[name] = (mu, var)
        return affine64(net, name, h, mu, var)

    with torch.no_grad():
        for x in batches([4, 2, 3]):
            close(adapter(x), forward64(net, x, ema))
    kept = 1 if moments == "mean" else 0  # the moment that stays at its source value
    for name in LAYERS:
        layer = getattr(adapter.model, name)
        buffers = (layer.running_mean, layer.running_var)
        close(buffers[1 - kept], state[name][1 - kept])
        assert differs(buffers[1 - kept].double(), source[name][1 - kept])
        assert torch.equal(buffers[kept].double(), source[name][kept])


# --- (c) gradients in the evaluation loop ---------------------------------------------------

STATISTICS = {"source": {}, "batch": {}, "blend": {}, "ema": {}, "recalibrate": {}, "dua": {"num_copies": 4}}
GRADIENT = {"tent": {}, "eta": {}, "eata": {"fisher_images": 8}, "sar": {}, "cotta": {"num_augmentations": 2}}


@pytest.mark.parametrize("method", [*STATISTICS, *GRADIENT])
def test_evaluation_loop_enables_gradients_only_for_gradient_methods(method):
    """A forward hook on the model records ``torch.is_grad_enabled()`` at every forward pass
    that the evaluation loop makes (``evaluate`` itself runs under ``torch.no_grad``)."""
    params = {**STATISTICS, **GRADIENT}[method]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 5, (16,), generator=g)
    model = make_net()
    recorded: list[bool] = []
    model.register_forward_hook(lambda module, args, output: recorded.append(torch.is_grad_enabled()))
    cells = [Cell("fog", 1, images)]
    adapter = tta.adapt(model, method, **({**params, "fisher_images": images[:8].float() / 255}
                                          if method == "eata" else params))
    recorded.clear()  # only the loop's passes (EATA's Fisher pass is made by tta.adapt)
    out = evaluate(model, cells, targets, method=adapter, batch_size=8)
    assert out["cells"][0]["num_examples"] == 16
    assert recorded, "no forward pass was recorded"
    if method in STATISTICS:
        assert not any(recorded), f"{method}: gradients enabled in {sum(recorded)} of {len(recorded)} passes"
    else:
        assert any(recorded), f"{method}: gradients never enabled"
