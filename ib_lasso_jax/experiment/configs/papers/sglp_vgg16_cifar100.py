"""sGLP-IB / sTLP-IB, VGG-16 on CIFAR-100.

Paper: Liu et al., "Enhanced Structured Lasso Pruning with Class-wise Information", arXiv
2502.09125.
Row: VGG-16 CIFAR-100 (the paper's number is not available to us; target FLOPs -61%, as on
CIFAR-10).

Command (the baseline is trained in WORKDIR/baseline first; to start from a baseline trained
earlier add ``--set checkpoint=runs/baseline/model``; ``--smoke`` checks the setup in
seconds on a CPU with a shrunk model)::

    ib-lasso run sglp_vgg16_cifar100 --workdir runs/sglp_vgg16_cifar100 --set data_dir="$DATA"

sTLP-IB (the tree-guided scheme) on the same row::

    ib-lasso run sglp_vgg16_cifar100 --workdir runs/stlp_vgg16_cifar100 --set data_dir="$DATA" \
        --set prune.method=stlp-ib

Expected runtime: estimate, not measured: baseline 1.5 h + pruning ~30 min + finetuning ~1 h on
one H100.

Data preparation (nothing is downloaded by the library)::

    tfds build cifar100 --data_dir=$DATA --file_format=array_record
"""

from ib_lasso_jax.experiment.configs.papers._recipes import cifar_baseline, finetune_recipe
from ib_lasso_jax.experiment.pipeline import PipelineConfig, PruneConfig


def get_config() -> PipelineConfig:
    base = cifar_baseline("vgg16", "cifar100")
    return PipelineConfig(
        train=base,
        prune=PruneConfig(method="sglp-ib", target_flops=0.61, per_class=5),
        finetune=finetune_recipe(base, epochs=200, learning_rate=0.1),
        paper='Liu et al., "Enhanced Structured Lasso Pruning with Class-wise Information", arXiv 2502.09125',
        paper_row="VGG-16 CIFAR-100 (the paper's number is not available to us; target FLOPs -61%, as on CIFAR-10)",
        published={},
        expected_runtime='estimate, not measured: baseline 1.5 h + pruning ~30 min + finetuning ~1 h on one H100',
        notes=('The CIFAR-100 rows are not in METHODS.md; the CIFAR-10 budget is reused. 5 images per class (N=500): '
               'the class-wise responses are (100, N, N), 100 MB at N=500.'),
    )
