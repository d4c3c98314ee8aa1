"""Information-bottleneck structured lasso: ``hsic-lasso`` (APIB), ``sglp-ib``, ``stlp-ib``.

For each channel group (METHODS.md section 1)::

    features F (N, C, D) at the group's first consumer, response G (N, R) its output
      -> centred channel kernels K_k and response kernels L_c  (ib_lasso_jax.lasso.gram)
      -> Q = [<K_k, K_l>], P = [<K_k, L_c>]                      (never the N^2 x C design)
      -> min_B 1/2 tr(B^T Q B) - tr(B^T P) + lam ||B||_1 + Omega(B)   (ib_lasso_jax.lasso.solvers)
      -> keep channel k when row B[k, :] is non-zero

* ``hsic-lasso``: one response, the kernel of the consumer's output, no labels and no class
  structure (APIB's HSIC lasso, Guo et al. ICCV 2023).
* ``sglp-ib``: one response per class (``response``: R1 one-vs-rest labels, R2 the output
  kernel restricted to the class, R4 the class logit's kernel) and a graph-guided fusion over
  a class graph (``structures.class_graph``: correlation of class profiles > ``rho``).
* ``stlp-ib``: the same responses and a tree-guided group lasso over a class tree
  (``structures.class_tree``, Kim & Xing weights).

Adaptive lambda (APIB's scheme): one lambda for every layer (the kernels are unit-Frobenius
normalised, so lambdas are comparable across layers), searched to hit the FLOPs or params
target, with the per-layer floor. Each layer is solved once for a whole grid of lambdas in one
vmapped, compiled call; the search walks the grid, then single channels are added or removed
by their row norms to land within tolerance.

Options (``prune(..., method, **options)``), defaults chosen as documented in
``docs/sglp-ib.md``:

``kernel`` ("gaussian": median bandwidth; APIB used "laplacian"), ``response`` ("R2"),
``profiles`` ("logits": class-mean logits; "P": the layer's P columns), ``rho`` (0.6),
``linkage`` ("average"), ``structure_weight`` (0.7: Omega's weight relative to lam),
``output_weight`` (3: the whole-output kernel's response as column 0 beside the class-wise
columns, scaled by this weight, tied to every class by the graph or under the tree's root;
0 leaves it out, and HSIC-lasso is the limit of a large weight), ``graph_method`` ("auto":
"exact", the fusion's exact prox, up to :data:`EXACT_MAX_EDGES` edges, else "smooth", Chen et
al.'s smoothing, the author's solver, which stops early once ``gamma lam ||C||^2 / mu`` dwarfs
Q's Lipschitz constant), ``allocation`` ("global":
APIB's one lambda; "layer": one lambda relative to each layer's lambda_max; "uniform": the
same fraction of every layer, ranked by the lambda path), ``nonneg`` (False), ``grid``
(48 lambdas), ``lam_range`` (1e-4: smallest lambda relative to the largest), ``mu`` (0.1),
``maxiter`` (500), ``batch_size`` (128), ``grid_mode`` ("auto": see :func:`solve_grid`),
``inspect`` (None; a group's name: its coefficient path B, lambdas, exit points and structure
in ``report.info["inspect"]``, as ``experiments/linkage.py`` plots).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ib_lasso_jax.graph.features import iter_features, padded_batches
from ib_lasso_jax.lasso import gram, structures
from ib_lasso_jax.lasso.solvers import StructuredLasso, gram_lipschitz
from ib_lasso_jax.pruning import MethodContext, method_options, register_method, selection

__all__ = ["ALLOCATIONS", "GRID_MODES", "RESPONSES", "layer_lambda_for_count", "layer_problem", "solve_grid"]

RESPONSES = ("R1", "R2", "R4")
PROFILES = ("logits", "P")
DEFAULTS = dict(kernel="gaussian", response="R2", profiles="logits", rho=0.6, linkage="average",
                structure_weight=0.7, output_weight=3.0, allocation="global", graph_method="auto",
                nonneg=False, grid=48, lam_range=1e-4, mu=0.1, maxiter=500, batch_size=128, grid_mode="auto",
                inspect=None)
# A smoke run's lambda grid and proximal-gradient iterations.
_SMOKE = {"grid": 6, "maxiter": 30}
GRID_MODES = ("auto", "vmap", "path")
ALLOCATIONS = ("global", "layer", "uniform")


def _options(ctx: MethodContext) -> dict:
    opts = method_options(ctx.options, DEFAULTS, "the IB-lasso methods")
    if opts["response"] not in RESPONSES:
        raise ValueError(f"response must be one of {', '.join(RESPONSES)}; got {opts['response']!r}")
    if opts["profiles"] not in PROFILES:
        raise ValueError(f"profiles must be one of {', '.join(PROFILES)}; got {opts['profiles']!r}")
    if opts["grid_mode"] not in GRID_MODES:
        raise ValueError(f"grid_mode must be one of {', '.join(GRID_MODES)}; got {opts['grid_mode']!r}")
    if opts["graph_method"] not in ("auto", "exact", "smooth"):
        raise ValueError(f"graph_method must be one of auto, exact, smooth; got {opts['graph_method']!r}")
    if opts["allocation"] not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {opts['allocation']!r}")
    # ctx.groups is None when the options are checked before the model is loaded (pruning.check_options)
    if opts["inspect"] is not None and (not isinstance(opts["inspect"], str)
                                        or ctx.groups is not None and opts["inspect"] not in ctx.groups):
        groups = f" ({', '.join(ctx.groups)})" if ctx.groups is not None else ""
        raise ValueError(f"inspect must name a prunable channel group{groups}; got {opts['inspect']!r}")
    w = opts["output_weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
        raise ValueError(f"output_weight must be a finite number >= 0; got {w!r}")

    def bad(key, valid):
        raise ValueError(f"option {key}={opts[key]!r} is not valid for the IB-lasso methods; valid values: {valid}")

    def number(v):
        return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v)

    def integer(v):
        return not isinstance(v, bool) and isinstance(v, (int, np.integer))

    if not isinstance(opts["nonneg"], (bool, np.bool_)):
        bad("nonneg", "true or false")
    if not (number(opts["lam_range"]) and 0 < opts["lam_range"] < 1):
        bad("lam_range", "the smallest lambda relative to the largest, a number in (0, 1)")
    if not (integer(opts["grid"]) and opts["grid"] >= 2):
        bad("grid", "the number of lambdas, an integer >= 2")
    if not (number(opts["structure_weight"]) and opts["structure_weight"] >= 0):
        bad("structure_weight", "a finite number >= 0")
    if not (number(opts["mu"]) and opts["mu"] > 0):
        bad("mu", "a finite number > 0")
    for key in ("maxiter", "batch_size"):
        if not (integer(opts[key]) and opts[key] >= 1):
            bad(key, "a positive integer")
    return opts


def _num_classes(ctx: MethodContext) -> int:
    spec = getattr(ctx.model, "spec", None)
    return int(spec.num_classes) if spec is not None else int(ctx.labels.max()) + 1


def _check_classes(labels: np.ndarray, num_classes: int):
    counts = np.bincount(labels, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(
            f"the calibration set has no example of class {int(missing[0])} (missing classes: "
            f"{missing.tolist()}); class-wise methods need every class: draw it with "
            "ib_lasso_jax.data.calibration_set(ds, n_per_class)"
        )


def _logits(model, images, batch_size=256) -> np.ndarray:
    """The model's outputs on ``images``, one compiled forward for every (padded) batch."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    images = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(forward(state, jax.device_put(x)))[:real]
                           for x, real in padded_batches(images, batch_size)])


