"""The README main job: the embedded Fashion-MNIST benchmark with the shipped model.

    python scripts/main_job.py                        # 500 test images per cell
    python scripts/main_job.py --num-examples 10000   # the full benchmark
    python scripts/main_job.py -- stream=continual    # extra overrides for evaluate.py

Two Hydra multiruns of scripts/evaluate.py, then scripts/report.py:
1. prepare: adapt=source over the four corruption groups (noise, blur, weather, digital) as
   parallel jobs; they corrupt every cell once and compute the source model's accuracies,
   both cached on disk (cache_dir) for the next step;
2. the methods adapt=tent,recalibrate,batch,blend,ema,source on all 15 corruptions x 5 severities,
   as parallel jobs that read the cached cells;
3. the report: prints the recovered-accuracy table and where the plots are.
Jobs run on the joblib launcher (--jobs processes of --threads torch threads each; on a
2-core machine 2 x 1 is much faster than 1 x 2) or, without hydra-joblib-launcher, one
after the other. Re-running skips the jobs that already finished. When a step fails, the
next steps still run (the report shows the failed jobs) and the exit status is 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
# the longest jobs first (tent: a backward pass per batch; recalibrate: two passes per cell), so
# that the parallel jobs finish together
METHODS = "tent,recalibrate,batch,blend,ema,source"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-examples", type=int, default=500,
                        help="test images per cell (default 500; 10000 = the full benchmark)")
    parser.add_argument("--out", default="outputs/main", help="output directory (outputs/main)")
    parser.add_argument("--methods", default=METHODS, help=f"adapt methods ({METHODS})")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (1)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for evaluate.py")
    args = parser.parse_args(argv)
    out = Path(args.out) / f"n{args.num_examples}"
    start = time.perf_counter()
    launcher = []
    if args.jobs > 1 and importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher"):
        launcher = ["hydra/launcher=local", f"hydra.launcher.n_jobs={args.jobs}"]
    common = [f"num_examples={args.num_examples}", f"num_threads={args.threads}", *launcher,
              *args.overrides]
    evaluate = [sys.executable, str(SCRIPTS / "evaluate.py"), "-m"]
    commands = {
        "prepare": [*evaluate, "adapt=source", "corruption=noise,blur,weather,digital",
                    f"hydra.sweep.dir={out / 'prepare'}", *common],
        "methods": [*evaluate, f"adapt={args.methods}", f"hydra.sweep.dir={out / 'methods'}",
                    *common],
        "report": [sys.executable, str(SCRIPTS / "report.py"), str(out / "methods"),
                   "--out", str(out / "report")],
    }
    failed = []
    for name, command in commands.items():  # a failed step does not stop the next ones
        print("+", " ".join(command), flush=True)
        status = subprocess.call(command)
        if status != 0:
            failed.append(f"{name} (exit status {status})")
    print(f"\nmain job finished in {time.perf_counter() - start:.0f} s")
    if failed:
        print(f"main job failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
