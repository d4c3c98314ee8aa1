"""One entry point for every pruning method: ``prune(model, calibration, method, target)``.

A method is a small *scoring rule* or *selection rule* plugged into one path::

    calibration data -> (features) -> per-group scores or a Selection -> target search
    -> keep masks -> surgery -> report

Every method reaches the search as a :class:`~ib_lasso_jax.pruning.selection.Selection`: keep
masks as a monotone function of one global knob. Score-based methods (``l1-norm``,
``bn-scale``, ``hrank``, ``random``, ``dwgl``, ``entropic``) rank the channels of each group and
become a selection whose knob is the fraction of every group removed (with a per-layer floor);
methods that choose the per-layer widths themselves (the structured-lasso methods' lambda,
information concentration) build their own. The knob is bisected until the pruned network's
FLOPs (or params, or latency) reduction hits the target within tolerance, then the masks are
moved channel by channel onto it.

Targets are *reductions*: ``target_flops=0.6`` removes 60% of the FLOPs (the papers'
"FLOPs -61%"). Or give ``keep_ratios`` (one float, or a ratio per group) explicitly.
``target_latency=0.5`` halves the latency predicted by a per-layer latency table measured on
this backend (:mod:`ib_lasso_jax.deploy.latency`, NetAdapt / HALP style): the same search, with the
predicted latency in place of the FLOPs counter.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from ib_lasso_jax.graph import counting, coupling, surgery
from ib_lasso_jax.pruning.selection import Selection, from_scores, masks_from_scores

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


@dataclasses.dataclass
class MethodContext:
    """What a method sees: the model, its channel graph and the calibration data."""

    model: nnx.Module
    graph: coupling.ChannelGraph
    groups: dict[str, coupling.ChannelGroup]
    images: np.ndarray | None
    labels: np.ndarray | None
    policy: str
    floors: dict[str, int]
    rng: np.random.Generator
    options: dict[str, Any]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # method -> report


@dataclasses.dataclass(frozen=True)
class _Method:
    name: str
    needs_data: bool
    # Either scores(ctx) -> {group: scores} or selection(ctx) -> Selection.
    scores: Callable[[MethodContext], dict[str, np.ndarray]] | None
    selection: Callable[[MethodContext], Selection] | None
    description: str
    # prepare(ctx) -> model: e.g. a sparsity-training phase; the returned model is pruned.
    prepare: Callable[[MethodContext], nnx.Module] | None = None
    # finalize(ctx, small, masks) -> small: e.g. weight reconstruction after surgery.
    finalize: Callable[[MethodContext, nnx.Module, dict], nnx.Module] | None = None
    default_policy: str | None = None
    # check_options(ctx) -> options: ValueError naming a bad option; ctx may hold only the options.
    check_options: Callable[[MethodContext], Any] | None = None
    # Cost knobs a smoke run (seconds on a CPU) overrides, and the method a smoke run of a
    # data set with too many classes for a class-balanced set of 64 images uses instead.
    smoke_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    smoke_substitute: str | None = None


_METHODS: dict[str, _Method] = {}


def register_method(name: str, *, scores=None, selection=None, needs_data: bool = True, description: str = "",
                    prepare=None, finalize=None, default_policy: str | None = None, check_options=None,
                    smoke_options: Mapping[str, Any] | None = None, smoke_substitute: str | None = None):
    """Register a pruning method by a scoring rule or a selection rule (exactly one).

    Args:
      name: the method's name in ``prune(..., method=name)``.
      scores: ``scores(ctx) -> {group: per-channel scores}`` (higher = keep), made a
        :class:`~ib_lasso_jax.pruning.selection.Selection` by
        :func:`~ib_lasso_jax.pruning.selection.from_scores` (one keep ratio for every group).
      selection: ``selection(ctx) -> Selection``: keep masks as a monotone function of one
        knob, searched by :func:`prune`, for methods that choose their own per-layer widths.
      needs_data: the method needs calibration ``(images, labels)``.
      description: one line for listings.
      prepare: ``prepare(ctx) -> model`` run first (e.g. sparsity training); the model it
        returns is the one scored and pruned.
      finalize: ``finalize(ctx, small, masks) -> small`` run after surgery (e.g. weight
        reconstruction).
      default_policy: the residual policy used when ``prune`` is called without one.
      check_options: ``check_options(ctx)`` raises ValueError naming the option, its value and
        what is valid for a bad ``ctx.options`` (unknown keys included, e.g. with
        :func:`method_options`). :func:`prune` calls it before any work; :func:`check_options`
        calls it with a context holding only the options (``model``, ``groups``, ... ``None``),
        so checks that need the model must skip themselves there.
      smoke_options: option overrides of a smoke run (cost knobs only: grid sizes, iterations).
      smoke_substitute: the method a smoke run uses when the data set has more classes than a
        64-image calibration set can balance (a class-wise method falls back to its class-free
        engine).
    """
    if (scores is None) == (selection is None):
        raise ValueError("register_method needs exactly one of scores= or selection=")
    if name in _METHODS:
        raise ValueError(f"pruning method {name!r} is already registered")
    _METHODS[name] = _Method(name, needs_data, scores, selection, description, prepare, finalize, default_policy,
                             check_options, dict(smoke_options or {}), smoke_substitute)


def method_info(name: str) -> _Method:
    """The registry's record of ``name`` (its hooks, smoke options, description); ValueError if unknown."""
    _load_builtin_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown pruning method {name!r}; valid methods are: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def _load_builtin_methods():
    # Importing a method module registers its methods.
    from ib_lasso_jax.pruning.methods import baselines, dwgl, entropic, ib_lasso, ic_shapley  # noqa: F401


