"""What a pruning method hands :func:`~ib_lasso_jax.pruning.prune`: a :class:`Selection`.

A selection is a small ``NamedTuple`` of pure functions of one global knob (the optax pattern
of ``init``/``update``): ``select(knob)`` gives keep masks, monotone in the knob (a larger knob
prunes more), and ``prune`` searches the knob on ``[lo, hi]`` until the pruned network meets
the FLOPs, params or latency target. A scoring rule (per-channel scores, higher = keep) becomes
a selection through :func:`from_scores`; a method that chooses widths itself (the lasso path,
information concentration) builds one directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

Masks = dict[str, np.ndarray]


def _identity(knob: float) -> float:
    return knob


class Selection(NamedTuple):
    """Keep masks as a function of one knob, searched by ``prune``.

    Attributes:
      select: ``select(knob) -> {group: bool keep mask}``; monotone (a larger knob keeps no more
        channels in any group).
      lo, hi: the knob's search interval; ``select(hi)`` is the strongest setting.
      scores_at: ``scores_at(knob) -> {group: per-channel scores}`` (higher = keep): how
        ``round_to`` re-chooses channels and how the search lands on its target channel by
        channel; ``None``: neither is available.
      knob_value: what the report records for a knob (e.g. the lambda it stands for).
      log: search the knob on a log scale (``lo > 0``).
      at_ratios: ``at_ratios(ratio or {group: ratio}) -> masks`` for explicit keep ratios;
        ``None`` for methods that choose their own per-layer widths.
      strongest: how the error message names ``select(hi)`` when the target is out of reach.
    """

    select: Callable[[float], Masks]
    lo: float
    hi: float
    scores_at: Callable[[float], Mapping[str, np.ndarray]] | None = None
    knob_value: Callable[[float], float] = _identity
    log: bool = False
    at_ratios: Callable[[float | Mapping[str, float]], Masks] | None = None
    strongest: str = "the strongest setting"


def masks_from_scores(scores: Mapping[str, np.ndarray], ratio: float | Mapping[str, float],
                      floors: Mapping[str, int]) -> Masks:
    """Keep the top ``ceil(ratio * size)`` channels of each group by score (ties: lower index)."""
    masks = {}
    for n, s in scores.items():
        r = ratio[n] if isinstance(ratio, Mapping) else ratio
        k = min(len(s), max(floors[n], math.ceil(r * len(s) - 1e-9)))
        order = np.lexsort((np.arange(len(s)), -np.asarray(s, np.float64)))
        m = np.zeros(len(s), bool)
        m[order[:k]] = True
        masks[n] = m
    return masks


def from_scores(scores: Mapping[str, np.ndarray], floors: Mapping[str, int]) -> Selection:
    """A scoring rule as a selection: knob ``k`` keeps the best ``ceil((1 - k) * size)`` channels
    of every group (at least its floor); the report records the keep ratio ``1 - k``."""
    scores = dict(scores)
    return Selection(
        select=lambda k: masks_from_scores(scores, 1.0 - k, floors),
        lo=0.0,
        hi=1.0,
        scores_at=lambda k: scores,
        knob_value=lambda k: 1.0 - k,
        at_ratios=lambda r: masks_from_scores(scores, r, floors),
        strongest="keeping only the floor",
    )


def exit_points(kept: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """Each channel's exit point on a path of ``G`` settings of increasing strength.

    ``kept`` and ``strength`` are ``(G, C)``: whether channel ``c`` survives setting ``g`` and
    how strongly (a row norm, a weight). The exit point is ``last + frac``: ``last`` the last
    setting at which the channel survives, ``frac`` in ``[0, 1)`` its strength there over the
    group's largest, so a stronger channel leaves later; a channel that never survives gets
    ``-1 + 1e-3 * strength[0] / max(strength[0])``. Thresholding exit points at an integer ``t``
    reproduces the path's masks at setting ``t`` (for a monotone path), and in between the
    threshold moves one channel at a time, so a target search lands on its target exactly.
    """
    kept = np.asarray(kept, bool)
    strength = np.asarray(strength, np.float64)
    g = kept.shape[0]
    cols = np.arange(kept.shape[1])
    last = np.where(kept.any(0), g - 1 - np.argmax(kept[::-1], axis=0), -1)
    at = strength[np.clip(last, 0, g - 1), cols]
    frac = at / (at.max() + 1e-30) * (1 - 1e-6)
    first = strength[0]
    return np.where(last >= 0, last + frac, -1 + 1e-3 * first / (first.max() + 1e-30))


__all__ = ["Selection", "exit_points", "from_scores", "masks_from_scores"]
