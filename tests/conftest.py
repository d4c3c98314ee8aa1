"""Shared test helpers."""

import os

# Several CPU devices let the data-parallel code be exercised. Compilation dominates these
# tests on a 2-core machine: the cheaper XLA optimisation level halves compile times, and
# XLA:CPU's FAST_COMPILE preset cuts them again (a shrunk ResNet-110 training step: 19.4 s ->
# 6.5 s; ResNet-56: 6.7 s -> 4.2 s).
# The same compile-time flags go to the processes the tests start (notebook kernels, the
# multihost workers), which set their own device counts.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_opt_preset=FAST_COMPILE")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 " + FAST_COMPILE_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole test session, shared by the xdist
# workers and the processes the tests start (notebook kernels, CLI subprocesses): the same
# program (a model's training step, a solver at one shape) is compiled once per session, not
# once per worker and process. It starts empty every session (a fresh clone's first run costs
# the same), so no test depends on an earlier run. The controller creates it; the workers
# inherit the variables; the controller removes it at exit.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="ib-lasso-jax-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # Every program, however small (as ib_lasso_jax.compile_cache does for users): reading an
    # entry costs ~3 ms, compiling even a tiny one ~45 ms.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "heavy(seconds): a long test and its rough duration on 2 cores; scheduled longest first")
    config.addinivalue_line(
        "markers", "depth_variant: a zoo model's depth variant, run by `make test-onnx` (CI) instead of `make test`")


def _heavy_seconds(item) -> float:
    mark = item.get_closest_marker("heavy")
    if mark is None:
        return 0.0
    return float(mark.kwargs.get("seconds", mark.args[0] if mark.args else 60))


def pytest_collection_modifyitems(config, items):
    """Longest first (the classic LPT schedule): xdist hands tests out in collection order, so
    the long tests start at once instead of forming a tail after the short ones. xdist's
    default chunks send the first worker the first quarter of the collection (every long
    test); the Makefile passes ``--maxschedchunk=1`` so each worker takes the next test when it
    is free. Measured (2026-11-22, all fourteen paper configs): the same wall time either way
    (15:20 vs 15:23): long tests side by side run ~15% slower than next to short ones."""
    items.sort(key=_heavy_seconds, reverse=True)  # stable: the others keep their order


def random_masks(graph, policy, rng, p=0.5):
    """A random keep mask (about ``p`` kept, never empty) for every group prunable under ``policy``."""
    masks = {}
    for n, g in graph.prunable(policy).items():
        m = rng.random(g.size) < p
        m[rng.integers(g.size)] = True
        masks[n] = m
    return masks


def randomise_batchnorm(model, seed=0):
    """Give every BatchNorm non-trivial scale, shift and running statistics, in place.

    Freshly initialised BatchNorms are the identity, which would hide surgery bugs (a removed
    channel that still emits BatchNorm's shift, a mis-sliced running mean).
    """
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            c = m.scale.get_value().shape
            m.scale.set_value(jax.numpy.asarray(rng.uniform(0.5, 1.5, c), m.scale.get_value().dtype))
            m.bias.set_value(jax.numpy.asarray(rng.normal(0, 0.5, c), m.bias.get_value().dtype))
            m.mean.set_value(jax.numpy.asarray(rng.normal(0, 0.5, c), m.mean.get_value().dtype))
            m.var.set_value(jax.numpy.asarray(rng.uniform(0.5, 2.0, c), m.var.get_value().dtype))
    return model


def scaled_widths(widths, div):
    """Every integer width divided by ``div`` (at least 2): the same structure, cheaper to run."""
    if isinstance(widths, bool):
        return widths
    if isinstance(widths, int):
        return max(2, widths // div)
    if isinstance(widths, dict):
        return {k: scaled_widths(v, div) for k, v in widths.items()}
    if isinstance(widths, list):
        return [scaled_widths(v, div) for v in widths]
    return widths