@dataclasses.dataclass
class PruneReport:
    """What pruning did, for people (``to_markdown``) and programs (``to_dict``)."""

    method: str
    policy: str
    target: dict[str, Any]
    knob: float | None
    groups: dict[str, dict[str, int]]  # name -> {"before": n, "after": k}
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    seconds: float
    info: dict[str, Any]
    widths_before: Any = None
    widths_after: Any = None
    # Predicted seconds per forward pass at info["latency"]["batch"] (target_latency only).
    predicted_latency_before: float | None = None
    predicted_latency_after: float | None = None

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops_after / self.flops_before

    @property
    def predicted_latency_reduction(self) -> float | None:
        if self.predicted_latency_before is None or self.predicted_latency_after is None:
            return None
        return 1.0 - self.predicted_latency_after / self.predicted_latency_before

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["flops_reduction"] = self.flops_reduction
        d["params_reduction"] = self.params_reduction
        if self.predicted_latency_reduction is not None:
            d["predicted_latency_reduction"] = self.predicted_latency_reduction
        return d

    def to_markdown(self) -> str:
        lines = [
            f"## Pruning report: {self.method} (policy {self.policy})",
            "",
            f"- target: {self.target}",
            f"- params: {counting.human(self.params_before)} -> {counting.human(self.params_after)} "
            f"(-{100 * self.params_reduction:.1f}%)",
            f"- FLOPs: {counting.human(self.flops_before)} -> {counting.human(self.flops_after)} "
            f"(-{100 * self.flops_reduction:.1f}%)",
            *([f"- predicted latency (batch {self.info.get('latency', {}).get('batch')}): "
               f"{1e3 * self.predicted_latency_before:.3f} ms -> {1e3 * self.predicted_latency_after:.3f} ms "
               f"(-{100 * self.predicted_latency_reduction:.1f}%)"] if self.predicted_latency_reduction is not None
              else []),
            f"- search knob: {self.knob}",
            f"- time: {self.seconds:.1f} s",
            "",
            "| group | channels before | after |",
            "|---|---:|---:|",
        ]
        lines += [f"| {n} | {g['before']} | {g['after']} |" for n, g in self.groups.items()]
        return "\n".join(lines) + "\n"


def method_options(options: Mapping[str, Any], defaults: Mapping[str, Any], method: str,
                   noun: str = "options") -> dict[str, Any]:
    """``{**defaults, **options}``; an option not in ``defaults`` raises ValueError naming it,
    ``method`` and the valid options."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "none (it takes no options)"
        raise ValueError(f"unknown {noun} {unknown} for {method}; valid options: {valid}")
    return {**defaults, **options}


def check_options(method: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError for an unknown ``method`` or options it refuses, before any model or data.

    The message names the option, its value and what is valid. A method registered without a
    ``check_options`` hook is not checked here (it sees its options in :func:`prune`); checks
    that need the model (e.g. an option naming a channel group) wait for :func:`prune`.
    """
    _load_builtin_methods()
    if method not in _METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid methods are: {', '.join(sorted(_METHODS))}")
    check = _METHODS[method].check_options
    if check is not None:
        check(MethodContext(model=None, graph=None, groups=None, images=None, labels=None, policy=None, floors={},
                            rng=None, options=dict(options)))


