"""Optional dependencies: the extras of the ``tta-bn`` distribution (pyproject.toml)."""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator

DISTRIBUTION = "tta-bn"
# extra -> {module it provides: pip package}
EXTRAS = {
    "sklearn": {"sklearn": "scikit-learn"},
    "launchers": {"hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher",
                  "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher"},
}


def _missing(extra: str, feature: str, module: str) -> ImportError:
    return ImportError(f"{feature} needs {EXTRAS[extra][module]}, which is not installed: "
                       f"pip install '{DISTRIBUTION}[{extra}]'")


def _check(extra: str) -> dict[str, str]:
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; valid: {sorted(EXTRAS)}")
    return EXTRAS[extra]


@contextmanager
def require_extra(extra: str, feature: str) -> Iterator[None]:
    """Imports inside the block that need ``extra``: a missing package raises an ImportError
    naming ``feature`` and the install command.

        with require_extra("sklearn", "the digits dataset"):
            from sklearn.datasets import load_digits

    Raises:
        ImportError: a module of the extra is not installed (other import errors pass unchanged).
        ValueError: ``extra`` is not one of :data:`EXTRAS`.
    """
    modules = _check(extra)
    try:
        yield
    except ModuleNotFoundError as error:
        name = error.name or ""  # the module, one of its submodules or its missing parent
        module = next((m for m in modules if name == m or name.startswith(m + ".") or m.startswith(name + ".")),
                      None)
        if module is None:
            raise
        raise _missing(extra, feature, module) from error


def check_extra(extra: str, feature: str, module: str) -> None:
    """Raises the ImportError of :func:`require_extra` when ``module`` (one of ``extra``'s) is
    not installed, without importing it (e.g. a Hydra plugin that Hydra loads itself)."""
    if module not in _check(extra):
        raise ValueError(f"{module!r} is not provided by extra {extra!r}; valid: {sorted(EXTRAS[extra])}")
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        found = False
    if not found:
        raise _missing(extra, feature, module)
