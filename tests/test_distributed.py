"""tta.recalibrate under torch.distributed: 2 gloo processes on CPU against one process."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tta

CONFIGS = {"once": {}, "exact": {"exact": True}, "prior": {"prior": 10}}


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3), nn.BatchNorm1d(3),
    )
    return net.eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    # ranks see different distributions (offset grows with the batch index)
    return [torch.randn(6, 3, 6, 6, generator=g) * (1 + i) + i for i in range(6)]


def _recalibrate_all(batches) -> dict[str, dict[str, torch.Tensor]]:
    return {name: tta.recalibrate(_model(), batches, **kwargs).state_dict() for name, kwargs in CONFIGS.items()}


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = _recalibrate_all(_batches()[rank::world_size])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = _recalibrate_all(_batches())
    source = _model().state_dict()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in CONFIGS:
        for key, value in single[name].items():
            if "running" not in key:
                continue
            assert not torch.allclose(value, source[key])  # recalibration did change it
            for r in range(2):
                torch.testing.assert_close(ranks[r][name][key], value, rtol=1e-5, atol=1e-5,
                                           msg=f"{name} {key} rank {r}")
    # without the all-reduce a rank would only see its own data
    alone = tta.recalibrate(_model(), _batches()[0::2]).state_dict()
    assert not torch.allclose(alone["0.running_var"], single["once"]["0.running_var"], rtol=1e-3)
