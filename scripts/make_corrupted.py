"""Export a corrupted copy of a dataset in the CIFAR-10-C layout (docs/corruptions.md).

    python scripts/make_corrupted.py dataset=fashion_mnist out_dir=data/fashion_mnist-c
    python scripts/make_corrupted.py dataset=cifar10 dataset.root=~/data corruptions=[fog,snow] preset=cifar

Writes <out_dir>/<corruption>.npy (uint8, 5 N x H x W x C, severity-major) and
<out_dir>/labels.npy; finished files are skipped, so an interrupted run resumes.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

try:
    import tta  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import tta
from tta.data.corrupted import export_corrupted

logger = logging.getLogger("make_corrupted")


def load_uint8(dataset, num_examples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_examples`` images as uint8 (N, C, H, W) and their labels."""
    n = len(dataset) if num_examples is None else min(int(num_examples), len(dataset))
    images = getattr(dataset, "images", None)
    targets = getattr(dataset, "targets", None)
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and isinstance(targets, torch.Tensor):
        return images[:n], targets[:n]  # in-memory datasets: no per-item loop
    pairs = [dataset[i] for i in range(n)]
    stack = torch.stack([p[0] for p in pairs])
    if stack.is_floating_point():
        stack = (stack.clamp(0, 1) * 255).round().to(torch.uint8)
    return stack, torch.tensor([int(p[1]) for p in pairs], dtype=torch.long)


@hydra.main(version_base="1.3", config_path="../conf", config_name="make_corrupted")
def main(cfg: DictConfig) -> None:
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    d = cfg.dataset
    kwargs = OmegaConf.to_container(d.kwargs, resolve=True)
    dataset = tta.data.get_dataset(d.name, split=d.split, root=d.root, **kwargs)
    images, labels = load_uint8(dataset, cfg.num_examples)
    logger.info("%s/%s: %d images of shape %s", d.name, d.split, len(images), tuple(images.shape[1:]))
    paths = export_corrupted(
        images, labels, Path(cfg.out_dir).expanduser(), list(cfg.corruptions),
        preset=cfg.preset, seed=int(cfg.seed), batch_size=int(cfg.batch_size), rgb=bool(cfg.rgb),
        progress=bool(cfg.progress),
    )
    print(f"wrote {len(paths)} corruptions and labels.npy to {Path(cfg.out_dir).expanduser()}")


if __name__ == "__main__":
    main()
