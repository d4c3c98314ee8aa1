"""Everything that reads a model's computation: channel tracing and coupled groups, capture of
intermediates and calibration features, params/FLOPs counting, and surgery (the physically
smaller model)."""

from ib_lasso_jax.graph.counting import Counts, count
from ib_lasso_jax.graph.coupling import ChannelGraph, ChannelGroup, CouplingError, trace_channels
from ib_lasso_jax.graph.surgery import apply_masks, zero_channels

__all__ = ["ChannelGraph", "ChannelGroup", "Counts", "CouplingError", "apply_masks", "count", "trace_channels",
           "zero_channels"]
