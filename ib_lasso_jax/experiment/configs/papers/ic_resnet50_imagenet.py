"""Information concentration + Shapley, ResNet-50 on ImageNet.

Paper: Chen & Wang, "An Effective Information Theoretic Framework for Channel Pruning", arXiv
2408.16772.
Row: ResNet-50 ImageNet: FLOPs -41.6%, params -35.0%, -0.43% top-1 / -0.11% top-5.

Command (the baseline is trained in WORKDIR/baseline first; to start from a baseline trained
earlier add ``--set checkpoint=runs/baseline/model``; ``--smoke`` checks the setup in
seconds on a CPU with a shrunk model)::

    ib-lasso run ic_resnet50_imagenet --workdir runs/ic_resnet50_imagenet --set data_dir="$DATA"

Expected runtime: estimate, not measured: days on one H100 (90 finetuning epochs; the input
pipeline bounds it).

Data preparation (nothing is downloaded by the library)::

    download ILSVRC2012 manually, then
    tfds build imagenet2012 --data_dir=$DATA --manual_dir=$MANUAL --file_format=array_record
"""

from ib_lasso_jax.experiment.configs.papers._recipes import finetune_recipe, imagenet_baseline
from ib_lasso_jax.experiment.pipeline import PipelineConfig, PruneConfig


def get_config() -> PipelineConfig:
    base = imagenet_baseline("resnet50")
    return PipelineConfig(
        train=base,
        prune=PruneConfig(method="ic-shapley", target_flops=0.416, per_class=1),
        finetune=finetune_recipe(base, epochs=90, learning_rate=0.01, weight_decay=1e-4),
        paper='Chen & Wang, "An Effective Information Theoretic Framework for Channel Pruning", arXiv 2408.16772',
        paper_row='ResNet-50 ImageNet: FLOPs -41.6%, params -35.0%, -0.43% top-1 / -0.11% top-5',
        published={"flops_reduction": 0.416, "params_reduction": 0.35, "accuracy_drop": 0.0043, "top5_drop": 0.0011},
        expected_runtime=('estimate, not measured: days on one H100 (90 finetuning epochs; '
                          'the input pipeline bounds it)'),
        notes=("One image per class (1000) for ranks and entropies; finetuning recipe APIB's ImageNet one (ours)."),
    )
