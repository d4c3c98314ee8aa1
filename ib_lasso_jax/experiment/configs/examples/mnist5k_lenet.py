"""LeNet-5 (6-16-120-84) on mnist5k (4000 train / 1000 test real MNIST digits, 28x28).

Command::

    ib-lasso train --config mnist5k_lenet --workdir runs/mnist5k_lenet

Runtime: about 70 s on 2 (shared) CPU cores (620 steps); measured test accuracy 96.3%
(best epoch 96.9%).
"""

from ib_lasso_jax.train.training import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="mnist5k",
        model="lenet5",
        batch_size=128,
        num_epochs=20,
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1,
        log_every_steps=10,
    )
