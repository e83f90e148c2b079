"""convert/revert carry the whole layer state: hooks (and their handles), pruned, parametrised
and spectral-normed weights; a layer that cannot be swapped is refused before any change."""
from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import tta


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    return net.eval()


class _Exp(nn.Module):
    def forward(self, w):
        return w.exp()


def _prune(bn):
    prune.l1_unstructured(bn, "weight", amount=0.5)


def _parametrize(bn):
    parametrize.register_parametrization(bn, "weight", _Exp())


def _spectral(bn):
    torch.nn.utils.spectral_norm(bn)


def _batch_norm64(h, bn):
    """Independent float64 batch normalisation of h with bn's current (pruned/parametrised) weight."""
    h = h.double()
    var, mean = torch.var_mean(h, (0, 2, 3), correction=0)
    shape = (1, -1, 1, 1)
    return (h - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.double().view(shape) \
        + bn.bias.double().view(shape)


@pytest.mark.parametrize("setup", [_prune, _parametrize, _spectral], ids=["prune", "parametrize", "spectral_norm"])
def test_pruned_parametrized_and_spectral_normed_layers_convert_and_revert(setup):
    net, oracle = _net(), _net()  # oracle: torch's own BatchNorm
    for model in (net, oracle):
        torch.manual_seed(1)  # spectral_norm draws its start vector
        setup(model[4])
    keys = list(net.state_dict())
    x = torch.randn(6, 3, 5, 5)
    expected = oracle(x)
    tta.convert(net, stats="source")
    assert isinstance(net[1], tta.AdaptiveBatchNorm2d) and isinstance(net[4], tta.AdaptiveBatchNorm2d)
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    # batch statistics with the pruned / parametrised weight, against float64
    net[4].set_stats("batch")
    h = oracle[:4](x)
    torch.testing.assert_close(net(x).double(), _batch_norm64(h, oracle[4]), rtol=1e-5, atol=1e-5)
    net[4].set_stats("source")
    net.load_state_dict(oracle.state_dict(), strict=True)
    if setup is _parametrize:
        torch.testing.assert_close(copy.deepcopy(net)(x), expected, rtol=0, atol=0)
    tta.revert(net)
    assert type(net[1]) is nn.BatchNorm2d and isinstance(net[4], nn.BatchNorm2d)
    assert not isinstance(net[4], tta.AdaptiveBatchNorm2d)
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    # torch's own removal still finds everything it registered
    if setup is _prune:
        prune.remove(net[4], "weight")
    elif setup is _parametrize:
        parametrize.remove_parametrizations(net[4], "weight")
    else:
        torch.nn.utils.remove_spectral_norm(net[4])
    assert type(net[4]) is nn.BatchNorm2d and isinstance(net[4].weight, nn.Parameter)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_pruned_layer_trains_like_torch_after_conversion():
    net, oracle = _net(), _net().train()
    _prune(net[4]), _prune(oracle[4])
    tta.convert(net, stats="source").train()
    x = torch.randn(6, 3, 5, 5) * 2 + 1
    torch.testing.assert_close(net(x), oracle(x), rtol=0, atol=0)
    for a, b in zip(net.buffers(), oracle.buffers()):
        assert torch.equal(a, b)


def test_convert_and_revert_refuse_before_any_change():
    net = _net()
    net[4].forward = lambda x: x  # patched instance forward: swapping the class would not take effect
    with pytest.raises(ValueError, match="'4'.*instance-level forward"):
        tta.convert(net)
    assert type(net[1]) is nn.BatchNorm2d and type(net[4]) is nn.BatchNorm2d
    net = tta.convert(_net())
    net[4].forward = lambda x: x
    with pytest.raises(ValueError, match="'4'"):
        tta.revert(net)
    assert type(net[1]) is tta.AdaptiveBatchNorm2d


def _register_all(bn, calls):
    def record(kind):
        return lambda module, *args, **kwargs: calls[kind].append(module)

    return {
        "forward": bn.register_forward_hook(lambda m, a, out: calls["forward"].append((m, out.detach().clone()))),
        "forward_pre": bn.register_forward_pre_hook(record("forward_pre")),
        "forward_kwargs": bn.register_forward_hook(record("forward_kwargs"), with_kwargs=True),
        "forward_always": bn.register_forward_hook(record("forward_always"), always_call=True),
        "forward_pre_kwargs": bn.register_forward_pre_hook(record("forward_pre_kwargs"), with_kwargs=True),
        "backward": bn.register_full_backward_hook(record("backward")),
        "backward_pre": bn.register_full_backward_pre_hook(record("backward_pre")),
        "state_dict_pre": bn.register_state_dict_pre_hook(record("state_dict_pre")),
        "state_dict_post": bn.register_state_dict_post_hook(record("state_dict_post")),
        "load_pre": bn.register_load_state_dict_pre_hook(record("load_pre")),
        "load_post": bn.register_load_state_dict_post_hook(record("load_post")),
    }


def _use(net, x):
    x = x.clone().requires_grad_()
    net(x).sum().backward()
    net.load_state_dict(net.state_dict())


def _hook_dicts(module):
    return {k: v for k, v in vars(module).items() if "hooks" in k and isinstance(v, dict)}


@pytest.mark.parametrize("direction", ["convert", "revert"])
def test_hooks_are_carried_over_and_kept_handles_still_remove_them(direction):
    net = _net()
    if direction == "revert":
        tta.convert(net, stats="source")
    old = net[1]
    calls = defaultdict(list)
    handles = _register_all(old, calls)
    oracle = copy.deepcopy(net)
    x = torch.randn(6, 3, 5, 5)
    features = oracle[1](oracle[0](x))
    calls.clear()  # the deep copy carries the hooks too
    tta.convert(net, stats="source") if direction == "convert" else tta.revert(net)
    new = net[1]
    assert new is not old
    assert all(not hooks for hooks in _hook_dicts(old).values())  # moved, not copied
    _use(net, x)
    for kind in handles:
        got = [c[0] if kind == "forward" else c for c in calls[kind]]
        assert got and all(m is new for m in got), kind
    # a feature extractor hooked on the layer keeps receiving the layer's output
    torch.testing.assert_close(calls["forward"][0][1], features, rtol=0, atol=0)
    for handle in handles.values():
        handle.remove()
    assert all(not hooks for hooks in _hook_dicts(new).values())
    calls.clear()
    _use(net, x)
    assert not calls
