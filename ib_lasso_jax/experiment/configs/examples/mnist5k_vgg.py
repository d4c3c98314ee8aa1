"""A narrow VGG-11 (CIFAR/HRank form, widths 16-32-64-64-128-128-128-128) on mnist5k at 32x32.

MNIST's 28x28 digits are zero-padded to 32x32 (the LeNet-5 convention), so the CIFAR
architecture applies unchanged. Command::

    ib-lasso train --config mnist5k_vgg --workdir runs/mnist5k_vgg

Runtime: about 9 minutes on 2 (shared) CPU cores (measured ~35 s per epoch; 15 epochs,
465 steps); seconds per epoch on one GPU. Test accuracy 92.7% after 2 epochs (measured).
"""

from ib_lasso_jax.train.training import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        dataset="mnist5k",
        image_size=32,
        model="vgg11",
        widths={"features": [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128], "classifier": [128]},
        batch_size=128,
        num_epochs=15,
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1,
        log_every_steps=10,
    )
