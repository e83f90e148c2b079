"""Turn a training checkpoint of scripts/train_source.py into a shipped model.

    python scripts/export_pretrained.py checkpoints/fashion_mnist_resnet14.pt \
        [--name fashion_mnist] [--out-dir tta/models/pretrained]

Writes ``<stem>.pt`` (the float32 state_dict only) and ``<stem>.json``
(``{"name", "file", "sha256", "size_bytes", "tta": metadata}``: the checkpoint's metadata block
unchanged, see :mod:`tta.models.shipped`), both atomically; ``<stem>`` is the file stem
registered for ``--name`` in ``tta.models.shipped.PRETRAINED``. Checkpoints of the older
layout (``"model"``, ``"clean_test_accuracy"``) are converted.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tta.evaluation.results import write_json
from tta.models import extract_state_dict, load_checkpoint, save_checkpoint
from tta.models.checkpoint import METADATA_KEY, read_metadata
from tta.models.shipped import PRETRAINED, PRETRAINED_DIR, sha256_of


def export(checkpoint_path: str | os.PathLike, name: str = "fashion_mnist", out_dir: str | os.PathLike = PRETRAINED_DIR) -> tuple[Path, Path]:
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained name {name!r}; valid: {sorted(PRETRAINED)}")
    checkpoint = load_checkpoint(checkpoint_path)
    metadata = read_metadata(checkpoint, checkpoint_path)
    if metadata is None or metadata.get("test_accuracy") is None:
        raise ValueError(f"{checkpoint_path} records no model metadata and test accuracy: "
                         "not a scripts/train_source.py checkpoint")
    if isinstance(checkpoint, dict) and METADATA_KEY not in checkpoint:  # the older layout
        extra = ("config", "history", "training_time_s", "device", "command", "versions")
        metadata.update({key: checkpoint[key] for key in extra if key in checkpoint})
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
        METADATA_KEY: metadata,
    }
    meta_path = out_dir / f"{PRETRAINED[name]}.json"
    write_json(meta_path, meta)
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
          f"test accuracy {info[METADATA_KEY]['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