def layer_problem(F, G, labels, num_classes, *, method: str, kernel: str, response: str, logits=None,
                  output_weight: float = 0.0):
    """``(Q, P)`` of one layer for a method (see the module docstring).

    With ``output_weight = w > 0`` (class-wise methods), the whole-output kernel enters as
    response column 0, scaled by ``w``, beside the class-wise columns: ``P = [w P_hsic, P_1..P_C]``.
    Scaling a lasso column's response by ``w`` is solving it at ``lam / w``, so as ``w`` grows
    column 0 outlives the class columns on the lambda path and the ranking tends to HSIC-lasso's.
    """
    def whole_output():
        return gram.channel_kernels(G[:, None, :], kernel, normalize=True)  # (1, N, N)
    if method == "hsic-lasso":
        L = whole_output()
    else:
        if response == "R1":
            L = gram.one_vs_rest_responses(labels, num_classes)
        elif response == "R2":
            L = gram.output_responses(G, labels, num_classes, kernel)
        else:  # R4
            L = gram.logit_responses(logits)
        if output_weight > 0:
            L = jnp.concatenate([output_weight * whole_output(), L])
    return gram.gram_statistics(F, L, kernel, normalize=True)


def _describe(structure) -> dict:
    """The class graph's edges or the class tree's groups and weights, as plain numbers."""
    if isinstance(structure, structures.ClassGraph):
        return {"edges": [(int(i), int(j), round(float(r), 3)) for i, j, r in structure.edges()]}
    return {"groups": [np.flatnonzero(g).tolist() for g in np.asarray(structure.masks)],
            "weights": np.round(np.asarray(structure.weights), 3).tolist()}


