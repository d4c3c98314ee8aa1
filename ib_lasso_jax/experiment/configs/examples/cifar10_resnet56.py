"""ResNet-56 (option-A shortcuts, 0.85M params) on CIFAR-10: the baseline to prune.

He et al. (2016) recipe: SGD, momentum 0.9, coupled L2 1e-4, batch 128, pad-4 random crop
+ flip, learning rate 0.1 divided by 10 at epochs 82 and 123, 164 epochs in all (64k
steps). Published baseline: 93.03% (He et al.), 93.26% (HRank).

Needs CIFAR-10 prepared for TFDS (nothing is downloaded here)::

    tfds build cifar10 --data_dir=$DATA --file_format=array_record
    ib-lasso train --config cifar10_resnet56 --workdir runs/cifar10_resnet56 --set data_dir=\\"$DATA\\"

Runtime: estimated (not measured) 1 hour on one H100-class GPU; days on a CPU (use ``--set smoke=true`` to
check the setup in a minute).
"""

from ib_lasso_jax.train.training import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="cifar10",
        model="resnet56",
        batch_size=128,
        eval_batch_size=500,
        num_epochs=164,
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        weight_decay_on="all",
        schedule="step",
        milestones=(82, 123),
        decay_factor=0.1,
        log_every_steps=100,
        prefetch=4,
    )
