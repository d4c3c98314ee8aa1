"""DWGL: directed-weighting group lasso (Zhan et al., arXiv 1910.09318), METHODS.md section 2.

Convolutions that feed one elementwise add (a residual stream) must keep the same channel
indices. Trained with a plain filter-level group lasso, each of them zeroes *its own* set of
filters and only the intersection can be removed. DWGL multiplies the group-lasso weight of
filter ``i`` by a coefficient ``alpha_i`` that increases with the index, the same on every
layer of a coupled group, so every coupled layer drives the same (high-index) filters to zero::

    loss(W) + lam * sum_groups sum_members sum_i alpha_i ||W_{m,i}||_2

The penalty is applied by a proximal step after each optimiser step (an optax
transformation, :func:`directed_group_lasso`); the decision is a vote
(:func:`coupled_group_vote`): member ``m`` votes to prune ``i`` when
``||W_{m,i}|| < tau * max_j ||W_{m,j}||``; the group prunes ``i`` only when every member
votes for it.

Pieces, from the pure core outwards:

* :func:`directed_weights` ``(size, schedule, alpha_max, power)``: the ``alpha`` vector.
* :func:`dwgl_groups` ``(model, graph, policy)``: for each channel group, its *members*
  (one per producer layer: the kernel's output slice, its bias, and the BatchNorm scale and
  shift that follow it), as static ``(param_path, axis, positions)`` entries.
* :func:`member_norms`, :func:`prox_directed_group_lasso`: pure functions of the parameter
  pytree (paths "/"-joined as :func:`ib_lasso_jax.graph.coupling.path_str`), jit-safe.
* :func:`directed_group_lasso`: the optax transformation (``update(updates, state, params)``).
* :func:`coupled_group_vote`, :func:`vote_scores`: the decision, reusable by any method.
* ``prune(model, calib, "dwgl", target_flops=...)``: a sparsity-training ``prepare`` phase,
  then scores consistent with the vote (``max`` over members of the normalised norm), then
  the common search. Default policy ``"coupled"``.

Options of ``prune(..., "dwgl", **options)`` (defaults in :data:`DEFAULTS`): ``dataset``
(``None``: train on the calibration images and labels themselves), ``image_size``,
``steps`` (0: no training, score the model as it is), ``epochs`` (instead of ``steps``,
only with ``dataset``), ``batch_size``, ``lam``, ``learning_rate``, ``momentum``,
``weight_decay``, ``schedule`` (``"linear"``, ``"power"``, ``"exponential"``, ``"none"``),
``alpha_max``, ``power``, ``norm`` (``"layer"`` or ``"joint"``), ``seed``.

References:
  Zhan, Ren, Ding, Zhang, Lin, "Directed-Weighting Group Lasso for Eltwise Blocked CNN
  Pruning", arXiv:1910.09318 (2019).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ib_lasso_jax.graph import coupling
from ib_lasso_jax.graph.scaling import ChannelSlice, channel_slices, scale_channels
from ib_lasso_jax.pruning import MethodContext, method_options, register_method

__all__ = [
    "DEFAULTS",
    "DirectedGroupLassoState",
    "GroupSpec",
    "Member",
    "NORMS",
    "SCHEDULES",
    "coupled_group_vote",
    "directed_group_lasso",
    "directed_weights",
    "dwgl_groups",
    "member_norms",
    "prox_directed_group_lasso",
    "sparsity_train",
    "vote_masks",
    "vote_scores",
]

SCHEDULES = ("linear", "power", "exponential", "none")
NORMS = ("layer", "joint")
DEFAULTS: dict[str, Any] = dict(
    dataset=None, image_size=None, steps=100, epochs=None, batch_size=32, lam=2e-3, learning_rate=0.02,
    momentum=0.9, weight_decay=0.0, schedule="linear", alpha_max=4.0, power=2.0, norm="layer", seed=0,
)


# --------------------------------------------------------------------------------------
# Directed weights
# --------------------------------------------------------------------------------------


def directed_weights(size: int, schedule: str = "linear", alpha_max: float = 4.0, power: float = 2.0) -> np.ndarray:
    """Index-wise coefficients ``alpha_i``, ``i = 0 .. size-1``, increasing from 1 to ``alpha_max``.

    With ``t = i / (size - 1)``:

    * ``linear``: ``1 + t (a - 1)``;
    * ``power``: ``1 + t^p (a - 1)`` (flat for low indices, steep for high ones);
    * ``exponential``: ``a^t`` (geometric: equal ratios between neighbours);
    * ``none``: all 1 (the plain group lasso).

    Args:
      size: number of channels ``C`` (>= 1; one channel gets ``alpha = 1``).
      schedule: one of :data:`SCHEDULES`.
      alpha_max: ``a = alpha_{C-1}`` (>= 1).
      power: ``p`` of the ``power`` schedule (> 0).

    Returns:
      ``(size,)`` float64 array.

    >>> directed_weights(5, "linear", 3.0).tolist()
    [1.0, 1.5, 2.0, 2.5, 3.0]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not valid; valid values: {list(SCHEDULES)}")
    if isinstance(alpha_max, bool) or not isinstance(alpha_max, (int, float)) or not alpha_max >= 1:
        raise ValueError(f"alpha_max={alpha_max!r} is not valid; valid values: a number >= 1")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
        raise ValueError(f"power={power!r} is not valid; valid values: a number > 0")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size={size!r} is not valid; valid values: a positive integer")
    t = np.arange(size, dtype=np.float64) / max(size - 1, 1)
    a = float(alpha_max)
    if schedule == "linear":
        return 1.0 + t * (a - 1.0)
    if schedule == "power":
        return 1.0 + t ** float(power) * (a - 1.0)
    if schedule == "exponential":
        return a ** t
    return np.ones(size)


