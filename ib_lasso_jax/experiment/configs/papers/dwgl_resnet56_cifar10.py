"""DWGL, ResNet-56 on CIFAR-10.

Paper: Zhan et al., "Directed-Weighting Group Lasso for Eltwise Blocked CNN Pruning", arXiv
1910.09318.
Row: ResNet-56 CIFAR-10: 75.34% compression, +0.94% error.

Command (the baseline is trained in WORKDIR/baseline first; to start from a baseline trained
earlier add ``--set checkpoint=runs/baseline/model``; ``--smoke`` checks the setup in
seconds on a CPU with a shrunk model)::

    ib-lasso run dwgl_resnet56_cifar10 --workdir runs/dwgl_resnet56_cifar10 --set data_dir="$DATA"

Expected runtime: estimate, not measured: baseline ~1 h + DWGL training 30 epochs ~15 min +
finetuning ~1 h on one H100.

Data preparation (nothing is downloaded by the library)::

    tfds build cifar10 --data_dir=$DATA --file_format=array_record
"""

from ib_lasso_jax.experiment.configs.papers._recipes import cifar_baseline, finetune_recipe
from ib_lasso_jax.experiment.pipeline import PipelineConfig, PruneConfig


def get_config() -> PipelineConfig:
    base = cifar_baseline("resnet56")
    return PipelineConfig(
        train=base,
        prune=PruneConfig(method="dwgl", target_flops=0.7534, per_class=20,
                          options={"dataset": "cifar10", "epochs": 30, "batch_size": 128,
                                   "lam": 2e-3, "learning_rate": 0.01}),
        finetune=finetune_recipe(base, epochs=200, learning_rate=0.1),
        paper='Zhan et al., "Directed-Weighting Group Lasso for Eltwise Blocked CNN Pruning", arXiv 1910.09318',
        paper_row='ResNet-56 CIFAR-10: 75.34% compression, +0.94% error',
        published={"compression": 0.7534, "accuracy_drop": 0.0094},
        expected_runtime=('estimate, not measured: baseline ~1 h + DWGL training 30 epochs ~15 min + finetuning ~1 h '
                          'on one H100'),
        notes=("'Compression' read as the FLOPs reduction (the paper's ResNet-50 '53%, 2.23x speed-up' fits FLOPs). "
               "Policy coupled (DWGL's point: residual streams pruned as groups). 30 epochs of DWGL sparsity training "
               'at lr 0.01 from the trained baseline, then 200 finetuning epochs: our choices. The dwgl method reads '
               "its training set from TFDS's default data_dir (it has no data_dir option yet)."),
    )
