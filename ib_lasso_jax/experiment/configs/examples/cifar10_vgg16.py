"""VGG-16 (HRank/APIB form, 14.98M params) on CIFAR-10: the baseline to prune.

Recipe as HRank's and APIB's baselines: SGD, momentum 0.9, coupled L2 5e-4 on all
parameters, batch 128, pad-4 random crop + flip, 200 epochs; the learning rate 0.1 follows
a cosine schedule after 1 warm-up epoch. Published baseline: 93.96% (HRank).

Needs CIFAR-10 prepared for TFDS (nothing is downloaded here)::

    tfds build cifar10 --data_dir=$DATA --file_format=array_record
    ib-lasso train --config cifar10_vgg16 --workdir runs/cifar10_vgg16 --set data_dir=\\"$DATA\\"

Runtime: estimated (not measured) 1.5 hours on one H100-class GPU (78k steps); days on a CPU (use
``--set smoke=true`` to check the setup in a minute).
"""

from ib_lasso_jax.train.training import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="cifar10",
        model="vgg16",
        batch_size=128,
        eval_batch_size=500,
        num_epochs=200,
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        weight_decay_on="all",
        schedule="cosine",
        warmup_epochs=1,
        log_every_steps=100,
        eval_every_epochs=1,
        prefetch=4,
    )
