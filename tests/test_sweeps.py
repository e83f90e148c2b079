"""Sweeps and job directories of scripts/evaluate.py: the exit status of a sweep with a failed
job (basic, joblib and submitit launchers), job directory names that cannot merge or escape,
one run per output directory (lock), the results.json/results.csv pair, superseded outcomes,
and main_job.py's exit status. Apps run as subprocesses on digits (a few seconds each)."""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import tta.evaluation.results as results_module
from test_evaluation_app import ROOT, SMALL, app_env, evaluate, results
from tta.evaluation.results import (OutputDirLocked, run_lock, supersede, sync_results_csv,
                                    write_error, write_results)
from tta.evaluation.sweeps import job_dirname

SEVERITIES_2_6 = [a for a in SMALL if not a.startswith("corruption.severities")] + [
    "corruption.severities=[2],[6]"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- job directory names --------------------------------------------------------------------

def test_job_dirname_keeps_ordinary_names_and_escapes_the_rest():
    ordinary = "adapt.prior=16,adapt=blend,batch_size=8,corruption.names=[fog,contrast]"
    assert job_dirname(ordinary) == ordinary  # re-running an existing sweep finds its jobs
    assert job_dirname("") == "defaults"
    assert job_dirname("adapt=source,dataset.root=../../data") == \
        "adapt=source,dataset.root=..%2F..%2Fdata"
    long = "dataset.root=" + "x" * 300
    assert job_dirname(long) == ("dataset.root=" + "x" * 229 + "~"
                                 + hashlib.sha256(long.encode()).hexdigest()[:12])
    tricky = ["a=x/y", "a=x%2Fy", "a=x%252Fy", "a=x~y", "a=x y", "a='x y'", ".a=1", "a=ä",
              "a=\\x", "a=x\0y", "a=..", "..", ".", long, long[:-1] + "y", long + "x"]
    names = [job_dirname(t) for t in tricky]
    assert len(set(names)) == len(tricky)  # different overrides, different directories
    for name in names:
        assert "/" not in name and "\0" not in name and not name.startswith(".")
        assert 0 < len(name.encode()) <= 255


def test_the_resolver_names_the_sweep_subdir():
    cfg = OmegaConf.create({"d": "dataset.root=../x", "subdir": "${tta.job_dirname:${d}}"})
    assert cfg.subdir == "dataset.root=..%2Fx"


@pytest.mark.slow
def test_override_values_cannot_merge_or_escape_job_directories(tmp_path):
    (tmp_path / "data").mkdir()
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    sweep = cwd / "sweep"
    small = [a for a in SMALL if not a.startswith("batch_size")]
    # before: `..` cancelled the part naming batch_size, so the two ../../data jobs shared one
    # directory, and ../../../x put its jobs outside the sweep directory
    done = evaluate(["-m", "batch_size=8,16", "dataset.root=../../data,../../../x", *small,
                     f"hydra.sweep.dir={sweep}"], cwd)
    assert done.returncode == 1, done.stderr[-3000:]  # the ../../../x jobs: no such root
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    assert set(tmp_path.iterdir()) == {tmp_path / "data", tmp_path / "a"}
    assert set(cwd.iterdir()) == {sweep, cwd / "cache"}
    runs = results(sweep)
    assert sorted(r["batch_size"] for r in runs.values()) == [8, 16]
    assert all("..%2F..%2Fdata" in name for name in runs)
    failed = [j for j in jobs if (j / "error.json").exists()]
    assert len(failed) == 2 and all("..%2F..%2F..%2Fx" in j.name for j in failed)


# --- a failed job fails the sweep -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit"])  # basic: test_evaluation_app.py
def test_a_failed_job_fails_the_sweep_after_all_jobs_ran(tmp_path, launcher):
    pytest.importorskip(f"hydra_plugins.hydra_{launcher}_launcher")
    sweep = tmp_path / "sweep"
    plugin = {"joblib": "local", "submitit": "submitit_local"}[launcher]
    done = evaluate(["-m", f"hydra/launcher={plugin}", *SEVERITIES_2_6,
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    good, = (p.parent for p in sweep.glob("*/results.json"))
    bad, = (p.parent for p in sweep.glob("*/error.json"))
    assert "corruption.severities=[2]" in good.name and "corruption.severities=[6]" in bad.name
    summary = done.stderr.strip().splitlines()[-1]
    assert summary == (f"1 of 2 jobs failed in {sweep}: {bad.name} (ValueError: invalid "
                       "severity 6; valid severities are: 1, 2, 3, 4, 5)")
    assert not (sweep / ".tta-sweep").exists()  # the jobs' reports are cleaned up


@pytest.mark.slow
def test_main_job_runs_every_step_and_exits_nonzero_on_a_failed_job(tmp_path):
    out = tmp_path / "main"
    small = [a for a in SEVERITIES_2_6 if not a.startswith("num_examples")]
    done = subprocess.run(  # the severity 6 jobs of both steps fail
        [sys.executable, str(ROOT / "scripts" / "main_job.py"), "--num-examples", "16",
         "--methods", "source", "--jobs", "1", "--out", str(out), "--", *small],
        cwd=tmp_path, env=app_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "main job failed: prepare (exit status 1), methods (exit status 1)" in done.stderr
    assert (out / "n16" / "report" / "report.md").exists()  # the report still ran
    assert [r["method"] for r in results(out / "n16" / "methods").values()] == ["source"]


# --- one run per output directory -----------------------------------------------------------

def test_run_lock_refuses_a_second_holder_at_once(tmp_path):
    import threading

    errors = []
    with run_lock(tmp_path / "run"):
        with run_lock(tmp_path / "run"):  # re-entrant in the holding thread
            pass
        thread = threading.Thread(target=lambda: errors.append(_try_lock(tmp_path / "run")))
        thread.start()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert isinstance(errors[0], OutputDirLocked)
    assert str((tmp_path / "run").resolve()) in str(errors[0])
    assert _try_lock(tmp_path / "run") is None  # released


def _try_lock(directory: Path) -> Exception | None:
    try:
        with run_lock(directory):
            return None
    except OutputDirLocked as error:
        return error


@pytest.mark.slow
def test_a_locked_output_directory_is_refused_and_left_alone(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):  # another run owns the directory
        done = evaluate([*SMALL, f"hydra.run.dir={run}"], tmp_path)
    assert done.returncode == 1
    line, = done.stderr.strip().splitlines()
    assert f"OutputDirLocked: output directory {run.resolve()} is in use by another run" in line
    assert not {"results.json", "results.csv", "error.json"} & {p.name for p in run.iterdir()}

    # in a sweep: the locked job fails, the other one finishes, the sweep exits 1
    sweep = tmp_path / "sweep"
    # the seed=1 job's directory: its overrides but progress (hydra.job.config.override_dirname)
    name = job_dirname(",".join(sorted([*SMALL[:-1], "seed=1"])))
    assert SMALL[-1] == "progress=false"
    with run_lock(sweep / name):
        done = evaluate(["-m", *SMALL, "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"1 of 2 jobs failed in {sweep}: {name} (OutputDirLocked" in done.stderr
    assert [r["seed"] for r in results(sweep).values()] == [0]


# --- results.json and results.csv ------------------------------------------------------------

def fake_results(accuracy: float) -> dict:
    cells = [{"corruption": "fog", "severity": s, "accuracy": accuracy / s} for s in (1, 2)]
    return {"status": "ok", "method": "source", "params": {}, "cells": cells}


def test_a_kill_between_the_two_writes_never_pairs_them_wrong(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_results(run, fake_results(0.5))
    first = json.loads((run / "results.json").read_text())

    def killed(path, obj):
        raise KeyboardInterrupt  # after results.csv, before results.json

    monkeypatch.setattr(results_module, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        write_results(run, fake_results(0.25))  # a force=true overwrite
    monkeypatch.undo()
    # no results.json: no pair to read (before: the old results.json with the new CSV)
    assert not (run / "results.json").exists()
    sync_results_csv(run)  # what a resume does under the lock
    assert not (run / "results.csv").exists()
    # nothing lost: the first outcome is superseded as a pair, the orphan CSV beside it
    old_json, = (run / "superseded").glob("*.results.json")
    first_csv, orphan_csv = sorted((run / "superseded").glob("*.results.csv"))
    assert json.loads(old_json.read_text()) == first
    assert first_csv.name.split(".results")[0] == old_json.name.split(".results")[0]
    assert {r["run_id"] for r in read_csv(first_csv)} == {first["run_id"]}
    assert [float(r["accuracy"]) for r in read_csv(orphan_csv)] == [0.25, 0.125]


def test_sync_rewrites_a_csv_that_belongs_to_another_run(tmp_path):
    run = tmp_path / "run"
    write_results(run, fake_results(0.5))
    kept = json.loads((run / "results.json").read_text())
    other = tmp_path / "other"
    write_results(other, fake_results(0.25))
    (run / "results.csv").write_bytes((other / "results.csv").read_bytes())  # an old-style pair
    sync_results_csv(run)
    rows = read_csv(run / "results.csv")
    assert {r["run_id"] for r in rows} == {kept["run_id"]}
    assert [float(r["accuracy"]) for r in rows] == [0.5, 0.25]


def test_a_failure_supersedes_the_results_and_both_record_finished_at(tmp_path):
    run = tmp_path / "run"
    write_results(run, fake_results(0.5))
    ok = json.loads((run / "results.json").read_text())
    write_error(run, ValueError("bad"), {"x": 1})
    assert {p.name for p in run.iterdir()} == {"error.json", "superseded"}
    error = json.loads((run / "error.json").read_text())
    assert error["finished_at"] > ok["finished_at"]  # UTC ISO 8601: ordered as strings
    assert ok["finished_at"].endswith("+00:00")
    old, = (run / "superseded").glob("*.results.json")
    assert json.loads(old.read_text()) == ok
    assert list(run.rglob("results.json")) == []  # readers that glob cannot pick it up
    moved, = supersede(run)
    assert moved.name.endswith(".error.json") and json.loads(moved.read_text()) == error
    assert not (run / "error.json").exists()


@pytest.mark.slow
def test_the_job_directory_shows_the_latest_outcome(tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, f"hydra.run.dir={run}"]
    assert evaluate(args, tmp_path).returncode == 0
    first = json.loads((run / "results.json").read_text())
    # a CSV that does not belong to results.json is rewritten from it by the next run
    (run / "results.csv").write_text("run_id,accuracy\nsomething-else,0.0\n")
    resumed = evaluate(args, tmp_path)
    assert resumed.returncode == 0 and "skipping" in resumed.stderr
    rows = read_csv(run / "results.csv")
    assert {r["run_id"] for r in rows} == {first["run_id"]}
    assert [float(r["accuracy"]) for r in rows] == [c["accuracy"] for c in first["cells"]]
    # a re-run of the same job that fails (device is a run option: the same config)
    failed = evaluate([*args, "force=true", "device=nonsense"], tmp_path)
    assert failed.returncode == 1
    assert not (run / "results.json").exists() and not (run / "results.csv").exists()
    error = json.loads((run / "error.json").read_text())
    assert error["finished_at"] > first["finished_at"]
    old, = (run / "superseded").glob("*.results.json")
    assert json.loads(old.read_text()) == first
