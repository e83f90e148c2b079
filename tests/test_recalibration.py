"""tta.recalibrate (AdaBN) against independent computations with forward hooks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tta


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc1 = nn.Linear(4, 5)
        self.bn3 = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(self.bn0(x))))
        h = torch.relu(h + self.bn2(self.conv2(h)))  # residual branch
        h = self.drop(h.mean((2, 3)))
        return self.fc2(torch.relu(self.bn3(self.fc1(h))))


def _model(dropout: float = 0.0) -> Net:
    torch.manual_seed(0)
    net = Net(dropout)
    with torch.no_grad():
        for m in _bns(net):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return net.eval()


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    # batch-dependent offsets, so that the spread of the batch means matters
    x = torch.randn(n, 3, 6, 6, generator=g) * 2 + 1
    x += torch.arange(n).view(n, 1, 1, 1) // 8 * 0.5
    return x


def _batches(x, size):
    return [x[i:i + size] for i in range(0, len(x), size)]


def _record_inputs(model, batches, train: bool):
    """Independent oracle: concatenated inputs of every BN layer, captured with forward hooks."""
    inputs = {m: [] for m in _bns(model)}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs[mod].append(args[0].detach())) for m in inputs]
    model.train(train)
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    out = []
    for m, xs in inputs.items():
        x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], 1).double()
        var, mean = torch.var_mean(x, 1, correction=1)
        out.append((mean, var))
    return out


def _assert_stats(model, expected, rtol=1e-4, atol=1e-5):
    for m, (mean, var) in zip(_bns(model), expected):
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=rtol, atol=atol)
        torch.testing.assert_close(m.running_var.double(), var, rtol=rtol, atol=atol)


def test_pooled_statistics_equal_train_mode_oracle():
    x = _data()
    model = _model()
    oracle = copy.deepcopy(model)
    for m in _bns(oracle):
        m.momentum = 0.0  # train mode normalises with batch statistics; buffers untouched
    expected = _record_inputs(oracle, _batches(x, 8), train=True)
    assert tta.recalibrate(model, _batches(x, 8)) is model
    _assert_stats(model, expected)


def test_first_layer_independent_of_batch_size_and_is_dataset_variance():
    x = _data()
    results = []
    for size in (4, 16, 48):
        model = tta.recalibrate(_model(), _batches(x, size))
        results.append((model.bn0.running_mean.clone(), model.bn0.running_var.clone()))
    var, mean = torch.var_mean(x.double(), (0, 2, 3), correction=1)
    for m, v in results:
        torch.testing.assert_close(m.double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v.double(), var, rtol=1e-6, atol=1e-6)
    # torch's momentum=None averages per-batch unbiased variances: not the dataset variance
    plain = _model()
    plain.bn0.reset_running_stats()
    plain.bn0.momentum = None
    plain.train()
    with torch.no_grad():
        for b in _batches(x, 4):
            plain(b)
    assert (plain.bn0.running_var.double() - var).abs().max() > 0.05


def test_exact_statistics_are_those_of_the_final_model_in_eval_mode():
    x = _data()
    model = tta.recalibrate(_model(), _batches(x, 8), exact=True)
    check = copy.deepcopy(model)
    expected = _record_inputs(check, _batches(x, 8), train=False)
    _assert_stats(model, expected, rtol=1e-5, atol=1e-6)
    # exact results do not depend on the batch size at any depth
    other = tta.recalibrate(_model(), _batches(x, 24), exact=True)
    for a, b in zip(_bns(model), _bns(other)):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
    # the one-pass result is different for deeper layers (batch statistics upstream)
    approx = tta.recalibrate(_model(), _batches(x, 8))
    assert not torch.allclose(approx.bn3.running_var, model.bn3.running_var, rtol=1e-3)


def test_prior_blends_source_as_pseudo_samples():
    x = _data()
    source = _model()
    full = tta.recalibrate(_model(), _batches(x, 8))
    partial = tta.recalibrate(_model(), _batches(x, 8), prior=16)
    w = 48 / (16 + 48)
    for s, f, p in zip(_bns(source), _bns(full), _bns(partial)):
        # the pass normalises with batch statistics, so the target statistics are those of `full`
        mean = (1 - w) * s.running_mean + w * f.running_mean
        var = (1 - w) * s.running_var + w * f.running_var + w * (1 - w) * (s.running_mean - f.running_mean) ** 2
        torch.testing.assert_close(p.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.running_var, var, rtol=1e-5, atol=1e-6)


def test_dropout_stays_off_and_modes_are_restored():
    x = _data()
    with_dropout = _model(dropout=0.9)
    with_dropout.train()
    with_dropout.bn1.eval()
    flags = {name: m.training for name, m in with_dropout.named_modules()}
    momenta = [m.momentum for m in _bns(with_dropout)]
    tta.recalibrate(with_dropout, _batches(x, 8))
    assert {name: m.training for name, m in with_dropout.named_modules()} == flags
    assert [m.momentum for m in _bns(with_dropout)] == momenta
    reference = tta.recalibrate(_model(), _batches(x, 8))  # no dropout at all
    for a, b in zip(_bns(with_dropout), _bns(reference)):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)


def test_converted_model_keeps_stats_and_reset_restores_source():
    x = _data()
    source = _model()
    model = tta.convert(_model(), stats="blend", prior=4)
    plain = tta.recalibrate(_model(), _batches(x, 8))
    tta.recalibrate(model, _batches(x, 8))
    assert all(m.stats == "blend" and m.prior == 4 for m in _bns(model))
    for a, b in zip(_bns(model), _bns(plain)):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
    # the recalibrated state_dict loads into the original architecture without tta
    Net().load_state_dict(model.state_dict(), strict=True)
    tta.reset(model)
    for a, s in zip(_bns(model), _bns(source)):
        assert torch.equal(a.running_mean, s.running_mean) and torch.equal(a.running_var, s.running_var)


def test_tuples_generators_and_max_batches():
    x = _data()
    y = torch.zeros(len(x), dtype=torch.long)
    ref = tta.recalibrate(_model(), _batches(x[:16], 8))
    got = tta.recalibrate(_model(), ((x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)), max_batches=2)
    shown = tta.recalibrate(_model(), _batches(x[:16], 8), progress=True)
    for a, b, c in zip(_bns(ref), _bns(got), _bns(shown)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert torch.equal(a.running_var, c.running_var)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    exact = tta.recalibrate(_model(), loader, exact=True, max_batches=2)
    exact_ref = tta.recalibrate(_model(), _batches(x[:16], 8), exact=True)
    for a, b in zip(_bns(exact), _bns(exact_ref)):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=0)


def test_bad_input_raises_and_restores_statistics():
    x = _data()
    model = _model()
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in _bns(model)]
    with pytest.raises(TypeError, match="tensors or \\(input, target\\) tuples, got str"):
        tta.recalibrate(model, [x[:8], x[8:16], "oops"])
    for m, (mean, var) in zip(_bns(model), before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    assert not model.training
    with pytest.raises(ValueError, match="no batches"):
        tta.recalibrate(model, [])
    with pytest.raises(ValueError, match="no batches"):
        tta.recalibrate(model, [], exact=True)
    with pytest.raises(ValueError, match="max_batches must be a positive int or None, got 0"):
        tta.recalibrate(model, _batches(x, 8), max_batches=0)
    with pytest.raises(ValueError, match="prior"):
        tta.recalibrate(model, _batches(x, 8), prior=-1)
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics"):
        tta.recalibrate(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)), [torch.randn(4, 2)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("exact", [False, True])
def test_cuda_matches_cpu(exact):
    x = _data()
    cpu = tta.recalibrate(_model(), _batches(x, 8), exact=exact)
    gpu = tta.recalibrate(_model().cuda(), _batches(x, 8), exact=exact)  # batches are moved to the model
    for a, b in zip(_bns(cpu), _bns(gpu)):
        torch.testing.assert_close(b.running_mean.cpu(), a.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.running_var.cpu(), a.running_var, rtol=1e-4, atol=1e-5)


class _Counting:
    """A re-iterable that counts the batches pulled from it and records their sample indices."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.seen: list[torch.Tensor] = []

    def __iter__(self):
        for batch in self.loader:
            self.seen.append(batch[1] if isinstance(batch, (tuple, list)) else batch)
            yield batch


