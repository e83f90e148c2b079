#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine: the Fashion-MNIST package, a venv in .venv and tta-bn
# (import name tta) with its test, reference, launchers and sklearn extras. Safe to re-run: every
# step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[setup] installing dataset-fashion-mnist (Debian package)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "[setup] dataset-fashion-mnist is not installed and apt-get is not usable here;" \
             "tta will fall back to a torchvision download of Fashion-MNIST" >&2
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.tta-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing tta-bn and its dependencies into .venv (torch is large: a few minutes)"
    .venv/bin/python -m pip install -q --disable-pip-version-check 'torch==2.14.1' 'torchvision==0.29.1'
    # the distribution was called `tta` before (a name taken on PyPI by another project): drop it
    if .venv/bin/python -m pip show tta >/dev/null 2>&1; then
        .venv/bin/python -m pip uninstall -q -y --disable-pip-version-check tta
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,reference,launchers,sklearn]'
    touch "$stamp"
fi
