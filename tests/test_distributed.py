"""tta.recalibrate under torch.distributed: 2 gloo processes on CPU against one process.

One spawn runs every scenario in sequence on both ranks (the collectives must stay aligned
across failures): the normal split, a rank without batches, a rank whose data raises midway
or has the wrong shape, and no data on any rank.
"""
from __future__ import annotations

import datetime
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


def _broken(batches):
    yield batches[0]
    raise RuntimeError("rank 1 data broke")


def _outcome(data, kwargs) -> tuple:
    """("ok", state_dict) or ("error", type, message, whether the model is unchanged)."""
    model = _model()
    try:
        return ("ok", tta.recalibrate(model, data, **kwargs).state_dict())
    except Exception as error:
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _model().state_dict().values()))
        return ("error", type(error).__name__, str(error), same)


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a hang would end in this timeout and fail the test instead of blocking it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mine = _batches()[rank::world_size]
        results: dict = {}
        for name, kwargs in CONFIGS.items():
            results[f"no_data_on_rank1/{name}"] = _outcome(mine if rank == 0 else [], kwargs)
            results[f"raises_on_rank1/{name}"] = _outcome(_broken(mine) if rank == 1 else mine, kwargs)
            bad = [mine[0], mine[1][:, :, 0]] if rank == 1 else mine
            results[f"bad_shape_on_rank1/{name}"] = _outcome(bad, kwargs)
            results[f"no_data/{name}"] = _outcome([], kwargs)
        results["split"] = _recalibrate_all(mine)  # still aligned after all the failures
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_gloo_ranks_match_one_process(ranks):
    single = _recalibrate_all(_batches())
    source = _model().state_dict()
    for name in CONFIGS:
        for key, value in single[name].items():
            if "running" not in key:
                continue
            assert not torch.allclose(value, source[key])  # recalibration did change it
            for r in range(2):
                torch.testing.assert_close(ranks[r]["split"][name][key], value, rtol=1e-5, atol=1e-5,
                                           msg=f"{name} {key} rank {r}")
    # without the all-reduce a rank would only see its own data
    alone = tta.recalibrate(_model(), _batches()[0::2]).state_dict()
    assert not torch.allclose(alone["0.running_var"], single["once"]["0.running_var"], rtol=1e-3)


def test_rank_without_batches_contributes_nothing(ranks):
    data = _batches()[0::2]
    # independent float64 statistics of the first layer's input: rank 0's data alone
    var, mean = torch.var_mean(torch.cat(data).double(), (0, 2, 3), correction=1)
    for name, kwargs in CONFIGS.items():
        single = tta.recalibrate(_model(), data, **kwargs).state_dict()
        for r in range(2):
            status, state = ranks[r][f"no_data_on_rank1/{name}"]
            assert status == "ok"
            for key, value in single.items():
                torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=f"{name} {key} rank {r}")
            if name != "prior":
                torch.testing.assert_close(state["0.running_mean"].double(), mean, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(state["0.running_var"].double(), var, rtol=1e-5, atol=1e-5)


def test_a_failing_rank_makes_every_rank_raise_without_changes(ranks):
    for name in CONFIGS:
        own = ranks[1][f"raises_on_rank1/{name}"]
        assert own[:3] == ("error", "RuntimeError", "rank 1 data broke") and own[3], name
        shape = ranks[1][f"bad_shape_on_rank1/{name}"]
        assert shape[:2] == ("error", "ValueError") and "(6, 3, 6)" in shape[2] and shape[3], name
        for scenario in ("raises_on_rank1", "bad_shape_on_rank1"):
            other = ranks[0][f"{scenario}/{name}"]
            assert other[:2] == ("error", "RuntimeError") and "failed on 1 other rank" in other[2] and other[3], name
        for r in range(2):
            none = ranks[r][f"no_data/{name}"]
            assert none[:2] == ("error", "ValueError") and "no batches on any rank" in none[2] and none[3]
