"""workdir_lock: one holder of DIR/.lock at a time; stale locks are taken over, others' never removed."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ib_lasso_jax.experiment import workdir_lock
from ib_lasso_jax.experiment.workdir_lock import StaleLockWarning, WorkdirLockedError, locked, read_lock

# The holder process loads the module by path: it needs no JAX, so it starts in a blink.
_HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("wl", {str(Path(workdir_lock.__file__))!r})
wl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wl)
with wl.locked(sys.argv[1], command="the holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def _write(path, **holder):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"hostname": socket.gethostname(), "command": "x", **holder}))


def test_a_lock_is_held_for_the_block_and_released_after_an_exception(tmp_path):
    with locked(tmp_path / "w", command="ib-lasso train") as path:
        holder = read_lock(path)
        assert path == (tmp_path / "w" / ".lock").absolute()
        assert holder["pid"] == os.getpid() and holder["command"] == "ib-lasso train"
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
            with locked(tmp_path / "w"):
                pass
    assert not path.exists()
    with pytest.raises(KeyError):
        with locked(tmp_path / "w"):
            raise KeyError
    assert not path.exists()


def test_a_process_holding_the_lock_then_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError) as e:
            with locked(tmp_path):
                pass
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and "'the holder'" in msg and str(tmp_path / ".lock") in msg
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock").exists()  # a killed holder leaves its lock behind: stale
    with pytest.warns(StaleLockWarning, match=f"stale lock .* pid {holder.pid}"):
        with locked(tmp_path):
            assert read_lock(tmp_path / ".lock")["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_a_reused_pid_is_stale_and_another_host_is_never_taken_over(tmp_path):
    lock = tmp_path / ".lock"
    if workdir_lock._start_time(os.getpid()) is not None:  # Linux: our pid, but an earlier process's
        _write(lock, pid=os.getpid(), start_time="1")
        with pytest.warns(StaleLockWarning):
            with locked(tmp_path):
                pass
    _write(lock, pid=1, hostname="elsewhere.example")
    hint = f"if no such process runs on 'elsewhere.example', remove '{lock}'"
    with pytest.raises(WorkdirLockedError, match=re.escape(hint)):
        with locked(tmp_path):
            pass
    assert read_lock(lock)["hostname"] == "elsewhere.example"


def test_an_unreadable_lock_is_stale_only_once_old(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text("")  # a holder killed between creating its lock and writing it, or one writing it now
    with pytest.raises(WorkdirLockedError, match="unreadable"):
        with locked(tmp_path):
            pass
    old = time.time() - 60
    os.utime(lock, (old, old))
    with pytest.warns(StaleLockWarning):
        with locked(tmp_path):
            pass
    assert not lock.exists()


def test_release_never_removes_another_holders_lock(tmp_path):
    with locked(tmp_path) as path:
        _write(path, pid=os.getpid(), token="someone else's")
    assert read_lock(path)["token"] == "someone else's"
