"""Selective-classification metrics (numpy only, float64 accumulation).

Every metric is computed under the weights of a named view (``w_lt`` or ``w_bal``; None = unit
weights). A group with no accepted sample counts as error 1.0 everywhere.
"""

from argse_cli.metrics.bootstrap import (
    bootstrap_rc,
    class_stratified_indices,
    paired_bootstrap_diff,
)
from argse_cli.metrics.calibration import ece, nll
from argse_cli.metrics.rc import (
    AURC_CONVENTION,
    COVERAGE_GRID,
    RCCurve,
    augrc,
    aurc,
    e_aurc,
    errors_at_coverage,
    geifman_aurc,
    optimal_aurc,
    rc_curve,
    trapezoid_area,
)
from argse_cli.metrics.selective import (
    balanced_error,
    coverage,
    group_coverage,
    group_errors,
    min_group_coverage,
    selective_metrics,
    selective_risk,
    worst_group_error,
)

__all__ = [
    "AURC_CONVENTION",
    "COVERAGE_GRID",
    "RCCurve",
    "augrc",
    "aurc",
    "balanced_error",
    "bootstrap_rc",
    "class_stratified_indices",
    "coverage",
    "e_aurc",
    "ece",
    "errors_at_coverage",
    "geifman_aurc",
    "group_coverage",
    "group_errors",
    "min_group_coverage",
    "nll",
    "optimal_aurc",
    "paired_bootstrap_diff",
    "rc_curve",
    "selective_metrics",
    "selective_risk",
    "trapezoid_area",
    "worst_group_error",
]
