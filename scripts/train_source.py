"""Train a source model on a clean train split and save a checkpoint: the Hydra app
:mod:`tta.apps.train_source` (the same as ``tta train-source``; docs/models.md).

    python scripts/train_source.py                                # ResNet-14 on Fashion-MNIST
    python scripts/train_source.py dataset=digits epochs=1 output=/tmp/digits.pt
    python scripts/train_source.py model=resnet8 +model.kwargs.width=8 dataset=digits
"""
import sys
from pathlib import Path

try:
    import tta  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tta.apps.train_source import check_config, main, protocol_config, run  # noqa: E402, F401

if __name__ == "__main__":
    main()
