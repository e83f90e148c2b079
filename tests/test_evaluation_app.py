"""scripts/evaluate.py as a Hydra app: the fixed command line, multiruns on the basic and
joblib launchers, a failing job, resume and skip, one-line errors, scalar list overrides
(subprocesses on digits, a few seconds each). More on sweeps: tests/test_sweeps.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["dataset=digits", "model=resnet8", "corruption.names=[fog]", "corruption.severities=[2]",
         "num_examples=32", "batch_size=16", "progress=false"]


def app_env(cwd: Path, **env: str) -> dict[str, str]:
    """The environment of an app under test: this checkout, a cache in ``cwd``, no TTA_DEBUG."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TTA_")},
            "PYTHONPATH": str(ROOT), "TTA_CACHE_DIR": str(cwd / "cache"), "HYDRA_FULL_ERROR": "1",
            **env}


def evaluate(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args],
                          cwd=cwd, env=app_env(cwd, **env), capture_output=True, text=True,
                          timeout=600)


def results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("results.json")}


@pytest.mark.slow
def test_fixed_command_line(tmp_path):
    import tta

    try:
        tta.models.load_pretrained("fashion_mnist")
        tta.data.get_dataset("fashion_mnist", num_examples=1)
    except (FileNotFoundError, OSError) as error:
        pytest.skip(f"shipped model or Fashion-MNIST not available: {error}")
    command = ("dataset=fashion_mnist adapt=blend adapt.prior=16 stream=reset "
               "corruption.names=[fog,contrast] corruption.severities=[5] num_examples=1000 "
               "batch_size=64 hydra.run.dir=outputs/example").split()
    done = evaluate(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "outputs/example/results.json").read_text())
    assert out["method"] == "blend" and out["params"]["prior"] == 16
    assert [(c["corruption"], c["severity"]) for c in out["cells"]] == [("fog", 5), ("contrast", 5)]
    assert all(c["num_examples"] == 1000 for c in out["cells"])
    assert out["clean_accuracy"] > 0.8  # the shipped model works
    assert (tmp_path / "outputs/example/results.csv").exists()


@pytest.mark.slow
def test_multirun_failing_job_and_resume(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "adapt=blend", "adapt.prior=-1,4", *SMALL, f"hydra.sweep.dir={sweep}"]
    done = evaluate(args, tmp_path)
    # every job ran, then the sweep failed, naming the failed job on its last line
    assert done.returncode == 1, done.stderr[-3000:]
    # job directories are named by their overrides
    good, = sweep.glob("adapt.prior=4,adapt=blend,*")
    bad, = sweep.glob("adapt.prior=-1,adapt=blend,*")
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("1 of 2 jobs failed") and bad.name in summary
    assert good.name not in summary and "adapt.prior must be >= 0" in summary
    assert results(sweep).keys() == {good.name}
    error = json.loads((bad / "error.json").read_text())
    assert error["error_type"] == "ValueError" and "adapt.prior must be >= 0" in error["error"]
    stamp = (good / "results.json").stat().st_mtime_ns
    again = evaluate(args, tmp_path)  # re-run: the finished job is skipped, the bad one fails
    assert again.returncode == 1, again.stderr[-3000:]
    assert (good / "results.json").stat().st_mtime_ns == stamp
    assert "skipping" in (good / "evaluate.log").read_text()
    forced = evaluate([*args, "force=true"], tmp_path)
    assert forced.returncode == 1
    assert (good / "results.json").stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_joblib_launcher_multirun(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    done = evaluate(["-m", "hydra/launcher=local", "adapt=source,batch", *SMALL,
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = results(sweep)
    assert {r["method"] for r in runs.values()} == {"source", "batch"}
    source, batch = (next(r for r in runs.values() if r["method"] == m) for m in ("source", "batch"))
    # the two processes computed the same source model on the same corrupted cell
    assert source["cells"][0]["source_accuracy"] == batch["cells"][0]["source_accuracy"]
    assert source["cells"][0]["accuracy"] == source["cells"][0]["source_accuracy"]


@pytest.mark.slow
def test_single_run_failure_prints_one_line_and_records_error(tmp_path):
    done = evaluate([*SMALL, "corruption.severities=[6]", "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr
    assert "invalid severity 6" in lines[0] and str(tmp_path / "run" / "error.json") in lines[0]
    error = json.loads((tmp_path / "run" / "error.json").read_text())
    assert "valid severities are: 1, 2, 3, 4, 5" in error["error"]
    assert "Traceback" in error["traceback"]
    debug = evaluate([*SMALL, "corruption.severities=[6]", "hydra.run.dir=run"], tmp_path,
                     TTA_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "invalid severity 6" in debug.stderr


@pytest.mark.slow
def test_scalar_names_and_severities_are_one_element_lists(tmp_path):
    small = [a for a in SMALL if not a.startswith("corruption.")]
    done = evaluate([*small, "corruption.names=fog", "corruption.severities=3",
                     "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(c["corruption"], c["severity"]) for c in out["cells"]] == [("fog", 3)]
    assert out["config"]["corruption"]["names"] == ["fog"]
    assert out["config"]["corruption"]["severities"] == [3]
    # the same job written as lists: the same config, so it is skipped
    again = evaluate([*small, "corruption.names=[fog]", "corruption.severities=[3]",
                      "hydra.run.dir=run"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping" in again.stderr


@pytest.mark.slow
def test_the_documented_prior_sweep_composes_for_every_method(tmp_path):
    sweep = tmp_path / "sweep"
    done = evaluate(["-m", "adapt=source,batch,blend", "adapt.prior=1,16", "batch_size=1,8",
                     *[a for a in SMALL if not a.startswith("batch_size")],
                     "corruption.severities=[5]", "num_examples=8", f"hydra.sweep.dir={sweep}"],
                    tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list(results(sweep).values())
    assert len(runs) == 3 * 2 * 2 and not list(sweep.rglob("error.json"))
    blend = {(r["params"]["prior"], r["batch_size"]): r for r in runs if r["method"] == "blend"}
    assert set(blend) == {(1, 1), (1, 8), (16, 1), (16, 8)}
