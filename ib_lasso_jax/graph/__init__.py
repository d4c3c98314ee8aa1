"""Everything that reads a model's computation: channel tracing and coupled groups, capture of
intermediates and calibration features, params/FLOPs counting, channel scaling
and surgery (the physically smaller model)."""

from ib_lasso_jax.graph.counting import Counts, count
from ib_lasso_jax.graph.coupling import ChannelGraph, ChannelGroup, CouplingError, trace_channels
from ib_lasso_jax.graph.scaling import ChannelSlice, channel_slices, scale_channels, scale_model
from ib_lasso_jax.graph.surgery import apply_masks, zero_channels

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelSlice", "Counts", "CouplingError", "apply_masks", "channel_slices",
           "count", "scale_channels", "scale_model", "trace_channels", "zero_channels"]
