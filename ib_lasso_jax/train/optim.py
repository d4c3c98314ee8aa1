"""The optimiser and learning-rate schedule of a :class:`~ib_lasso_jax.train.training.TrainConfig`.

* **Weight decay.** ``optimizer='sgd'`` uses PyTorch's *coupled* L2, as HRank and APIB
  trained their baselines: ``optax.add_decayed_weights(wd)`` is chained *before*
  ``optax.sgd``, so ``g <- g + wd * w`` enters the momentum buffer (``torch.optim.SGD``
  with ``weight_decay``; optax's trace ``t <- g + mu * t``, ``w <- w - lr * t`` is
  PyTorch's dampening-0 momentum, Nesterov included). ``optimizer='adamw'`` uses decoupled
  decay (``optax.adamw``). ``weight_decay_on='all'`` (default, as PyTorch's
  ``model.parameters()``) decays every parameter, BatchNorm scale/shift and biases
  included; ``'kernels'`` only conv/dense kernels.
* **Schedules** are per step: linear warm-up from 0 over ``warmup_epochs``, then cosine
  to ``learning_rate * min_lr_ratio`` at the last step, or multi-step decay by
  ``decay_factor`` at each epoch of ``milestones`` (PyTorch ``MultiStepLR``), or constant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import optax

if TYPE_CHECKING:
    from ib_lasso_jax.train.training import TrainConfig

__all__ = [
    "CHOICES",
    "create_optimizer",
    "create_schedule",
]


CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "weight_decay_on": ("all", "kernels"),
}
"""Valid values of the string-choice fields of :class:`~ib_lasso_jax.train.training.TrainConfig`."""


def create_schedule(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The per-step learning-rate schedule of ``config``.

    Linear warm-up ``lr * s / W`` for ``s < W = round(warmup_epochs * steps_per_epoch)``,
    then for ``t = s - W`` over ``T = total_steps - W`` steps:

    * cosine: ``lr * (r + (1 - r) * (1 + cos(pi * t / T)) / 2)``, ``r = min_lr_ratio``;
    * step: ``lr * decay_factor ** #{m in milestones : s >= m * steps_per_epoch}``;
    * constant: ``lr``.

    >>> from ib_lasso_jax.train.training import TrainConfig
    >>> c = TrainConfig(learning_rate=1.0, warmup_epochs=1, schedule="cosine")
    >>> s = create_schedule(c, steps_per_epoch=10, total_steps=30)
    >>> tuple(round(float(s(i)), 6) for i in (5, 10, 20, 30))  # float32 round-off
    (0.5, 1.0, 0.5, 0.0)
    """
    lr = float(config.learning_rate)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup > total_steps:
        raise ValueError(
            f"config.warmup_epochs={config.warmup_epochs!r} is not valid: the warm-up ({warmup} steps) is longer than "
            f"the run ({total_steps} steps, {total_steps / steps_per_epoch:.4g} epochs); valid values: a number in "
            f"[0, {total_steps / steps_per_epoch:.4g}]")
    decay_steps = max(1, total_steps - warmup)
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=config.min_lr_ratio)
    elif config.schedule == "step":
        boundaries = {int(round(m * steps_per_epoch)) - warmup: config.decay_factor for m in config.milestones}
        # a milestone past the run is never reached (and past 2**31 steps optax's int32 step overflows)
        main = optax.piecewise_constant_schedule(lr, {b: f for b, f in boundaries.items() if 0 < b <= total_steps})
    elif config.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(f"config.schedule={config.schedule!r} is not valid; valid values: {list(CHOICES['schedule'])}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _kernel_mask(params: Any) -> Any:
    def is_kernel(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
    """The optax optimiser of ``config`` (see the module docstring for the conventions)."""
    schedule = create_schedule(config, steps_per_epoch, total_steps)
    mask = _kernel_mask if config.weight_decay_on == "kernels" else None
    if config.optimizer == "sgd":
        sgd = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
        if not config.weight_decay:
            return sgd
        return optax.chain(optax.add_decayed_weights(config.weight_decay, mask), sgd)
    if config.optimizer == "adamw":
        return optax.adamw(schedule, b1=config.momentum, weight_decay=config.weight_decay, mask=mask,
                           nesterov=config.nesterov)
    raise ValueError(f"config.optimizer={config.optimizer!r} is not valid; valid values: {list(CHOICES['optimizer'])}")