def floor_counts(groups: Mapping[str, coupling.ChannelGroup], floor: int | float) -> dict[str, int]:
    """Per-group minimum channels: an int count, or a fraction of each group (at least 1)."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or floor < 0:
        raise ValueError(f"floor must be a non-negative int (channels) or a fraction in [0, 1); got {floor!r}")
    if isinstance(floor, float) and floor >= 1:
        raise ValueError(f"a fractional floor must be below 1; got {floor!r}")
    out = {}
    for n, g in groups.items():
        k = int(floor) if isinstance(floor, int) else math.ceil(floor * g.size)
        out[n] = min(g.size, max(1, k))
    return out


def _rounded_count(k: int, size: int, round_to: int, floor: int) -> int:
    """``k`` to the nearest multiple of ``round_to`` (ties up), at least the floor (rounded up)
    and one block, at most ``size`` (a group's full size is always allowed)."""
    r = int(round_to)
    q = r * math.floor(k / r + 0.5)
    q = max(q, r * math.ceil(max(floor, 1) / r))
    return min(size, q)


def round_masks(masks: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray], round_to: int | None,
                floors: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Masks whose kept counts are multiples of ``round_to`` (or a group's full size).

    Each group's count is rounded to the nearest multiple (ties up; never below its floor or
    one block) and the channels are re-chosen by ``scores`` (best first, ties: lower index):
    hardware runs convolutions whose channel counts are multiples of 8 or 16 faster, so a
    9-channel layer can be slower than a 16-channel one (docs/latency.md). ``None`` or 1:
    the masks unchanged.
    """
    if not round_to or int(round_to) == 1:
        return dict(masks)
    out = {}
    for n, m in masks.items():
        s = np.asarray(scores[n], np.float64)
        k = _rounded_count(int(np.sum(m)), len(m), round_to, floors.get(n, 1))
        order = np.lexsort((np.arange(len(s)), -s))
        new = np.zeros(len(m), bool)
        new[order[:k]] = True
        out[n] = new
    return out


def search_knob(measure: Callable[[float], float], target: float, lo: float, hi: float, *,
                tol: float = 0.01, increasing: bool = True, max_iter: int = 60, log: bool = False):
    """Bisect a scalar knob until ``measure(knob)`` (a reduction) is within ``tol`` of ``target``.

    ``measure`` must be monotone in the knob (``increasing``: larger knob, larger
    reduction). Returns ``(knob, value, iterations)``; the best knob found if the exact
    tolerance is unreachable (a step function, e.g. integer channel counts).
    """
    f = (lambda k: measure(math.exp(k))) if log else measure
    a, b = (math.log(lo), math.log(hi)) if log else (lo, hi)
    best = None
    for it in range(1, max_iter + 1):  # noqa: B007 (the iteration count is returned after the loop)
        mid = 0.5 * (a + b)
        val = f(mid)
        if best is None or abs(val - target) < abs(best[1] - target):
            best = (mid, val)
        if abs(val - target) <= tol * max(target, 1e-12):
            break
        if (val < target) == increasing:
            a = mid
        else:
            b = mid
    knob = math.exp(best[0]) if log else best[0]
    return knob, best[1], it


def refine_to_target(masks, scores, reduction, target: float, tol: float, max_rounds: int = 50, step: int = 1):
    """Nudge masks channel by channel until ``reduction(masks)`` is within ``tol`` of ``target``.

    A uniform keep ratio moves every group at once, so the reduction it reaches is a step
    function with steps of a few percent on narrow networks. Starting from the masks the
    search found, add back (or remove) single channels, best (or worst) score first, in the
    group whose one-channel change moves the reduction least, until within tolerance. With
    ``step > 1`` a group's count moves to the next multiple of ``step`` up (at most its size)
    or down (at least one block), so rounded masks stay rounded.
    """
    masks = {n: m.copy() for n, m in masks.items()}
    current = reduction(masks)
    step = max(1, int(step))
    for _ in range(max_rounds):
        if abs(current - target) <= tol * target:
            break
        add = current > target
        best = None
        for n, m in masks.items():
            k = int(m.sum())
            if add:
                new_k = min(len(m), step * (k // step + 1))
            else:
                new_k = step * ((k - 1) // step)
            if new_k == k or new_k < 1:
                continue
            cand = np.flatnonzero(~m) if add else np.flatnonzero(m)
            s = np.asarray(scores[n], np.float64)[cand]
            order = np.lexsort((cand, -s)) if add else np.lexsort((cand, s))  # best / worst first, ties: lower index
            trial = dict(masks)
            trial[n] = m.copy()
            trial[n][cand[order[: abs(new_k - k)]]] = add
            value = reduction(trial)
            gap = abs(value - target)
            if best is None or gap < best[0]:
                best = (gap, n, trial[n], value)
        if best is None or best[0] >= abs(current - target):
            break
        masks[best[1]], current = best[2], best[3]
    return masks


def _check_calibration(calibration, model, input_shape) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` as arrays, checked against the model before any tracing or work."""
    if not isinstance(calibration, (tuple, list)) or len(calibration) != 2:
        raise ValueError(f"calibration must be a pair (images, labels) or None; got {type(calibration).__name__}"
                         + (f" of length {len(calibration)}" if isinstance(calibration, (tuple, list)) else ""))
    images, labels = (np.asarray(a) for a in calibration)
    model_spec = getattr(model, "spec", None)
    expected = tuple(int(s) for s in input_shape) if input_shape is not None else (
        tuple(model_spec.input_shape) if model_spec is not None else None)
    fix = "(ib_lasso_jax.data.load_dataset(..., image_size=...) and data.calibration_set give such batches)"
    if expected is not None and images.ndim != len(expected) + 1:
        batch = f"(N, {', '.join(map(str, expected))})"
        raise ValueError(f"calibration images must be a {len(expected) + 1}-d batch {batch}; "
                         f"got shape {images.shape} ({images.ndim}-d) {fix}")
    if images.ndim < 2:
        raise ValueError(f"calibration images must be a batch (N, ...) of at least 2 dims; got shape {images.shape}")
    if expected is not None and images.shape[1:] != expected:
        size = f"image_size={expected[0]}" if len(expected) == 3 and expected[0] == expected[1] else "image_size=..."
        raise ValueError(f"calibration images have shape {images.shape}, i.e. {images.shape[1:]} per example; "
                         f"the model expects {expected}: pad/resize them "
                         f"(ib_lasso_jax.data.load_dataset(..., {size}))")
    if images.shape[0] == 0:
        raise ValueError(f"calibration images are empty (shape {images.shape}); give at least one example")
    if images.dtype == np.uint8:
        raise ValueError(f"calibration images are uint8 (range {int(images.min())}..{int(images.max())}), not the "
                         "normalised float images the model was trained on: normalise them as the data module does "
                         "(ib_lasso_jax.data datasets return normalised float32), e.g. "
                         "(images / 255 - mean) / std")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"calibration images must be floating point (normalised float32); got dtype {images.dtype}")
    if not np.isfinite(images).all():
        bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
        raise ValueError(f"calibration images contain {bad} non-finite value(s) (NaN or inf); all must be finite")
    lo, hi = float(images.min()), float(images.max())
    if hi > 20:
        warnings.warn(f"calibration images range over [{lo:g}, {hi:g}]: they look unnormalised (e.g. 0..255); "
                      "the model expects images normalised as ib_lasso_jax.data does (divide by 255, then "
                      "subtract the mean and divide by the std)", UserWarning, stacklevel=3)
    n = images.shape[0]
    if labels.ndim == 2 and labels.shape[0] == n and labels.shape[1] > 1:
        raise ValueError(f"labels must be class indices of shape ({n},), not one-hot {labels.shape}: "
                         "use labels.argmax(-1)")
    if labels.ndim != 1:
        raise ValueError(f"labels must be class indices of shape ({n},); got shape {labels.shape}")
    if labels.shape[0] != n:
        raise ValueError(f"calibration images ({n}) and labels ({labels.shape[0]}) differ in number")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}")
    neg = np.flatnonzero(labels < 0)
    if neg.size:
        raise ValueError(f"labels must be class indices >= 0; labels[{int(neg[0])}] = {int(labels[neg[0]])}")
    num_classes = getattr(model_spec, "num_classes", None)
    if num_classes is not None:
        over = np.flatnonzero(labels >= int(num_classes))
        if over.size:
            raise ValueError(f"labels must be class indices in [0, {int(num_classes)}) for this "
                             f"{int(num_classes)}-class model; labels[{int(over[0])}] = {int(labels[over[0]])}")
    return images, labels


