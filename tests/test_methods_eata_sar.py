"""EATA, ETA and SAR (tta.methods.eata, tta.methods.sar) against independent float64
computations written out here: the sample filters on hand-built logits, the Fisher estimate, and
the Adam/SGD/SAM updates step by step (gradients of the separately written float64 losses by
autograd, the update rules by hand)."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from test_methods import batches, tiny_net
from tta.methods import adapt, get_method
from tta.methods.eata import entropy_margin, select_samples
from tta.methods.sar import SAR_EXCLUDE_LAYERS

E0 = 0.4 * math.log(4)  # 4 classes


def controlled_net(scale: float = 10.0) -> nn.Module:
    """tiny_net whose last layer maps channel k to class k (k < 4), sharpened by ``scale``: on
    ``batches(n=8)`` some samples are confident (entropy < E0), some are not, in classes 1 and 3."""
    net = tiny_net()
    with torch.no_grad():
        net[5].weight.copy_(scale * torch.eye(4, 5, dtype=torch.float64))
        net[5].bias.zero_()
    return net


def forward(net, x, weight, bias):
    """tiny_net's forward written out: conv, BatchNorm with the batch's mean and biased variance
    and the given scale and shift, ReLU, global average pool, linear."""
    h = net[0](x)
    mean = h.mean((0, 2, 3), keepdim=True)
    var = h.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (h - mean) / torch.sqrt(var + 1e-5) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return torch.relu(y).mean((2, 3)) @ net[5].weight.T + net[5].bias


def entropy(z):
    logp = z - torch.logsumexp(z, 1, keepdim=True)
    return -(logp.exp() * logp).sum(1)


def cosine(u, v):
    return (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))


def affine(net):
    return [net[1].weight.detach().clone().requires_grad_(True), net[1].bias.detach().clone().requires_grad_(True)]


class Adam:
    def __init__(self, params, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, b1, b2, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g ** 2
            m_hat, v_hat = self.m[i] / (1 - self.b1 ** self.t), self.v[i] / (1 - self.b2 ** self.t)
            p -= self.lr * m_hat / (torch.sqrt(v_hat) + self.eps)


class SGD:
    """SGD with momentum mu, dampening 0: buf = g (first step), else mu buf + g; the step is
    buf, or g + mu buf with Nesterov."""

    def __init__(self, params, lr, momentum=0.9, nesterov=False):
        self.params, self.lr, self.mu, self.nesterov = params, lr, momentum, nesterov
        self.buf = [None] * len(params)

    @torch.no_grad()
    def step(self, grads):
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self.buf[i] = g.clone() if self.buf[i] is None else self.mu * self.buf[i] + g
            p -= self.lr * (g + self.mu * self.buf[i] if self.nesterov else self.buf[i])


def assert_affine(net, params, **tol):
    tol = tol or {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(net[1].weight, params[0].detach(), **tol)
    torch.testing.assert_close(net[1].bias, params[1].detach(), **tol)


# --- EATA's sample filters ------------------------------------------------------------------

def test_select_samples_on_hand_built_logits():
    # entropies: a confident sample has logits (a, 0, 0, 0) permuted; a uniform one has ln 4
    logits = torch.tensor([[6.0, 0, 0, 0], [0, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, 6.0, 0], [2.5, 0, 0, 0]],
                          dtype=torch.float64)
    h = entropy(logits)
    assert (h[[0, 2, 3]] < E0).all() and (h[[1, 4]] > E0).all()
    reliable, selected = select_samples(logits, E0, 0.4, None)
    assert reliable.tolist() == [True, False, True, True, False]
    assert selected.tolist() == reliable.tolist()  # no moving average yet: no redundancy filter
    m = logits[0].softmax(0) * 0.65 + logits[2].softmax(0) * 0.35  # mostly class 0, some class 1
    cos = cosine(m, logits.softmax(1))
    assert cos[0] > 0.85 and 0.45 < cos[2] < 0.5 and cos[3] < 0.05  # what the filter sees
    reliable, selected = select_samples(logits, E0, 0.4, m)
    assert reliable.tolist() == [True, False, True, True, False]
    assert selected.tolist() == [False, False, False, True, False]
    _, selected = select_samples(logits, E0, 0.5, m)
    assert selected.tolist() == [False, False, True, True, False]
    # E0 = margin_e0 ln C with C the logits width, or num_classes when given
    assert entropy_margin(0.4, None, logits) == 0.4 * math.log(4)
    assert entropy_margin(0.4, 8, logits) == 0.4 * math.log(8)
    assert E0 < h[4] < 0.4 * math.log(8) < h[1]
    reliable, _ = select_samples(logits, entropy_margin(0.4, 8, logits), 0.4, None)
    assert reliable.tolist() == [True, False, True, True, True]


# --- ETA / EATA updates ------------------------------------------------------------------------

def expected_eta(ref, xs, params, opt, d_margin, fisher=None):
    """ETA/EATA written out: the two filters, loss = mean_sel H exp(E0 - H) (+ the Fisher term,
    whose gradient is 2 alpha F (theta - theta0)), a step only when a sample is selected, the
    probability moving average 0.9/0.1. Yields per batch the logits, the masks and the parameters."""
    m = None
    for x in xs:
        z = forward(ref, x, *params)
        h = entropy(z)
        p = z.detach().softmax(1)
        reliable = h.detach() < E0
        selected = reliable.clone() if m is None else reliable & (cosine(m, p).abs() < d_margin)
        if selected.any():
            hs = h[selected]
            loss = (hs * torch.exp(E0 - hs.detach())).mean()
            grads = list(torch.autograd.grad(loss, params))
            if fisher is not None:
                alpha, fishers, anchors = fisher
                grads = [g + 2 * alpha * f * (q.detach() - a) for g, q, f, a in zip(grads, params, fishers, anchors)]
            opt.step(grads)
            mean = p[selected].mean(0)
            m = mean if m is None else 0.9 * m + 0.1 * mean
        yield z.detach(), reliable, selected, m


def test_eta_equals_hand_written_adam_updates():
    net, ref = controlled_net(), controlled_net()
    params = affine(ref)
    adapter = adapt(net, "eta", d_margin=0.8)  # Adam lr 1e-3, betas (0.9, 0.999)
    xs = batches(6, n=8)
    counts = [0, 0]
    redundant = 0
    for x, (z, reliable, selected, m) in zip(xs, expected_eta(ref, xs, params, Adam(params), 0.8)):
        torch.testing.assert_close(adapter(x), z, rtol=1e-10, atol=1e-10)  # logits before the update
        assert_affine(net, params)
        torch.testing.assert_close(adapter.probs_ema, m, rtol=1e-12, atol=1e-14)
        counts[0] += int(reliable.sum())
        counts[1] += int(selected.sum())
        redundant += int((reliable & ~selected).sum())
        assert (adapter.num_reliable, adapter.num_selected) == tuple(counts)
    # the batches exercise both filters: unreliable, reliable but redundant, and selected samples
    assert 0 < counts[1] < counts[0] < 6 * 8 and redundant > 0
    for name in ("0.weight", "5.weight", "5.bias"):
        assert torch.equal(net.state_dict()[name], ref.state_dict()[name])


def fisher_written_out(ref, images, batch_size):
    """Per batch: CE against the argmax pseudo-labels, mean over the batch, squared gradient;
    summed over the batches, divided by their number (EATA's main.py)."""
    params = affine(ref)
    squares = [torch.zeros_like(p) for p in params]
    chunks = images.split(batch_size)
    for x in chunks:
        z = forward(ref, x, *params)
        y = z.argmax(1)
        ce = (torch.logsumexp(z, 1) - z[torch.arange(len(z)), y]).mean()
        for s, g in zip(squares, torch.autograd.grad(ce, params)):
            s += g ** 2
    return [s / len(chunks) for s in squares]


def test_eata_fisher_and_sgd_updates_written_out():
    net, ref = controlled_net(), controlled_net()
    clean = batches(1, n=10, seed=7)[0]
    fishers = fisher_written_out(ref, clean, 4)  # batches of 4, 4, 2
    assert all((f[:4] > 0).all() and f[4] == 0 for f in fishers)  # channel 4 feeds no class
    adapter = adapt(net, "eata", fisher_images=clean, fisher_batch_size=4, fisher_alpha=50.0, d_margin=0.8,
                    optimizer="sgd", lr=0.05)  # nesterov=True, momentum 0.9 (the benchmark's SGD)
    assert adapter.hparams["fisher_images"] == 10 and adapter.param_names == ["1.weight", "1.bias"]
    for got, want in zip(adapter.fishers, fishers):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    params = affine(ref)
    anchors = [p.detach().clone() for p in params]
    for got, want in zip(adapter.anchors, anchors):
        assert torch.equal(got, want)
    xs = batches(5, n=8)
    expected = expected_eta(ref, xs, params, SGD(params, 0.05, nesterov=True), 0.8, (50.0, fishers, anchors))
    for x, (z, _, selected, _) in zip(xs, expected):
        torch.testing.assert_close(adapter(x), z, rtol=1e-10, atol=1e-10)
        assert_affine(net, params)
    # the Fisher term mattered: without it the trajectory differs
    params_eta = affine(controlled_net())
    for _ in expected_eta(ref, xs, params_eta, SGD(params_eta, 0.05, nesterov=True), 0.8):
        pass
    assert (params_eta[0] - params[0]).abs().max() > 1e-4


def test_eata_fisher_from_an_iterable_of_batches_equals_the_tensor_split():
    clean = batches(1, n=10, seed=7)[0]
    by_tensor = adapt(controlled_net(), "eata", fisher_images=clean, fisher_batch_size=5)
    loader = [(clean[:5], torch.zeros(5)), (clean[5:], torch.zeros(5))]  # (input, target) tuples
    by_loader = adapt(controlled_net(), "eata", fisher_images=iter(loader))
    for a, b in zip(by_tensor.fishers, by_loader.fishers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert by_loader.hparams["fisher_images"] == 10


def test_eata_needs_fisher_images_and_refuses_bad_ones_before_any_change():
    net = tiny_net()
    with pytest.raises(ValueError, match=r"eata needs fisher_images.*tensor \(N, C, H, W\).*'eta'"):
        adapt(net, "eata")
    with pytest.raises(TypeError, match="fisher_images must be a float tensor .* got str"):
        adapt(net, "eata", fisher_images="clean")
    with pytest.raises(TypeError, match="must yield float input batches .* got int"):
        adapt(net, "eata", fisher_images=[batches(1)[0], 3])
    with pytest.raises(RuntimeError):  # wrong channel count: fails inside the model, on the copy
        adapt(net, "eata", fisher_images=torch.zeros(4, 2, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="fisher_images holds no image"):
        adapt(net, "eata", fisher_images=[])
    with pytest.raises(ValueError, match="fisher_alpha must be > 0"):
        adapt(net, "eata", fisher_images=batches(1)[0], fisher_alpha=0)
    with pytest.raises(ValueError, match="d_margin must be >= 0"):
        adapt(net, "eata", fisher_images=batches(1)[0], d_margin=-1)
    assert type(net[1]) is nn.BatchNorm2d  # nothing was converted
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="affine=False"):
        adapt(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, affine=False)), "eta")