# "auto" takes the exact fusion prox up to this many graph edges, Chen et al.'s smoothing above:
# the exact prox's dual solve per step grows with the edges (docs/performance-log.md).
EXACT_MAX_EDGES = 128


def graph_method_for(opts: dict, structure) -> str:
    """The graph solver ``opts["graph_method"]`` names, ``"auto"`` resolved by the edge count."""
    if opts["graph_method"] != "auto":
        return opts["graph_method"]
    return "exact" if structure.n_edges <= EXACT_MAX_EDGES else "smooth"


def _solver(method: str, opts: dict, structure) -> StructuredLasso:
    if method == "hsic-lasso" or structure is None or opts["structure_weight"] == 0:
        return StructuredLasso(penalty="lasso", nonneg=opts["nonneg"], maxiter=opts["maxiter"])
    if method == "sglp-ib":
        return StructuredLasso(penalty="graph", structure=structure, nonneg=opts["nonneg"],
                               graph_method=graph_method_for(opts, structure), mu=opts["mu"],
                               maxiter=opts["maxiter"])
    return StructuredLasso(penalty="tree", structure=structure, nonneg=opts["nonneg"], maxiter=opts["maxiter"])


def grid_mode_for_devices() -> str:
    """``"vmap"`` on an accelerator or several devices, ``"path"`` on one CPU device."""
    return "vmap" if jax.device_count() > 1 or jax.default_backend() != "cpu" else "path"


def solve_grid(solver: StructuredLasso, Q, P, lams, structure_weight: float, mode: str = "auto"):
    """Solve one layer for every lambda of ``lams`` in one compiled call: ``(B (G, C, K), iters (G,))``.

    Modes:
      ``"vmap"``: every lambda solved from zero at once (``jax.vmap`` of the solver; sharded
        across devices when there are several). Batching is nearly free on an accelerator,
        but every member runs until the slowest has converged.
      ``"path"``: :meth:`~ib_lasso_jax.lasso.solvers.StructuredLasso.path`, the lambdas from the
        largest down in one ``lax.scan``, each warm-started from the last and stopped on the
        gradient-mapping residual: on one CPU device warm starts do less work than a batched
        grid, and the residual rule is the more accurate stop (docs/performance-log.md).
      ``"auto"``: ``"path"`` on one CPU device, ``"vmap"`` otherwise.
    """
    if mode not in GRID_MODES:
        raise ValueError(f"mode must be one of {', '.join(GRID_MODES)}; got {mode!r}")
    if mode == "auto":
        mode = grid_mode_for_devices()
    Qp, lip = gram_lipschitz(jnp.asarray(Q))
    if mode == "path":
        B, state = solver.path(Qp, P, lams, structure_weight=structure_weight, lipschitz=lip)
        return B, state.iter_num
    lams = jnp.asarray(lams, Qp.dtype)
    n_dev = jax.device_count()
    if n_dev > 1 and lams.shape[0] % n_dev == 0:
        # Several devices: shard the grid across them (solver.grid replicates Q and P).
        mesh = jax.make_mesh((n_dev,), ("grid",), axis_types=(jax.sharding.AxisType.Auto,))
        lams = jax.device_put(lams, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("grid")))
    # One compiled program per solver configuration and layer shape, reused across layers.
    B, state = solver.grid(Qp, P, lams, structure_weight=structure_weight, lipschitz=lip)
    return B, state.iter_num


