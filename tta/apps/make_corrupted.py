"""``tta corrupt``: a corrupted copy of a dataset in the CIFAR-10-C layout (docs/corruptions.md).

    tta corrupt dataset=fashion_mnist out_dir=data/fashion_mnist-c
    tta corrupt dataset=cifar10 dataset.root=~/data corruptions=[fog,snow] preset=cifar

(``python scripts/make_corrupted.py ...`` is the same app.) Writes <out_dir>/<corruption>.npy
(uint8, 5 N x H x W x C, severity-major), a record of its arguments <out_dir>/<corruption>.json,
and <out_dir>/labels.npy. Files finished with the same arguments are skipped, so an interrupted
run resumes; files made with other arguments (seed, preset, num_examples, ...) are refused,
naming the differences, unless overwrite=true. The settings are checked before any data are
read; a failure prints one line and exits with status 1 (``TTA_DEBUG=1``: the traceback).
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import tta
from tta.apps import DEBUG_ENV, config_dir, debugging, error_line
from tta.data.base import check_num_examples
from tta.data.corrupted import export_corrupted

logger = logging.getLogger(__name__)


def load_uint8(dataset, num_examples: int | None, what: str = "the dataset") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_examples`` images as uint8 (N, C, H, W) and their labels; ``num_examples``
    must lie in 1..len(dataset) (ValueError naming ``what`` and its size)."""
    n = check_num_examples(num_examples, len(dataset), what)
    images = getattr(dataset, "images", None)
    targets = getattr(dataset, "targets", None)
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and isinstance(targets, torch.Tensor):
        return images[:n], targets[:n]  # in-memory datasets: no per-item loop
    pairs = [dataset[i] for i in range(n)]
    stack = torch.stack([p[0] for p in pairs])
    if stack.is_floating_point():
        stack = (stack.clamp(0, 1) * 255).round().to(torch.uint8)
    return stack, torch.tensor([int(p[1]) for p in pairs], dtype=torch.long)


def check_config(cfg: DictConfig) -> None:
    """The corruption names (:func:`tta.evaluation.pipeline.check_cells`), preset, seed and the
    plain settings, before any data are read: ValueError / TypeError naming the setting and the
    valid values (``num_examples`` is checked against the split's size once it is known)."""
    from tta.corruptions import PRESETS, SEVERITIES
    from tta.evaluation.pipeline import _check_arguments, check_cells  # lazy: a heavy import

    if not OmegaConf.is_list(cfg.corruptions):
        raise ValueError(f"corruptions must be a list of names, e.g. [fog,snow], got {cfg.corruptions!r}")
    check_cells(list(cfg.corruptions), list(SEVERITIES))
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; valid choices: {', '.join(PRESETS)} or null")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {cfg.seed!r}")
    _check_arguments(ints={"batch_size": cfg.batch_size, "num_threads": cfg.num_threads},
                     bools={"rgb": cfg.rgb, "overwrite": cfg.overwrite, "progress": cfg.progress},
                     strs={"out_dir": cfg.out_dir, "dataset.name": cfg.dataset.name}, optional={},
                     mappings={"dataset.kwargs": cfg.dataset.kwargs})


def run(cfg: DictConfig) -> list[Path]:
    """Exports as configured (:func:`tta.data.corrupted.export_corrupted`); returns the paths of
    the corruption files. Raises ValueError / TypeError for a bad setting (before any data are
    read) or for files of ``out_dir`` made with other arguments (before anything is written)."""
    check_config(cfg)
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    d = cfg.dataset
    kwargs = OmegaConf.to_container(d.kwargs, resolve=True)
    dataset = tta.data.get_dataset(d.name, split=d.split, root=d.root, **kwargs)
    images, labels = load_uint8(dataset, cfg.num_examples, f"the {d.name} {d.split} split")
    logger.info("%s/%s: %d images of shape %s", d.name, d.split, len(images), tuple(images.shape[1:]))
    paths = export_corrupted(
        images, labels, Path(cfg.out_dir).expanduser(), list(cfg.corruptions),
        preset=cfg.preset, seed=cfg.seed, batch_size=cfg.batch_size, rgb=bool(cfg.rgb),
        overwrite=bool(cfg.overwrite), progress=bool(cfg.progress),
        source={"dataset": d.name, "split": d.split, "root": d.root, "kwargs": kwargs,
                "num_examples": cfg.num_examples},
    )
    print(f"wrote {len(paths)} corruptions and labels.npy to {Path(cfg.out_dir).expanduser()}")
    return paths


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="make_corrupted")
def main(cfg: DictConfig) -> None:
    """The app: :func:`run`; a failure prints one line and exits with status 1 (``TTA_DEBUG=1``:
    the traceback)."""
    try:
        run(cfg)
    except Exception as error:
        if debugging():
            raise
        logger.error("export failed: %s: %s (%s=1 shows the traceback)", type(error).__name__,
                     error_line(error), DEBUG_ENV)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
