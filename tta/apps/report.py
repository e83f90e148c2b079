"""``tta report``: tables and plots over finished evaluation runs (docs/evaluation.md#reports).

    tta report RUN_OR_SWEEP_DIR... --out DIR

(``python scripts/report.py ...`` is the same app.) Writes DIR/report.md, DIR/report.csv and
PNG plots (recovered_heatmap.png, accuracy_vs_severity.png, prior_batch_grid.png when a sweep
varied blend's prior and the batch size; one set per model/dataset/protocol group), then
prints the recovered-accuracy table. The runs' warnings, failed jobs and unreadable results
files are listed in the report and on stderr; failed or unreadable jobs make the exit status 1
(the report of the others is still written), no readable run at all makes it 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tta.evaluation.report import write_report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the report on ``argv`` (default ``sys.argv[1:]``; ``prog``: the command's name in
    messages) and returns the exit status: 0, or 1 with failed or unreadable jobs; usage errors
    and no readable run exit with status 2 (argparse)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                        help="run or sweep directories (searched for results.json)")
    parser.add_argument("--out", required=True, help="directory for the report files")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.paths, args.out, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"Accuracy recovered over the source model (percentage points), "
          f"{len(report['runs'])} run(s):\n")
    print(report["recovered"])
    print("\nReport and plots:")
    for path in report["files"]:
        print(f"  {path}")
    for warning in report["warnings"]:
        print(f"warning: {warning['path']}: {warning['warning']}", file=sys.stderr)
    for error in report["errors"]:
        print(f"{error['kind']}: {error['file']}: {error['error_type']}: {error['error']}",
              file=sys.stderr)
    if report["errors"]:
        print(f"{len(report['errors'])} failed or unreadable job(s), listed in "
              f"{Path(args.out) / 'report.md'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