def _hook_count(model):
    return sum(len(v) for m in model.modules() for k, v in vars(m).items() if "hooks" in k and isinstance(v, dict))


@pytest.mark.parametrize("exact", [False, True])
def test_never_pulls_more_than_max_batches(exact):
    x = _data()
    batches = iter(_batches(x, 6))  # 8 batches; an iterator is fine in exact mode too
    model = tta.recalibrate(_model(), batches, max_batches=2, exact=exact)
    assert len(list(batches)) == 6
    counting = _Counting(_batches(x, 6))
    tta.recalibrate(_model(), counting, max_batches=2, exact=exact)
    assert len(counting.seen) == 2
    if exact:  # statistics of exactly those 2 batches, under the final model in eval mode
        _assert_stats(model, _record_inputs(copy.deepcopy(model), _batches(x[:12], 6), train=False), 1e-5, 1e-6)
    else:
        oracle = _model()
        for m in _bns(oracle):
            m.momentum = 0.0
        _assert_stats(model, _record_inputs(oracle, _batches(x[:12], 6), train=True))


def test_exact_with_shuffling_loader_uses_the_same_samples_for_every_layer():
    x = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(len(x))), batch_size=8,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    counting = _Counting(loader)
    model = tta.recalibrate(_model(), counting, exact=True, max_batches=2)
    assert len(counting.seen) == 2  # read once, kept for every layer's pass
    used = x[torch.cat(counting.seen)]
    _assert_stats(model, _record_inputs(copy.deepcopy(model), _batches(used, 8), train=False), 1e-5, 1e-6)


