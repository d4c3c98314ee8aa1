"""Atomic writes of checkpoint directories: a crash at any instant leaves a complete checkpoint.

Protocol (:func:`atomic_directory`, used by every save), for a target ``DIR/NAME``:

1. *Recover* from an earlier crash (see below) and delete stale ``DIR/.NAME.tmp-*``
   directories of crashed saves.
2. Write the complete new checkpoint (orbax state, then the JSON files, fsynced) into a
   fresh temporary sibling ``DIR/.NAME.tmp-<random>``. Orbax itself writes ``state/`` to
   its own temporary name and renames it when complete. Any failure here deletes the
   temporary directory and leaves ``DIR/NAME`` untouched.
3. If ``DIR/NAME`` exists: rename it to ``DIR/.NAME.old``.
4. Rename ``DIR/.NAME.tmp-<random>`` to ``DIR/NAME`` (atomic on POSIX file systems).
   If this rename fails, step 3 is undone.
5. Delete ``DIR/.NAME.old``.

So at every instant either ``DIR/NAME`` or ``DIR/.NAME.old`` is a complete checkpoint.
A process killed between steps 3 and 4 leaves only ``DIR/.NAME.old``: readers
(:func:`_resolve`, so ``restore_model``, ``load_spec``, ``restore_pytree``, ...) then read the
previous checkpoint from there, and the next save renames it back to ``DIR/NAME`` (step 1)
before going on. If both exist (killed between steps 4 and 5), ``DIR/NAME`` is the new,
complete one and step 1 deletes the stale ``.old``. The protocol assumes one writer per
path at a time on a local file system, single-process JAX (no multi-host saves).

The renames go through :func:`_rename`, looked up in this module, so tests can interrupt the
protocol between any two steps by patching ``ib_lasso_jax.checkpoint.atomic._rename``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ib_lasso_jax.checkpoint.files import STATE_DIR, CheckpointError

__all__ = [
    "atomic_directory",
]

_TMP_INFIX = ".tmp-"
_OLD_SUFFIX = ".old"


def _old_path(path: Path) -> Path:
    return path.parent / f".{path.name}{_OLD_SUFFIX}"


def _tmp_paths(path: Path) -> list[Path]:
    return [Path(p) for p in glob.glob(str(path.parent / f".{glob.escape(path.name)}{_TMP_INFIX}*"))]


def _rename(src: Path, dst: Path) -> None:
    """``os.rename`` (a separate function so tests can interrupt the protocol)."""
    os.rename(src, dst)


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory entry table (not all file systems support it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text(file: Path, text: str) -> None:
    """Write ``text`` to ``file`` (UTF-8) and fsync it: durable once its directory is synced."""
    with open(file, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _as_target(path: str | os.PathLike) -> Path:
    target = Path(path).expanduser().absolute()
    if not target.name or target.name in (".", ".."):
        raise ValueError(f"path must name a checkpoint directory; got {str(path)!r}")
    return target


def _recover(path: Path) -> None:
    """Repair what a crashed save left behind (step 1 of the protocol)."""
    old = _old_path(path)
    if old.exists():
        if path.exists():  # killed after the swap: `path` is the new, complete checkpoint
            shutil.rmtree(old)
        else:  # killed between the renames: put the previous checkpoint back
            _rename(old, path)
            _fsync_dir(path.parent)
    for stale in _tmp_paths(path):
        shutil.rmtree(stale, ignore_errors=True)


def _is_replaceable(path: Path) -> bool:
    """True for one of our checkpoints (has ``state/``) or an empty directory."""
    return path.is_dir() and ((path / STATE_DIR).is_dir() or not any(path.iterdir()))


def _check_writable(path: Path, overwrite: bool) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(
            f"checkpoint path {str(path)!r} already exists; pass overwrite=True to replace it "
            "(the default overwrite=False never replaces anything)"
        )
    if path.is_symlink() or not _is_replaceable(path):
        raise FileExistsError(
            f"refusing to replace {str(path)!r} even with overwrite=True: it is not an "
            f"ib_lasso_jax checkpoint (expected a directory with a {STATE_DIR!r} subdirectory, "
            "or an empty directory); remove it yourself or choose another path"
        )


def _commit(tmp: Path, path: Path) -> None:
    """Swap the complete ``tmp`` in as ``path`` (steps 3-5 of the protocol)."""
    old = _old_path(path)
    had_previous = path.exists()
    if had_previous:
        _rename(path, old)
    try:
        _rename(tmp, path)
    except BaseException:
        if had_previous and not path.exists():
            _rename(old, path)
        raise
    _fsync_dir(path.parent)
    if had_previous:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary directory, it becomes ``path``.

    The yielded directory is a fresh, empty sibling of ``path``. When the ``with`` block
    ends normally it replaces ``path`` (see the module docstring for the protocol); when the
    block raises, it is deleted and ``path`` is left as it was.

    Args:
      path: the final directory.
      overwrite: whether an existing checkpoint at ``path`` may be replaced.

    Yields:
      The temporary directory to write into.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False, or ``path`` exists and is
        not a checkpoint directory (never replaced).
    """
    target = _as_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    _check_writable(target, overwrite)
    tmp = target.parent / f".{target.name}{_TMP_INFIX}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve(path: str | os.PathLike) -> Path:
    """The directory holding the committed checkpoint of ``path`` (``path`` or its ``.old``)."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        return target
    if target.exists():
        raise CheckpointError(f"checkpoint path {str(target)!r} is a file; expected a checkpoint directory")
    old = _old_path(target)
    if target.name and old.is_dir():  # a save was interrupted between its two renames
        return old
    raise CheckpointError(f"no checkpoint at {str(target)!r}: the path does not exist")