# --------------------------------------------------------------------------------------
# Group members from the channel graph
# --------------------------------------------------------------------------------------


class Member(NamedTuple):
    """One layer of a channel group: the entries that make up its filter ``i``.

    Attributes:
      name: the producer module (e.g. ``"layer1/0/conv2"``), or a BatchNorm module with no
        single producer.
      entries: ``(param_path, axis, positions)`` with ``positions`` a ``(C, r)`` int array of
        indices along ``axis`` holding channel ``i`` (``r = 1`` for conv/BatchNorm axes).
    """

    name: str
    entries: tuple[tuple[str, int, np.ndarray], ...]


class GroupSpec(NamedTuple):
    """A channel group as DWGL sees it: its size and its members (all share channel ``i``)."""

    name: str
    size: int
    members: tuple[Member, ...]


def _module(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else path


def dwgl_groups(model: nnx.Module, graph: coupling.ChannelGraph | None = None, policy: str = "coupled",
                groups: Mapping[str, coupling.ChannelGroup] | None = None) -> tuple[GroupSpec, ...]:
    """The DWGL members of every prunable channel group of ``model``.

    A member is one producer layer of the group: its kernel's output slice, its bias, and the
    scale and shift of the BatchNorm that normalises its output (a zeroed filter would
    otherwise still emit BatchNorm's shift). Consumer input slices are not penalised (the
    penalty is filter-level, as in the paper). A residual stream under ``policy="coupled"``
    is one group whose members are all the producers of the stream.

    Args:
      model: the NNX model.
      graph: its channel graph (traced when ``None``).
      policy: ``"inner"`` or ``"coupled"`` (which groups are prunable).
      groups: explicit groups (overrides ``policy``), e.g. ``MethodContext.groups``.

    Returns:
      A tuple of :class:`GroupSpec`, static data for :func:`prox_directed_group_lasso`.
    """
    graph = coupling.trace_channels(model, strict=False) if graph is None else graph
    groups = graph.prunable(policy) if groups is None else groups
    param_paths = {coupling.path_str(kp) for kp, _ in
                   jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
    slices = channel_slices(graph, groups)
    # Each BatchNorm joins the member of the layer whose output it normalises (the tracer's
    # reach); one after a residual add is a member of its own.
    norms = {"/".join(str(k) for k in p) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}
    bn_owner = {bn: owner for bn in norms if (owner := graph.follows(bn)) is not None}
    out = []
    for name, g in groups.items():
        by_member: dict[str, list] = {}
        for p, axis, _ in slices[name]:
            if p not in param_paths:
                continue  # running statistics: not penalised
            if p.endswith("kernel") and axis != len(graph.param_shapes[p]) - 1:
                continue  # a kernel's input axis (e.g. a dense layer after a flatten)
            mod = _module(p)
            owner = bn_owner.get(mod, mod)
            by_member.setdefault(owner, []).append((p, axis, graph.channel_positions(name, p, axis)))
        members = tuple(Member(m, tuple(e)) for m, e in sorted(by_member.items()))
        if members:
            out.append(GroupSpec(name, g.size, members))
    return tuple(out)


# --------------------------------------------------------------------------------------
# Pure core: norms, prox, vote
# --------------------------------------------------------------------------------------


def _flat(params) -> tuple[dict[str, Any], Callable]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat = {coupling.path_str(kp): v for kp, v in leaves}
    order = [coupling.path_str(kp) for kp, _ in leaves]
    return flat, lambda d: jax.tree_util.tree_unflatten(treedef, [d[p] for p in order])


def _channel_rows(w, axis: int, pos: np.ndarray):
    """``(C, -1)``: the entries of ``w`` holding each channel (rows of ``moveaxis(w, axis, 0)``)."""
    moved = jnp.moveaxis(jnp.asarray(w), axis, 0)
    return moved[pos.reshape(-1)].reshape(pos.shape[0], -1)


def member_norms(params, groups_spec: Sequence[GroupSpec]) -> dict[str, jax.Array]:
    """``{group: (M, C)}``: the Euclidean norm of each member's filter ``i``.

    Args:
      params: pytree of parameters (e.g. ``nnx.state(model, nnx.Param)``).
      groups_spec: from :func:`dwgl_groups`.
    """
    flat, _ = _flat(params)
    out = {}
    for g in groups_spec:
        rows = []
        for m in g.members:
            sq = sum(jnp.sum(jnp.square(_channel_rows(flat[p], a, pos)), axis=1) for p, a, pos in m.entries)
            rows.append(jnp.sqrt(sq))
        out[g.name] = jnp.stack(rows)
    return out


def prox_directed_group_lasso(params, groups_spec: Sequence[GroupSpec], scaling, alphas: Mapping[str, Any],
                              norm: str = "layer"):
    r"""Proximal operator of the directed-weighting group lasso.

    .. math::

       \mathrm{prox}(W) = \arg\min_V \tfrac12 \|V - W\|^2
         + s \sum_g \sum_m \sum_i \alpha_{g,i} \|V_{g,m,i}\|_2

    solved in closed form by group soft-thresholding,
    ``V_{m,i} = W_{m,i} max(0, 1 - s alpha_i / ||W_{m,i}||)`` (``norm="layer"``: each member's
    filter is its own group). With ``norm="joint"`` the group of channel ``i`` is every
    member's filter ``i`` together, ``||W_i||^2 = sum_m ||W_{m,i}||^2``, so all members zero
    channel ``i`` at once. Parameters outside every group are returned unchanged.

    Args:
      params: pytree of parameters; its "/"-joined paths name the entries of ``groups_spec``.
      groups_spec: from :func:`dwgl_groups`.
      scaling: ``s = eta * lam`` (learning rate times strength; a scalar, may be traced).
      alphas: ``{group: (C,)}`` directed weights (:func:`directed_weights`).
      norm: ``"layer"`` or ``"joint"``.

    Returns:
      The pytree after the proximal step.

    References:
      Zhan et al., arXiv:1910.09318; Yuan & Lin, "Model selection and estimation in
      regression with grouped variables", JRSS-B 2006 (group soft-thresholding).
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not valid; valid values: {list(NORMS)}")
    flat, _ = _flat(params)
    norms = member_norms(params, groups_spec)
    slices, factors = {}, {}
    for g in groups_spec:
        n = norms[g.name]  # (M, C)
        if norm == "joint":
            n = jnp.broadcast_to(jnp.sqrt(jnp.sum(jnp.square(n), axis=0)), n.shape)
        thr = scaling * jnp.asarray(alphas[g.name], n.dtype)
        factor = jnp.where(n > thr, 1.0 - thr / jnp.where(n > 0, n, 1.0), 0.0)  # max(0, 1 - thr/||W||)
        rows = [(ChannelSlice.at_positions(p, a, pos, flat[p].shape[a]), f)
                for m, f in zip(g.members, factor) for p, a, pos in m.entries]
        if rows:  # one shrinkage row per member entry
            slices[g.name] = tuple(s for s, _ in rows)
            factors[g.name] = jnp.stack([f for _, f in rows])
    return scale_channels(params, slices, factors)


def coupled_group_vote(member_norms: Any, tau: float) -> np.ndarray:
    """The coupled-group vote: which channels of one group to prune.

    Member ``m`` votes to prune channel ``i`` when ``n[m, i] < tau * max_j n[m, j]``; the
    group prunes ``i`` only when every member votes for it (the intersection of the votes,
    the constraint an elementwise add puts on the layers feeding it).

    Args:
      member_norms: ``(M, C)`` non-negative per-member channel scores (e.g. filter norms).
      tau: relative threshold in ``[0, 1]``.

    Returns:
      ``(C,)`` bool, True = prune.

    >>> coupled_group_vote([[1.0, 0.0, 0.1], [1.0, 0.05, 0.5]], 0.2).tolist()
    [False, True, False]
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau={tau!r} is not valid; valid values: a number in [0, 1]")
    return vote_scores(member_norms) < tau


def vote_scores(member_norms: Any) -> np.ndarray:
    """``(C,)`` scores consistent with :func:`coupled_group_vote`: ``max_m n[m, i] / max_j n[m, j]``.

    Channel ``i`` is pruned at threshold ``tau`` exactly when its score is below ``tau`` (every
    member's normalised norm is below ``tau`` iff the largest one is), so keeping the top
    channels by this score is the vote at some ``tau``: the common keep-ratio search over these
    scores is a search over ``tau``.
    """
    n = np.atleast_2d(np.asarray(member_norms, np.float64))
    top = n.max(axis=1, keepdims=True)
    return (n / np.where(top > 0, top, 1.0)).max(axis=0)


def vote_masks(params, groups_spec: Sequence[GroupSpec], tau: float) -> dict[str, np.ndarray]:
    """``{group: keep mask}`` by the coupled-group vote on the members' filter norms at ``tau``."""
    return {g: ~coupled_group_vote(np.asarray(n), tau) for g, n in member_norms(params, groups_spec).items()}


# --------------------------------------------------------------------------------------
# The optax transformation
# --------------------------------------------------------------------------------------


class DirectedGroupLassoState(NamedTuple):
    """Step count (for a learning-rate schedule)."""

    count: jax.Array


def directed_group_lasso(
    groups_spec: Sequence[GroupSpec],
    lam: float,
    learning_rate: float | optax.Schedule,
    schedule: str = "linear",
    *,
    alpha_max: float = 4.0,
    power: float = 2.0,
    norm: str = "layer",
) -> optax.GradientTransformation:
    """DWGL's proximal step, chained after an optimiser: ``optax.chain(sgd, directed_group_lasso(...))``.

    ``update(updates, state, params)`` takes the optimiser's updates ``u`` and returns
    ``prox(params + u) - params``, with the prox of :func:`prox_directed_group_lasso` at
    ``scaling = eta_t * lam`` (``eta_t`` the learning rate of this step), so applying the
    returned updates lands on the proximal point.

    Args:
      groups_spec: from :func:`dwgl_groups`.
      lam: penalty strength (>= 0).
      learning_rate: the optimiser's learning rate: a float or an optax schedule of the step.
      schedule: directed-weight schedule (:data:`SCHEDULES`; ``"none"`` is the plain group lasso).
      alpha_max: the largest weight (:func:`directed_weights`).
      power: exponent of the ``"power"`` schedule.
      norm: ``"layer"`` (each member's filter is its own group, the paper's penalty) or
        ``"joint"`` (channel ``i`` of every member is one group).

    Returns:
      An ``optax.GradientTransformation`` that needs ``params`` in ``update``.

    >>> import optax, jax.numpy as jnp
    >>> spec = (GroupSpec("g", 2, (Member("w", (("w", 0, np.array([[0], [1]])),)),)),)
    >>> tx = directed_group_lasso(spec, lam=1.0, learning_rate=1.0, schedule="none")
    >>> p = {"w": jnp.array([3.0, 0.5])}
    >>> u, _ = tx.update({"w": jnp.zeros(2)}, tx.init(p), p)
    >>> [round(v, 6) for v in optax.apply_updates(p, u)["w"].tolist()]  # float32 round-off
    [2.0, 0.0]
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"lam={lam!r} is not valid; valid values: a number >= 0")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not valid; valid values: {list(NORMS)}")
    if not callable(learning_rate) and (isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float))
                                        or learning_rate < 0):
        raise ValueError(f"learning_rate={learning_rate!r} is not valid; valid values: a number >= 0 or a schedule")
    alphas = {g.name: directed_weights(g.size, schedule, alpha_max, power) for g in groups_spec}

    def init(params):
        del params
        return DirectedGroupLassoState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("directed_group_lasso needs params: call update(updates, state, params)")
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
        moved = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
        proxed = prox_directed_group_lasso(moved, groups_spec, eta * lam, alphas, norm)
        new_updates = jax.tree.map(lambda q, p: (q - p).astype(p.dtype), proxed, params)
        return new_updates, DirectedGroupLassoState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------------------
# Sparsity training (the method's prepare phase)
# --------------------------------------------------------------------------------------


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    o = method_options(options, DEFAULTS, "method 'dwgl'", noun="option(s)")

    def bad(key, valid):
        raise ValueError(f"option {key}={o[key]!r} is not valid for method 'dwgl'; valid values: {valid}")

    if o["schedule"] not in SCHEDULES:
        bad("schedule", list(SCHEDULES))
    if o["norm"] not in NORMS:
        bad("norm", list(NORMS))
    for key, lo in (("lam", 0.0), ("learning_rate", 0.0), ("weight_decay", 0.0)):
        if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or not o[key] >= lo:
            bad(key, f"a number >= {lo}")
    if isinstance(o["momentum"], bool) or not isinstance(o["momentum"], (int, float)) or not 0 <= o["momentum"] < 1:
        bad("momentum", "a number in [0, 1)")
    if isinstance(o["alpha_max"], bool) or not isinstance(o["alpha_max"], (int, float)) or not o["alpha_max"] >= 1:
        bad("alpha_max", "a number >= 1")
    if isinstance(o["power"], bool) or not isinstance(o["power"], (int, float)) or not o["power"] > 0:
        bad("power", "a number > 0")
    for key, lo in (("steps", 0), ("batch_size", 1), ("seed", 0)):
        if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < lo:
            bad(key, f"an integer >= {lo}")
    for key in ("epochs", "image_size"):
        if o[key] is not None and (isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 1):
            bad(key, "a positive integer or None")
    if o["epochs"] is not None and o["dataset"] is None:
        raise ValueError("option epochs is only valid with option dataset (an epoch of the calibration set is "
                         "ill-defined); give steps instead, or a dataset")
    if o["dataset"] is not None:
        from ib_lasso_jax.models._registry import DATASETS

        if o["dataset"] not in DATASETS:
            bad("dataset", sorted(DATASETS))
    return o


def sparsity_train(model: nnx.Module, groups_spec: Sequence[GroupSpec], batches, steps: int, *, lam: float,
                   learning_rate: float, momentum: float = 0.9, weight_decay: float = 0.0, schedule: str = "linear",
                   alpha_max: float = 4.0, power: float = 2.0, norm: str = "layer") -> tuple[nnx.Module, dict]:
    """Train ``model`` (a copy) for ``steps`` steps with SGD followed by the DWGL proximal step.

    The optimiser is the training library's (:func:`ib_lasso_jax.train.training.create_optimizer`:
    SGD with momentum, coupled L2, constant learning rate) chained with
    :func:`directed_group_lasso`; the step is :func:`ib_lasso_jax.train.training.make_train_step`.

    Args:
      model: the model to sparsify (not modified).
      groups_spec: from :func:`dwgl_groups`.
      batches: an iterator of ``(images, labels)`` numpy batches.
      steps: number of steps.
      lam, learning_rate, momentum, weight_decay: strength and optimiser settings.
      schedule, alpha_max, power, norm: as :func:`directed_group_lasso`.

    Returns:
      ``(trained model in eval mode, info)`` with the mean training loss and accuracy of the
      last steps and the seconds taken.
    """
    from ib_lasso_jax.train import training

    model = nnx.clone(model)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    config = training.TrainConfig(optimizer="sgd", learning_rate=float(learning_rate), momentum=float(momentum),
                                  weight_decay=float(weight_decay), schedule="constant")
    tx = optax.chain(training.create_optimizer(config, max(steps, 1), max(steps, 1)),
                     directed_group_lasso(groups_spec, lam, float(learning_rate), schedule, alpha_max=alpha_max,
                                          power=power, norm=norm))
    step_fn = training.make_train_step(graphdef, tx)
    opt_state = jax.jit(tx.init)(params)  # one program, not one per parameter shape
    t0, tail = time.perf_counter(), []
    for s in range(steps):
        images, labels = next(batches)
        params, rest, opt_state, sums = step_fn(params, rest, opt_state, jax.device_put(images), jax.device_put(labels))
        if s >= steps - 10:
            tail.append(jax.device_get(sums))
    nnx.update(model, params, rest)
    model.eval()
    info = {"steps": steps, "seconds": round(time.perf_counter() - t0, 3)}
    if tail:
        count = sum(float(t["count"]) for t in tail)
        info["train_loss"] = sum(float(t["loss_sum"]) for t in tail) / count
        info["train_accuracy"] = sum(float(t["correct"]) for t in tail) / count
    return model, info


def _calibration_batches(images, labels, batch_size, rng: np.random.Generator):
    n = images.shape[0]
    while True:
        idx = rng.choice(n, size=min(batch_size, n), replace=False)
        yield images[idx], labels[idx]


def _prepare(ctx: MethodContext) -> nnx.Module:
    o = _check_options(ctx.options)
    spec = dwgl_groups(ctx.model, ctx.graph, groups=ctx.groups)
    ctx.info["dwgl"] = {k: o[k] for k in ("lam", "learning_rate", "schedule", "alpha_max", "norm", "steps",
                                          "epochs", "dataset")}
    if o["dataset"] is None:
        if ctx.images is None:
            raise ValueError("method 'dwgl' trains on the calibration set when option dataset is not given; "
                             "pass calibration (images, labels) or dataset=...")
        steps = o["steps"]
        batches = _calibration_batches(ctx.images.astype(np.float32), ctx.labels.astype(np.int32), o["batch_size"],
                                       np.random.default_rng(o["seed"]))
    else:
        from ib_lasso_jax.data import load_dataset

        data = load_dataset(o["dataset"], image_size=o["image_size"])
        shape = tuple(getattr(getattr(ctx.model, "spec", None), "input_shape", data.input_shape))
        if tuple(data.input_shape) != shape:
            raise ValueError(f"option dataset={o['dataset']!r} at image_size={o['image_size']!r} gives inputs "
                             f"{tuple(data.input_shape)}, the model takes {shape}; set option image_size")
        per_epoch = data.steps_per_epoch(data.train_split, o["batch_size"], True)
        steps = o["epochs"] * per_epoch if o["epochs"] is not None else o["steps"]
        batches = iter(data.batches(data.train_split, o["batch_size"], seed=o["seed"], training=True,
                                    num_epochs=None))
    if steps == 0:
        return ctx.model
    model, info = sparsity_train(ctx.model, spec, batches, steps, lam=o["lam"], learning_rate=o["learning_rate"],
                                 momentum=o["momentum"], weight_decay=o["weight_decay"], schedule=o["schedule"],
                                 alpha_max=o["alpha_max"], power=o["power"], norm=o["norm"])
    ctx.info["dwgl"].update(info)
    return model


def dwgl_scores(ctx: MethodContext) -> dict[str, np.ndarray]:
    """Scores consistent with the coupled-group vote (:func:`vote_scores`) on the members' filter norms."""
    _check_options(ctx.options)
    spec = dwgl_groups(ctx.model, ctx.graph, groups=ctx.groups)
    norms = member_norms(nnx.state(ctx.model, nnx.Param), spec)
    out = {g: vote_scores(np.asarray(n)) for g, n in norms.items()}
    for n, g in ctx.groups.items():  # a group with no penalised member (none in the zoo): keep all equal
        out.setdefault(n, np.ones(g.size))
    return out


register_method("dwgl", scores=dwgl_scores, needs_data=True, prepare=_prepare, default_policy="coupled",
                # sparsity training: a few steps on the calibration set instead of epochs of the data set
                smoke_options={"steps": 3, "epochs": None, "dataset": None, "image_size": None, "batch_size": 8},
                description="directed-weighting group lasso sparsity training + coupled-group vote (Zhan et al. 2019)",
                check_options=lambda ctx: _check_options(ctx.options))
