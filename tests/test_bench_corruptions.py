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

pytest.importorskip("imagecorruptions", reason="needs the optional imagecorruptions-imaug package")
pytest.importorskip("skimage.data")

pytestmark = pytest.mark.reference

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_corruptions.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def table() -> str:
    out = _run("--sizes", "32", "--batch32", "4", "--ref32", "1", "--severities", "5", "--threads", "1", "2",
               "--skip-fidelity", "--names", *CORRUPTIONS)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _cells(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| corruption")]
    return {r[0]: r[1:] for r in rows}


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


def test_sums_add_up_and_the_full_set_time_follows_from_them(table):
    rows = _cells(table)
    total = rows["**sum of the 15**"]
    for k, threads in enumerate((1, 2)):
        ours = sum(float(rows[n][3 * k]) for n in CORRUPTIONS)
        ref = sum(float(rows[n][3 * k + 1]) for n in CORRUPTIONS)
        assert abs(float(total[3 * k]) - ours) <= 15 * 0.0005 + 0.005
        assert abs(float(total[3 * k + 1]) - ref) <= 15 * 0.005 + 0.05
        label = f"{threads} thread{'s' if threads > 1 else ''}"
        seconds = float(re.search(rf"\(ours, {label}\): (\d+) s", table).group(1))
        assert abs(seconds - ours * 5 * 10_000 / 1e3) <= 0.5 + 15 * 0.0005 * 50, (seconds, ours)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_corruptions", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_each_timed_block_runs_at_its_thread_count_in_alternating_order(monkeypatch):
    import cv2

    bench = _load_bench()
    calls = []  # (who, torch threads, OpenCV threads) of every call, warm-up included

    def record(who):
        def fn(*args, **kwargs):
            calls.append((who, torch.get_num_threads(), cv2.getNumThreads()))
        return fn

    monkeypatch.setattr(bench, "corrupt", record("ours"))
    monkeypatch.setattr(bench, "reference", record("ref"))
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        with threadpool_limits(limits=None):  # restores the BLAS pools' sizes on exit
            bench.speed(["fog"], [1, 2], 32, 2, 1, "cifar", rounds=3, threads=(1, 2))
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])
    timed = calls[4:]  # after the warm-up: one call of each side per severity
    # per round, one block per thread count (order 1 2, then 2 1, then 1 2), each with both sides
    # at both severities, the side that goes first alternating with round + severity
    blocks = [timed[i : i + 4] for i in range(0, len(timed), 4)]
    assert len(blocks) == 6
    assert [b[0][1] for b in blocks] == [1, 2, 2, 1, 1, 2]
    for k, block in enumerate(blocks):
        threads = block[0][1]
        assert all(t == threads and c == threads for _, t, c in block), block
        r = k // 2
        expected = [("ours", "ref") if (r + s) % 2 == 0 else ("ref", "ours") for s in (1, 2)]
        assert [who for who, _, _ in block] == [w for pair in expected for w in pair]


@pytest.mark.parametrize("args, message", [
    (("--threads", "0"), "--threads [0]"),
    (("--threads", "2", "2"), "--threads [2, 2]"),
    (("--names", "fogg"), "unknown corruption(s) ['fogg']; valid choices: gaussian_noise"),
    (("--severities", "6"), "--severities [6]: valid choices are 1 to 5"),
    (("--names", "fog", "fog"), "--names ['fog', 'fog']: each corruption once"),
    (("--rounds", "0"), "--rounds 0: it must be at least 1"),
    (("--batch224", "4"), "--ref224 8: it must not exceed --batch224 (4)"),
    (("--fidelity-images", "9"), "--fidelity-images 9: valid choices are 1 to 8"),
])
def test_bad_arguments_are_refused_naming_the_value(args, message, monkeypatch, capsys):
    # in this process (the checks run before any work): the script's main() with these arguments
    bench = _load_bench()
    monkeypatch.setattr(bench, "set_threads", lambda n: pytest.fail("set threads before refusing"))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args, "--skip-fidelity"])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
