"""``tta evaluate``: BatchNorm test-time adaptation on a corrupted benchmark (docs/evaluation.md).

    tta evaluate dataset=fashion_mnist adapt=blend adapt.prior=16 stream=reset \
        corruption.names=[fog,contrast] corruption.severities=[5] num_examples=1000 \
        batch_size=64 hydra.run.dir=outputs/example
    tta evaluate -m adapt=source,batch,blend adapt.prior=1,4,16,64 batch_size=1,8,64

(``python scripts/evaluate.py ...`` is the same app.) Writes results.json and results.csv into
the job's Hydra output directory, or error.json when the job fails. A failure prints one line
(TTA_DEBUG=1: the traceback) and exits with status 1; in a multirun the other jobs go on and
the sweep exits with status 1 at the end, naming the failed jobs (tta.evaluation.sweeps).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tta._extras import check_extra
from tta.apps import DEBUG_ENV, config_dir, debugging, error_line
from tta.evaluation.pipeline import run_benchmark
from tta.evaluation.results import ERROR_JSON, finished, run_lock, sync_results_csv, write_error
from tta.evaluation.sweeps import record_job, sweep_recorded  # registers ${tta.job_dirname:}

logger = logging.getLogger(__name__)

# options that change how a job runs, not what it measures: left out of the stored config,
# so changing them does not invalidate finished results
RUN_OPTIONS = ("force", "progress", "num_threads", "device", "cache_dir")
# conf/hydra/launcher presets -> the Hydra plugin they need (extra "launchers")
LAUNCHERS = {"local": "hydra_plugins.hydra_joblib_launcher",
             "slurm": "hydra_plugins.hydra_submitit_launcher",
             "slurm_gpu": "hydra_plugins.hydra_submitit_launcher"}


def as_list(value: Any) -> list[Any]:
    """A scalar (``corruption.names=fog``, ``corruption.severities=3``) is a one-element list."""
    if value is None or isinstance(value, (str, int, float)):
        return [value]
    return list(value)


def protocol_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the run options: what results.json records and what a
    re-run compares to decide whether a job is already done."""
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return {k: v for k, v in config.items() if k not in RUN_OPTIONS}


def run(cfg: DictConfig, output_dir: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """Maps the config onto :func:`tta.evaluation.run_benchmark`'s plain arguments."""
    adapt = {k: v for k, v in OmegaConf.to_container(cfg.adapt, resolve=True).items() if k != "name"}
    stream = {k: v for k, v in OmegaConf.to_container(cfg.stream, resolve=True).items() if k != "name"}
    d, m, c = cfg.dataset, cfg.model, cfg.corruption
    cache_dir = None if cfg.cache_dir is None else Path(cfg.cache_dir).expanduser().resolve()
    return run_benchmark(
        output_dir,
        dataset=d.name, dataset_root=d.root, dataset_split=d.split,
        dataset_kwargs=OmegaConf.to_container(d.kwargs, resolve=True),
        precorrupted=d.precorrupted, clean_dataset=d.clean, clean_dataset_root=d.clean_root,
        model=m.name, pretrained=m.pretrained, weights=m.weights,
        model_kwargs={"num_classes": m.num_classes, "in_channels": m.in_channels,
                      **OmegaConf.to_container(m.kwargs, resolve=True)},
        corruptions=list(c.names), severities=list(c.severities), preset=c.preset,
        method=cfg.adapt.name, method_params=adapt, stream=cfg.stream.name, stream_params=stream,
        batch_size=cfg.batch_size, num_examples=cfg.num_examples, seed=cfg.seed,
        device=cfg.device, num_threads=cfg.num_threads, cache_dir=cache_dir,
        baseline=cfg.baseline, force=cfg.force, progress=cfg.progress,
        label_free=OmegaConf.to_container(cfg.label_free, resolve=True), config=config,
    )


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def app(cfg: DictConfig) -> dict[str, Any] | None:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    error_file = None
    try:
        cfg.corruption.names = as_list(cfg.corruption.names)
        cfg.corruption.severities = as_list(cfg.corruption.severities)
        config = protocol_config(cfg)
        # refusals leave the directory alone: another run owns it (OutputDirLocked), or it
        # holds results of another config (ValueError; force=true overwrites them)
        with run_lock(output_dir):
            sync_results_csv(output_dir)
            if not cfg.force:
                finished(output_dir, config)
            try:
                results = run(cfg, output_dir, config)
            except Exception as error:
                write_error(output_dir, error, config)
                error_file = output_dir / ERROR_JSON
                raise
    except Exception as error:
        return failed(error, output_dir, error_file, hydra_cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        record_job(hydra_cfg.sweep.dir, hydra_cfg.job.num, output_dir)
    mean = results["mean"]
    print(f"{results['method']} / {results['stream']}: accuracy {100 * mean['accuracy']:.2f}% "
          f"(source {100 * mean['source_accuracy']:.2f}%, recovered "
          f"{100 * mean['recovered']:+.2f} points) -> {output_dir / 'results.json'}")
    return results


def failed(error: Exception, output_dir: Path, error_file: Path | None, hydra_cfg: Any) -> None:
    """One log line for a failed job; exit status 1 for a single run, a record for the sweep
    (:class:`tta.evaluation.sweeps.SweepStatus`) in a multirun."""
    logger.error("job failed: %s: %s (%s; %s=1 shows the traceback)", type(error).__name__,
                 error_line(error), f"recorded in {error_file}" if error_file else f"{output_dir} unchanged",
                 DEBUG_ENV)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        record_job(hydra_cfg.sweep.dir, hydra_cfg.job.num, output_dir, error)
    if debugging() or (multirun and not sweep_recorded()):
        raise error
    if not multirun:
        raise SystemExit(1)
    return None


def check_launchers(args: list[str]) -> None:
    """ImportError naming the ``launchers`` extra when a ``hydra/launcher=<preset>`` override
    needs a Hydra plugin that is not installed (Hydra's own error only lists the presets)."""
    for arg in args:
        if arg.startswith("hydra/launcher="):
            for name in arg.partition("=")[2].split(","):
                if name in LAUNCHERS:
                    check_extra("launchers", f"hydra/launcher={name}", LAUNCHERS[name])


def main() -> dict[str, Any] | None:
    """The app on the command line (``sys.argv``: Hydra overrides and options)."""
    check_launchers(sys.argv[1:])
    return app()


if __name__ == "__main__":
    main()
