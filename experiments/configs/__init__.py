"""Experiment configs: one file per experiment, each with ``get_config() -> TrainConfig``.

Run one with ``ib-lasso train --config NAME --workdir DIR [--set key=value ...]``; add
``--set smoke=true`` to shrink it to a few steps (any experiment). ``NAME`` is a file
name here without ``.py`` or a path to any config file.

=================== =============================================================
``mnist5k_lenet``   LeNet-5 on mnist5k (28x28), 20 epochs
``mnist5k_vgg``     a narrow VGG-11 (CIFAR form) on mnist5k padded to 32x32
``mnist5k_resnet20`` ResNet-20 on mnist5k padded to 32x32
``cifar10_vgg16``   VGG-16 (HRank form) on CIFAR-10, 200 epochs
``cifar10_resnet56`` ResNet-56 on CIFAR-10, He et al. 2016 step schedule
=================== =============================================================
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ib_lasso_jax.train.training import TrainConfig

__all__ = ["CONFIG_DIR", "available", "load"]

CONFIG_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the config files in this directory."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def load(name_or_path: str | os.PathLike) -> TrainConfig:
    """``get_config()`` of config ``name_or_path`` (a name from :func:`available` or a path).

    Raises:
      ValueError: unknown name, or the file has no ``get_config`` returning a TrainConfig.
    """
    text = os.fspath(name_or_path)
    path = Path(text) if text.endswith(".py") else CONFIG_DIR / f"{text}.py"
    if not path.is_file() or path.stem.startswith("_"):
        raise ValueError(f"config={text!r} is not valid; valid configs: {available()} or a path to a .py file")
    spec = importlib.util.spec_from_file_location(f"ib_lasso_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    config = get_config() if callable(get_config) else None
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config file {str(path)!r} must define get_config() returning a TrainConfig; got {config!r}")
    return config
