"""Information concentration + Shapley, ResNet-56 on CIFAR-10.

Paper: Chen & Wang, "An Effective Information Theoretic Framework for Channel Pruning", arXiv
2408.16772.
Row: ResNet-56 CIFAR-10: FLOPs -45.5%, params -40.3%, +0.21% accuracy.

Command (the baseline is trained in WORKDIR/baseline first; to start from a baseline trained
earlier add ``--set checkpoint=runs/baseline/model``; ``--smoke`` checks the setup in
seconds on a CPU with a shrunk model)::

    ib-lasso run ic_resnet56_cifar10 --workdir runs/ic_resnet56_cifar10 --set data_dir="$DATA"

Expected runtime: estimate, not measured: baseline ~1 h + pruning ~15 min + finetuning ~1 h on
one H100.

Data preparation (nothing is downloaded by the library)::

    tfds build cifar10 --data_dir=$DATA --file_format=array_record
"""

from ib_lasso_jax.experiment.configs.papers._recipes import cifar_baseline, finetune_recipe
from ib_lasso_jax.experiment.pipeline import PipelineConfig, PruneConfig


def get_config() -> PipelineConfig:
    base = cifar_baseline("resnet56")
    return PipelineConfig(
        train=base,
        prune=PruneConfig(method="ic-shapley", target_flops=0.455, per_class=64),
        finetune=finetune_recipe(base, epochs=200, learning_rate=0.1),
        paper='Chen & Wang, "An Effective Information Theoretic Framework for Channel Pruning", arXiv 2408.16772',
        paper_row='ResNet-56 CIFAR-10: FLOPs -45.5%, params -40.3%, +0.21% accuracy',
        published={"flops_reduction": 0.455, "params_reduction": 0.403, "accuracy_drop": -0.0021},
        expected_runtime='estimate, not measured: baseline ~1 h + pruning ~15 min + finetuning ~1 h on one H100',
        notes=("64 images per class (640: HRank's rank sample size) for the ranks and entropies; Shapley values on the"
               " method's default 64 of them. Finetuning recipe: APIB's (the paper's is not known to us)."),
    )
