"""ib-lasso-jax: structured (channel/filter) pruning of CNNs in JAX.

The data path is the layout::

    models -> data (calibration features) -> kernels (Gram statistics) -> prox/solvers
    (structured-lasso solve) -> keep masks -> surgery (smaller model) -> training (finetune)
    -> report

This file re-exports the stable API; see each module for details.
"""

from ib_lasso_jax import checkpoint
from ib_lasso_jax import data
from ib_lasso_jax import features
from ib_lasso_jax import kernels
from ib_lasso_jax import models
from ib_lasso_jax import prox
from ib_lasso_jax import structures
from ib_lasso_jax import training
from ib_lasso_jax.counting import Counts
from ib_lasso_jax.counting import count
from ib_lasso_jax.coupling import ChannelGraph
from ib_lasso_jax.coupling import ChannelGroup
from ib_lasso_jax.coupling import CouplingError
from ib_lasso_jax.coupling import trace_channels
from ib_lasso_jax.models import create
from ib_lasso_jax.pruning import PruneReport
from ib_lasso_jax.pruning import available_methods
from ib_lasso_jax.pruning import prune
from ib_lasso_jax.solvers import StructuredLasso
from ib_lasso_jax.surgery import apply_masks
from ib_lasso_jax.surgery import zero_channels

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