def prune(
    model: nnx.Module,
    calibration: tuple[np.ndarray, np.ndarray] | None,
    method: str,
    *,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    keep_ratios: float | Mapping[str, float] | None = None,
    policy: str | None = None,
    floor: int | float = 0.05,
    tolerance: float = 0.01,
    seed: int = 0,
    round_to: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    latency_batch: int = 1,
    latency_grid: int = 3,
    latency_cache: str | os.PathLike | bool | None = None,
    **options: Any,
) -> tuple[nnx.Module, PruneReport]:
    """Prune ``model`` with ``method`` to a target; returns ``(smaller_model, report)``.

    Args:
      model: a zoo model (or any NNX model of supported layers), typically in eval mode.
      calibration: ``(images, labels)``, class-balanced (see
        :func:`ib_lasso_jax.data.calibration_set`); may be ``None`` for data-free methods.
      method: a registered method name (see :func:`available_methods`).
      target_flops: fraction of FLOPs to remove, in (0, 1).
      target_params: fraction of params to remove, in (0, 1).
      target_latency: fraction of latency to remove, in (0, 1): of the latency predicted by a
        per-layer table measured on this backend at ``latency_batch``
        (:func:`ib_lasso_jax.deploy.latency.build_table`; measured once, then read from its cache).
        Measure the pruned model with :func:`ib_lasso_jax.deploy.latency.measure` to compare.
      keep_ratios: explicit keep ratio (one float for every group, or per group name).
      policy: ``"inner"`` (channels inside residual blocks) or ``"coupled"``; default: the
        method's own default (``"inner"`` for most).
      floor: minimum channels kept per group: an int, or a fraction of the group in [0, 1).
      tolerance: relative tolerance on the target, in (0, 1) (0.01: within 1%).
      seed: for methods that draw random numbers.
      round_to: keep a multiple of this many channels in every group (or the whole group),
        e.g. 8 or 16 for hardware-friendly widths; the target search works on rounded masks
        (the reachable reductions are coarser: the best within reach is returned if the
        tolerance cannot be met). ``None``: any count.
      input_shape: one example's shape, for tracing; default: ``model.spec.input_shape`` for a
        zoo model, else the calibration images' shape.
      latency_batch: ``target_latency``'s batch size (a positive int).
      latency_grid: ``target_latency``'s table grid points per width axis (an int >= 2).
      latency_cache: where latency tables are cached: a directory, None (the default location,
        see :func:`ib_lasso_jax.deploy.latency.cache_location`) or False (measure every time).
      **options: method-specific options.

    Returns:
      The physically smaller model and a :class:`PruneReport`.
    """
    t0 = time.perf_counter()
    _load_builtin_methods()
    if method not in _METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid methods are: {', '.join(sorted(_METHODS))}")
    given = [k for k, v in (("target_flops", target_flops), ("target_params", target_params),
                            ("target_latency", target_latency), ("keep_ratios", keep_ratios)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of target_flops, target_params, target_latency, keep_ratios; "
                         f"got {given or 'none'}")
    if target_latency is not None:
        _check_latency_args(target_latency, latency_batch, latency_grid, latency_cache)
    for name, value in (("target_flops", target_flops), ("target_params", target_params)):
        if value is not None and not (0.0 < float(value) < 1.0):
            raise ValueError(f"{name} is the fraction to remove and must be in (0, 1); got {value!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance={tolerance!r} is not valid; valid values: the relative tolerance on the target, "
                         "a number in (0, 1) (0.01: within 1%)")
    spec = _METHODS[method]
    if keep_ratios is not None and spec.scores is None:  # before any costly step
        raise ValueError(f"method {method!r} chooses its own per-layer widths; give target_flops, target_params "
                         "or target_latency")
    if policy is None:
        policy = spec.default_policy or "inner"
    images = labels = None
    if calibration is not None:
        images, labels = _check_calibration(calibration, model, input_shape)
    elif spec.needs_data:
        raise ValueError(f"method {method!r} needs calibration data (images, labels)")
    if input_shape is None and getattr(model, "spec", None) is None and images is not None:
        input_shape = images.shape[1:]  # a user's own model: the calibration images carry the shape
    graph = coupling.trace_channels(model, input_shape, strict=False)
    groups = graph.prunable(policy)
    if not groups:
        raise ValueError(f"model has no channel group prunable under policy={policy!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer))
                                 or round_to < 1):
        raise ValueError(f"round_to must be a positive int (channels per block, e.g. 8) or None; got {round_to!r}")
    step = int(round_to or 1)
    floors = floor_counts(groups, floor)
    ctx = MethodContext(model, graph, groups, images, labels, policy, floors,
                        np.random.default_rng(seed), dict(options))
    if spec.check_options is not None:  # before any costly step (prepare may train)
        spec.check_options(ctx)
    if spec.prepare is not None:  # e.g. sparsity training: prune the model it returns
        model = spec.prepare(ctx)
        ctx.model = model
    count = counting.MaskedCounter(model, graph, policy)
    params0, flops0 = count({})
    predict = latency0 = None
    if target_latency is not None:  # the table stands in for the FLOPs counter in the search
        from ib_lasso_jax.deploy import latency

        table = latency.build_table(model, graph, policy, batch=latency_batch, grid=latency_grid, round_to=round_to,
                                    input_shape=graph.input_shape, cache=latency_cache)
        predict = latency.LatencyPredictor(table, graph, policy)
        latency0 = predict({})
        ctx.info["latency"] = {"batch": table.batch, "grid": latency_grid, "measured_full_s": table.full_s,
                               "residual_s": table.residual_s, "table_seconds": table.build_seconds,
                               "from_cache": table.from_cache, "cache_file": None if table.path is None
                               else str(table.path)}

    def reduction(masks):
        if predict is not None:
            return 1 - predict(masks) / latency0
        p, f = count(masks)
        return (1 - f / flops0) if target_params is None else (1 - p / params0)

    if spec.scores is not None:
        scores = spec.scores(ctx)
        _check_scores(scores, groups, method)
        selection = from_scores(scores, floors)
    else:
        selection = spec.selection(ctx)
        if not isinstance(selection, Selection):
            raise TypeError(f"method {method!r}: its selection hook must return a Selection; got "
                            f"{type(selection).__name__}")
    if step > 1 and selection.scores_at is None:
        raise ValueError(f"method {method!r} does not expose channel scores; round_to is not supported for it")

    def select(k):
        masks = selection.select(k)
        return round_masks(masks, selection.scores_at(k), round_to, floors) if step > 1 else masks

    knob = None
    if keep_ratios is not None:
        masks = round_masks(selection.at_ratios(_keep_ratios(keep_ratios, groups)), selection.scores_at(0.0),
                            round_to, floors)
    else:
        target = _target_value(target_flops, target_params, target_latency)
        most = reduction(select(selection.hi))
        if most < target * (1 - tolerance):
            _unreachable(target, target * (1 - tolerance), most, reduction(selection.select(selection.hi)), floor,
                         round_to, selection.strongest, predict)
        knob, _, iters = search_knob(lambda k: reduction(select(k)), target, selection.lo, selection.hi,
                                     tol=tolerance, increasing=True, log=selection.log, max_iter=30)
        masks = select(knob)
        if selection.scores_at is not None:  # land within tolerance channel by channel
            masks = refine_to_target(masks, selection.scores_at(knob), reduction, target, tolerance, step=step)
        knob = selection.knob_value(knob)
        ctx.info["search_iterations"] = iters

    if predict is not None:  # the layers' share, to compare with the measured pruned model
        ctx.info["latency"]["layers_before_s"] = latency0 - predict.table.residual_s
        ctx.info["latency"]["layers_after_s"] = predict(masks) - predict.table.residual_s
    small = surgery.apply_masks(model, masks, policy, graph)
    if spec.finalize is not None:  # e.g. weight reconstruction
        small = spec.finalize(ctx, small, masks)
    params1, flops1 = count(masks)
    report = PruneReport(
        method=method,
        policy=policy,
        target={k: v for k, v in (("flops", target_flops), ("params", target_params), ("latency", target_latency),
                                   ("keep_ratios", keep_ratios)) if v is not None},
        knob=knob,
        groups={n: {"before": g.size, "after": int(masks[n].sum()) if n in masks else g.size}
                for n, g in groups.items()},
        params_before=params0,
        params_after=params1,
        flops_before=flops0,
        flops_after=flops1,
        seconds=time.perf_counter() - t0,
        info=ctx.info,
        widths_before=getattr(getattr(model, "spec", None), "widths", None),
        widths_after=getattr(getattr(small, "spec", None), "widths", None),
        predicted_latency_before=latency0,
        predicted_latency_after=None if predict is None else predict(masks),
    )
    return small, report


def _keep_ratios(keep_ratios, groups) -> float | dict[str, float]:
    """``keep_ratios`` checked: one ratio, or a ratio per group name (missing groups keep all)."""
    if isinstance(keep_ratios, Mapping):
        unknown = set(keep_ratios) - set(groups)
        if unknown:
            raise ValueError(f"keep_ratios names unknown groups {sorted(unknown)}; valid: {', '.join(groups)}")
        ratios = {n: float(keep_ratios.get(n, 1.0)) for n in groups}
    else:
        ratios = float(keep_ratios)
    for r in (ratios.values() if isinstance(ratios, dict) else [ratios]):
        if not 0.0 < r <= 1.0:
            raise ValueError(f"keep ratios must be in (0, 1]; got {r!r}")
    return ratios


def _target_value(target_flops, target_params, target_latency) -> float:
    return float(next(t for t in (target_flops, target_params, target_latency) if t is not None))


def _check_latency_args(target_latency, batch, grid, cache) -> None:
    """ValueError naming a bad ``target_latency`` option, its value and what is valid."""
    t = target_latency
    if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not (0.0 < float(t) < 1.0):
        raise ValueError(f"target_latency={t!r} is not valid; valid values: the fraction of latency to remove, a "
                         "number in (0, 1) (e.g. 0.5 halves the predicted latency)")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"latency_batch={batch!r} is not valid; valid values: a positive int (the batch size the "
                         "latency is measured at, e.g. 1 or 64)")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 2:
        raise ValueError(f"latency_grid={grid!r} is not valid; valid values: an int >= 2 (grid points per width "
                         "axis of the latency table, e.g. 4)")
    if not (cache is None or isinstance(cache, (bool, str, os.PathLike))):
        raise ValueError(f"latency_cache={cache!r} is not valid; valid values: a directory (str or path), None "
                         "(the default cache location) or False (no cache)")


