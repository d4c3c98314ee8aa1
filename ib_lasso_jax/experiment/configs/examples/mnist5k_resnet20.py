"""ResNet-20 (16-32-64, option-A shortcuts) on mnist5k padded to 32x32.

Command::

    ib-lasso train --config mnist5k_resnet20 --workdir runs/mnist5k_resnet20

Runtime: estimated 20-30 minutes on 2 CPU cores (15 epochs, 465 steps; not measured
beyond a smoke run, 6 steps in 18 s with compilation); well under a minute on one GPU.
"""

from ib_lasso_jax.train.training import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="mnist5k",
        image_size=32,
        model="resnet20",
        batch_size=128,
        num_epochs=15,
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1,
        log_every_steps=10,
    )
