"""tta.adapt: the API, the BatchNorm-statistics methods and TENT against independent float64
computations written out here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tta
from tta.methods import Adapter, adapt, get_method, list_methods


def tiny_net(channels: int = 3, classes: int = 4, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(channels, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, classes))
    with torch.no_grad():  # non-trivial source statistics and affine parameters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.3, 0.3)
    return net.to(dtype).eval()


def batches(count: int, n: int = 6, seed: int = 1, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 5, 5, generator=g) * 1.7 + 0.4).to(dtype) for _ in range(count)]


# --- API ---------------------------------------------------------------------------------------

def test_list_methods_sorted_and_all_usable():
    names = list_methods()
    assert names == sorted(names)
    for name in ("source", "batch", "blend", "ema", "recalibrate", "tent"):
        assert name in names
    required = {"eata": {"fisher_images": batches(1, seed=9)[0]}}  # in-distribution images
    for name in names:
        adapter = adapt(tiny_net(), name, **required.get(name, {}))
        assert isinstance(adapter, Adapter) and isinstance(adapter, nn.Module)
        assert adapter.name == name
        assert adapter(batches(1)[0]).shape == (6, 4)


def test_unknown_method_and_hparam_are_refused_before_any_change():
    net = tiny_net()
    with pytest.raises(ValueError, match="unknown adaptation method 'tnet'.*tent"):
        adapt(net, "tnet")
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['learning_rate'\].*lr"):
        adapt(net, "tent", learning_rate=1e-3)
    with pytest.raises(ValueError, match="prior must be >= 0"):
        adapt(net, "blend", prior=-1)
    with pytest.raises(ValueError, match="optimizer must be one of 'adam', 'sgd'"):
        adapt(net, "tent", optimizer="rmsprop")
    assert type(net[1]) is nn.BatchNorm2d  # nothing was converted
    assert all(p.requires_grad for p in net.parameters())


def test_numpy_scalars_are_numbers():
    adapter = adapt(tiny_net(), "blend", prior=np.float32(4), window=np.int64(3))
    assert adapter.hparams["prior"] == 4.0 and adapter.hparams["window"] == 3


# --- statistics methods ------------------------------------------------------------------------

def manual_bn(x, mean, var, weight, bias, eps=1e-5):
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)


def head(net, h):
    return net[5](net[4](net[3](net[2](h))))


def expected_logits(net, x, mean, var):
    bn = net[1]
    return head(net, manual_bn(net[0](x), mean, var, bn.weight, bn.bias))


@torch.no_grad()
def test_blend_and_window_against_float64_formula():
    net = tiny_net()
    src_mean, src_var = net[1].running_mean.clone(), net[1].running_var.clone()
    ref = tiny_net()
    xs = batches(4, n=1)
    adapter = adapt(net, "blend", prior=2, window=3)
    seen = []
    for x in xs:
        seen.append(x)
        window = torch.cat(seen[-3:])
        feats = ref[0](window)
        n = len(window)
        mean_b = feats.mean((0, 2, 3))
        var_b = feats.var((0, 2, 3), unbiased=False)
        w = n / (2 + n)
        expected = expected_logits(ref, window, (1 - w) * src_mean + w * mean_b,
                                   (1 - w) * src_var + w * var_b)[-1:]
        torch.testing.assert_close(adapter(x), expected, rtol=1e-9, atol=1e-9)
    adapter.reset()
    assert adapter._buffer is None
    torch.testing.assert_close(adapter(xs[0]), expected_logits(ref, xs[0], *(
        (1 - 1 / 3) * s + (1 / 3) * b for s, b in zip(
            (src_mean, src_var),
            (ref[0](xs[0]).mean((0, 2, 3)), ref[0](xs[0]).var((0, 2, 3), unbiased=False))))))


@torch.no_grad()
def test_ema_reset_restores_source_statistics():
    net = tiny_net()
    src = net[1].running_mean.clone(), net[1].running_var.clone()
    ref = tiny_net()
    adapter = adapt(net, "ema", momentum=0.5)
    mean, var = src
    for x in batches(3):
        feats = ref[0](x)
        mean = 0.5 * mean + 0.5 * feats.mean((0, 2, 3))
        var = 0.5 * var + 0.5 * feats.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(adapter(x), expected_logits(ref, x, mean, var))
    adapter.reset()
    torch.testing.assert_close(net[1].running_mean, src[0], rtol=0, atol=0)
    torch.testing.assert_close(net[1].running_var, src[1], rtol=0, atol=0)


@torch.no_grad()
def test_layers_selects_which_batchnorms_adapt():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).double()
    with pytest.raises(ValueError, match=r"matches no BatchNorm layer; the layers are: 1, 3"):
        adapt(net, "batch", layers="layer*")
    assert type(net[1]) is nn.BatchNorm2d
    adapter = adapt(net, "batch", layers=["3"])
    assert net[1].stats == "source" and net[3].stats == "batch"
    x = batches(1)[0][:, :3]
    h = net[0](x)
    h = manual_bn(h, net[1].running_mean, net[1].running_var, net[1].weight, net[1].bias)
    h = net[2](h)
    expected = manual_bn(h, h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False), net[3].weight, net[3].bias)
    torch.testing.assert_close(adapter(x), expected)


@torch.no_grad()
def test_recalibrate_fit_then_predict():
    net = tiny_net()
    ref = tiny_net()
    xs = batches(3)
    adapter = adapt(net, "recalibrate")
    with pytest.raises(NotImplementedError):
        adapt(tiny_net(), "batch").fit(xs)
    adapter.fit(xs)
    feats = ref[0](torch.cat(xs))
    mean, var = feats.mean((0, 2, 3)), feats.var((0, 2, 3), unbiased=True)  # AdaBN stores unbiased
    torch.testing.assert_close(adapter(xs[0]), expected_logits(ref, xs[0], mean, var))
    adapter.reset()
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean, rtol=0, atol=0)


# --- TENT --------------------------------------------------------------------------------------

def entropy_grad_affine(net, x, weight, bias):
    """Mean softmax entropy of the batch and its gradient w.r.t. the BatchNorm scale and shift,
    derived by hand in float64: dH/dz_k = -p_k (log p_k + H); back through the linear layer, the
    global average pool and the ReLU; dy/dgamma = xhat, dy/dbeta = 1 (batch statistics do not
    depend on gamma, beta)."""
    h = net[0](x)
    mean = h.mean((0, 2, 3), keepdim=True)
    var = h.var((0, 2, 3), unbiased=False, keepdim=True)
    xhat = (h - mean) / torch.sqrt(var + 1e-5)
    y = xhat * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    a = torch.relu(y)
    pooled = a.mean((2, 3))
    z = pooled @ net[5].weight.T + net[5].bias
    logp = z - torch.logsumexp(z, 1, keepdim=True)
    p = logp.exp()
    H = -(p * logp).sum(1)
    n = len(x)
    dz = -p * (logp + H[:, None]) / n                          # d mean(H) / dz
    dpooled = dz @ net[5].weight                               # (n, C)
    da = dpooled[:, :, None, None].expand_as(a) / (a.shape[2] * a.shape[3])
    dy = da * (y > 0)
    return z, H.mean(), (dy * xhat).sum((0, 2, 3)), dy.sum((0, 2, 3))


def test_tent_equals_hand_derived_adam_updates_float64():
    net = tiny_net()
    ref = tiny_net()
    weight, bias = ref[1].weight.detach().clone(), ref[1].bias.detach().clone()
    adapter = adapt(net, "tent")  # Adam, lr 1e-3, betas (0.9, 0.999), eps 1e-8
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    m = [torch.zeros_like(weight), torch.zeros_like(bias)]
    v = [torch.zeros_like(weight), torch.zeros_like(bias)]
    with torch.no_grad():
        for t, x in enumerate(batches(4), start=1):
            z, _, g_w, g_b = entropy_grad_affine(ref, x, weight, bias)
            out = adapter(x)
            torch.testing.assert_close(out, z, rtol=1e-10, atol=1e-10)  # logits before the update
            for i, (param, grad) in enumerate(((weight, g_w), (bias, g_b))):
                m[i] = b1 * m[i] + (1 - b1) * grad
                v[i] = b2 * v[i] + (1 - b2) * grad ** 2
                param -= lr * (m[i] / (1 - b1 ** t)) / (torch.sqrt(v[i] / (1 - b2 ** t)) + eps)
            torch.testing.assert_close(net[1].weight, weight, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(net[1].bias, bias, rtol=1e-10, atol=1e-12)
    # nothing else trained, running statistics untouched
    for name in ("0.weight", "5.weight", "5.bias"):
        assert torch.equal(net.state_dict()[name], ref.state_dict()[name])
    assert torch.equal(net[1].running_mean, ref[1].running_mean)


def test_tent_sgd_steps_and_episodic():
    ref = tiny_net()
    weight, bias = ref[1].weight.detach().clone(), ref[1].bias.detach().clone()
    adapter = adapt(tiny_net(), "tent", optimizer="sgd", lr=0.05, steps=2, nesterov=False)
    x = batches(1)[0]
    buf = [None, None]
    with torch.no_grad():
        for _ in range(2):  # two SGD-momentum steps on the same batch; logits of the second forward
            z, _, g_w, g_b = entropy_grad_affine(ref, x, weight, bias)
            for i, (param, grad) in enumerate(((weight, g_w), (bias, g_b))):
                buf[i] = grad.clone() if buf[i] is None else 0.9 * buf[i] + grad
                param -= 0.05 * buf[i]
        out = adapter(x)
    torch.testing.assert_close(out, z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(adapter.model[1].weight, weight, rtol=1e-10, atol=1e-12)
    # episodic: every batch starts from the source weights, so the same batch gives the same logits
    episodic = adapt(tiny_net(), "tent", episodic=True)
    first = episodic(x)
    torch.testing.assert_close(episodic(x), first, rtol=0, atol=0)


def test_tent_reset_restores_weights_and_optimizer():
    net = tiny_net()
    adapter = adapt(net, "tent")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    xs = batches(3)
    first = [adapter(x) for x in xs]
    assert not torch.equal(net[1].weight, state["1.weight"])
    adapter.reset()
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert adapter.optimizer.state_dict()["state"] == {}
    again = [adapter(x) for x in xs]  # the same trajectory as from a fresh adapter
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tent_adapts_under_no_grad_but_refuses_inference_mode():
    adapter = adapt(tiny_net(), "tent")
    before = adapter.model[1].weight.detach().clone()
    with torch.no_grad():
        adapter(batches(1)[0])
    assert not torch.equal(adapter.model[1].weight, before)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        adapter(batches(1)[0])


def test_tent_needs_batchnorm():
    net = nn.Sequential(nn.Flatten(), nn.Linear(75, 4)).double()
    with pytest.raises(ValueError, match="tent adapts through BatchNorm layers"):
        adapt(net, "tent")


def test_defaults_are_the_reference_configuration():
    tent = get_method("tent").defaults()
    assert tent["optimizer"] == "adam" and tent["lr"] is None and tent["steps"] == 1
    adapter = adapt(tiny_net(), "tent")
    group = adapter.optimizer.param_groups[0]
    assert isinstance(adapter.optimizer, torch.optim.Adam)
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0
    sgd = adapt(tiny_net(), "tent", optimizer="sgd").optimizer.param_groups[0]
    assert sgd["lr"] == 0.00025 and sgd["momentum"] == 0.9 and sgd["nesterov"] is True
    assert math.isclose(get_method("blend").defaults()["prior"], 16)


# --- CoTTA -------------------------------------------------------------------------------------

def functional_net(params, x):
    """tiny_net's forward with batch statistics, written out (params: name -> tensor)."""
    h = torch.nn.functional.conv2d(x, params["0.weight"], padding=1)
    mean = h.mean((0, 2, 3))
    var = h.var((0, 2, 3), unbiased=False)
    h = manual_bn(h, mean, var, params["1.weight"], params["1.bias"])
    return torch.relu(h).mean((2, 3)) @ params["5.weight"].T + params["5.bias"]


