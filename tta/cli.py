"""The ``tta`` command (installed by the ``tta-bn`` wheel; README.md, docs/evaluation.md).

    tta evaluate dataset=digits model=resnet8 num_examples=100    # Hydra overrides; -m: a sweep
    tta report outputs/sweep --out outputs/report
    tta corrupt dataset=fashion_mnist out_dir=data/fashion_mnist-c
    tta train-source dataset=digits epochs=1 output=digits.pt

Each command is an app of :mod:`tta.apps` (``scripts/<app>.py`` runs the same one); the
arguments after the command go to it unchanged: Hydra overrides and options (``--help``,
``-m``, ``--cfg job``) for evaluate, corrupt and train-source, ``--help`` lists report's. The
exit status is the app's (1: a failed job or report, 2: a usage error).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (app module, whether it is a Hydra app, summary)
COMMANDS = {
    "evaluate": ("tta.apps.evaluate", True,
                 "adaptation methods on a corrupted benchmark (Hydra overrides; -m: a sweep)"),
    "report": ("tta.apps.report", False, "tables and plots over finished runs: DIRS --out DIR"),
    "corrupt": ("tta.apps.make_corrupted", True,
                "export a corrupted dataset in the CIFAR-10-C layout (Hydra overrides)"),
    "train-source": ("tta.apps.train_source", True,
                     "train a source model and save its checkpoint (Hydra overrides)"),
}


def main(argv: list[str] | None = None) -> int:
    """Runs ``tta COMMAND ARGS...``; returns the exit status (Hydra apps exit non-zero
    themselves on failure, raising SystemExit)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from tta import __version__

    parser = argparse.ArgumentParser(
        prog="tta", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Test-time adaptation through BatchNorm statistics: evaluation, reports, "
                    "corrupted datasets, source models.",
        epilog="commands:\n" + "\n".join(f"  {name:14s}{summary}" for name, (_, _, summary) in COMMANDS.items())
               + "\n\n'tta COMMAND --help' shows the options of a command.")
    parser.add_argument("--version", action="version", version=f"tta-bn {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), help="see the commands below")
    parser.parse_args(argv[:1])  # --help, --version, or a valid command (else exit status 2)
    command, args = argv[0], argv[1:]
    module, hydra_app, _ = COMMANDS[command]
    app = importlib.import_module(module)
    if not hydra_app:
        return app.main(args, prog=f"tta {command}")
    saved = sys.argv
    sys.argv = [f"tta {command}", *args]  # Hydra reads its overrides from sys.argv
    try:
        app.main()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