def _unreachable(target: float, reach: float, most: float, unrounded: float, floor, round_to, how: str,
                 predict=None):
    """ValueError blaming what keeps the target out of reach: the rounding if the unrounded masks reach it,
    and for a latency target the part of the latency no width changes."""
    if predict is not None and not (round_to is not None and int(round_to) > 1 and unrounded >= reach):
        table = predict.table
        raise ValueError(
            f"target_latency {target:.3f} cannot be met: {how} (floor {floor!r}) removes {most:.3f} of the predicted "
            f"latency ({1e3 * table.full_s:.3f} ms at batch {table.batch}, of which {1e3 * table.residual_s:.3f} ms "
            "is the part no width changes: pooling, residual adds, per-op overhead); valid values: a lower "
            "target_latency, a lower floor, or a larger latency_batch (per-call overhead weighs less)")
    if round_to is not None and int(round_to) > 1 and unrounded >= reach:
        raise ValueError(
            f"target {target:.3f} cannot be met with round_to={round_to!r}: {how} and rounding every group up to a "
            f"multiple of {round_to} channels (or its full width) removes {most:.3f} (unrounded: {unrounded:.3f}); "
            "valid values: a round_to below the groups' widths (e.g. 8), or a lower target")
    raise ValueError(f"target {target:.3f} cannot be met under the per-layer floor ({floor!r}): {how} removes "
                     f"{most:.3f}; lower the target or the floor")


def _check_scores(scores, groups, method):
    for n, g in groups.items():
        if n not in scores:
            raise ValueError(f"method {method!r} gave no scores for group {n!r}")
        s = np.asarray(scores[n])
        if s.shape != (g.size,) or not np.isfinite(s).all():
            raise ValueError(f"method {method!r}: scores for group {n!r} must be {g.size} finite numbers; "
                             f"got {s.shape}")
