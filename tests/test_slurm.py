"""scripts/evaluate.py sweeps through the Slurm launcher preset (conf/hydra/launcher/slurm.yaml)
on a real Slurm cluster: results equal to the same jobs run locally, a re-submitted sweep skips
its finished jobs, a failed job fails the sweep, and so does a job that Slurm kills (seen through
`sacct`, which is why scripts/slurm_up.sh sets up accounting). CI (.ci/run) brings up a one-node
cluster with scripts/slurm_up.sh and sets TTA_REQUIRE_SLURM=1, which turns the skip below into a
failure.

Digits, ResNet-8, 32 images, 1 CPU per job; about 80 s in all."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_evaluation_app import ROOT, SMALL, app_env, evaluate, results

pytestmark = pytest.mark.slow

REQUIRE_ENV = "TTA_REQUIRE_SLURM"
# the CPU preset as is, with requests that fit a small node
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
         "hydra.launcher.timeout_min=10", "num_threads=1"]
JOBS = ["adapt=source,batch", *SMALL]
VOLATILE = {"seconds", "images_per_second", "run_id", "finished_at"}  # differ between runs


def slurm_problem() -> str | None:
    """Why this machine cannot run the Slurm tests (None: it can)."""
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return "hydra-submitit-launcher is not installed (pip install 'tta-bn[launchers]')"
    for command in ("sbatch", "sacct", "scontrol", "sinfo"):
        if shutil.which(command) is None:
            return f"{command} not found: Slurm is not installed (bash scripts/slurm_up.sh)"
    checks = [(["scontrol", "ping"], "slurmctld does not answer"),
              (["sacct", "-n", "-X", "-S", "now"], "sacct does not work (submitit needs it)"),
              (["sinfo", "-h", "-t", "idle,mixed,allocated,completing", "-o", "%n"],
               "no node takes jobs")]
    for command, problem in checks:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return f"{problem}: {' '.join(command)} timed out (bash scripts/slurm_up.sh)"
        if done.returncode != 0 or (command[0] == "sinfo" and not done.stdout.strip()):
            said = ((done.stdout + done.stderr).strip().splitlines() or [""])[0]
            return f"{problem}: {' '.join(command)} -> {said!r} (bash scripts/slurm_up.sh)"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = slurm_problem()
    if problem and os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_ENV}=1 but Slurm cannot run jobs here: {problem}")
    if problem:
        pytest.skip(f"no usable Slurm cluster: {problem}")


def sacct(array_ids: set[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, node list)} of the Slurm jobs of the given arrays (no job steps), once
    none is pending or running any more (a task's result file can come before its end)."""
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,NodeList",
                               "-j", ",".join(sorted(array_ids))],
                              capture_output=True, text=True, check=True, timeout=30)
        jobs = {job: (state, nodes) for job, state, nodes in
                (line.split("|") for line in done.stdout.splitlines() if line)}
        ended = not any(s in ("PENDING", "RUNNING", "COMPLETING") for s, _ in jobs.values())
        if ended or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


