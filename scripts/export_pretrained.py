"""Turn a training checkpoint of scripts/train_source.py into a shipped model.

    python scripts/export_pretrained.py checkpoints/fashion_mnist_resnet20.pt \
        [--name fashion_mnist] [--out-dir tta/models/pretrained]

Writes ``<stem>.pt`` (the float32 state_dict only) and ``<stem>.json`` (model name and kwargs,
sha256 of the ``.pt``, clean test accuracy, training config, time and command), both
atomically; ``<stem>`` is the file stem registered for ``--name`` in
``tta.models.shipped.PRETRAINED``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from tta._atomic import atomic_file
from tta.models import extract_state_dict, load_checkpoint, save_checkpoint
from tta.models.shipped import PRETRAINED, PRETRAINED_DIR, sha256_of


def _write_json_atomic(obj: dict, path: Path) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def export(checkpoint_path: str | os.PathLike, name: str = "fashion_mnist", out_dir: str | os.PathLike = PRETRAINED_DIR) -> tuple[Path, Path]:
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained name {name!r}; valid: {sorted(PRETRAINED)}")
    checkpoint = load_checkpoint(checkpoint_path)
    for key in ("model", "clean_test_accuracy", "config"):
        if key not in checkpoint:
            raise ValueError(f"{checkpoint_path} has no {key!r}: not a scripts/train_source.py checkpoint")
    state = {
        key: (value.float() if value.is_floating_point() else value).contiguous().clone()
        for key, value in extract_state_dict(checkpoint).items()
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = save_checkpoint(state, out_dir / f"{PRETRAINED[name]}.pt")
    meta = {
        "name": name,
        "file": weights.name,
        "sha256": sha256_of(weights),
        "size_bytes": weights.stat().st_size,
        "model": checkpoint["model"],
        "dataset": checkpoint.get("dataset"),
        "clean_test_accuracy": checkpoint["clean_test_accuracy"],
        "training_time_s": checkpoint.get("training_time_s"),
        "training_device": checkpoint.get("device"),
        "command": checkpoint.get("command"),
        "config": checkpoint["config"],
        "history": checkpoint.get("history"),
        "versions": checkpoint.get("versions", {"torch": str(torch.__version__)}),
    }
    meta_path = out_dir / f"{PRETRAINED[name]}.json"
    _write_json_atomic(meta, meta_path)
    return weights, meta_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint written by scripts/train_source.py")
    parser.add_argument("--name", default="fashion_mnist", choices=sorted(PRETRAINED))
    parser.add_argument("--out-dir", default=os.fspath(PRETRAINED_DIR))
    args = parser.parse_args()
    weights, meta = export(args.checkpoint, args.name, args.out_dir)
    info = json.loads(meta.read_text())
    print(f"wrote {weights} ({info['size_bytes']} bytes, sha256 {info['sha256'][:12]}...) and {meta}; "
          f"clean test accuracy {info['clean_test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
