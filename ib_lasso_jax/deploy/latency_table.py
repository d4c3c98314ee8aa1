"""The per-layer latency table and predictor behind ``prune(..., target_latency=...)``.

A latency lookup table in the manner of NetAdapt (Yang et al., ECCV 2018) and HALP (Shen et
al., NeurIPS 2022). Every prunable convolution (with a per-channel scale, shift and ReLU after
it, the eval-mode conv-BatchNorm-ReLU unit) and every dense layer is timed alone, at its input
map size and the table's batch, on a grid of (input, output) widths that are multiples of
``round_to``; the whole model is timed once and the rest of the network is the residual constant::

    T_hat(w) = R + sum_l T_l(c_in_l(w), c_out_l(w)),   R = T(full) - sum_l T_l(full widths)

so ``T_hat(full) = T(full)`` exactly, and ``T_l`` between grid points is bilinear in
``(c_in, c_out)`` (:func:`interpolate`; a convolution's cost ``a + b c_in + c c_out + d c_in
c_out`` is exactly bilinear). The grid values are made monotone (a wider layer is never
predicted faster), so the prediction is monotone in every width and a bisection over the
pruning knob works on it as on FLOPs.

Tables are cached as JSON files (:func:`cache_location`), one per device, jax version, model
spec, input shape, batch, grid and ``round_to``, and reused by the next call. Every timing goes
through :func:`ib_lasso_jax.deploy.latency._time_samples` (looked up at call time, so one stand-in
replaces all timing). The names here are also ``ib_lasso_jax.deploy.latency``'s; see
docs/latency-targets.md for the measured prediction error and the limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.graph import coupling

__all__ = [
    "CACHE_ENV_VAR",
    "LatencyPredictor",
    "LatencyTable",
    "LayerTable",
    "build_table",
    "cache_location",
    "interpolate",
]

CACHE_ENV_VAR = "IB_LASSO_JAX_LATENCY_CACHE"
_DISABLE_VALUES = ("off", "0", "false", "no", "none")
# Bumped whenever what a table holds or how it is measured changes: old files are then ignored.
TABLE_VERSION = 1


def _timing():
    """The timing module, imported when first needed (it imports this one)."""
    from ib_lasso_jax.deploy import latency

    return latency


# ---------------------------------------------------------------------------------------------
# Argument checks (shared with the timing module)


def _check_int(name: str, value: Any, least: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name}={value!r} is not valid; valid values: {what}")
    return int(value)


def _check_positive_number(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not valid; valid values: {what}")
    return float(value)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# The latency table


def interpolate(in_grid: Sequence[int], out_grid: Sequence[int], times: Any, n_in: float, n_out: float) -> float:
    """Bilinear interpolation of ``times[i][j]`` (measured at ``in_grid[i] x out_grid[j]``).

    Exact at grid points; between them the bilinear form ``a + b n_in + c n_out + d n_in n_out``
    through the cell's four corners; widths outside the grid are clamped to it. A grid of one
    point on an axis (a width that is never pruned) makes that axis constant.

    >>> interpolate([8, 16], [8, 16], [[1.0, 2.0], [3.0, 4.0]], 12, 16)
    3.0
    """
    t = np.asarray(times, np.float64)
    gi, go = np.asarray(in_grid, np.float64), np.asarray(out_grid, np.float64)
    if t.shape != (gi.size, go.size):
        raise ValueError(f"times has shape {t.shape}; expected (len(in_grid), len(out_grid)) = "
                         f"({gi.size}, {go.size})")

    def locate(grid, v):
        if grid.size == 1:
            return 0, 0, 0.0
        v = min(max(float(v), grid[0]), grid[-1])
        k = int(np.clip(np.searchsorted(grid, v, side="right") - 1, 0, grid.size - 2))
        return k, k + 1, (v - grid[k]) / (grid[k + 1] - grid[k])

    i0, i1, u = locate(gi, n_in)
    j0, j1, v = locate(go, n_out)
    return float((1 - u) * (1 - v) * t[i0, j0] + u * (1 - v) * t[i1, j0] + (1 - u) * v * t[i0, j1]
                 + u * v * t[i1, j1])


def _grid(size: int, prunable: bool, points: int, step: int) -> tuple[int, ...]:
    """Widths to time on one axis: ``points`` multiples of ``step`` from one block to ``size``
    (which is always allowed, multiple or not), or ``(size,)`` for an axis never pruned."""
    if not prunable or size <= step:
        return (int(size),)
    raw = np.linspace(0, size, points)[1:-1]
    inner = {int(min(size, max(step, step * round(v / step)))) for v in raw}
    return tuple(sorted(inner | {int(step), int(size)}))


@dataclasses.dataclass(frozen=True)
class LayerTable:
    """One conv or dense layer's seconds per call on an (input, output) width grid.

    Widths are the kernel's input and output axis sizes (a grouped convolution's input axis
    is per group). ``times`` are monotone (a wider layer is never predicted faster) with the
    dispatch overhead of a lone call removed; ``measured`` are the medians as timed.
    """

    name: str
    kind: str
    kernel: str
    in_axis: int
    out_axis: int
    in_full: int
    out_full: int
    in_grid: tuple[int, ...]
    out_grid: tuple[int, ...]
    times: tuple[tuple[float, ...], ...]
    measured: tuple[tuple[float, ...], ...]

    def __call__(self, n_in: float, n_out: float) -> float:
        return interpolate(self.in_grid, self.out_grid, self.times, n_in, n_out)

    @property
    def full_s(self) -> float:
        return self(self.in_full, self.out_full)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("in_grid", "out_grid"):
            d[k] = list(d[k])
        d["times"], d["measured"] = [list(r) for r in self.times], [list(r) for r in self.measured]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerTable:
        return cls(str(d["name"]), str(d["kind"]), str(d["kernel"]), int(d["in_axis"]), int(d["out_axis"]),
                   int(d["in_full"]), int(d["out_full"]), tuple(int(v) for v in d["in_grid"]),
                   tuple(int(v) for v in d["out_grid"]), tuple(tuple(float(v) for v in r) for r in d["times"]),
                   tuple(tuple(float(v) for v in r) for r in d["measured"]))


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Per-layer tables plus the residual constant: ``predict(full widths) == full_s``.

    Attributes:
      key: what the table was measured for (device, jax version, model, batch, grid, ...).
      layers: one :class:`LayerTable` per timed conv/dense layer, in execution order.
      full_s: the whole model's measured median seconds per call at ``batch``.
      residual_s: ``full_s - sum(layer at full widths)``: everything the layers do not cover
        (pooling, residual adds, BatchNorm of untimed layers, the runtime's per-op overhead).
      overhead_s: the dispatch cost of a lone jitted call, removed from every layer's times.
      batch: the batch size timed.
      build_seconds: how long measuring took (0 when read from the cache).
      path: the cache file, if any; ``from_cache``: read from it rather than measured.
    """

    key: dict[str, Any]
    layers: tuple[LayerTable, ...]
    full_s: float
    residual_s: float
    overhead_s: float
    batch: int
    build_seconds: float
    path: Path | None = None
    from_cache: bool = False

    def predict(self, widths: Mapping[str, tuple[float, float]] | None = None) -> float:
        """Predicted seconds per call with ``widths[layer name] = (n_in, n_out)``; absent layers: full."""
        widths = widths or {}
        total = self.residual_s
        for layer in self.layers:
            n_in, n_out = widths.get(layer.name, (layer.in_full, layer.out_full))
            total += layer(n_in, n_out)
        return float(total)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "layers": [layer.to_dict() for layer in self.layers], "full_s": self.full_s,
                "residual_s": self.residual_s, "overhead_s": self.overhead_s, "batch": self.batch,
                "build_seconds": self.build_seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: Path | None = None, from_cache: bool = False) -> LatencyTable:
        return cls(dict(d["key"]), tuple(LayerTable.from_dict(x) for x in d["layers"]), float(d["full_s"]),
                   float(d["residual_s"]), float(d["overhead_s"]), int(d["batch"]), float(d["build_seconds"]),
                   path, from_cache)


