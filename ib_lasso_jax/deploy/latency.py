"""Measured inference latency, and a per-layer latency table that predicts it for any widths.

Two parts:

* :func:`measure` and :func:`compare`: wall-clock latency of a model's eval-mode forward pass
  (BatchNorm on running statistics), per batch size, as the median and spread (interquartile
  range, min, max) over samples, compilation excluded. ``runtime="xla"`` times the model as a
  user runs it in JAX (``jax.jit`` of the forward pass, weights as arguments, on the default
  device): on a CPU the zoo's convolutions over tiny output maps take their im2col + matmul
  path (:func:`ib_lasso_jax.models._layers.conv_general_dilated`), because that is what such a
  user gets. ``runtime="onnxruntime"`` times the ONNX export (plain convolutions,
  :func:`ib_lasso_jax.deploy.export.export_onnx`) in onnxruntime's CPU provider; it needs
  ``pip install 'ib-lasso-jax[onnx]'``.
* :func:`build_table`, :class:`LatencyTable` and :class:`LatencyPredictor` (defined in
  :mod:`ib_lasso_jax.deploy.latency_table`, importable from here): a per-layer latency table,
  NetAdapt/HALP style, that predicts the latency of any widths; ``prune(...,
  target_latency=0.5)`` searches with it. See docs/latency-targets.md for the measured
  prediction error and the limits.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.deploy.export import ONNX_INSTALL_HINT, eval_split
from ib_lasso_jax.deploy.latency_table import (
    CACHE_ENV_VAR,
    TABLE_VERSION,
    LatencyPredictor,
    LatencyTable,
    LayerTable,
    _check_int,
    _check_positive_number,
    _cpu_model,
    build_table,
    cache_location,
    interpolate,
)
from ib_lasso_jax.deploy.latency_table import _grid as _grid  # re-exported: the tests check it here

__all__ = [
    "CACHE_ENV_VAR",
    "RUNTIMES",
    "Comparison",
    "LatencyPredictor",
    "LatencyStats",
    "LatencyTable",
    "LayerTable",
    "Measurement",
    "TABLE_VERSION",
    "build_table",
    "cache_location",
    "compare",
    "interpolate",
    "measure",
]

RUNTIMES = ("xla", "onnxruntime")
DEFAULT_BATCH_SIZES = (1, 64)


# ---------------------------------------------------------------------------------------------
# Statistics and results


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Seconds per forward pass at one batch size: median and spread over ``samples`` samples.

    A sample times ``calls_per_sample`` back-to-back calls (enough to last ``min_sample_seconds``)
    and divides by their number, so fast calls are not lost in the timer's resolution.
    """

    batch: int
    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float
    samples: int
    calls_per_sample: int

    @classmethod
    def from_samples(cls, batch: int, samples: Sequence[float], calls: int) -> LatencyStats:
        s = np.asarray(samples, np.float64)
        q1, med, q3 = np.percentile(s, [25, 50, 75])
        return cls(int(batch), float(med), float(q1), float(q3), float(s.min()), float(s.max()), int(s.size),
                   int(calls))

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What :func:`measure` returns: one :class:`LatencyStats` per batch size."""

    runtime: str
    device: str
    jax_version: str
    input_shape: tuple[int, ...]
    stats: dict[int, LatencyStats]

    def median(self, batch: int) -> float:
        return self.stats[batch].median_s

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "device": self.device, "jax_version": self.jax_version,
                "input_shape": list(self.input_shape),
                "batches": [s.to_dict() for s in self.stats.values()]}

    def format_table(self, title: str = "") -> str:
        lines = [title] if title else []
        lines.append(f"{'batch':>5s}  {'median ms':>10s}  {'IQR ms':>17s}  {'min ms':>9s}  {'max ms':>9s}  "
                     f"{'samples':>7s}")
        for s in self.stats.values():
            lines.append(f"{s.batch:5d}  {_ms(s.median_s):>10s}  {_ms(s.q1_s) + '-' + _ms(s.q3_s):>17s}  "
                         f"{_ms(s.min_s):>9s}  {_ms(s.max_s):>9s}  {s.samples:7d}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What :func:`compare` returns: both models' measurements, the speed-up and the FLOPs ratio.

    ``speedup(b) = T_original(b) / T_pruned(b)`` (medians); ``flops_ratio = FLOPs_original /
    FLOPs_pruned`` (MACs, :func:`ib_lasso_jax.graph.counting.count`); their quotient is the share of
    the theoretical speed-up that is realised.
    """

    original: Measurement
    pruned: Measurement
    flops_original: int
    flops_pruned: int

    @property
    def flops_ratio(self) -> float:
        return self.flops_original / max(self.flops_pruned, 1)

    def speedup(self, batch: int) -> float:
        return self.original.median(batch) / self.pruned.median(batch)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for b, o in self.original.stats.items():
            p = self.pruned.stats[b]
            out.append({"batch": b, "original_median_s": o.median_s, "original_q1_s": o.q1_s,
                        "original_q3_s": o.q3_s, "pruned_median_s": p.median_s, "pruned_q1_s": p.q1_s,
                        "pruned_q3_s": p.q3_s, "speedup": self.speedup(b), "flops_ratio": self.flops_ratio,
                        "speedup_over_flops_ratio": self.speedup(b) / self.flops_ratio})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"original": self.original.to_dict(), "pruned": self.pruned.to_dict(),
                "flops_original": self.flops_original, "flops_pruned": self.flops_pruned, "rows": self.rows()}

    def format_table(self, title: str = "") -> str:
        lines = [title] if title else []
        lines.append(f"{'batch':>5s}  {'original ms (IQR)':>24s}  {'pruned ms (IQR)':>24s}  {'speed-up':>8s}  "
                     f"{'FLOPs ratio':>11s}  {'speed-up / FLOPs ratio':>22s}")
        for r in self.rows():
            o = f"{_ms(r['original_median_s'])} ({_ms(r['original_q1_s'])}-{_ms(r['original_q3_s'])})"
            p = f"{_ms(r['pruned_median_s'])} ({_ms(r['pruned_q1_s'])}-{_ms(r['pruned_q3_s'])})"
            lines.append(f"{r['batch']:5d}  {o:>24s}  {p:>24s}  {r['speedup']:8.2f}  {r['flops_ratio']:11.2f}  "
                         f"{r['speedup_over_flops_ratio']:22.2f}")
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_runtime(runtime: Any) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not valid; valid values: {', '.join(map(repr, RUNTIMES))}")
    return runtime


