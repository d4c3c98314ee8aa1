"""The package as users get it: a built wheel, installed into a fresh environment, run from a
directory that is not the checkout (the configs ship inside the package, found by import)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A venv with the wheel of this checkout installed; its dependencies come from this venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: the checkout gets no build/ or egg-info
    shutil.copytree(ROOT / "ib_lasso_jax", src / "ib_lasso_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(src)], check=True, cwd=tmp)
    (wheel,) = dist.glob("ib_lasso_jax-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (jax, flax, ...) from this environment, after the wheel's own site-packages.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, cwd=tmp)
    return wheel, env_dir, site


def test_wheel_ships_the_configs(wheel_env):
    wheel, _, _ = wheel_env
    names = zipfile.ZipFile(wheel).namelist()
    assert "ib_lasso_jax/experiment/configs/papers/mnist5k_vgg_sglp.py" in names
    assert "ib_lasso_jax/experiment/configs/papers/_recipes.py" in names
    assert "ib_lasso_jax/experiment/configs/examples/mnist5k_vgg.py" in names
    assert not [n for n in names if n.startswith(("tests/", "experiments/"))]


@pytest.mark.heavy(40)
def test_installed_wheel_runs_a_paper_config_outside_the_checkout(wheel_env, tmp_path):
    _, env_dir, site = wheel_env
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import ib_lasso_jax; print(ib_lasso_jax.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout
    work = tmp_path / "w"
    proc = subprocess.run([str(env_dir / "bin" / "ib-lasso"), "run", "mnist5k_vgg_sglp", "--workdir", str(work),
                           "--smoke", "--no-progress", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < ours["flops_reduction"] < 1 and 0 <= ours["accuracy"] <= 1
    assert (work / "model").is_dir() and (work / "report.md").is_file()
