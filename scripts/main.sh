#!/usr/bin/env bash
# README main job: set up, then run the embedded Fashion-MNIST benchmark and print the
# recovered-accuracy table. Arguments go to scripts/main_job.py (e.g. --num-examples 10000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/main_job.py "$@"