def array_ids(sweep: Path) -> set[str]:
    """The Slurm array jobs submitit submitted for this sweep (its folders ``<array>_<task>``)."""
    folders = (p.name.split("_") for p in (sweep / ".submitit").iterdir())
    return {f[0] for f in folders if len(f) == 2 and f[0].isdigit() and f[1].isdigit()}


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory):
    """The sweep on Slurm (cache in ``cwd/cache``, one file system for all nodes here) and the
    same jobs in one local process with a cache of its own, as the reference."""
    cwd, local_cwd = tmp_path_factory.mktemp("slurm"), tmp_path_factory.mktemp("local")
    sweep = cwd / "sweep"
    done = evaluate(["-m", *SLURM, *JOBS, f"hydra.sweep.dir={sweep}"], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    local = evaluate(["-m", *JOBS, f"hydra.sweep.dir={local_cwd / 'sweep'}"], local_cwd)
    assert local.returncode == 0, local.stderr[-3000:]
    return cwd, sweep, results(local_cwd / "sweep")


def test_slurm_jobs_give_the_results_of_local_jobs(first_sweep):
    cwd, sweep, local = first_sweep
    runs = results(sweep)
    assert len(runs) == 2 and runs.keys() == local.keys()
    assert sorted(r["method"] for r in runs.values()) == ["batch", "source"]
    for name, run in runs.items():
        assert {k: v for k, v in run.items() if k not in VOLATILE} == \
            {k: v for k, v in local[name].items() if k not in VOLATILE}, name
        for cell in run["cells"]:  # the accuracy is the confusion matrix's diagonal
            confusion = np.array(cell["confusion"], dtype=np.float64)
            assert confusion.sum() == cell["num_examples"] == 32
            assert cell["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum(),
                                                     abs=1e-12)
    # the jobs ran as one Slurm array on the node, and used the cache directory they were given
    arrays = array_ids(sweep)
    assert len(arrays) == 1
    jobs = sacct(arrays)
    assert sorted(jobs) == [f"{next(iter(arrays))}_{i}" for i in range(2)]
    assert set(jobs.values()) == {("COMPLETED", "localhost")}
    assert any((cwd / "cache").rglob("*.npy"))


def test_a_resubmitted_sweep_skips_the_finished_jobs(first_sweep):
    cwd, sweep, _ = first_sweep
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep.glob("*/results.*")}
    assert len(before) == 4  # results.json and results.csv of both jobs
    arrays = array_ids(sweep)
    done = evaluate(["-m", *SLURM, *JOBS, f"hydra.sweep.dir={sweep}"], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    # the jobs went through Slurm again, found their results and left them as they were
    new, = array_ids(sweep) - arrays
    assert set(sacct({new}).values()) == {("COMPLETED", "localhost")}
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep.glob("*/results.*")} == before
    for job in {p.parent for p in before}:
        assert (job / "evaluate.log").read_text().count("skipping:") == 1, job.name
        assert not (job / "superseded").exists()


def test_a_failed_slurm_job_fails_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    done = evaluate(["-m", *SLURM, "adapt=blend", "adapt.prior=-1,4", *SMALL,
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    good, = sweep.glob("adapt.prior=4,adapt=blend,*")
    bad, = sweep.glob("adapt.prior=-1,adapt=blend,*")
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"1 of 2 jobs failed in {sweep}: {bad.name} (ValueError: ")
    assert "adapt.prior must be >= 0" in summary and good.name not in summary
    assert results(sweep).keys() == {good.name}
    error = json.loads((bad / "error.json").read_text())
    assert error["error_type"] == "ValueError"
    assert not (sweep / ".tta-sweep").exists()  # the jobs' reports are cleaned up


def test_a_job_killed_by_slurm_fails_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "-m", *SLURM, *JOBS,
               f"hydra.sweep.dir={sweep}"]
    with subprocess.Popen(command, cwd=tmp_path, env=app_env(tmp_path), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as sweeping:
        killed, deadline = None, time.monotonic() + 120
        while killed is None and sweeping.poll() is None and time.monotonic() < deadline:
            arrays = array_ids(sweep) if (sweep / ".submitit").is_dir() else set()
            for array in arrays:  # job 1 once it runs (python and torch take seconds to start)
                running = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i", "-j",
                                          f"{array}_1"], capture_output=True, text=True,
                                         timeout=30).stdout
                if running.strip() == f"{array}_1":
                    subprocess.run(["scancel", f"{array}_1"], check=True, timeout=30)
                    killed = f"{array}_1"
            time.sleep(0.1)
        try:
            _, stderr = sweeping.communicate(timeout=300)  # without sacct: waits forever
        except subprocess.TimeoutExpired:
            sweeping.kill()
            raise
    assert killed is not None, stderr[-3000:]
    assert sweeping.returncode == 1, stderr[-3000:]
    assert f"Job {killed} " in stderr and "state: CANCELLED" in stderr
    assert sacct({killed.split("_")[0]})[killed][0].startswith("CANCELLED")
    assert [r["method"] for r in results(sweep).values()] == ["source"]  # job 0 finished
    assert not list((sweep / ".tta-sweep").glob("*"))  # the sweep's records are removed at exit
