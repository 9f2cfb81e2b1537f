"""Probability paths: each knows its source, ``p_t(· | x1)``, its rates and its one-step kernel."""

from .base import ProbabilityPath
from .metric import MetricInducedPath
from .mixture import MixturePath, PolynomialScheduler
from .spec import build_path

__all__ = ["MetricInducedPath", "MixturePath", "PolynomialScheduler", "ProbabilityPath", "build_path"]