def _check_batch_sizes(batch_sizes: Any) -> tuple[int, ...]:
    what = "a non-empty sequence of positive ints, e.g. (1, 64)"
    if isinstance(batch_sizes, (int, np.integer)) and not isinstance(batch_sizes, bool):
        batch_sizes = (batch_sizes,)
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise ValueError(f"batch_sizes={batch_sizes!r} is not valid; valid values: {what}")
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"batch_sizes={batch_sizes!r} is not valid (entry {b!r}); valid values: {what}")
    return tuple(dict.fromkeys(int(b) for b in batch_sizes))


def _input_shape(model: Any, inputs: Any, batch_sizes: Any) -> tuple[tuple[int, ...], tuple[int, ...], Any]:
    """``(one example's shape, batch sizes, the given batch or None)`` from :func:`measure`'s arguments."""
    spec = getattr(model, "spec", None)
    given = None
    if inputs is None:
        if spec is None:
            raise ValueError(f"{type(model).__name__} is not a zoo model (it has no .spec): pass the input shape "
                             "of one example, e.g. measure(model, (32, 32, 3)), or a batch of inputs")
        shape = tuple(int(s) for s in spec.input_shape)
    elif hasattr(inputs, "shape") and hasattr(inputs, "dtype"):
        given = inputs
        if np.ndim(inputs) < 2 or inputs.shape[0] < 1:
            raise ValueError(f"inputs must be a batch (N, ...) with N >= 1 or one example's shape; got an array "
                             f"of shape {tuple(inputs.shape)}")
        if batch_sizes is not None:
            raise ValueError(f"give batch_sizes or a batch of inputs, not both: the batch's first axis "
                             f"({inputs.shape[0]}) is the batch size; got batch_sizes={batch_sizes!r}")
        shape, batch_sizes = tuple(int(s) for s in inputs.shape[1:]), (int(inputs.shape[0]),)
    else:
        try:
            shape = tuple(int(s) for s in inputs)
            ok = bool(shape) and all(s >= 1 and not isinstance(s0, bool) for s, s0 in zip(shape, inputs))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"inputs must be one example's shape of positive ints (e.g. (32, 32, 3)), a batch of "
                             f"inputs, or None (a zoo model's own input shape); got {inputs!r}")
    sizes = _check_batch_sizes(DEFAULT_BATCH_SIZES if batch_sizes is None else batch_sizes)
    return shape, sizes, given