def layer_lambda_for_count(solver: StructuredLasso, Q, P, count: int, *, structure_weight: float = 0.0,
                           lo: float = 1e-7, hi: float = 1e7, max_iter: int = 60):
    """Per-layer search: the lambda at which ``count`` rows of B are non-zero.

    Log-space bisection on ``[lo, hi]`` (the author's earlier code's range), each solve
    warm-started from the previous solution. The number of non-zero rows is non-increasing
    in lambda for the lasso path in practice; where no lambda gives exactly ``count`` (two
    rows leave at the same lambda), the largest lambda keeping at least ``count`` rows is
    returned (a per-layer floor must never be undercut).

    Returns:
      ``(lam, B, nonzero_rows, iterations)``.

    Raises:
      ValueError: ``count`` outside ``[1, channels]``.
    """
    Qp, lip = gram_lipschitz(jnp.asarray(Q))
    P = jnp.asarray(P)
    c = Qp.shape[0]
    if not 1 <= int(count) <= c:
        raise ValueError(f"count must be in [1, {c}] (the layer's channels); got {count!r}")
    pair = solver.penalty != "lasso"

    def run(init, lam):  # solver.run's compiled program is cached across calls and layers
        return solver.run(init, Qp, P, (lam, structure_weight * lam) if pair else lam, lipschitz=lip)[0]
    a, b = np.log(lo), np.log(hi)
    best, B = None, jnp.zeros(P.shape, Qp.dtype)
    for it in range(1, max_iter + 1):  # noqa: B007 (the iteration count is returned after the loop)
        mid = 0.5 * (a + b)
        B = run(B, float(np.exp(mid)))
        nnz = int(np.sum(np.linalg.norm(np.asarray(B), axis=1) > 0))
        if nnz >= count and (best is None or mid > best[0]):
            best = (mid, B, nnz)
        if nnz == count:
            break
        if nnz > count:
            a = mid
        else:
            b = mid
    if best is None:  # even the smallest lambda keeps fewer rows (dead channels)
        best = (a, B, nnz)
    return float(np.exp(best[0])), best[1], best[2], it


