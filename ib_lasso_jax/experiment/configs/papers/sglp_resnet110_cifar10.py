"""sGLP-IB / sTLP-IB, ResNet-110 on CIFAR-10.

Paper: Liu et al., "Enhanced Structured Lasso Pruning with Class-wise Information", arXiv
2502.09125.
Row: ResNet-110 CIFAR-10 (the paper's number is not available to us; target FLOPs -58%).

Command (the baseline is trained in WORKDIR/baseline first; to start from a baseline trained
earlier add ``--set checkpoint=runs/baseline/model``; ``--smoke`` checks the setup in
seconds on a CPU with a shrunk model)::

    ib-lasso run sglp_resnet110_cifar10 --workdir runs/sglp_resnet110_cifar10 --set data_dir="$DATA"

sTLP-IB (the tree-guided scheme) on the same row::

    ib-lasso run sglp_resnet110_cifar10 --workdir runs/stlp_resnet110_cifar10 --set data_dir="$DATA" \
        --set prune.method=stlp-ib

Expected runtime: estimate, not measured: baseline ~2 h + pruning ~20 min + finetuning ~1.5 h on
one H100.

Data preparation (nothing is downloaded by the library)::

    tfds build cifar10 --data_dir=$DATA --file_format=array_record
"""

from ib_lasso_jax.experiment.configs.papers._recipes import cifar_baseline, finetune_recipe
from ib_lasso_jax.experiment.pipeline import PipelineConfig, PruneConfig


def get_config() -> PipelineConfig:
    base = cifar_baseline("resnet110")
    return PipelineConfig(
        train=base,
        prune=PruneConfig(method="sglp-ib", target_flops=0.58, per_class=20),
        finetune=finetune_recipe(base, epochs=200, learning_rate=0.1),
        paper='Liu et al., "Enhanced Structured Lasso Pruning with Class-wise Information", arXiv 2502.09125',
        paper_row="ResNet-110 CIFAR-10 (the paper's number is not available to us; target FLOPs -58%)",
        published={},
        expected_runtime='estimate, not measured: baseline ~2 h + pruning ~20 min + finetuning ~1.5 h on one H100',
        notes=("The paper's ResNet-110 row is not in METHODS.md. Target FLOPs -58% is HRank's ResNet-110 budget as we "
               "recall it (-58.2%); not verified against HRank's paper here."),
    )
