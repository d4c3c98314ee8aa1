"""Loss and jitted step functions over ``nnx.split`` state.

Step functions are ``jax.jit`` over ``nnx.split`` state (``graphdef`` static, ``params`` and
the other variables as pytrees): pure, so a restored state continues bit-for-bit, and
shardable (params replicated, batch split over ``'data'``; see
:mod:`ib_lasso_jax.train.parallel`). The train step runs the model in train mode (BatchNorm
uses batch statistics and updates its running statistics with the layer's momentum); the eval
step runs it in eval mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ib_lasso_jax.train import parallel

__all__ = [
    "cross_entropy",
    "make_eval_step",
    "make_train_step",
]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with label smoothing.

    The target is ``(1 - a) * onehot + a / K`` (``optax.smooth_labels``; Szegedy et al.
    2016, as ``torch.nn.CrossEntropyLoss(label_smoothing=a)``).

    Args:
      logits: ``(N, K)``.
      labels: ``(N,)`` integer classes.
      label_smoothing: ``a`` in ``[0, 1)``.

    Returns:
      ``(N,)`` losses.
    """
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def _jit(fn, mesh, batch_argnums: Sequence[int], nargs: int, donate: tuple[int, ...] = ()):
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate)
    rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    in_shardings = tuple(bat if i in batch_argnums else rep for i in range(nargs))
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=rep, donate_argnums=donate)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    mesh: jax.sharding.Mesh | None = None,
    donate: bool = False,
) -> Callable:
    """A jitted ``step(params, rest, opt_state, images, labels)``.

    ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)`` of the model in *train*
    mode. Returns ``(params, rest, opt_state, sums)`` with ``sums`` the batch's
    ``loss_sum``, ``correct`` and ``count`` (summed, so they add up across steps).
    With ``mesh``, ``images``/``labels`` are split over ``'data'`` and all else replicated.
    """

    def step(params, rest, opt_state, images, labels):
        def loss_fn(p, r):  # `r` is an argument: BatchNorm updates it inside this trace
            model = nnx.merge(graphdef, p, r, copy=True)
            logits = model(images)
            loss = cross_entropy(logits, labels, label_smoothing).mean()
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        n = labels.shape[0]
        sums = {
            "loss_sum": loss * n,
            "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
            "count": jnp.asarray(n, jnp.float32),
        }
        return params, new_rest, opt_state, sums

    return _jit(step, mesh, (3, 4), 5, (0, 1, 2) if donate else ())


def make_eval_step(graphdef: nnx.GraphDef, *, top5: bool = False, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """A jitted ``step(params, rest, images, labels, weights) -> sums`` in eval mode.

    ``graphdef`` is of the model in *eval* mode. ``weights`` (0 or 1 per example) mask
    the padding of a last partial batch. ``sums``: ``loss_sum``, ``correct``,
    (``correct5``), ``count``.
    """

    def step(params, rest, images, labels, weights):
        logits = nnx.merge(graphdef, params, rest)(images)
        loss = cross_entropy(logits, labels)
        sums = {
            "loss_sum": jnp.sum(loss * weights),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
            "count": jnp.sum(weights),
        }
        if top5:
            top = jax.lax.top_k(logits, 5)[1]
            sums["correct5"] = jnp.sum(jnp.any(top == labels[:, None], axis=-1) * weights)
        return sums

    return _jit(step, mesh, (2, 3, 4), 5)


@functools.lru_cache(maxsize=16)
def _cached_eval_step(graphdef, top5, mesh):
    return make_eval_step(graphdef, top5=top5, mesh=mesh)


def _split(model: nnx.Module, train: bool):
    if train:
        model.train()
    else:
        model.eval()
    return nnx.split(model, nnx.Param, ...)


def _place(tree, mesh):
    # Fresh buffers (the train step donates its inputs): the caller's model keeps its own.
    if mesh is None:
        return jax.device_put(tree, jax.devices()[0], may_alias=False)
    return jax.device_put(tree, parallel.replicated_sharding(mesh), may_alias=False)


def _to_batch(images, labels, mesh, weights=None):
    arrays = (images, labels) if weights is None else (images, labels, weights)
    if mesh is None:
        return tuple(jax.device_put(a) for a in arrays)  # jnp.asarray of NumPy data compiles a copy per shape
    return parallel.shard_batch(arrays, mesh)
