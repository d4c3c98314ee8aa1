"""The persistent compilation cache of the command line and experiments (compile_cache)."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from ib_lasso_jax import compile_cache
from ib_lasso_jax.cli import main


def test_location_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.location() == tmp_path / "xdg" / "ib-lasso-jax" / "xla" == compile_cache.default_path()
    assert compile_cache.location(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.location() == tmp_path / "env"
    assert compile_cache.location(tmp_path / "mine") == tmp_path / "mine"  # an explicit path wins
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.location(tmp_path / "mine") == tmp_path / "jax"  # JAX's own setting wins
    for off in ("off", "0", "False", "no"):
        monkeypatch.setenv(compile_cache.ENV_VAR, off)
        assert compile_cache.location() is None
    try:  # turned off: enable() says so and turns JAX's cache off (restored for the other tests)
        assert compile_cache.enable() is None and jax.config.jax_enable_compilation_cache is False
    finally:
        jax.config.update("jax_enable_compilation_cache", True)


def test_bad_threshold():
    with pytest.raises(ValueError, match="min_compile_secs must be a finite number >= 0; got -1"):
        compile_cache.enable(min_compile_secs=-1)


_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jax import monitoring
    from ib_lasso_jax import compile_cache
    hits = []
    monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
    where = compile_cache.enable(min_compile_secs=0)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0 + 1.0)
    value = float(f(jnp.ones((5, 7))))
    print(where, len(hits), value)
""")


def test_second_process_reads_the_first_ones_programs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env[compile_cache.ENV_VAR] = str(tmp_path / "cache")

    def run():
        out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    where, hits, value = run()
    assert where == str(tmp_path / "cache") and hits == "0"
    entries, nbytes = compile_cache.size(tmp_path / "cache")
    assert entries >= 1 and nbytes > 0
    if os.name == "posix":
        assert (tmp_path / "cache").stat().st_mode & 0o077 == 0  # private: JAX treats entries as trusted code
    where2, hits2, value2 = run()
    assert int(hits2) >= 1 and value2 == value
    assert compile_cache.size(tmp_path / "cache")[0] == entries  # nothing recompiled, nothing new written



def test_cli_cache_command_and_opt_out(tmp_path, capsys, monkeypatch):
    d = tmp_path / "c"
    d.mkdir()
    (d / "jit_f-abc-cache").write_bytes(b"x" * 2048)
    (d / "jit_f-abc-atime").write_bytes(b"t")
    assert main(["cache", "--dir", str(d)]) == 0
    assert f"{d}: 1 compiled programs, 0.0 MiB" in capsys.readouterr().out
    assert main(["cache", "--dir", str(d), "--clear"]) == 0
    assert "removed 1 compiled programs" in capsys.readouterr().out and not d.exists()
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert main(["cache"]) == 0
    assert "turned off" in capsys.readouterr().out

    # --no-compile-cache turns JAX's cache off for the process (restored for the other tests).
    try:
        rc = main(["--no-compile-cache", "evaluate", "--checkpoint", str(tmp_path / "missing"),
                   "--dataset", "mnist5k"])
        assert rc == 2 and "no checkpoint at" in capsys.readouterr().err  # the flag acted first
        assert jax.config.jax_enable_compilation_cache is False
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
