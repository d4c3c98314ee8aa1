"""Paper configs: one ``get_config() -> PipelineConfig`` per published table row.

Run one with ``ib-lasso run NAME --workdir DIR [--set key=value ...] [--smoke]``; ``NAME``
is a file name here without ``.py`` (or a path to any such file). Each file's docstring gives
the paper, the row, the exact command, the expected GPU runtime and the data to prepare.
None of the rows has been run at full scale (see docs/pipeline.md for the status table).

===================================== ====================================================
``sglp_vgg16_cifar10``                sGLP-IB (``--set prune.method='"stlp-ib"'``: sTLP-IB)
                                      VGG-16 CIFAR-10: FLOPs -61%, params -85%, 94.10%
``sglp_resnet56_cifar10``             sGLP-IB/sTLP-IB ResNet-56 CIFAR-10 (target: FLOPs -50%)
``sglp_resnet110_cifar10``            sGLP-IB/sTLP-IB ResNet-110 CIFAR-10 (FLOPs -58%)
``sglp_googlenet_cifar10``            sGLP-IB/sTLP-IB GoogLeNet CIFAR-10 (FLOPs -55%)
``sglp_vgg16_cifar100``               sGLP-IB/sTLP-IB VGG-16 CIFAR-100 (FLOPs -61%)
``sglp_resnet56_cifar100``            sGLP-IB/sTLP-IB ResNet-56 CIFAR-100 (FLOPs -50%)
``sglp_resnet50_imagenet``            sGLP-IB/sTLP-IB ResNet-50 ImageNet: FLOPs -57%,
                                      params -55%, 76.12% top-1
``dwgl_resnet56_cifar10``             DWGL ResNet-56 CIFAR-10: 75.34% compression, +0.94% err
``dwgl_resnet20_cifar10``             DWGL ResNet-20 CIFAR-10: 52.06% compression, +0.72% err
``dwgl_resnet50_imagenet``            DWGL ResNet-50 ImageNet: 53%, +0.6% error
``ic_resnet56_cifar10``               information concentration + Shapley ResNet-56
                                      CIFAR-10: FLOPs -45.5%, params -40.3%, +0.21%
``ic_resnet50_imagenet``              information concentration + Shapley ResNet-50
                                      ImageNet: FLOPs -41.6%, params -35.0%, -0.43% top-1
``entropic_lenet_mnist``              entropic sparsification LeNet-5 MNIST: sparsity
                                      55-84%, loss 0.1-0.5%
``entropic_vgg16_cifar10``            entropic sparsification VGG-16 CIFAR-10: sparsity
                                      73-89%, loss 0.1-0.5%
``mnist5k_vgg_sglp``                  offline check (not a paper row): sGLP-IB FLOPs -50%
                                      on a narrow VGG-11, mnist5k, runs on a CPU
===================================== ====================================================
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["PAPERS_DIR", "available", "load"]

PAPERS_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the config files in this directory."""
    return sorted(p.stem for p in PAPERS_DIR.glob("*.py") if not p.stem.startswith("_"))


def load(name_or_path: str | os.PathLike):
    """``get_config()`` of config ``name_or_path`` (a name from :func:`available` or a path).

    Raises:
      ValueError: unknown name, or the file has no ``get_config`` returning a PipelineConfig.
    """
    from ib_lasso_jax.experiment.pipeline import PipelineConfig

    text = os.fspath(name_or_path)
    path = Path(text) if text.endswith(".py") else PAPERS_DIR / f"{text}.py"
    if not path.is_file() or path.stem.startswith("_"):
        raise ValueError(f"config={text!r} is not valid; valid configs: {available()} or a path to a .py file")
    if str(PAPERS_DIR) not in sys.path:  # the configs share experiments/papers/_recipes.py
        sys.path.insert(0, str(PAPERS_DIR))
    spec = importlib.util.spec_from_file_location(f"ib_lasso_paper_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    config = get_config() if callable(get_config) else None
    if not isinstance(config, PipelineConfig):
        raise ValueError(f"config file {str(path)!r} must define get_config() returning a PipelineConfig; "
                         f"got {type(config).__name__}")
    return config