# ---------------------------------------------------------------------------------------------
# Forward functions and the timing loop


def _xla_forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """The model's eval-mode forward pass, jitted, weights passed as arguments (as a training loop does)."""
    graphdef, state = eval_split(model, "timing")
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda x: fn(state, x)


def _require_onnxruntime():
    for module in ("jax2onnx", "onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"runtime='onnxruntime' needs the optional packages jax2onnx and onnxruntime "
                              f"(Python >= 3.11), missing here ({e}): {ONNX_INSTALL_HINT}") from e


def _onnx_forward(model: nnx.Module, shape: tuple[int, ...]) -> Callable[[Any], np.ndarray]:
    """The ONNX export of ``model`` (symbolic batch) in an onnxruntime CPU session."""
    from ib_lasso_jax.deploy import export

    _require_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="ib-lasso-latency-") as d:
        path = Path(d) / "model.onnx"
        export.export_onnx(model, path, input_shape=shape)
        return export.load_onnx(path)  # the session holds the graph; the file may go


def _forward(model: nnx.Module, runtime: str, shape: tuple[int, ...]):
    return _xla_forward(model) if runtime == "xla" else _onnx_forward(model, shape)


def _inputs(runtime: str, shape: tuple[int, ...], batch: int, seed: int, given=None):
    x = given if given is not None else np.random.default_rng(seed).standard_normal((batch, *shape)).astype(
        np.float32)
    # On the device before timing: the host-to-device copy is not the model's latency.
    return jax.device_put(jnp.asarray(x)) if runtime == "xla" else np.asarray(x, np.float32)


