"""ib-lasso-jax: structured (channel/filter) pruning of CNNs in JAX.

The data path is the layout::

    models -> data (calibration set) -> graph (channel groups, calibration features)
    -> lasso (Gram statistics, structures, prox, solvers) -> pruning (keep masks)
    -> graph.surgery (the smaller model) -> train (finetune) -> checkpoint -> deploy

``experiment`` runs that path as resumable stages; ``interop`` reads and writes PyTorch and
Flax Linen models; ``cli`` is the ``ib-lasso`` command. This file re-exports the stable API.
"""

from ib_lasso_jax import _compat, checkpoint, data, graph, lasso, models, pruning, train
from ib_lasso_jax.graph import (
    ChannelGraph,
    ChannelGroup,
    Counts,
    CouplingError,
    apply_masks,
    count,
    trace_channels,
    zero_channels,
)
from ib_lasso_jax.lasso import StructuredLasso
from ib_lasso_jax.models import create
from ib_lasso_jax.pruning import PruneReport, available_methods, prune

__version__ = "0.1.0"

_compat.install()


def __getattr__(name: str):
    # `ib_lasso_jax.kernels` and the other 0.1.0 module names, as attributes.
    if name in _compat.MOVED and "." not in name:
        return _compat.resolve(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "graph",
    "lasso",
    "models",
    "prune",
    "pruning",
    "trace_channels",
    "train",
    "zero_channels",
]