def test_eta_no_step_when_nothing_is_selected():
    net = controlled_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = batches(1, n=8)[0]
    adapter = adapt(net, "eta", margin_e0=1e-6)  # no sample is reliable
    with torch.no_grad():
        adapter(x)
    assert (adapter.num_reliable, adapter.num_selected) == (0, 0) and adapter.probs_ema is None
    assert torch.equal(net[1].weight, before["1.weight"]) and adapter.optimizer.state_dict()["state"] == {}
    # reliable but all redundant: d_margin 0 rejects every sample once a moving average exists
    adapter = adapt(controlled_net(), "eta", d_margin=0.0)
    adapter(x)
    weight, m, state = adapter.model[1].weight.detach().clone(), adapter.probs_ema.clone(), adapter.num_selected
    assert state > 0
    adapter(x)
    assert adapter.num_selected == state and adapter.num_reliable > state
    assert torch.equal(adapter.model[1].weight, weight) and torch.equal(adapter.probs_ema, m)
    assert all(p.grad is None for p in adapter.params)  # gradients zeroed either way
    assert adapter.optimizer.state_dict()["state"][0]["step"] == 1


def test_eata_reset_restores_everything_but_the_fisher_anchors():
    net = controlled_net()
    clean = batches(1, n=8, seed=7)[0]
    adapter = adapt(net, "eata", fisher_images=clean, d_margin=0.8, steps=2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fishers = [f.clone() for f in adapter.fishers]
    xs = batches(3, n=8)
    first = [adapter(x) for x in xs]
    assert adapter.num_selected > 0 and adapter.probs_ema is not None
    assert not torch.equal(net[1].weight, state["1.weight"])
    adapter.reset()
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert adapter.optimizer.state_dict()["state"] == {}
    assert (adapter.num_reliable, adapter.num_selected, adapter.probs_ema) == (0, 0, None)
    assert all(torch.equal(a, b) for a, b in zip(adapter.fishers, fishers))
    again = [adapter(x) for x in xs]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eta_eata_defaults_are_the_benchmark_cifar10_setting():
    for name in ("eta", "eata"):
        d = get_method(name).defaults()
        assert d["optimizer"] == "adam" and d["lr"] is None and d["betas"] == (0.9, 0.999)
        assert d["margin_e0"] == 0.4 and d["d_margin"] == 0.4 and d["steps"] == 1 and d["num_classes"] is None
    d = get_method("eata").defaults()
    assert d["fisher_alpha"] == 1.0 and d["fisher_images"] is None and d["fisher_batch_size"] == 64
    group = adapt(tiny_net(), "eta").optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0


# --- SAR ---------------------------------------------------------------------------------------

def expected_sar(ref, xs, params, lr, rho=0.05, reset_constant=0.2):
    """SAR written out: reliable mean entropy, SAM ascent rho g / (||g|| + 1e-12), second
    forward there, re-filter among the first selection, SGD-momentum step (no Nesterov) with the
    second gradient at the restored weights, loss moving average 0.9/0.1, recovery reset."""
    start = [p.detach().clone() for p in params]
    opt, ema = SGD(params, lr), None
    for x in xs:
        z = forward(ref, x, *params)
        h = entropy(z)
        s1 = h.detach() < E0
        g = torch.autograd.grad(h[s1].mean() if s1.any() else h.sum() * 0, params)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        perturbed = [(p.detach() + rho * gi / (norm + 1e-12)).requires_grad_(True) for p, gi in zip(params, g)]
        h2 = entropy(forward(ref, x, *perturbed))[s1]
        s2 = h2.detach() < E0
        loss = h2[s2].mean() if s2.any() else h2.sum() * 0
        opt.step(torch.autograd.grad(loss, perturbed))
        if s2.any():
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        recovered = ema is not None and ema < reset_constant
        if recovered:
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            opt, ema = SGD(params, lr), None
        yield z.detach(), s1, s2, ema, recovered


def test_sar_equals_hand_written_sam_sgd_updates():
    net, ref = controlled_net(), controlled_net()
    params = affine(ref)
    adapter = adapt(net, "sar", lr=0.05, reset_constant=0.0)
    assert adapter.param_names == ["1.weight", "1.bias"]
    assert isinstance(adapter.optimizer, torch.optim.SGD) and adapter.optimizer.defaults["nesterov"] is False
    xs = batches(5, n=8)
    mixed = False
    for x, (z, s1, s2, ema, _) in zip(xs, expected_sar(ref, xs, params, 0.05, reset_constant=0.0)):
        with torch.no_grad():  # adapts under no_grad too
            torch.testing.assert_close(adapter(x), z, rtol=1e-10, atol=1e-10)  # first-forward logits
        assert_affine(net, params)
        assert adapter.loss_ema == pytest.approx(ema, rel=1e-10)
        mixed |= bool(0 < s1.sum() < len(s1))
    assert mixed  # the first filter dropped some samples and kept others
    assert torch.equal(net[1].running_mean, ref[1].running_mean)


class Shifted(nn.Module):
    """logits = x + LayerNorm(x): with the LayerNorm's scale and shift at 0 the logits are the
    input, so a batch sets its own entropies (a LayerNorm-only model, as in the SAR paper)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(4)
        nn.init.zeros_(self.ln.weight)
        nn.init.zeros_(self.ln.bias)

    def forward(self, x):
        return x + self.ln(x)


def confident(a: float, n: int = 3) -> torch.Tensor:
    """n samples with logits (a, 0, 0, 0) and one uniform (unreliable) sample."""
    x = torch.zeros(n + 1, 4, dtype=torch.float64)
    x[:n, 0] = a
    return x


def test_sar_model_recovery_on_a_constructed_loss_sequence():
    # rho 0 and a tiny lr: the second loss is the mean entropy of each batch's confident samples
    lr = 1e-9
    model = Shifted().double()
    adapter = adapt(model, "sar", lr=lr, rho=0.0)
    assert adapter.param_names == ["ln.weight", "ln.bias"] and adapter.hparams["exclude_layers"] == SAR_EXCLUDE_LAYERS
    xs = [confident(3.75)] + [confident(7.0)] * 5 + [confident(3.0)]
    losses = [entropy(x[:1]).item() for x in xs]
    assert losses[0] < E0 and entropy(xs[0][-1:]).item() > E0
    ema, emas = None, []
    for value in losses:
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        emas.append(ema)
    crossing = next(i for i, e in enumerate(emas[:6]) if e < 0.2)
    assert crossing == 5 and emas[4] > 0.21 and emas[5] < 0.196  # robust to the tiny updates
    for i, x in enumerate(xs):
        torch.testing.assert_close(adapter(x), x, rtol=0, atol=1e-6)
        if i < crossing:
            assert adapter.loss_ema == pytest.approx(emas[i], abs=1e-6) and adapter.num_recoveries == 0
            assert model.ln.weight.abs().max() > 0  # it adapts
        elif i == crossing:  # recovery: weights, optimizer and moving average back to the start
            assert adapter.loss_ema is None and adapter.num_recoveries == 1
            assert torch.equal(model.ln.weight, torch.zeros(4, dtype=torch.float64))
            assert adapter.optimizer.state_dict()["state"] == {}
        else:
            assert losses[i] > 0.2 and adapter.loss_ema == pytest.approx(losses[i], abs=1e-6)  # a fresh average
    # an all-unreliable batch leaves the moving average alone; the zero-gradient SGD step still
    # applies the momentum (as the reference), weight <- weight - lr * 0.9 * buf
    buf = adapter.optimizer.state[model.ln.weight]["momentum_buffer"].clone()
    weight, ema = model.ln.weight.detach().clone(), adapter.loss_ema
    adapter(torch.zeros(4, 4, dtype=torch.float64))
    assert adapter.loss_ema == ema
    torch.testing.assert_close(model.ln.weight, weight - lr * 0.9 * buf, rtol=1e-12, atol=1e-20)
    # reset(): back to the state right after tta.adapt
    adapter.reset()
    assert (adapter.loss_ema, adapter.num_recoveries) == (None, 0)
    assert torch.equal(model.ln.bias, torch.zeros(4, dtype=torch.float64))


def test_sar_reset_restores_weights_optimizer_and_moving_average():
    net = controlled_net()
    adapter = adapt(net, "sar", lr=0.05)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    xs = batches(3, n=8)
    first = [adapter(x) for x in xs]
    assert adapter.loss_ema is not None and not torch.equal(net[1].weight, state["1.weight"])
    adapter.reset()
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert adapter.optimizer.state_dict()["state"] == {} and adapter.loss_ema is None
    again = [adapter(x) for x in xs]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sar_skips_the_last_resnet_stage_by_name():
    model = torchvision.models.resnet18(num_classes=10).eval()
    adapter = adapt(model, "sar")
    names = adapter.param_names
    assert "bn1.weight" in names and "layer3.1.bn2.bias" in names
    assert not any("layer4" in n for n in names)
    assert len(names) == 2 * (1 + 4 + 5 + 5)  # bn1; layer1-3: 2 blocks x 2 BN, + a downsample BN in 2, 3
    assert model.layer4[0].bn1.stats == "batch" and not model.layer4[0].bn1.weight.requires_grad
    everything = adapt(torchvision.models.resnet18(num_classes=10), "sar", exclude_layers=())
    assert any("layer4" in n for n in everything.param_names)
    net = tiny_net()
    with pytest.raises(ValueError, match=r"\['layer5\*'\] match no normalisation layer; the layers are: 1"):
        adapt(net, "sar", exclude_layers=["layer5*"])
    with pytest.raises(ValueError, match="excludes every normalisation layer"):
        adapt(net, "sar", exclude_layers="*")
    with pytest.raises(ValueError, match="the model has none"):
        adapt(nn.Sequential(nn.Flatten(), nn.Linear(75, 4)), "sar")
    assert type(net[1]) is nn.BatchNorm2d  # refused before any change


def test_sar_adapts_groupnorm_models_without_conversion():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 4)).double()
    with torch.no_grad():
        model[5].weight.mul_(20)
    adapter = adapt(model, "sar", lr=0.1, reset_constant=0.0)
    assert adapter.param_names == ["1.weight", "1.bias"] and type(model[1]) is nn.GroupNorm
    before = model[1].weight.detach().clone()
    adapter(batches(1, n=8)[0])
    assert not torch.equal(model[1].weight, before) and not model[0].weight.requires_grad


def test_sar_defaults_are_the_benchmark_cifar10_setting():
    d = get_method("sar").defaults()
    assert d["optimizer"] == "sgd" and d["lr"] == 1e-3 and d["momentum"] == 0.9 and d["nesterov"] is False
    assert d["rho"] == 0.05 and d["margin_e0"] == 0.4 and d["reset_constant"] == 0.2
    assert d["exclude_layers"] == SAR_EXCLUDE_LAYERS and d["steps"] == 1
    group = adapt(tiny_net(), "sar").optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and group["momentum"] == 0.9 and group["nesterov"] is False
