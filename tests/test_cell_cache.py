"""The corrupted-cell cache shared by concurrent jobs: a cell is computed once (the others wait for
it and read it), the total size stays within TTA_CACHE_MAX_GB by evicting the least recently used
cells, and a cell another job holds is never deleted."""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest
import torch
from filelock import FileLock

from tta.evaluation.results import CellCache

CELL_BYTES = 128 + 1000  # np.save of a (1000,) uint8 array: a 128-byte header, then the data


def _cell(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, 1000, dtype=np.uint8))


def _job(cache_dir: str, marker: str, out: str, barrier) -> None:
    """One job of the concurrency test: waits for the other, then asks for the same cell."""
    def compute() -> torch.Tensor:
        with open(marker, "a") as f:  # one line per computation
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other job to ask meanwhile
        return _cell(7)

    barrier.wait()
    images = CellCache(cache_dir).get_or_compute("k" * 64, compute, shape=(1000,))
    np.save(out, images.numpy())


def test_concurrent_jobs_compute_a_cell_once_and_read_the_same_array(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    marker = tmp_path / "computed.txt"
    jobs = [context.Process(target=_job, args=(str(tmp_path / "cache"), str(marker), str(tmp_path / f"{i}.npy"),
                                               barrier)) for i in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0, 0]
    assert len(marker.read_text().splitlines()) == 1  # computed once
    expected = np.random.default_rng(7).integers(0, 256, 1000, dtype=np.uint8)
    for i in range(2):
        assert np.array_equal(np.load(tmp_path / f"{i}.npy"), expected)
    assert np.array_equal(np.load(tmp_path / "cache" / "cells" / f"{'k' * 64}.npy"), expected)


def _sizes(cache: CellCache) -> dict[str, int]:
    return {p.stem: p.stat().st_size for p in cache.directory.glob("*.npy")}


def _put_aged(cache: CellCache, keys: str) -> None:
    """Puts the cells ``keys`` used in that order, an hour ago and one second apart."""
    for i, key in enumerate(keys):
        cache.put(key, _cell(ord(key)))
        then = time.time() - 3600 + i
        os.utime(cache.directory / f"{key}.npy", (then, then))


def test_eviction_keeps_the_bound_and_removes_the_least_recently_used(tmp_path, monkeypatch):
    bound = 3.5 * CELL_BYTES
    monkeypatch.setenv("TTA_CACHE_MAX_GB", str(bound / 1e9))
    cache = CellCache(tmp_path, memory=0)
    _put_aged(cache, "abc")
    assert _sizes(cache) == {"a": CELL_BYTES, "b": CELL_BYTES, "c": CELL_BYTES}
    assert torch.equal(cache.get("a", shape=(1000,)), _cell(ord("a")))  # a read makes "a" the most recent
    cache.put("d", _cell(ord("d")))
    assert sorted(_sizes(cache)) == ["a", "c", "d"]  # "b", the least recently used, is gone
    cache.put("e", _cell(ord("e")))
    assert sorted(_sizes(cache)) == ["a", "d", "e"]
    assert sum(_sizes(cache).values()) <= bound
    cache.put("d", _cell(ord("d")))  # rewriting a cell replaces its file: nothing else goes
    assert sorted(_sizes(cache)) == ["a", "d", "e"]
    assert cache.get("b") is None and torch.equal(cache.get("e"), _cell(ord("e")))


def test_eviction_skips_a_cell_another_job_holds(tmp_path):
    cache = CellCache(tmp_path, memory=0, max_gb=3.5 * CELL_BYTES / 1e9)
    _put_aged(cache, "abc")
    held, release = threading.Event(), threading.Event()

    def reader() -> None:  # another job reading "a", the least recently used cell
        with FileLock(cache.directory / "a.lock", is_singleton=True):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert held.wait(30)
        cache.put("d", _cell(ord("d")))
    finally:
        release.set()
        thread.join()
    assert sorted(_sizes(cache)) == ["a", "c", "d"]  # "b" went instead of the held "a"


def test_a_cell_over_the_bound_is_not_written_and_bad_bounds_are_refused(tmp_path, monkeypatch, caplog):
    cache = CellCache(tmp_path, memory=0, max_gb=CELL_BYTES / 2 / 1e9)
    with caplog.at_level(logging.WARNING):
        cache.put("a", _cell(1))
    assert _sizes(cache) == {} and f"its {CELL_BYTES} bytes exceed the cache bound of 564 bytes" in caplog.text
    for bad in (0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match=f"must be a positive number of GB or None, got {bad!r}"):
            CellCache(tmp_path, max_gb=bad)
    monkeypatch.setenv("TTA_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="TTA_CACHE_MAX_GB must be a positive number of GB, got 'lots'"):
        CellCache(tmp_path)
    monkeypatch.delenv("TTA_CACHE_MAX_GB")
    assert CellCache(tmp_path).max_bytes is None  # default: unbounded


def test_a_cell_over_the_bound_is_served_from_memory_without_being_written_again(tmp_path, caplog):
    # a cell too big for the bound stays in memory; reading it must not try to write it (and
    # evict others) on every read
    cache = CellCache(tmp_path, memory=16, max_gb=CELL_BYTES / 2 / 1e9)
    with caplog.at_level(logging.WARNING):
        cache.put("a", _cell(0))
        for _ in range(3):
            assert torch.equal(cache.get("a"), _cell(0))
    assert _sizes(cache) == {} and caplog.text.count("not caching cell a") == 1
