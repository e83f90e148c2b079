"""Label-free tools: diagnose the shift, estimate the accuracy, choose the prior strength."""
from tta.label_free._observe import Observation, configuration, observe
from tta.label_free.diagnosis import Diagnosis, diagnose
from tta.label_free.estimator import AccuracyEstimate, AccuracyEstimator, fit_accuracy_estimator
from tta.label_free.cumulative import CumulativeBlend
from tta.label_free.prior import CANDIDATES, OnlinePriorSelector, select_prior

__all__ = ["Observation", "configuration", "observe", "Diagnosis", "diagnose", "AccuracyEstimate",
           "AccuracyEstimator", "fit_accuracy_estimator", "CANDIDATES", "OnlinePriorSelector", "select_prior",
           "CumulativeBlend"]
