"""``tta corrupt``: a corrupted copy of a dataset in the CIFAR-10-C layout (docs/corruptions.md).

    tta corrupt dataset=fashion_mnist out_dir=data/fashion_mnist-c
    tta corrupt dataset=cifar10 dataset.root=~/data corruptions=[fog,snow] preset=cifar

(``python scripts/make_corrupted.py ...`` is the same app.) Writes <out_dir>/<corruption>.npy
(uint8, 5 N x H x W x C, severity-major), a record of its arguments <out_dir>/<corruption>.json,
and <out_dir>/labels.npy. Files finished with the same arguments are skipped, so an interrupted
run resumes; files made with other arguments (seed, preset, num_examples, ...) are refused,
naming the differences, unless overwrite=true.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import tta
from tta.apps import config_dir
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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="make_corrupted")
def main(cfg: DictConfig) -> None:
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


if __name__ == "__main__":
    main()
