"""Shared recipes of the paper configs (baselines and finetuning), so every row states only its own choices.

Finetuning follows METHODS.md section 1 (APIB's recipe, [prior]): SGD momentum 0.9, weight
decay 2e-4, cosine schedule; lr 0.1 at batch 256 on CIFAR, 0.01 on ImageNet. The epoch counts
are our choice (APIB used up to 350): 200 on CIFAR, 90 on ImageNet, stated per row.
"""

from __future__ import annotations

from ib_lasso_jax.experiment.configs import examples
from ib_lasso_jax.train.training import TrainConfig


def training_config(name: str) -> TrainConfig:
    """``get_config()`` of the example config ``name``: the recipe ``ib-lasso train --config NAME`` runs."""
    return examples.load(name)


def cifar_baseline(model: str, dataset: str = "cifar10") -> TrainConfig:
    """The baseline recipe of a CIFAR zoo model (what `ib-lasso train` would run): ResNets as
    the example config cifar10_resnet56 (He et al. 2016), VGG-16 / GoogLeNet as the example
    config cifar10_vgg16 (HRank's recipe)."""
    recipe = training_config("cifar10_resnet56" if model.startswith("resnet") else "cifar10_vgg16")
    return recipe.replace(dataset=dataset, model=model)


def imagenet_baseline(model: str = "resnet50") -> TrainConfig:
    """torchvision's ResNet-50 recipe: 90 epochs, batch 256, lr 0.1 divided by 10 at 30/60, wd 1e-4."""
    return TrainConfig(dataset="imagenet2012", model=model, batch_size=256, eval_batch_size=250, num_epochs=90,
                       optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-4,
                       weight_decay_on="all", schedule="step", milestones=(30, 60), decay_factor=0.1,
                       log_every_steps=200, prefetch=8)


def mnist_baseline(dataset: str = "mnist") -> TrainConfig:
    """LeNet-5 as the example config mnist5k_lenet, on full MNIST."""
    return training_config("mnist5k_lenet").replace(dataset=dataset, log_every_steps=50)


def finetune_recipe(baseline: TrainConfig, *, epochs: int, learning_rate: float, batch_size: int = 256,
                    weight_decay: float = 2e-4) -> TrainConfig:
    """APIB's finetuning recipe on the baseline's data set (cosine, momentum 0.9)."""
    return baseline.replace(model=baseline.model, num_epochs=epochs, learning_rate=learning_rate,
                            batch_size=batch_size, weight_decay=weight_decay, schedule="cosine", milestones=(),
                            warmup_epochs=0)
