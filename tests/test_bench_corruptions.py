"""scripts/bench_corruptions.py on a tiny workload: it prints, for every thread count asked for,
our time, the reference's and their ratio per corruption, and sums that add up, so the speed
goal's numbers (docs/corruptions.md) come from a script that cannot rot unnoticed."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tta.corruptions import CORRUPTIONS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_corruptions.py"


def _needs_reference() -> None:
    """The timing tests run the reference (or, mocked, photographs of scikit-image); the argument
    checks need neither."""
    pytest.importorskip("imagecorruptions", reason="needs the optional imagecorruptions-imaug package")
    pytest.importorskip("skimage.data")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def table() -> str:
    _needs_reference()
    out = _run("--sizes", "32", "--batch32", "4", "--ref32", "1", "--severities", "5", "--threads", "1", "2",
               "--skip-fidelity", "--names", *CORRUPTIONS)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _cells(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| corruption")]
    return {r[0]: r[1:] for r in rows}


@pytest.mark.reference
def test_every_corruption_has_both_thread_counts_and_consistent_ratios(table):
    header = next(line for line in table.splitlines() if line.startswith("| corruption"))
    assert "ours, 1 thread |" in header and "ours, 2 threads |" in header
    rows = _cells(table)
    assert set(CORRUPTIONS) <= set(rows)
    for name in CORRUPTIONS:
        cells = rows[name]
        assert len(cells) == 6, (name, cells)
        for ours, ref, ratio in (cells[0:3], cells[3:6]):
            ours, ref, ratio = float(ours), float(ref), float(ratio.rstrip("x"))
            assert ours > 0 and ref > 0
            # printed to 3 and 2 decimals, the ratio to 1
            low = max(ref - 0.005, 0) / (ours + 0.0005)
            high = (ref + 0.005) / max(ours - 0.0005, 1e-9)
            assert low - 0.05 <= ratio <= high + 0.05, (name, cells)


@pytest.mark.reference
def test_sums_add_up_and_the_full_set_time_follows_from_them(table):
    rows = _cells(table)
    total = rows["**sum of the 15**"]
    for k, threads in enumerate((1, 2)):
        ours = sum(float(rows[n][3 * k]) for n in CORRUPTIONS)
        ref = sum(float(rows[n][3 * k + 1]) for n in CORRUPTIONS)
        assert abs(float(total[3 * k]) - ours) <= 15 * 0.0005 + 0.005
        assert abs(float(total[3 * k + 1]) - ref) <= 15 * 0.005 + 0.05
        label = f"{threads} thread{'s' if threads > 1 else ''}"
        seconds = float(re.search(rf"\(ours, {label}, at the ms per image of batches of 4\): (\d+) s", table).group(1))
        assert abs(seconds - ours * 5 * 10_000 / 1e3) <= 0.5 + 15 * 0.0005 * 50, (seconds, ours)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_corruptions", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.reference
def test_each_timed_block_runs_at_its_thread_count_in_alternating_order(monkeypatch):
    _needs_reference()
    cv2 = pytest.importorskip("cv2")
    threadpoolctl = pytest.importorskip("threadpoolctl")

    bench = _load_bench()
    calls = []  # (corruption, who, images, torch threads, OpenCV threads, BLAS threads) of every call

    def record(who):
        def fn(images, name, *args, **kwargs):
            blas = {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
            calls.append((name, who, len(images), torch.get_num_threads(), cv2.getNumThreads(), blas))
        return fn

    monkeypatch.setattr(bench, "corrupt", record("ours"))
    monkeypatch.setattr(bench, "reference", record("ref"))
    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        with threadpoolctl.threadpool_limits(limits=None):  # restores the BLAS pools' sizes on exit
            bench.speed(["fog", "frost"], [1, 2], 32, 3, 2, "cifar", rounds=3, threads=(1, 2))
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])
    for i, name in enumerate(["fog", "frost"]):
        mine = [c for c in calls if c[0] == name]
        # warm-up: ours on the whole batch (3 images) and the reference on one, per severity
        assert [(who, n) for _, who, n, *_ in mine[:4]] == [("ours", 3), ("ref", 1)] * 2
        timed = mine[4:]
        # per round one block per thread count, each with both sides at both severities (the
        # reference on 2 images); the counts alternate by round and corruption, the side that
        # goes first by round, corruption and severity
        blocks = [timed[k : k + 4] for k in range(0, len(timed), 4)]
        assert len(blocks) == 6
        orders = [(1, 2) if (r + i) % 2 == 0 else (2, 1) for r in range(3)]
        assert [b[0][3] for b in blocks] == [t for pair in orders for t in pair]
        for k, block in enumerate(blocks):
            threads = block[0][3]
            assert all(c[3] == threads and c[4] == threads and c[5] <= {threads} for c in block), block
            r = k // 2
            first = [("ours", "ref") if (r + i + j) % 2 == 0 else ("ref", "ours") for j in (0, 1)]
            assert [c[1] for c in block] == [w for pair in first for w in pair]
            assert [c[2] for c in block] == [3 if c[1] == "ours" else 2 for c in block]


@pytest.mark.parametrize("args, message", [
    (("--threads", "0"), "--threads [0]"),
    (("--threads", "2", "2"), "--threads [2, 2]"),
    (("--names", "fogg"), "unknown corruption(s) ['fogg']; valid choices: gaussian_noise"),
    (("--severities", "6"), "--severities [6]: valid choices are 1 to 5, each once"),
    (("--severities", "3", "3"), "--severities [3, 3]: valid choices are 1 to 5, each once"),
    (("--names", "fog", "fog"), "--names ['fog', 'fog']: each corruption once"),
    (("--rounds", "0"), "--rounds 0: it must be at least 1"),
    (("--batch224", "4"), "--ref224 8: it must not exceed --batch224 (4)"),
    (("--fidelity-images", "9", "--skip-speed"), "--fidelity-images 9: valid choices are 1 to 8"),
])
def test_bad_arguments_are_refused_naming_the_value(args, message, monkeypatch, capsys):
    # in this process (the checks run before any work): the script's main() with these arguments
    bench = _load_bench()
    monkeypatch.setattr(bench, "set_threads", lambda n: pytest.fail("set threads before refusing"))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])  # set_threads (above) comes before any work
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