def _select_factory(method: str):
    def selector(ctx: MethodContext):
        opts = _options(ctx)
        t0 = time.perf_counter()
        labels = np.asarray(ctx.labels).astype(np.int64)
        num_classes = _num_classes(ctx)
        hub = float(opts["output_weight"]) if method != "hsic-lasso" else 0.0  # whole-output column 0
        if method != "hsic-lasso":
            _check_classes(labels, num_classes)
        logits = (_logits(ctx.model, ctx.images)
                  if method != "hsic-lasso" and (opts["profiles"] == "logits" or opts["response"] == "R4") else None)
        problems = {}
        for gf in iter_features(ctx.model, ctx.images, list(ctx.groups), batch_size=opts["batch_size"]):
            problems[gf.group] = layer_problem(gf.features, gf.response, labels, num_classes, method=method,
                                               kernel=opts["kernel"], response=opts["response"], logits=logits,
                                               output_weight=hub)
        t_stats = time.perf_counter() - t0

        # The lambda grid, relative to lambda_max = max |P| (the lasso's smallest all-zero lambda).
        # "global": one grid for all layers (APIB: normalised kernels make lambdas comparable);
        # "layer": each layer's grid relative to its own lambda_max; "uniform" ranks on the
        # global grid and keeps the same fraction of every layer.
        rel = np.geomspace(opts["lam_range"], 1.0, opts["grid"])
        pmax = {name: float(np.max(np.abs(np.asarray(P)))) for name, (_, P) in problems.items()}
        top = max(pmax.values())
        grids = {name: rel * (pmax[name] if opts["allocation"] == "layer" else top) for name in problems}
        lams = rel * top
        structure = None
        if method != "hsic-lasso" and num_classes > 1:  # one class: no edges, no tree: plain lasso
            if opts["profiles"] == "logits":
                profiles = np.stack([logits[labels == c].mean(0) for c in range(num_classes)], axis=1)
            else:  # the class-wise columns of every layer's P
                profiles = np.concatenate([np.asarray(P)[:, 1 if hub else 0:] for _, P in problems.values()], axis=0)
            structure = (structures.class_graph(profiles, rho=opts["rho"]) if method == "sglp-ib"
                         else structures.class_tree(profiles, method=opts["linkage"]))
            ctx.info["class_structure"] = _describe(structure)  # classes only, before the output node
            if hub:
                structure = structures.with_output_node(structure)
        solver = _solver(method, opts, structure)
        if method == "sglp-ib" and structure is not None:
            ctx.info["graph_method"] = graph_method_for(opts, structure)
        norms, iters, paths = {}, {}, {}
        for name, (Q, P) in problems.items():
            B, it = solve_grid(solver, Q, P, grids[name], opts["structure_weight"], opts["grid_mode"])
            if name == opts["inspect"]:
                paths[name] = B
            norms[name] = np.linalg.norm(np.asarray(B), axis=2)  # (G, C)
            iters[name] = np.asarray(it)
        ctx.info.update(lambdas=lams.tolist(), seconds_statistics=round(t_stats, 2),
                        grid_mode=opts["grid_mode"] if opts["grid_mode"] != "auto" else grid_mode_for_devices(),
                        solver_iterations=int(sum(int(i.sum()) for i in iters.values())),
                        seconds_solve=round(time.perf_counter() - t0 - t_stats, 2),
                        max_solver_iterations={n: int(i.max()) for n, i in iters.items()})
        # Thresholding each channel's exit point on the lambda path moves one channel at a time.
        G = len(lams)
        exit_points = {n: selection.exit_points(norms[n] > 0, norms[n]) for n in ctx.groups}
        ctx.info["lambda_grid"] = {"lambdas": len(lams), "min": float(lams[0]), "max": float(lams[-1]),
                                   "allocation": opts["allocation"], "output_weight": hub}
        if opts["inspect"] is not None:  # one layer's whole path, for plots (the paper's "linkage matrix")
            n = opts["inspect"]
            ctx.info["inspect"] = {
                "group": n, "lambdas": grids[n].tolist(), "B": np.asarray(paths[n]).tolist(),
                "exit_points": exit_points[n].tolist(),
                "columns": ["output"] if method == "hsic-lasso"
                else (["output"] if hub else []) + [str(c) for c in range(num_classes)],
                "structure": _describe(structure) if structure is not None else None}
        if opts["allocation"] == "uniform":  # knob: the fraction of every layer removed (floors kept)
            return selection.from_scores(exit_points, ctx.floors)._replace(
                knob_value=float, at_ratios=None, strongest="the strongest setting")

        def select(knob: float):
            masks = {}
            for n in ctx.groups:
                e = exit_points[n]
                keep = e >= knob
                if keep.sum() < ctx.floors[n]:
                    keep = np.zeros_like(keep)
                    keep[np.argsort(-e, kind="stable")[: ctx.floors[n]]] = True
                masks[n] = keep
            return masks

        # The knob t sits between grid lambdas floor(t) and floor(t) + 1: report the former
        # (relative to each layer's lambda_max under the "layer" allocation).
        scale = lams if opts["allocation"] == "global" else rel
        return selection.Selection(select, -1.0, float(G), scores_at=lambda knob: exit_points,
                                   knob_value=lambda knob: float(scale[int(np.clip(np.floor(knob), 0, G - 1))]))

    return selector


register_method("hsic-lasso", selection=_select_factory("hsic-lasso"), check_options=_options,
                smoke_options=_SMOKE,
                description="HSIC lasso on the consumer's output kernel (APIB, Guo et al. 2023)")
register_method("sglp-ib", selection=_select_factory("sglp-ib"), check_options=_options,
                smoke_options=_SMOKE, smoke_substitute="hsic-lasso",
                description="sparse graph-structured lasso with class-wise information (Liu et al. 2025)")
register_method("stlp-ib", selection=_select_factory("stlp-ib"), check_options=_options,
                smoke_options=_SMOKE, smoke_substitute="hsic-lasso",
                description="sparse tree-guided lasso with class-wise information (Liu et al. 2025)")
