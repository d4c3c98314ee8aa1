"""A persistent XLA compilation cache for the command line and the experiment scripts.

On a CPU most of a pruning run's first call is XLA compilation (hundreds of programs), not
computation; tracing and lowering, which JAX redoes to compute the cache keys, are what a
cached process still pays (timings: docs/performance-log.md). Each program is compiled once
per machine and then read from disk, in every later process: ``ib-lasso prune`` and
``ib-lasso finetune`` run one after the other, a rerun of ``make demo``, every cell of
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
- ``ib-lasso cache`` shows the location and size, ``ib-lasso cache --clear`` empties it
  (:func:`clear`), also while other processes are using it: it renames the directory away
  first and deletes it there, and a process that enabled the cache here and finds it gone
  recreates it (empty, private) and says so once, with a :class:`CompileCacheClearedWarning`,
  instead of JAX's warning for every program it then fails to store.

Entries are small (docs/performance-log.md); the cache is not size-capped (JAX's cap needs
the ``filelock`` package, which is not a dependency).
Benchmarks never call :func:`enable`: their first-call timings must include compilation.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

__all__ = ["DISABLE_VALUES", "ENV_VAR", "CompileCacheClearedWarning", "clear", "default_path", "enable", "location",
           "size"]

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
        entry is far cheaper than compiling even a tiny program, and a pruning run compiles
        hundreds of them (docs/performance-log.md).

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
    _watch(where)
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


def clear(path: str | os.PathLike | None = None) -> tuple[int, int]:
    """Delete a cache directory (default: :func:`location`); returns the ``(entries, bytes)`` removed.

    Safe while other processes use the cache: the directory is renamed away (atomic) and
    deleted under its new name, so they see either the whole old cache or none of it, and
    their new entries are not written into a directory being deleted. A process that
    enabled it with :func:`enable` recreates it on its next write (one
    :class:`CompileCacheClearedWarning`); leftovers of an interrupted clear are deleted too.
    """
    where = Path(path) if path is not None else location()
    if where is None:
        return 0, 0
    entries, nbytes = size(where)
    where = where.resolve()  # a symlinked cache: move its directory, keep the link
    leftovers = sorted(where.parent.glob(f".{where.name}.cleared-*")) if where.parent.is_dir() else []
    if where.is_dir():
        trash = where.with_name(f".{where.name}.cleared-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(where, trash)
        leftovers.append(trash)
    for trash in leftovers:
        shutil.rmtree(trash, ignore_errors=True)
        if trash.exists():  # an entry a running process was writing when the directory moved: once more
            shutil.rmtree(trash)
    return entries, nbytes


class CompileCacheClearedWarning(UserWarning):
    """The compilation cache directory was deleted (e.g. ``ib-lasso cache --clear``) while this process used it."""


# JAX warns once per program it cannot read or store (compiler._cache_read/_cache_write).
_JAX_CACHE_ERROR = re.compile(r"Error (reading|writing) persistent compilation cache entry .*FileNotFoundError")
_watched: dict = {"path": None, "told": False}


def _watch(where: Path) -> None:
    """Recreate ``where`` when it vanishes under this process, saying so once instead of JAX's warning per entry.

    Hooked into ``warnings.showwarning``: JAX's cache has no other hook, and its directory is
    created only when the cache is set up, so without this every later program would fail to
    be stored, each with its own warning.
    """
    _watched["path"] = where
    if getattr(warnings.showwarning, "_ib_lasso_cache_watch", False):
        return
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        watched = _watched["path"]
        text = str(message)
        if watched is None or not _JAX_CACHE_ERROR.match(text) or (watched.is_dir() and str(watched) not in text):
            return previous(message, category, filename, lineno, file, line)
        try:
            watched.resolve().mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:  # cannot recreate it: JAX's own warning tells what is wrong
            return previous(message, category, filename, lineno, file, line)
        if not _watched["told"]:
            _watched["told"] = True
            # Named by the directory (line 0: no source line), so it is one line also outside the command line.
            warnings.warn_explicit(
                f"the compilation cache {str(watched)!r} was cleared while this process was using it; "
                "recreated it empty, and this process stores its programs there again",
                CompileCacheClearedWarning, str(watched), 0, module=__name__)
        return None

    show._ib_lasso_cache_watch = True
    warnings.showwarning = show
