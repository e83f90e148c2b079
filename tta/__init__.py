"""tta: test-time adaptation of image classifiers through their BatchNorm statistics."""
from tta.batchnorm import STATS, AdaptiveBatchNorm1d, AdaptiveBatchNorm2d, AdaptiveBatchNorm3d
from tta.surgery import convert, reset, revert, set_stats, use_stats
from tta.recalibration import recalibrate
from tta.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, PRESETS, corrupt
from tta import data, models
from tta.methods import Adapter, adapt, list_methods
from tta.label_free import diagnose, fit_accuracy_estimator, select_prior

__version__ = "0.1.0"

__all__ = [
    "STATS",
    "AdaptiveBatchNorm1d",
    "AdaptiveBatchNorm2d",
    "AdaptiveBatchNorm3d",
    "convert",
    "revert",
    "set_stats",
    "use_stats",
    "reset",
    "recalibrate",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "PRESETS",
    "corrupt",
    "data",
    "models",
    "Adapter",
    "adapt",
    "list_methods",
    "diagnose",
    "fit_accuracy_estimator",
    "select_prior",
]
