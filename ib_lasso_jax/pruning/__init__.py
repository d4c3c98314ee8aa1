"""Keep masks from calibration data: ``prune()``, the method registry and the report.

``api`` holds the one search path every method goes through; ``methods`` the scoring and
selection rules (structured lasso, DWGL, entropic, information concentration + Shapley and
the classical baselines).
"""

from ib_lasso_jax.pruning.api import (
    MethodContext,
    PruneReport,
    available_methods,
    check_options,
    floor_counts,
    method_info,
    method_options,
    prune,
    refine_to_target,
    register_method,
    round_masks,
    search_knob,
)
from ib_lasso_jax.pruning.selection import Selection, exit_points, from_scores, masks_from_scores

__all__ = [
    "MethodContext",
    "PruneReport",
    "Selection",
    "available_methods",
    "check_options",
    "exit_points",
    "floor_counts",
    "from_scores",
    "masks_from_scores",
    "method_info",
    "method_options",
    "prune",
    "refine_to_target",
    "register_method",
    "round_masks",
    "search_knob",
]
