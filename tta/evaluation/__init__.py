"""Evaluation pipeline: adaptation methods, test streams, the evaluation loop, metrics,
results files and reports (see docs/evaluation.md)."""
from tta.evaluation.metrics import NUM_BINS, expected_calibration_error, mean_corruption_error
from tta.evaluation.pipeline import SEVERITIES, run_benchmark
from tta.evaluation.runner import Cell, evaluate
from tta.methods import get_method, list_methods
from tta.evaluation.streams import (Segment, Stream, dirichlet_order, get_stream, imbalance_subset,
                                   list_streams, register_stream)

__all__ = [
    "Cell", "evaluate", "run_benchmark", "SEVERITIES",
    "get_method", "list_methods",
    "Stream", "Segment", "get_stream", "list_streams", "register_stream", "dirichlet_order", "imbalance_subset",
    "NUM_BINS", "expected_calibration_error", "mean_corruption_error",
]