def cache_location(cache: str | os.PathLike | bool | None = None) -> Path | None:
    """The directory latency tables are cached in, or ``None`` for no cache.

    ``cache``: a directory; ``False``: no cache; ``None`` or ``True``: ``$IB_LASSO_JAX_LATENCY_CACHE``
    if set (``off``, ``0``, ``false``, ``no``: no cache), else ``$XDG_CACHE_HOME/ib-lasso-jax/latency``
    (``~/.cache/ib-lasso-jax/latency``), beside the compilation cache (:mod:`ib_lasso_jax.compile_cache`).
    """
    if cache is False:
        return None
    if cache is not None and cache is not True:
        if isinstance(cache, (str, os.PathLike)):
            return Path(cache).expanduser()
        raise ValueError(f"latency cache={cache!r} is not valid; valid values: a directory (str or path), "
                         "None or True (the default location), False (no cache)")
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env.lower() in _DISABLE_VALUES:
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ib-lasso-jax" / "latency"


def _model_identity(model: nnx.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    spec = getattr(model, "spec", None)
    if spec is not None and hasattr(spec, "to_dict"):
        return {"spec": spec.to_dict()}
    params = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "input_shape": list(shape),
            "arrays": {coupling.path_str(k): list(np.shape(v)) for k, v in params}}