def test_cotta_one_step_against_float64_rule():
    from tta.methods.cotta import cotta_augment

    ref = tiny_net()
    source = {k: v.detach().clone() for k, v in ref.named_parameters()}
    x = batches(1)[0]
    for ap, augment in ((0.0, False), (1.0, True)):
        adapter = adapt(tiny_net(), "cotta", ap=ap, mt=0.9, rst=0.0, lr=0.01, num_augmentations=3, seed=5)
        out = adapter(x)
        with torch.no_grad():
            if augment:  # the teacher (= source before the first update) averaged over 3 draws
                g = torch.Generator().manual_seed(5)
                pseudo = torch.stack([functional_net(source, cotta_augment(x, g)) for _ in range(3)]).mean(0)
            else:
                pseudo = functional_net(source, x)
        torch.testing.assert_close(out, pseudo, rtol=1e-10, atol=1e-10)
        student = {k: v.clone().requires_grad_(True) for k, v in source.items()}
        loss = -(pseudo.softmax(1) * functional_net(student, x).log_softmax(1)).sum(1).mean()
        grads = torch.autograd.grad(loss, list(student.values()))
        for (name, value), grad in zip(source.items(), grads):
            # first Adam step: m_hat = g, v_hat = g^2, update = lr * g / (|g| + eps)
            new = value - 0.01 * grad / (grad.abs() + 1e-8)
            # (g / (|g| + 1e-8) is ill-conditioned where |g| ~ 1e-8: absolute tolerance 1e-9)
            torch.testing.assert_close(dict(adapter.model.named_parameters())[name], new, rtol=1e-9, atol=1e-9)
            teacher = dict(adapter.teacher.named_parameters())[name]
            torch.testing.assert_close(teacher, 0.9 * value + 0.1 * new, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(dict(adapter.anchor.named_parameters())[name], value, rtol=0, atol=0)


def test_cotta_stochastic_restore_and_reset():
    x = batches(1)[0]
    restored = adapt(tiny_net(), "cotta", ap=0.0, rst=1.0, lr=0.01)
    restored(x)  # every element goes back to its source value
    for name, value in tiny_net().named_parameters():
        torch.testing.assert_close(dict(restored.model.named_parameters())[name], value, rtol=0, atol=0)
    half = adapt(tiny_net(), "cotta", ap=0.0, rst=0.5, lr=0.01)
    keep = adapt(tiny_net(), "cotta", ap=0.0, rst=0.0, lr=0.01)
    half(x), keep(x)
    src, upd, got = (dict(m.named_parameters())["0.weight"] for m in (tiny_net(), keep.model, half.model))
    is_src, is_upd = torch.isclose(got, src, rtol=0, atol=0), torch.isclose(got, upd, rtol=0, atol=1e-15)
    assert bool((is_src | is_upd).all())
    assert 0.3 < is_src.double().mean().item() < 0.7
    first = half(x)
    half.reset()
    half(x)
    torch.testing.assert_close(half(x), first, rtol=0, atol=0)  # same trajectory after reset


def test_cotta_augment_properties():
    from tta.methods.cotta import cotta_augment

    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    a = cotta_augment(x, torch.Generator().manual_seed(1))
    b = cotta_augment(x, torch.Generator().manual_seed(1))
    c = cotta_augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    gray = cotta_augment(torch.rand(2, 1, 16, 16), torch.Generator().manual_seed(0))
    assert gray.shape == (2, 1, 16, 16)


# --- DUA ---------------------------------------------------------------------------------------

@torch.no_grad()
def test_dua_updates_running_statistics_with_decaying_momentum():
    from tta.methods.dua import dua_augment

    ref = tiny_net()
    mean, var = ref[1].running_mean.clone(), ref[1].running_var.clone()
    adapter = adapt(tiny_net(), "dua", num_copies=4, num_samples=2, seed=3)
    xs = batches(1, n=3)[0]
    out = adapter(xs)
    g = torch.Generator().manual_seed(3)
    m0 = 0.1
    expected = []
    for k, image in enumerate(xs[:2], start=1):
        feats = ref[0](dua_augment(image, 4, g))
        momentum = m0 * 0.94 ** k + 0.005
        mean = (1 - momentum) * mean + momentum * feats.mean((0, 2, 3))
        var = (1 - momentum) * var + momentum * feats.var((0, 2, 3), unbiased=True)  # torch stores unbiased
        expected.append(expected_logits(ref, image[None], mean, var))
    expected.append(expected_logits(ref, xs[2:], mean, var))  # beyond num_samples: statistics stay
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(adapter.model[1].running_var, var, rtol=1e-10, atol=1e-12)
    assert adapter.num_adapted == 2 and adapter.model[1].momentum == 0.1 and not adapter.model[1].training
    adapter.reset()
    assert adapter.num_adapted == 0
    torch.testing.assert_close(adapter.model[1].running_mean, ref[1].running_mean, rtol=0, atol=0)


def test_dua_augment_shapes_and_rotations():
    from tta.methods.dua import dua_augment

    image = torch.arange(1 * 8 * 8, dtype=torch.float64).view(1, 8, 8)
    copies = dua_augment(image, 16, torch.Generator().manual_seed(0))
    assert copies.shape == (16, 1, 8, 8)
    # every copy is a crop/flip/rotation: its non-zero values are values of the image
    assert set(copies.unique().tolist()) <= set(image.unique().tolist()) | {0.0}


@torch.no_grad()
def test_moments_option_reaches_every_layer():
    net = tiny_net()
    ref = tiny_net()
    adapter = adapt(net, "batch", moments="mean")
    assert net[1].moments == "mean" and adapter.hparams["moments"] == "mean"
    x = batches(1)[0]
    feats = ref[0](x)
    # batch mean, source variance (the partly adaptive BN of Schneider et al. 2020)
    torch.testing.assert_close(adapter(x), expected_logits(ref, x, feats.mean((0, 2, 3)), ref[1].running_var))
    with pytest.raises(ValueError, match="moments must be one of 'both', 'mean', 'var'"):
        adapt(tiny_net(), "ema", moments="mu")
