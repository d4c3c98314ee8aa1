"""An exclusive lock on a work directory, so two commands never write one directory at once.

:func:`locked` ``(directory)`` holds ``directory/.lock`` for the length of a ``with`` block.
The file is created with ``O_CREAT | O_EXCL`` (so exactly one process gets it) and holds
JSON: the holder's ``pid``, ``hostname``, ``command``, the process start time (Linux; it
tells a live holder from a new process that reuses a dead holder's pid) and a random
``token``. A second process gets :class:`WorkdirLockedError` naming the holder and the
lock file. A lock whose holder is not running on this host (its pid is gone, or now
belongs to a process started later) is stale: it is taken over with a warning. A lock
from another host is never taken over (its pid cannot be checked from here); the error
says to remove the file if no such process runs. The lock is removed when the block
ends, normally or by an exception; a killed process leaves a stale lock behind.

Example::

    with locked(workdir, command="ib-lasso train ..."):
        ...  # write workdir/...
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "StaleLockWarning", "WorkdirLockedError", "locked", "read_lock"]

LOCK_FILE = ".lock"
# A holder writes its lock within microseconds of creating it; an unreadable lock older than
# this is the remnant of a process killed in between, not one being written.
_UNREADABLE_GRACE_SECONDS = 10.0
_ATTEMPTS = 5


class WorkdirLockedError(RuntimeError):
    """Another process holds the lock of the directory (or its lock file cannot be judged)."""


class StaleLockWarning(UserWarning):
    """A lock left by a process that no longer runs was taken over."""


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except OSError:
        return True  # cannot tell: never take over a lock we are not sure about
    return True


def read_lock(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in lock file ``path`` (``None``: missing, empty or not our JSON)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        return None
    return data


def _is_stale(holder: dict[str, Any] | None, path: Path) -> bool:
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False  # released meanwhile: the next attempt creates it
        return age > _UNREADABLE_GRACE_SECONDS
    if holder.get("hostname") != socket.gethostname():
        return False
    pid = holder["pid"]
    if not _pid_alive(pid):
        return True
    recorded, now = holder.get("start_time"), _start_time(pid)
    return recorded is not None and now is not None and recorded != now  # the pid was reused


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unreadable lock (a process may be writing it)"
    return (f"pid {holder['pid']} on host {holder.get('hostname')!r}"
            f" (command: {holder.get('command')!r}, since {holder.get('started', '?')})")


def _take_over(path: Path, holder: dict[str, Any] | None) -> bool:
    """Remove the stale lock ``path`` unless another process replaced it meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # someone else removed it: try to create ours
    if read_lock(aside) != holder:  # a live lock created after we judged the old one: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return False
    os.unlink(aside)
    return True


def _lock_text(command: str | None) -> tuple[str, dict[str, Any]]:
    info = {"pid": os.getpid(), "hostname": socket.gethostname(),
            "command": command if command is not None else " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "start_time": _start_time(os.getpid()),
            "token": uuid.uuid4().hex}
    return json.dumps(info, indent=1) + "\n", info


def _acquire(path: Path, command: str | None, warn: Callable[[str], None], name: str) -> dict[str, Any]:
    text, info = _lock_text(command)
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if not _is_stale(holder, path):
                if holder is not None and holder.get("hostname") != socket.gethostname():
                    hint = f"if no such process runs on {holder.get('hostname')!r}, remove {str(path)!r}"
                else:
                    hint = "wait for it to finish, or use another directory"
                raise WorkdirLockedError(
                    f"{name} is in use: its lock {str(path)!r} is held by {_describe(holder)}; "
                    f"{hint}") from None
            if _take_over(path, holder):
                warn(f"took over the stale lock {str(path)!r} of {_describe(holder)}, which no longer runs")
            continue
        try:
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return info
    raise WorkdirLockedError(f"could not take the lock {str(path)!r}: other processes keep taking it; "
                             "try again")


def _release(path: Path, info: dict[str, Any]) -> None:
    holder = read_lock(path)
    if holder is not None and holder.get("token") == info["token"]:  # never remove another's lock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _warn(message: str) -> None:
    warnings.warn(message, StaleLockWarning, stacklevel=4)


@contextlib.contextmanager
def locked(directory: str | os.PathLike, *, command: str | None = None,
           warn: Callable[[str], None] | None = None, name: str | None = None) -> Iterator[Path]:
    """Hold ``directory/.lock`` (creating ``directory``) for the length of the block.

    Args:
      directory: the work directory to lock.
      command: what the holder is doing, for the error another process gets (default: this
        process's ``sys.argv``).
      warn: called with the message when a stale lock is taken over (default:
        ``warnings.warn`` with :class:`StaleLockWarning`).
      name: how the error names the directory (default: its path), e.g. ``"--workdir 'w'"``.

    Yields:
      The lock file's path.

    Raises:
      WorkdirLockedError: another live process holds the lock (the message names its pid,
        host and command, and the lock file).
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory.absolute() / LOCK_FILE
    info = _acquire(path, command, warn or _warn, name or repr(str(directory)))
    try:
        yield path
    finally:
        _release(path, info)
