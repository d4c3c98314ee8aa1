"""DWGL, ResNet-20 on CIFAR-10.

Paper: Zhan et al., "Directed-Weighting Group Lasso for Eltwise Blocked CNN Pruning", arXiv
1910.09318.
Row: ResNet-20 CIFAR-10: 52.06% compression, +0.72% error.

Command (the baseline is trained in WORKDIR/baseline first; to start from a baseline trained
earlier add ``--set checkpoint=runs/baseline/model``; ``--smoke`` checks the setup in
seconds on a CPU with a shrunk model)::

    ib-lasso run dwgl_resnet20_cifar10 --workdir runs/dwgl_resnet20_cifar10 --set data_dir="$DATA"

Expected runtime: estimate, not measured: baseline ~25 min + DWGL training ~5 min + finetuning
~30 min on one H100.

Data preparation (nothing is downloaded by the library)::

    tfds build cifar10 --data_dir=$DATA --file_format=array_record
"""

from ib_lasso_jax.experiment.configs.papers._recipes import cifar_baseline, finetune_recipe
from ib_lasso_jax.experiment.pipeline import PipelineConfig, PruneConfig


def get_config() -> PipelineConfig:
    base = cifar_baseline("resnet20")
    return PipelineConfig(
        train=base,
        prune=PruneConfig(method="dwgl", target_flops=0.5206, per_class=20,
                          options={"dataset": "cifar10", "epochs": 30, "batch_size": 128,
                                   "lam": 2e-3, "learning_rate": 0.01}),
        finetune=finetune_recipe(base, epochs=200, learning_rate=0.1),
        paper='Zhan et al., "Directed-Weighting Group Lasso for Eltwise Blocked CNN Pruning", arXiv 1910.09318',
        paper_row='ResNet-20 CIFAR-10: 52.06% compression, +0.72% error',
        published={"compression": 0.5206, "accuracy_drop": 0.0072},
        expected_runtime=('estimate, not measured: baseline ~25 min + DWGL training ~5 min + finetuning ~30 min '
                          'on one H100'),
        notes=('As dwgl_resnet56_cifar10: compression read as FLOPs reduction; 30 DWGL epochs and 200 finetuning '
               "epochs are our choices; DWGL training reads TFDS's default data_dir."),
    )
