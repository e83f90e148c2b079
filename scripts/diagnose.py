"""Diagnose unlabelled data for a model: how far has it moved, where, and how accurate is the
model on it before and after adaptation, without a single label of it.

    python scripts/diagnose.py --data path/to/images            # a folder of image files
    python scripts/diagnose.py --data fashion_mnist --corruption fog --severity 3 --num-examples 1000
    python scripts/diagnose.py --model resnet14 --weights ckpt.pt --data fashion_mnist --plot diag.png

Prints the shift diagnosis (per BatchNorm layer: symmetric KL and W2 of the per-channel
Gaussians against the model's source statistics), the label-free accuracy estimates with
source statistics (before adaptation) and batch statistics (after), and the prior strength N
``tta.select_prior`` chooses for ``blend``. The estimator is fitted once on labelled clean
source images (by default test images 5000..5999 of the model's dataset, never the evaluated
ones) and their synthetic corruptions, then kept as JSON (``--estimator``) and reused. See
docs/label_free.md.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

import tta
from tta._atomic import atomic_file
from tta.label_free import AccuracyEstimator, fit_accuracy_estimator, select_prior

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
logger = logging.getLogger("diagnose")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fashion_mnist",
                   help="a shipped model (tta.models.load_pretrained names) or a registry name with --weights "
                        "(default: fashion_mnist)")
    p.add_argument("--weights", help="checkpoint for a registry model (tta.models.get_model(name, weights=...))")
    p.add_argument("--data", required=True, help="a folder of image files (searched recursively) or a dataset name")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--offset", type=int, default=0, help="first dataset image (default 0)")
    p.add_argument("--num-examples", type=int, default=None, help="images to use (default: all)")
    p.add_argument("--corruption", help="corrupt the dataset images with this tta corruption (a demo shift)")
    p.add_argument("--severity", type=int, default=3, help="severity of --corruption, 1..5 (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the adaptation (default 64)")
    p.add_argument("--estimator", type=Path, default=None,
                   help="fitted estimator JSON; fitted and written there if missing "
                        "(default: outputs/label_free/estimator_<model>_b<batch size>.json)")
    p.add_argument("--fit-dataset", help="labelled clean source data for fitting (default: the model's dataset)")
    p.add_argument("--fit-range", default="5000:6000", help="START:STOP of --fit-dataset's test split (default 5000:6000)")
    p.add_argument("--plot", type=Path, help="write the per-layer divergence plot here (png/pdf)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def _load_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.weights is None:
        from tta.models.shipped import PRETRAINED

        if args.model not in PRETRAINED:
            raise SystemExit(f"--model {args.model!r} is not a shipped model ({', '.join(sorted(PRETRAINED))}); "
                             "give --weights for a registry model")
        return tta.models.load_pretrained(args.model)
    return tta.models.get_model(args.model, weights=args.weights).eval()


def _input_channels(model: torch.nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return 3 if conv is None else conv.in_channels


def _folder_images(root: Path, channels: int, limit: int | None) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    from tta.data.base import ImageReader

    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    files = files[:limit]
    read = ImageReader(files[0])
    images = [read(f) for f in files]
    if channels == 1:
        images = [image.convert("L") for image in images]
    return torch.stack([pil_to_tensor(image) for image in images])  # uint8 (N, C, H, W)


def _dataset(name: str, split: str, start: int, stop: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    data = tta.data.get_dataset(name, split=split)
    if not hasattr(data, "images"):
        raise SystemExit(f"dataset {name!r} is not an in-memory image dataset; export it to a folder and pass the folder")
    stop = len(data.images) if stop is None else stop
    if not 0 <= start < stop <= len(data.images):
        raise SystemExit(f"range {start}:{stop} outside the {len(data.images)} images of {name} {split}")
    return data.images[start:stop], data.targets[start:stop]


def _estimator(args: argparse.Namespace, model: torch.nn.Module) -> AccuracyEstimator:
    path = args.estimator or Path("outputs/label_free") / f"estimator_{args.model}_b{args.batch_size}.json"
    if path.is_file():
        logger.info("using the fitted estimator %s", path)
        return AccuracyEstimator.load(path)
    info = tta.models.model_info(model) or {}
    name = args.fit_dataset or info.get("dataset")
    if name is None:
        raise SystemExit("cannot tell the model's source dataset: give --fit-dataset (labelled clean source data)")
    start, stop = (int(v) for v in args.fit_range.split(":"))
    images, targets = _dataset(name, "test", start, stop)
    x = images.float() / 255
    print(f"fitting the accuracy estimator on {len(x)} labelled clean {name} test images ({start}:{stop}) and their "
          f"19 x 5 synthetic corruptions (once; saved to {path}) ...", file=sys.stderr)
    estimator = fit_accuracy_estimator(model, list(zip(x.split(args.batch_size), targets.split(args.batch_size))),
                                       progress=True)
    estimator.save(path)
    return estimator


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_model(args)
    root = Path(args.data).expanduser()
    if root.is_dir():
        images = _folder_images(root, _input_channels(model), args.num_examples)
        what = f"{len(images)} images from {root}"
    elif root.exists():
        raise SystemExit(f"--data {args.data}: not a directory (give a folder of images or a dataset name)")
    else:
        stop = None if args.num_examples is None else args.offset + args.num_examples
        images, _ = _dataset(args.data, args.split, args.offset, stop)  # the labels are dropped here
        what = f"{len(images)} {args.data} {args.split} images {args.offset}:{args.offset + len(images)}"
        fit_start, fit_stop = (int(v) for v in args.fit_range.split(":"))
        if args.split == "test" and args.offset < fit_stop and args.offset + len(images) > fit_start:
            logger.warning("the evaluated images overlap the estimator's fitting images (%s)", args.fit_range)
    if args.corruption:
        images = tta.corrupt(images, args.corruption, args.severity, seed=0)
        what += f", {args.corruption} severity {args.severity}"
    batches = (images.float() / 255).split(args.batch_size)
    estimator = _estimator(args, model)
    result = estimator.estimate(model, batches, progress=True)
    prior = select_prior(model, batches)
    print(f"data: {what}; model: {args.model}; batch size {args.batch_size}\n")
    print(result.diagnosis)
    print()
    print(f"estimated accuracy without labels (method {estimator.method}):")
    print(f"  before adaptation (source statistics): {100 * result.accuracy['source']:6.2f} %")
    print(f"  after adaptation (batch statistics):   {100 * result.accuracy['batch']:6.2f} %")
    print(f"  clean accuracy on the fitting data:    {100 * estimator.info['clean_accuracy']['source']:6.2f} %")
    chosen = "source statistics (no adaptation)" if prior == math.inf else f"blend with prior N = {prior:g}"
    print(f"\nselect_prior: {chosen}")
    if args.plot:
        with atomic_file(args.plot) as f:
            result.diagnosis.plot().figure.savefig(f, format=args.plot.suffix.lstrip(".") or "png", dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
