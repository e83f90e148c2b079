"""Tables and plots over finished evaluation runs: the app :mod:`tta.apps.report` (the same as
``tta report``; docs/evaluation.md#reports).

    python scripts/report.py RUN_OR_SWEEP_DIR... --out DIR
"""
import sys
from pathlib import Path

try:
    import tta  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tta.apps.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
