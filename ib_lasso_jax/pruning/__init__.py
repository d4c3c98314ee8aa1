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
    masks_from_scores,
    method_options,
    prune,
    refine_to_target,
    register_method,
    round_masks,
    search_knob,
)

__all__ = [
    "MethodContext",
    "PruneReport",
    "available_methods",
    "check_options",
    "floor_counts",
    "masks_from_scores",
    "method_options",
    "prune",
    "refine_to_target",
    "register_method",
    "round_masks",
    "search_knob",
]
