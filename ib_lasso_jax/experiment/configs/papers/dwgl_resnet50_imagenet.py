"""DWGL, ResNet-50 on ImageNet.

Paper: Zhan et al., "Directed-Weighting Group Lasso for Eltwise Blocked CNN Pruning", arXiv
1910.09318.
Row: ResNet-50 ImageNet: 53% compression, +0.6% error (2.23x speed-up).

Command (the baseline is trained in WORKDIR/baseline first; to start from a baseline trained
earlier add ``--set checkpoint=runs/baseline/model``; ``--smoke`` checks the setup in
seconds on a CPU with a shrunk model)::

    ib-lasso run dwgl_resnet50_imagenet --workdir runs/dwgl_resnet50_imagenet --set data_dir="$DATA"

Expected runtime: estimate, not measured: days on one H100 (5 DWGL epochs + 90 finetuning
epochs; the input pipeline bounds it).

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
        prune=PruneConfig(method="dwgl", target_flops=0.53, per_class=1,
                          options={"dataset": "imagenet2012", "epochs": 5, "batch_size": 256,
                                   "lam": 2e-3, "learning_rate": 0.001}),
        finetune=finetune_recipe(base, epochs=90, learning_rate=0.01, weight_decay=1e-4),
        paper='Zhan et al., "Directed-Weighting Group Lasso for Eltwise Blocked CNN Pruning", arXiv 1910.09318',
        paper_row='ResNet-50 ImageNet: 53% compression, +0.6% error (2.23x speed-up)',
        published={"compression": 0.53, "accuracy_drop": 0.006},
        expected_runtime=('estimate, not measured: days on one H100 (5 DWGL epochs + 90 finetuning epochs; '
                          'the input pipeline bounds it)'),
        notes=('The 75%/+1.2% row is the same config with --set prune.target_flops=0.75. 5 DWGL epochs at lr 1e-3 and '
               "90 finetuning epochs are our choices; DWGL training reads TFDS's default data_dir."),
    )
