"""Hydra sweeps of ``scripts/evaluate.py``: safe job directory names and a failing exit status.

* ``${tta.job_dirname:${hydra.job.override_dirname}}`` (``hydra.sweep.subdir`` in
  conf/evaluate.yaml) names a job's directory by its overrides, escaped so that every job
  gets its own directory inside ``hydra.sweep.dir`` whatever the values contain.
* :class:`SweepStatus` (a Hydra callback) makes a multirun exit with status 1, after all its
  jobs ran, when any job failed or started without reporting an outcome (killed), printing
  one line that names them. Jobs report through small files under
  ``<sweep dir>/.tta-sweep/<sweep id>/`` (:func:`record_job`), so this works for jobs in other
  processes and on other machines (joblib, submitit).
* A sweep directory must not hold a job outcome (``results.json`` / ``error.json``) at its
  top (:func:`check_sweep_dir`): reports would take the whole sweep for that one job and its
  real jobs for nested, ignored outcomes. A multirun refuses to start in such a directory and
  fails at its end when one appeared there.

Importing this module registers the resolver (evaluate.py imports it; Hydra's launchers import
it in their worker processes when they unpickle the callback).
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import string
import sys
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tta.evaluation.results import ERROR_JSON, RESULTS_JSON, read_json, write_json

__all__ = ["job_dirname", "record_job", "check_sweep_dir", "SweepStatus", "SWEEP_ID_ENV"]

SWEEP_ID_ENV = "TTA_SWEEP_ID"  # set by SweepStatus for the jobs of the running multirun
MAX_NAME = 255  # bytes of a file name on common file systems
_SAFE = frozenset(string.ascii_letters + string.digits + "._-+=,@:[]{}")
_RECORDS = ".tta-sweep"


def job_dirname(overrides: str) -> str:
    """A job directory name for Hydra's ``override_dirname`` (``adapt=blend,batch_size=8``).

    Ordinary overrides keep their name. Any other character (``/``, ``%``, ``~``, spaces,
    quotes, non-ASCII; a leading ``.``) is percent-encoded as its UTF-8 bytes, so the name is
    one path component (``..`` cannot escape) and different overrides give different names. A
    name longer than 255 characters is cut and ends with ``~`` and 12 hex digits of the
    sha256 of the full override string. No overrides give ``defaults``.
    """
    if not isinstance(overrides, str):
        raise TypeError(f"job_dirname expects the override string, got {overrides!r}")
    if not overrides:
        return "defaults"
    name = "".join(c if c in _SAFE and not (i == 0 and c == ".")
                   else "".join(f"%{b:02X}" for b in c.encode())
                   for i, c in enumerate(overrides))
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(overrides.encode()).hexdigest()[:12]
        name = f"{name[:MAX_NAME - 13]}~{digest}"
    return name


if not OmegaConf.has_resolver("tta.job_dirname"):
    OmegaConf.register_new_resolver("tta.job_dirname", job_dirname)


def record_job(sweep_dir: str | os.PathLike, job_num: int, job_dir: str | os.PathLike,
               error: BaseException | None = None, *, status: str | None = None) -> None:
    """Reports a finished multirun job to :class:`SweepStatus` (in the process that started
    the sweep); nothing is recorded outside a sweep started with it (``TTA_SWEEP_ID`` unset).
    ``status="started"`` (written by :meth:`SweepStatus.on_job_start`) marks a job that has
    not reported yet: it counts as failed unless its outcome replaces it."""
    sweep_id = os.environ.get(SWEEP_ID_ENV)
    if not sweep_id:
        return
    write_json(Path(sweep_dir) / _RECORDS / sweep_id / f"{job_num}.json", {
        "job": os.path.relpath(job_dir, sweep_dir),
        "status": status or ("ok" if error is None else "failed"),
        "error": None if error is None else f"{type(error).__name__}: {error}",
    })


def check_sweep_dir(sweep_dir: str | os.PathLike) -> None:
    """Raises ValueError when ``sweep_dir`` holds a job outcome (``results.json`` or
    ``error.json``) at its top, naming it: every job of the sweep would then look nested
    inside that one job's directory and be ignored by reports."""
    stray = [str(Path(sweep_dir) / name) for name in (RESULTS_JSON, ERROR_JSON)
             if (Path(sweep_dir) / name).exists()]
    if stray:
        raise ValueError(f"the sweep directory {sweep_dir} holds {' and '.join(stray)} at its top, as if "
                         f"it were one job's directory: reports would take the sweep's jobs for outcomes "
                         f"nested inside that job and ignore them; move it away or choose another "
                         f"hydra.sweep.dir")


def sweep_recorded() -> bool:
    """Whether a :class:`SweepStatus` collects the outcomes of this multirun's jobs."""
    return bool(os.environ.get(SWEEP_ID_ENV))


class SweepStatus(Callback):
    """Exits a multirun with status 1 when any of its jobs failed or never reported (killed)
    (after all of them ran), printing ``N of M jobs failed: <job dir> (<error>); ...`` to
    stderr, or when the sweep directory holds a job outcome at its top
    (:func:`check_sweep_dir`; then the multirun also refuses to start)."""

    def __init__(self) -> None:
        self.sweep_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # Hydra turns a callback's exception into a warning: exit instead, before any job
            check_sweep_dir(str(config.hydra.sweep.dir))
        except ValueError as error:
            print(error, file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        self.sweep_id = uuid.uuid4().hex
        os.environ[SWEEP_ID_ENV] = self.sweep_id  # inherited by joblib workers and sbatch
        # a launcher that raises (a job killed by Slurm) skips on_multirun_end: remove the
        # sweep's records at exit all the same
        atexit.register(shutil.rmtree, Path(str(config.hydra.sweep.dir)) / _RECORDS / self.sweep_id,
                        ignore_errors=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = config.hydra
        if hydra.mode == RunMode.MULTIRUN:
            record_job(str(hydra.sweep.dir), hydra.job.num, str(hydra.runtime.output_dir),
                       status="started")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_id is None:
            return
        os.environ.pop(SWEEP_ID_ENV, None)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        directory = sweep_dir / _RECORDS / self.sweep_id
        records = [read_json(p) for p in sorted(directory.glob("*.json"))]
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):  # only when no other sweep's records are there
            directory.parent.rmdir()
        failed = [r for r in records if r["status"] != "ok"]
        for record in failed:
            if record["status"] == "started":
                record["error"] = "it started but reported no outcome (killed?)"
        messages = []
        if failed:
            jobs = "; ".join(f"{r['job']} ({r['error']})" for r in failed)
            messages.append(f"{len(failed)} of {len(records)} jobs failed in {sweep_dir}: {jobs}")
        try:
            check_sweep_dir(sweep_dir)
        except ValueError as error:
            messages.append(str(error))
        if messages:
            print("\n".join(messages), file=sys.stderr, flush=True)
            raise SystemExit(1)
