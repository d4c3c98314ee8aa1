"""sGLP-IB / sTLP-IB, ResNet-50 on ImageNet (the paper's ImageNet headline).

Paper: Liu et al., "Enhanced Structured Lasso Pruning with Class-wise Information", arXiv
2502.09125.
Row: ResNet-50 ImageNet: FLOPs -57%, params -55%, 76.12% top-1 (-0.03).

Command (the baseline is trained in WORKDIR/baseline first; to start from a baseline trained
earlier add ``--set checkpoint=runs/baseline/model``; ``--smoke`` checks the setup in
seconds on a CPU with a shrunk model)::

    ib-lasso run sglp_resnet50_imagenet --workdir runs/sglp_resnet50_imagenet --set data_dir="$DATA"

sTLP-IB (the tree-guided scheme) on the same row::

    ib-lasso run sglp_resnet50_imagenet --workdir runs/stlp_resnet50_imagenet --set data_dir="$DATA" \
        --set prune.method=stlp-ib

Expected runtime: estimate, not measured: finetuning 90 epochs takes days on one H100 (the
numpy/PIL input pipeline on 16 cores, not the GPU, bounds it); start from a trained baseline
with --set checkpoint=...; the baseline itself is a further ~4-6 days.

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
        prune=PruneConfig(method="sglp-ib", target_flops=0.57, per_class=1),
        finetune=finetune_recipe(base, epochs=90, learning_rate=0.01, weight_decay=1e-4),
        paper='Liu et al., "Enhanced Structured Lasso Pruning with Class-wise Information", arXiv 2502.09125',
        paper_row='ResNet-50 ImageNet: FLOPs -57%, params -55%, 76.12% top-1 (-0.03)',
        published={"accuracy": 0.7612, "accuracy_drop": 0.0003, "flops_reduction": 0.57, "params_reduction": 0.55},
        expected_runtime=('estimate, not measured: finetuning 90 epochs takes days on one H100 (the numpy/PIL '
                          'input pipeline on 16 cores, not the GPU, bounds it); start from a trained baseline with '
                          '--set checkpoint=...; the baseline itself is a further ~4-6 days'),
        notes=('Published: FLOPs -57%, params -55%, 76.12% top-1 (-0.03). One calibration image per class (N=1000): '
               'class-wise responses are (1000, N, N), 4 GB per layer in float32, which an 80 GB GPU holds; '
               "finetuning: lr 0.01 (METHODS.md), 90 epochs and wd 1e-4 (torchvision's) are our choices. torchvision's"
               ' pretrained weights cannot be imported yet: the baseline is trained here or given with --set '
               'checkpoint=.'),
    )
