"""A persistent XLA compilation cache for the command line and the experiment scripts.

On a CPU most of a pruning run's first call is XLA compilation, not computation: the
sGLP-IB pruning of ``make demo`` (a narrow VGG-11, 200 calibration images) compiles 296
programs and takes 29.5 s in a fresh process, 5.8 s when repeated in the same process. With
this cache a second process needs 8.0 s (the rest is tracing and lowering, which JAX redoes
to compute the cache keys). Each program is compiled once per machine and then read from
disk, in every later process: ``ib-lasso prune`` and ``ib-lasso finetune`` run one after the
other, a rerun of ``make demo`` (53 s -> 21 s with the baseline trained), every cell of
``experiments/compare.py``.

The cache is JAX's own persistent compilation cache (keys hash the program, the compile
options, the backend and the JAX version, so a changed program never reads a stale entry).
This module only chooses where it lives and when it is on:

- the ``ib-lasso`` command line and the experiment scripts call :func:`enable` at start-up;
  the library itself never turns it on (importing a library should not change global JAX
  configuration);
- default location ``$XDG_CACHE_HOME/ib-lasso-jax/xla`` (``~/.cache/ib-lasso-jax/xla``),
  created private to the user: JAX treats the cache as trusted code, so it must not be
  writable by others;
- ``IB_LASSO_JAX_COMPILE_CACHE=off`` (or ``0``, ``false``, ``no``) turns it off, another
  value is the directory to use; a ``JAX_COMPILATION_CACHE_DIR`` already set (e.g. by the
  test suite) is respected as is;
- ``ib-lasso cache`` shows the location and size, ``ib-lasso cache --clear`` empties it.

Entries are small (the demo's sGLP-IB pruning wrote 288 entries, 1.8 MB); the cache is not
size-capped (JAX's cap needs the ``filelock`` package, which we do not depend on).
Benchmarks never call :func:`enable`: their first-call timings must include compilation.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DISABLE_VALUES", "ENV_VAR", "default_path", "enable", "location", "size"]

ENV_VAR = "IB_LASSO_JAX_COMPILE_CACHE"
DISABLE_VALUES = ("off", "0", "false", "no", "none")


def default_path() -> Path:
    """``$XDG_CACHE_HOME/ib-lasso-jax/xla``, or ``~/.cache/ib-lasso-jax/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ib-lasso-jax" / "xla"


def location(path: str | os.PathLike | None = None) -> Path | None:
    """The directory :func:`enable` would use, or ``None`` when the cache is turned off.

    Precedence: ``JAX_COMPILATION_CACHE_DIR``, then ``path``, then
    ``$IB_LASSO_JAX_COMPILE_CACHE``, then :func:`default_path`; ``IB_LASSO_JAX_COMPILE_CACHE=off``
    turns it off.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env.lower() in DISABLE_VALUES:
        return None
    preset = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if preset:
        return Path(preset)
    where = Path(path) if path is not None else (Path(env) if env else default_path())
    return where.expanduser()


def enable(path: str | os.PathLike | None = None, *, min_compile_secs: float = 0.0) -> Path | None:
    """Turn JAX's persistent compilation cache on; returns its directory, or ``None`` if off.

    Args:
      path: the cache directory; default: ``$IB_LASSO_JAX_COMPILE_CACHE`` if set, else
        :func:`default_path`. Ignored when ``JAX_COMPILATION_CACHE_DIR`` is already set in
        the environment (that choice wins; see :func:`location`).
      min_compile_secs: programs that compile faster than this are not stored. Default 0:
        everything. JAX's own default (1 s) suits remote caches; on a local disk reading an
        entry costs ~3 ms against ~45 ms to compile even a tiny program, and a pruning run
        compiles hundreds of them (the demo's sGLP-IB pruning: 296 programs; in a second
        process it took 20.6 s with a 0.2 s threshold, 7.9 s with none, 5.8 s in-process).

    Raises:
      ValueError: ``min_compile_secs`` negative or not finite.
    """
    import math

    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if not (isinstance(min_compile_secs, (int, float)) and math.isfinite(min_compile_secs)
            and min_compile_secs >= 0):
        raise ValueError(f"min_compile_secs must be a finite number >= 0; got {min_compile_secs!r}")
    where = location(path)
    if where is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        jax.config.update("jax_compilation_cache_dir", str(where))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_enable_compilation_cache", True)
    # The cache is set up on the first compilation; a program compiled before this call
    # (e.g. by an import) would otherwise have pinned "no cache" for the process.
    compilation_cache.reset_cache()
    return where


def size(path: str | os.PathLike | None = None) -> tuple[int, int]:
    """``(entries, bytes)`` of a cache directory (default: :func:`location`)."""
    where = Path(path) if path is not None else location()
    if where is None or not where.is_dir():
        return 0, 0
    files = [p for p in where.iterdir() if p.is_file() and p.name.endswith("-cache")]
    return len(files), sum(p.stat().st_size for p in files)
