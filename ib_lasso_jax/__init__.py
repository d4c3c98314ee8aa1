"""ib-lasso-jax: structured (channel/filter) pruning of CNNs in JAX.

The data path is the layout::

    models -> data (calibration features) -> kernels (Gram statistics) -> prox/solvers
    (structured-lasso solve) -> keep masks -> surgery (smaller model) -> training (finetune)
    -> report

This file re-exports the stable API; see each module for details.
"""

from ib_lasso_jax import models
from ib_lasso_jax.counting import Counts
from ib_lasso_jax.counting import count
from ib_lasso_jax.coupling import ChannelGraph
from ib_lasso_jax.coupling import ChannelGroup
from ib_lasso_jax.coupling import CouplingError
from ib_lasso_jax.coupling import trace_channels
from ib_lasso_jax.models import create
from ib_lasso_jax.surgery import apply_masks
from ib_lasso_jax.surgery import zero_channels

__version__ = "0.1.0"

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "Counts",
    "CouplingError",
    "apply_masks",
    "count",
    "create",
    "models",
    "trace_channels",
    "zero_channels",
]
