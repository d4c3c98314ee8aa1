"""ib-lasso-jax: structured (channel/filter) pruning of CNNs in JAX.

The data path is the layout::

    models -> data (calibration features) -> kernels (Gram statistics) -> prox/solvers
    (structured-lasso solve) -> keep masks -> surgery (smaller model) -> training (finetune)
    -> report

This file re-exports the stable API; see each module for details.
"""

from ib_lasso_jax import checkpoint, data, features, kernels, models, prox, structures, training
from ib_lasso_jax.counting import Counts, count
from ib_lasso_jax.coupling import ChannelGraph, ChannelGroup, CouplingError, trace_channels
from ib_lasso_jax.models import create
from ib_lasso_jax.pruning import PruneReport, available_methods, prune
from ib_lasso_jax.solvers import StructuredLasso
from ib_lasso_jax.surgery import apply_masks, zero_channels

__version__ = "0.1.0"

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "Counts",
    "CouplingError",
    "PruneReport",
    "StructuredLasso",
    "apply_masks",
    "available_methods",
    "checkpoint",
    "count",
    "create",
    "data",
    "features",
    "kernels",
    "models",
    "prox",
    "prune",
    "structures",
    "trace_channels",
    "training",
    "zero_channels",
]
