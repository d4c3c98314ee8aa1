"""Paper configs: one ``get_config() -> PipelineConfig`` per published table row.

Run one with ``ib-lasso run NAME --workdir DIR [--set key=value ...] [--smoke]``; ``NAME``
is a module name here (``ib-lasso configs`` lists them), or a path to a ``.py`` file of one's
own. Each module's docstring gives the paper, the row, the exact command, the expected GPU
runtime and the data to prepare; its ``notes`` say what it chose where the paper is silent.
None of the rows has been run at full scale (see docs/pipeline.md for the status table).

===================================== ====================================================
``sglp_vgg16_cifar10``                sGLP-IB (``--set prune.method=stlp-ib``: sTLP-IB)
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

import os

from ib_lasso_jax.experiment import configs

__all__ = ["available", "load"]


def available() -> list[str]:
    """Names of the paper configs."""
    return configs.available(__name__)


def load(name_or_path: str | os.PathLike):
    """``get_config()`` of paper config ``name_or_path`` (a name from :func:`available` or a path).

    Raises:
      ValueError: unknown name, or no ``get_config`` returning a PipelineConfig.
    """
    from ib_lasso_jax.experiment.pipeline import PipelineConfig

    return configs.load(__name__, name_or_path, PipelineConfig)