def _table_key(model, shape, batch, grid, step, policy, repeats) -> dict[str, Any]:
    import jaxlib

    d = jax.devices()[0]
    return {"version": TABLE_VERSION, "platform": d.platform, "device_kind": d.device_kind,
            "cpu": _cpu_model() if d.platform == "cpu" else None, "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            # XLA flags change the generated code (the tests' FAST_COMPILE preset, for one).
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "model": _model_identity(model, shape), "input_shape": list(shape), "batch": batch, "grid": grid,
            "round_to": step, "policy": policy, "repeats": repeats}


def _cache_file(directory: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = key["model"].get("spec", {}).get("name") or key["model"].get("class", "model").rsplit(".", 1)[-1]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))
    return directory / f"{safe}-b{key['batch']}-{digest}.json"


def _read_cached(file: Path, key: dict[str, Any]) -> LatencyTable | None:
    """The table in ``file`` if it is one for ``key``; a damaged or foreign file is ignored (and replaced)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("key") != json.loads(json.dumps(key)):
            return None
        return LatencyTable.from_dict(data, path=file, from_cache=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_cached(file: Path, table: LatencyTable) -> None:
    from ib_lasso_jax.deploy.export import _write_atomic

    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(file, json.dumps(table.to_dict(), indent=1, sort_keys=True).encode())  # temp file + rename


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    return {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)}


def _resized(module: nnx.Module, kernel_shape: tuple[int, ...], rng: np.random.Generator) -> nnx.Module:
    """A copy of a conv or dense layer with a kernel (and bias) of ``kernel_shape``: same
    strides, padding, groups and convolution function (so the CPU's im2col path applies alike)."""
    from ib_lasso_jax.graph import surgery

    m = nnx.clone(module)
    m.kernel.set_value(jnp.asarray(rng.standard_normal(kernel_shape).astype(np.float32) * 0.05))
    if getattr(m, "bias", None) is not None:
        m.bias.set_value(jnp.zeros((kernel_shape[-1],), jnp.float32))
    return surgery.sync_layer_sizes(m)


def _signature(module: nnx.Module, op: coupling.LayerOp, batch: int) -> str:
    """What a layer's time depends on besides its widths: its kind, hyperparameters and input map."""
    attrs = ("kernel_size", "strides", "padding", "input_dilation", "kernel_dilation", "feature_group_count",
             "use_bias", "dtype", "param_dtype", "precision", "kernel_shape")
    conv = getattr(module, "conv_general_dilated", None)
    parts = [type(module).__qualname__, op.kind, repr(op.in_shape[:-1]), str(batch),
             f"{getattr(conv, '__module__', '')}.{getattr(conv, '__qualname__', '')}"]
    parts += [f"{a}={getattr(module, a)!r}" for a in attrs if a != "kernel_shape" and hasattr(module, a)]
    parts.append(f"kernel_rank={np.ndim(module.kernel.get_value())}")
    return "|".join(parts)


def _layer_call(module: nnx.Module, kind: str, in_shape: tuple[int, ...], batch: int, rng: np.random.Generator):
    """``(fn, x)``: the layer (a conv followed by a per-channel affine and ReLU, the eval-mode
    conv-BatchNorm-ReLU unit) on a standard-normal input of its size."""
    n_in = int(module.in_features)
    x = jnp.asarray(rng.standard_normal((batch, *in_shape[:-1], n_in)).astype(np.float32))
    graphdef, state = nnx.split(module)
    n_out = int(module.out_features)
    scale, shift = jnp.ones((n_out,), jnp.float32), jnp.zeros((n_out,), jnp.float32)
    if kind == "conv":
        fn = jax.jit(lambda s, a, b, x: jnp.maximum(nnx.merge(graphdef, s)(x) * a + b, 0.0))
    else:
        fn = jax.jit(lambda s, a, b, x: nnx.merge(graphdef, s)(x))
    return (lambda x: fn(state, scale, shift, x)), x


def _dispatch_overhead(batch: int, repeats: int, min_sample_seconds: float) -> float:
    """Seconds of a jitted call that does (almost) nothing, with arguments like a layer's."""
    args = tuple(jnp.zeros((4,), jnp.float32) for _ in range(4))
    fn = jax.jit(lambda s, x: x[:1] + s[0][:1])
    x = jnp.zeros((batch, 4), jnp.float32)
    samples, _ = _timing()._time_samples({"overhead": (lambda x: fn(args, x), x)}, repeats=repeats, warmup=2,
                                         min_sample_seconds=min_sample_seconds)
    return float(np.median(samples["overhead"]))


def _timed_layers(model: nnx.Module, graph: coupling.ChannelGraph, policy: str):
    """``[(name, op, module, in_axis, out_axis, kernel shape, in prunable, out prunable)]`` for
    every conv (``nnx.Conv``) and dense (``nnx.Linear``) layer of the trace."""
    groups = graph.prunable(policy)
    # Masks that drop one channel of every group: the axes they touch are the prunable ones.
    probe = {n: np.arange(g.size) > 0 for n, g in groups.items() if g.size > 1}
    touched = set(graph.keep_vectors(probe, policy)) if probe else set()
    modules = _modules(model)
    out, seen = [], {}
    for op in graph.layers:
        m = modules.get(op.module)
        shape = graph.param_shapes.get(op.kernel)
        if shape is None or not ((op.kind == "conv" and isinstance(m, nnx.Conv))
                                 or (op.kind == "dense" and isinstance(m, nnx.Linear))):
            continue  # any other layer is part of the residual constant
        in_axis, out_axis = (len(shape) - 2, len(shape) - 1) if op.kind == "conv" else (0, 1)
        seen[op.module] = seen.get(op.module, 0) + 1
        name = op.module if seen[op.module] == 1 else f"{op.module}#{seen[op.module]}"  # a layer called twice
        out.append((name, op, m, in_axis, out_axis, tuple(int(s) for s in shape),
                    (op.kernel, in_axis) in touched, (op.kernel, out_axis) in touched))
    return out


def build_table(
    model: nnx.Module,
    graph: coupling.ChannelGraph | None = None,
    policy: str = "inner",
    *,
    batch: int = 1,
    grid: int = 3,
    round_to: int | None = None,
    repeats: int = 5,
    min_sample_seconds: float = 0.005,
    input_shape: Sequence[int] | None = None,
    cache: str | os.PathLike | bool | None = None,
    progress: bool = True,
) -> LatencyTable:
    """Measure (or read from the cache) the latency table of ``model`` on this backend.

    Every conv and dense layer whose width can change under ``policy`` is timed alone on a
    ``grid x grid`` grid of (input, output) widths, multiples of ``round_to``, from one block
    to the full width (a width that is never pruned: its full value only); the whole model is
    timed once, and the remainder is the residual constant (see the module docstring). Each
    grid point's time is the median of ``repeats`` samples, with a lone call's dispatch
    overhead removed, then the grid is made monotone (running maximum along both axes).

    Args:
      model: the model to prune (its eval-mode forward pass is timed).
      graph: its channel graph (:func:`ib_lasso_jax.graph.coupling.trace_channels`); traced if None.
      policy: the residual policy of the pruning (which widths can change).
      batch: the batch size to time (the latency the pruning targets).
      grid: grid points per width axis, an int >= 2 (the full width and one block included).
      round_to: the width step (``prune``'s ``round_to``); None: 1.
      repeats: samples per grid point.
      min_sample_seconds: a sample repeats a call until it lasts about this long.
      input_shape: one example's shape; default ``model.spec.input_shape``.
      cache: where tables are cached (see :func:`cache_location`); False: measure, do not cache.
      progress: a tqdm bar over the grid points (shown on a terminal).

    Returns:
      A :class:`LatencyTable` (``from_cache`` tells whether it was read back).
    """
    from tqdm.auto import tqdm

    batch = _check_int("latency batch", batch, 1, "a positive int (the batch size the latency is for, e.g. 1)")
    grid = _check_int("latency grid", grid, 2, "an int >= 2 (grid points per width axis, e.g. 4)")
    step = 1 if round_to is None else _check_int("round_to", round_to, 1, "a positive int or None")
    repeats = _check_int("repeats", repeats, 1, "an int >= 1 (samples per grid point)")
    min_sample_seconds = _check_positive_number("min_sample_seconds", min_sample_seconds,
                                                "a positive number of seconds (e.g. 0.005)")
    graph = graph if graph is not None else coupling.trace_channels(model, input_shape, strict=False)
    shape = tuple(int(s) for s in (input_shape if input_shape is not None else graph.input_shape))
    key = _table_key(model, shape, batch, grid, step, policy, repeats)
    directory = cache_location(cache)
    file = _cache_file(directory, key) if directory is not None else None
    if file is not None and file.is_file():
        cached = _read_cached(file, key)
        if cached is not None:
            return cached

    t0 = time.perf_counter()
    timing = _timing()
    layers = _timed_layers(model, graph, policy)
    plans = [(entry, _grid(entry[5][entry[3]], entry[6], grid, step), _grid(entry[5][entry[4]], entry[7], grid, step))
             for entry in layers]
    rng = np.random.default_rng(0)
    overhead = _dispatch_overhead(batch, repeats, min_sample_seconds)
    rows, done = [], {}
    # Layers of one configuration (ResNet-56 has 18 identical convolutions per stage) are timed once.
    points = {(_signature(e[2], e[1], batch), a, b) for e, gi, go in plans for a in gi for b in go}
    with tqdm(total=len(points), desc="latency table", unit="point", disable=None if progress else True,
              dynamic_ncols=True) as bar:
        for (name, op, module, in_axis, out_axis, kshape, _, _), gi, go in plans:
            measured = np.zeros((len(gi), len(go)))
            signature = _signature(module, op, batch)
            for i, a in enumerate(gi):
                for j, b in enumerate(go):
                    if (signature, a, b) not in done:
                        new = list(kshape)
                        new[in_axis], new[out_axis] = a, b
                        fn, x = _layer_call(_resized(module, tuple(new), rng), op.kind, op.in_shape, batch, rng)
                        samples, _ = timing._time_samples({name: (fn, x)}, repeats=repeats, warmup=1,
                                                   min_sample_seconds=min_sample_seconds)
                        done[signature, a, b] = float(np.median(samples[name]))
                        bar.update()
                    measured[i, j] = done[signature, a, b]
            # Monotone in both widths, so the predicted latency is monotone in every mask.
            times = np.maximum.accumulate(np.maximum.accumulate(np.maximum(measured - overhead, 0.0), 0), 1)
            rows.append(LayerTable(name, op.kind, op.kernel, in_axis, out_axis, kshape[in_axis], kshape[out_axis],
                                   gi, go, tuple(map(tuple, times.tolist())), tuple(map(tuple, measured.tolist()))))
    x = timing._inputs("xla", shape, batch, 1)
    # The residual is the difference of two timings: the whole model gets more samples than a grid point.
    samples, _ = timing._time_samples({"model": (timing._xla_forward(model), x)}, repeats=max(3 * repeats, 9),
                                      warmup=2, min_sample_seconds=max(min_sample_seconds, 0.01))
    full = float(np.median(samples["model"]))
    residual = full - sum(layer.full_s for layer in rows)
    table = LatencyTable(key, tuple(rows), full, residual, overhead, batch, time.perf_counter() - t0, file, False)
    if file is not None:
        _write_cached(file, table)
    return table


class LatencyPredictor:
    """Predicted seconds per call of the model a set of keep masks would give.

    ``LatencyPredictor(table, graph, policy)(masks)`` reads every timed layer's kept input and
    output widths from the masks (:meth:`ib_lasso_jax.graph.coupling.ChannelGraph.keep_vectors`) and
    sums the table there (:meth:`LatencyTable.predict`); ``predictor({})`` is the full model's
    measured latency.
    """

    def __init__(self, table: LatencyTable, graph: coupling.ChannelGraph, policy: str = "inner"):
        self.table, self.graph, self.policy = table, graph, policy

    def widths(self, masks: Mapping[str, np.ndarray]) -> dict[str, tuple[int, int]]:
        keeps = self.graph.keep_vectors(masks, self.policy) if masks else {}
        out = {}
        for layer in self.table.layers:
            k_in, k_out = keeps.get((layer.kernel, layer.in_axis)), keeps.get((layer.kernel, layer.out_axis))
            out[layer.name] = (layer.in_full if k_in is None else int(k_in.sum()),
                               layer.out_full if k_out is None else int(k_out.sum()))
        return out

    def __call__(self, masks: Mapping[str, np.ndarray]) -> float:
        return self.table.predict(self.widths(masks))
