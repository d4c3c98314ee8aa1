"""Finetuning: the training configuration, optimiser and schedule, jitted steps, the resumable
loop (``training``) and data parallelism over devices (``parallel``)."""

from ib_lasso_jax.train.training import TrainConfig, TrainResult, evaluate, finetune, train_and_evaluate

__all__ = ["TrainConfig", "TrainResult", "evaluate", "finetune", "train_and_evaluate"]
