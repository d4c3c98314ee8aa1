"""Clearing the compilation cache under a running process (compile_cache.clear, `ib-lasso cache --clear`)."""

import os
import subprocess
import sys
import textwrap

from ib_lasso_jax import compile_cache
from ib_lasso_jax.cli import main

# Compiles 3 programs, waits for the cache to be cleared, then compiles 2 x NEW more (a new
# shape each: a broadcast and the function itself). `jax` mode turns JAX's cache on directly,
# as a process that never called compile_cache.enable does.
_NEW = 8
_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    import jax, jax.numpy as jnp
    mode, where, new, module_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if mode == "library":  # the module alone: the whole package takes ~10 s to import on 2 cores
        spec = importlib.util.spec_from_file_location("ib_lasso_jax.compile_cache", module_file)
        compile_cache = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compile_cache)
        compile_cache.enable(where)
    else:
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    def compile_one(i):
        jax.jit(lambda x: jnp.tanh(x * 3.0).sum())(jnp.ones((3, 4 + i)))
    for i in range(3):
        compile_one(i)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(3, 3 + new):
        compile_one(i)
""")


def _start(mode, where):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.pop(compile_cache.ENV_VAR, None)
    argv = [sys.executable, "-c", _SCRIPT, mode, str(where), str(_NEW), compile_cache.__file__]
    proc = subprocess.Popen(argv, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready", proc.communicate()[1]
    return proc


def _cache_lines(stderr):
    return [ln for ln in stderr.splitlines() if "compilation cache" in ln]


def test_clear_under_a_running_process_gives_one_line_and_the_cache_keeps_working(tmp_path, capsys):
    # Side by side (two cores): a process that enabled the cache through the library, and one
    # that turned JAX's cache on itself (the flood as JAX gives it).
    lib, raw = tmp_path / "lib", tmp_path / "raw"
    procs = {"library": _start("library", lib), "jax": _start("jax", raw)}
    assert compile_cache.size(lib)[0] >= 3 and compile_cache.size(raw)[0] >= 3
    for where in (lib, raw):
        assert main(["cache", "--dir", str(where), "--clear"]) == 0
        assert "removed" in capsys.readouterr().out and not where.exists()
    errs = {}
    for mode, proc in procs.items():
        _, errs[mode] = proc.communicate("cleared\n", timeout=120)
        assert proc.returncode == 0, errs[mode]

    flood = _cache_lines(errs["jax"])
    assert len(flood) == 2 * _NEW and all("Error writing persistent compilation cache" in ln for ln in flood)
    assert not raw.exists()  # and nothing of its later programs is stored
    lines = _cache_lines(errs["library"])
    assert len(lines) == 1 and "CompileCacheClearedWarning" in lines[0] and "was cleared while" in lines[0], lines
    assert len(errs["library"].splitlines()) == 1, errs["library"]
    # Recreated private, with every later program but the one whose write found it gone.
    assert compile_cache.size(lib)[0] == 2 * _NEW - 1
    if os.name == "posix":
        assert lib.stat().st_mode & 0o077 == 0


def test_clear_removes_leftovers_and_counts(tmp_path):
    d = tmp_path / "xla"
    d.mkdir()
    (d / "jit_f-abc-cache").write_bytes(b"x" * 100)
    (d / "jit_f-abc-atime").write_bytes(b"t")
    left = tmp_path / ".xla.cleared-123-deadbeef"  # an interrupted clear
    left.mkdir()
    (left / "jit_g-def-cache").write_bytes(b"y")
    assert compile_cache.clear(d) == (1, 100)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert compile_cache.clear(d) == (0, 0)  # nothing there: nothing to do
