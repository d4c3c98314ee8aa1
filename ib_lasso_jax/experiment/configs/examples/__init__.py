"""Example training configs: one module per experiment, each with ``get_config() -> TrainConfig``.

Run one with ``ib-lasso train --config NAME --workdir DIR [--set key=value ...]``; add
``--set smoke=true`` to shrink it to a few steps (any experiment). ``NAME`` is a module
name here (``ib-lasso configs`` lists them) or a path to a ``.py`` file of one's own.

=================== =============================================================
``mnist5k_lenet``   LeNet-5 on mnist5k (28x28), 20 epochs
``mnist5k_vgg``     a narrow VGG-11 (CIFAR form) on mnist5k padded to 32x32
``mnist5k_resnet20`` ResNet-20 on mnist5k padded to 32x32
``cifar10_vgg16``   VGG-16 (HRank form) on CIFAR-10, 200 epochs
``cifar10_resnet56`` ResNet-56 on CIFAR-10, He et al. 2016 step schedule
=================== =============================================================
"""

from __future__ import annotations

import os

from ib_lasso_jax.experiment import configs
from ib_lasso_jax.train.training import TrainConfig

__all__ = ["available", "load"]


def available() -> list[str]:
    """Names of the example training configs."""
    return configs.available(__name__)


def load(name_or_path: str | os.PathLike) -> TrainConfig:
    """``get_config()`` of config ``name_or_path`` (a name from :func:`available` or a path).

    Raises:
      ValueError: unknown name, or no ``get_config`` returning a TrainConfig.
    """
    return configs.load(__name__, name_or_path, TrainConfig)
