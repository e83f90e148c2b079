"""The applications behind the ``tta`` command (:mod:`tta.cli`) and ``scripts/*.py``:
``evaluate`` and ``make_corrupted`` (``tta corrupt``) and ``train_source`` are Hydra apps,
``report`` an argparse one."""
from __future__ import annotations

import os
from pathlib import Path

CONFIG_NAME = "evaluate.yaml"  # present in every config directory


def config_dir() -> str:
    """The absolute path of the Hydra config directory: ``tta/conf`` inside an installed wheel
    (the repository's ``conf/``, mapped into the package at build time, pyproject.toml), else
    ``conf/`` next to the ``tta`` package (a clone, or an editable install).

    Raises:
        FileNotFoundError: neither directory holds ``evaluate.yaml``.
    """
    package = Path(__file__).resolve().parents[1]
    candidates = (package / "conf", package.parent / "conf")
    for candidate in candidates:
        if (candidate / CONFIG_NAME).is_file():
            return str(candidate)
    raise FileNotFoundError(f"no Hydra configs ({CONFIG_NAME}) in {' or '.join(map(str, candidates))}; "
                            "reinstall tta-bn or run from a complete clone")


DEBUG_ENV = "TTA_DEBUG"  # TTA_DEBUG=1: a failing app raises (full traceback) instead of one line


def debugging() -> bool:
    """Whether ``TTA_DEBUG`` asks for full tracebacks (set and not ``0``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(error: BaseException) -> str:
    """``error`` as the one line an app prints when it fails: an OmegaConf error (whose text
    spans 3 lines: message, ``full_key``, ``object_type``) becomes one line naming the key to set,
    e.g. ``dataset.root is not set: pass dataset.root=<value>``; any other error is its text, its
    lines joined by ``"; "``."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    key = getattr(error, "full_key", None)
    if not isinstance(error, OmegaConfBaseException) or not key:
        return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()).replace(":; ", ": ")
    if isinstance(error, MissingMandatoryValue):
        return f"{key} is not set: pass {key}=<value>"
    # e.g. 'KeyError raised while resolving interpolation: "Environment variable 'X' not found"'
    reason = str(error.msg).splitlines()[0].split("raised while resolving interpolation: ", 1)[-1].strip('"')
    return f"{key} could not be resolved ({reason}): pass {key}=<value>"