def _state(model):
    buffers = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.source_mean)
               for m in _bns(model)]
    return buffers, [m.stats_config() for m in _bns(model)], [m.training for m in model.modules()], _hook_count(model)


@pytest.mark.parametrize("exact", [False, True])
def test_failed_recalibration_leaves_no_trace(exact):
    x = _data()
    model = tta.convert(_model(), stats="blend", prior=4)
    model.bn1.train()
    before = _state(model)

    def failing():
        yield x[:8]
        yield x[8:16]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        tta.recalibrate(model, failing(), exact=exact)
    after = _state(model)
    assert after[1:] == before[1:]
    for (m0, v0, n0, s0), (m1, v1, n1, s1) in zip(before[0], after[0]):
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and torch.equal(n0, n1) and s0 is None and s1 is None
    # so a later reset keeps ordinary train-mode updates (oracle: the torch model, same step)
    oracle = _model().train()
    tta.set_stats(model, "source")
    model.train()
    with torch.no_grad():
        model(x[:8]), oracle(x[:8])
    tta.reset(model)
    for a, b in zip(_bns(model), _bns(oracle)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


@pytest.mark.parametrize("exact", [False, True])
def test_empty_batches_are_skipped(exact):
    x = _data()
    model = tta.recalibrate(_model(), [x[:0], x[:8], x[8:8], (x[8:16], None)], exact=exact)
    if exact:
        expected = _record_inputs(copy.deepcopy(model), [x[:8], x[8:16]], train=False)
    else:
        oracle = _model()
        for m in _bns(oracle):
            m.momentum = 0.0
        expected = _record_inputs(oracle, [x[:8], x[8:16]], train=True)
    _assert_stats(model, expected, 1e-5, 1e-6)
    with pytest.raises(ValueError, match="no batches"):
        tta.recalibrate(_model(), [x[:0]], exact=exact)


@pytest.mark.parametrize("exact", [False, True])
def test_single_tensor_and_wrong_shapes_get_clear_errors_and_change_nothing(exact):
    x = _data()
    model = tta.convert(_model(), stats="batch")
    before = _state(model)
    with pytest.raises(TypeError, match=r"single tensor of shape \(48, 3, 6, 6\).*x.split"):
        tta.recalibrate(model, x, exact=exact)
    with pytest.raises(ValueError, match=r"'bn0' got input of shape \(8, 6, 6\): expected input \(N, 3, \*\)"):
        tta.recalibrate(model, [x[:8, 0]], exact=exact)
    with pytest.raises(ValueError, match=r"'bn0' got input of shape \(8, 3, 6\): expected 4D input"):
        tta.recalibrate(model, [x[:8, :, 0]], exact=exact)
    after = _state(model)
    assert after[1:] == before[1:]
    for a, b in zip(before[0], after[0]):
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3])) and b[3] is None