def _time_samples(calls: Mapping[str, tuple[Callable, Any]], *, repeats: int, warmup: int,
                  min_sample_seconds: float) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Seconds per call of every ``fn(x)`` in ``calls``: ``repeats`` samples each, round-robin.

    ``warmup`` untimed calls first (the first one compiles); then each sample runs the call
    ``k`` times back to back, ``k`` chosen so a sample lasts about ``min_sample_seconds``, and
    waits for the result (``jax.block_until_ready``). Several calls are sampled in alternating
    order, so a burst of load from other processes hits all of them alike. Every timing in
    this module goes through here.
    """
    inner = {}
    for name, (f, x) in calls.items():
        for _ in range(warmup):
            jax.block_until_ready(f(x))
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        dt = time.perf_counter() - t
        inner[name] = int(max(1, min(10_000, math.ceil(min_sample_seconds / max(dt, 1e-7)))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            (f, x), k = calls[name], inner[name]
            t = time.perf_counter()
            for _ in range(k):
                y = f(x)
            jax.block_until_ready(y)
            samples[name].append((time.perf_counter() - t) / k)
    return {n: np.asarray(s) for n, s in samples.items()}, inner


def _device() -> str:
    d = jax.devices()[0]
    where = f"{d.platform}:{d.device_kind}"
    if d.platform == "cpu":
        where += f" ({_cpu_model()}, {os.cpu_count()} cores)"
    return where


def _check_timing(repeats, warmup, min_sample_seconds):
    repeats = _check_int("repeats", repeats, 1, "an int >= 1 (samples per batch size, e.g. 10)")
    warmup = _check_int("warmup", warmup, 1, "an int >= 1 (untimed calls first; the first one compiles)")
    min_sample_seconds = _check_positive_number("min_sample_seconds", min_sample_seconds,
                                                "a positive number of seconds (e.g. 0.01)")
    return repeats, warmup, min_sample_seconds


def _measure_models(models: Mapping[str, nnx.Module], inputs, batch_sizes, runtime, repeats, warmup,
                    min_sample_seconds, seed) -> dict[str, Measurement]:
    """:func:`measure` of every model, sampled interleaved (the input shape is the first model's)."""
    runtime = _check_runtime(runtime)
    repeats, warmup, min_sample_seconds = _check_timing(repeats, warmup, min_sample_seconds)
    shape, sizes, given = _input_shape(next(iter(models.values())), inputs, batch_sizes)
    fns = {n: _forward(m, runtime, shape) for n, m in models.items()}
    stats: dict[str, dict[int, LatencyStats]] = {n: {} for n in fns}
    for b in sizes:
        x = _inputs(runtime, shape, b, seed, given)
        samples, inner = _time_samples({n: (f, x) for n, f in fns.items()}, repeats=repeats, warmup=warmup,
                                       min_sample_seconds=min_sample_seconds)
        for n in fns:
            stats[n][b] = LatencyStats.from_samples(b, samples[n], inner[n])
    device = _device()
    return {n: Measurement(runtime, device, jax.__version__, shape, stats[n]) for n in fns}


def measure(
    model: nnx.Module,
    inputs: Sequence[int] | np.ndarray | jax.Array | None = None,
    *,
    batch_sizes: Sequence[int] | None = None,
    runtime: str = "xla",
    repeats: int = 10,
    warmup: int = 2,
    min_sample_seconds: float = 0.01,
    seed: int = 0,
) -> Measurement:
    """Latency of ``model``'s eval-mode forward pass per batch size (compilation excluded).

    Args:
      model: an NNX model with weights (not changed: an eval-mode copy sharing its arrays runs).
      inputs: one example's shape, e.g. ``(32, 32, 3)``; or a batch of inputs (its first axis is
        the batch size); default: ``model.spec.input_shape`` of a zoo model, standard-normal data.
      batch_sizes: default ``(1, 64)`` (or the given batch's size).
      runtime: ``"xla"`` (the JAX model as a user runs it, ``jax.jit`` on the default device: on
        a CPU with the zoo's im2col path for tiny output maps) or ``"onnxruntime"`` (the ONNX
        export's plain convolutions in onnxruntime; needs ``pip install 'ib-lasso-jax[onnx]'``).
      repeats: samples per batch size (the statistics are over them).
      warmup: untimed calls before the samples (at least 1: the first call compiles).
      min_sample_seconds: a sample repeats the call until it lasts about this long.
      seed: of the random inputs.

    Returns:
      A :class:`Measurement`: median, quartiles, min and max seconds per batch size.

    Raises:
      ValueError: a bad argument (named, with its value and what is valid).
      ImportError: ``runtime="onnxruntime"`` without the onnx extra.
    """
    (result,) = _measure_models({"model": model}, inputs, batch_sizes, runtime, repeats, warmup,
                                min_sample_seconds, seed).values()
    return result


def compare(
    original: nnx.Module,
    pruned: nnx.Module,
    inputs: Sequence[int] | np.ndarray | jax.Array | None = None,
    *,
    batch_sizes: Sequence[int] | None = None,
    runtime: str = "xla",
    repeats: int = 10,
    warmup: int = 2,
    min_sample_seconds: float = 0.01,
    seed: int = 0,
) -> Comparison:
    """Latency of an original and a pruned model side by side, with the speed-up and FLOPs ratio.

    The two are sampled interleaved (alternating order in each round), so load from other
    processes hits both alike and the ratio stays fair on a busy machine. Arguments as
    :func:`measure` (the input shape is the original's).
    """
    from ib_lasso_jax.graph import counting

    results = _measure_models({"original": original, "pruned": pruned}, inputs, batch_sizes, runtime, repeats,
                              warmup, min_sample_seconds, seed)
    shape = results["original"].input_shape
    return Comparison(results["original"], results["pruned"],
                      *(counting.count(m, shape).flops for m in (original, pruned)))
