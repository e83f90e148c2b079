"""scripts/bench_gpu.sh (and through it scripts/bench_bn.py and scripts/bench_methods.py) in its
CPU smoke mode, so that the GPU benchmark cannot rot between GPU runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tta

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_gpu.sh"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=environ,
                          timeout=600)


@pytest.fixture(scope="module")
def smoke() -> str:
    out = _run("--smoke")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout[out.stdout.index("===== summary"):]


def _rows(text: str, first: str = "") -> list[list[str]]:
    """The cells of the markdown table rows of ``text`` whose first cell starts with ``first``."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows if r[0].startswith(first)]


def test_smoke_prints_batchnorm_ratios_eager_and_compiled(smoke):
    rows = _rows(smoke, "resnet8")
    assert [r[2] for r in rows] == ["eager", "compiled (eager)"]
    for row in rows:
        assert float(row[3]) > 0  # torch eval ms
        batch, blend, ema = (float(v) for v in row[5:8])
        assert all(0 < v < 100 for v in (batch, blend, ema)), row
    assert float(rows[0][4]) > 0 and rows[1][4] == "-"  # source: eager only


def test_smoke_prints_images_per_second_of_every_method_with_and_without_amp(smoke):
    tables = re.split(r"\n(?=resnet8 \(4, 3, 32, 32\) on cpu, amp )", smoke)[1:]
    assert [re.match(r".*? on cpu, amp (\w+):", t).group(1) for t in tables] == ["none", "bf16"]
    for table in tables:
        rows = {r[0]: r for r in _rows(table) if r[0] in tta.list_methods()}
        assert sorted(rows) == sorted(tta.list_methods())
        source = float(rows["source"][1])
        for method, row in rows.items():
            ips, ratio = float(row[1]), float(row[2])
            assert ips > 0
            # images/s printed to 1 decimal, the ratio to 2: the ratio of the unrounded rates lies
            # between these bounds, and the printed ratio within 0.005 of it
            low, high = (ips - 0.05) / (source + 0.05), (ips + 0.05) / max(source - 0.05, 1e-9)
            assert low - 0.005 - 1e-9 <= ratio <= high + 0.005 + 1e-9, (method, row, source)


def test_smoke_reports_every_part_ok(smoke):
    statuses = [r[1] for r in _rows(smoke) if r[0].startswith(("BatchNorm", "tta.adapt"))]
    assert statuses == ["ok"] * 3


def test_a_failing_part_fails_the_script():
    out = _run("--smoke", PYTHON="false")  # every part exits 1 at once
    assert out.returncode == 1
    assert out.stdout.count("| FAILED: exit status 1 |") == 3


def test_bad_argument_is_refused():
    out = _run("--fast")
    assert out.returncode == 2
    assert "'--fast'" in out.stderr and "--smoke" in out.stderr
