"""Export a corrupted copy of a dataset in the CIFAR-10-C layout: the app
:mod:`tta.apps.make_corrupted` (the same as ``tta corrupt``; docs/corruptions.md).

    python scripts/make_corrupted.py dataset=fashion_mnist out_dir=data/fashion_mnist-c
    python scripts/make_corrupted.py dataset=cifar10 dataset.root=~/data corruptions=[fog,snow] preset=cifar
"""
import sys
from pathlib import Path

try:
    import tta  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tta.apps.make_corrupted import load_uint8, main  # noqa: E402, F401

if __name__ == "__main__":
    main()
