"""Evaluate BatchNorm test-time adaptation on a corrupted benchmark: the app
:mod:`tta.apps.evaluate` (the same as ``tta evaluate``; docs/evaluation.md).

    python scripts/evaluate.py dataset=fashion_mnist adapt=blend adapt.prior=16 stream=reset \
        corruption.names=[fog,contrast] corruption.severities=[5] num_examples=1000 \
        batch_size=64 hydra.run.dir=outputs/example
    python scripts/evaluate.py -m adapt=source,batch,blend adapt.prior=1,4,16,64 batch_size=1,8,64
"""
import sys
from pathlib import Path

try:
    import tta  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tta.apps.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
