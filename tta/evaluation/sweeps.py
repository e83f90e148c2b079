"""Hydra sweeps of ``scripts/evaluate.py``: safe job directory names and a failing exit status.

* ``${tta.job_dirname:${hydra.job.override_dirname}}`` (``hydra.sweep.subdir`` in
  conf/evaluate.yaml) names a job's directory by its overrides, escaped so that every job
  gets its own directory inside ``hydra.sweep.dir`` whatever the values contain.
* :class:`SweepStatus` (a Hydra callback) makes a multirun exit with status 1, after all its
  jobs ran, when any job failed, printing one line that names the failed jobs. Jobs report
  through small files under ``<sweep dir>/.tta-sweep/<sweep id>/`` (:func:`record_job`), so
  this works for jobs in other processes and on other machines (joblib, submitit).

Importing this module registers the resolver (evaluate.py imports it; Hydra's launchers import
it in their worker processes when they unpickle the callback).
"""
from __future__ import annotations

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
from omegaconf import DictConfig, OmegaConf

from tta.evaluation.results import read_json, write_json

__all__ = ["job_dirname", "record_job", "SweepStatus", "SWEEP_ID_ENV"]

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
               error: BaseException | None = None) -> None:
    """Reports a finished multirun job to :class:`SweepStatus` (in the process that started
    the sweep); nothing is recorded outside a sweep started with it (``TTA_SWEEP_ID`` unset)."""
    sweep_id = os.environ.get(SWEEP_ID_ENV)
    if not sweep_id:
        return
    write_json(Path(sweep_dir) / _RECORDS / sweep_id / f"{job_num}.json", {
        "job": os.path.relpath(job_dir, sweep_dir),
        "status": "ok" if error is None else "failed",
        "error": None if error is None else f"{type(error).__name__}: {error}",
    })


def sweep_recorded() -> bool:
    """Whether a :class:`SweepStatus` collects the outcomes of this multirun's jobs."""
    return bool(os.environ.get(SWEEP_ID_ENV))


class SweepStatus(Callback):
    """Exits a multirun with status 1 when any of its jobs failed (after all of them ran),
    printing ``N of M jobs failed: <job dir> (<error>); ...`` to stderr."""

    def __init__(self) -> None:
        self.sweep_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_id = uuid.uuid4().hex
        os.environ[SWEEP_ID_ENV] = self.sweep_id  # inherited by joblib workers and sbatch

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
        if failed:
            jobs = "; ".join(f"{r['job']} ({r['error']})" for r in failed)
            print(f"{len(failed)} of {len(records)} jobs failed in {sweep_dir}: {jobs}",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
