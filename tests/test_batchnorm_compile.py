"""torch.compile(fullgraph=True) on converted models: one graph in every mode, outputs equal eager.

CPU with the ``aot_eager`` backend (no C compiler needed): it checks that dynamo traces the
whole forward (no data-dependent branch) and that the traced program computes what eager does.
Inductor is timed by scripts/bench_bn.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tta


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                        nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


CONFIGS = [
    ("source", {}),
    ("batch", {}),
    ("batch", {"variance": "unbiased"}),
    ("blend", {"prior": 4}),
    ("blend", {"alpha": 0.7, "pooled": True, "variance": "unbiased"}),
    ("ema", {"momentum": 0.3}),
    ("ema", {"momentum": 0.3, "variance": "unbiased"}),
]


@pytest.mark.parametrize("stats,params", CONFIGS, ids=[f"{s}-{'-'.join(map(str, p.values()))}" for s, p in CONFIGS])
@pytest.mark.parametrize("train", [False, True])
def test_fullgraph_compile_matches_eager(stats, params, train):
    eager = tta.convert(_net(), stats=stats, **params).train(train)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(2):  # ema: the second step starts from the first step's estimate
            x = torch.randn(8, 3, 10, 10, generator=g) * 2 + step
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for (k, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=k)
    if stats == "ema":  # the source copy was taken under compile, and reset restores it
        tta.reset(compiled_model)
        for (k, a), b in zip(_net().state_dict().items(), compiled_model.state_dict().values()):
            assert torch.equal(b, a), k


def test_fullgraph_compile_with_gradients():
    """TENT-like use: gradients through the batch statistics under compile."""
    eager = tta.convert(_net(), stats="blend", prior=8)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 3, 10, 10)
    eager(x).square().sum().backward()
    compiled(x).square().sum().backward()
    for (k, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=k)
