"""Class structures for the structured lasso: a class graph (sGLP-IB) and a class tree (sTLP-IB).

Both are built from *class profiles*: the columns of a ``(features, classes)`` matrix, one
profile per class (the columns of the Gram-form right-hand side ``P``, or class prototypes such
as mean features or mean logits). Similarity is the Pearson correlation of two profiles,

.. math::

    r_{ml} = \\frac{\\langle p_m - \\bar p_m, p_l - \\bar p_l\\rangle}
                  {\\|p_m - \\bar p_m\\|\\,\\|p_l - \\bar p_l\\|}.

The results are JAX pytrees (their arrays are leaves, the number of classes is static), so
they can be passed straight into jitted or vmapped code, e.g. as part of a prox's
``hyperparams``:

- :class:`ClassGraph` -- an edge list ``(source, target, weight = r)`` and, through
  :meth:`ClassGraph.incidence`, the edge-incidence matrix ``C`` used by Chen et al.'s smoothing
  and by :func:`ib_lasso_jax.lasso.prox.prox_graph_fused_lasso`.
- :class:`ClassTree` -- the groups of a tree over classes (one per node, leaves first, every
  node after all of its descendants) with Kim & Xing's weights, used by
  :func:`ib_lasso_jax.lasso.prox.prox_tree_group_lasso`.

References:
    Kim, S. and Xing, E. P. (2009). Statistical estimation of correlated genome associations to
    a quantitative trait network. PLoS Genetics 5(8).
    Chen, X., Lin, Q., Kim, S., Carbonell, J. G. and Xing, E. P. (2012). Smoothing proximal
    gradient method for general structured sparse regression. Annals of Applied Statistics 6(2).
    Kim, S. and Xing, E. P. (2010). Tree-guided group lasso for multi-task regression with
    structured sparsity. ICML.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.cluster.hierarchy
import scipy.spatial.distance

LINKAGE_METHODS = ("average", "complete", "single", "weighted")

__all__ = [
    "LINKAGE_METHODS",
    "ClassGraph",
    "ClassTree",
    "class_correlation",
    "class_graph",
    "class_graph_from_edges",
    "class_tree",
    "class_tree_from_groups",
    "with_output_node",
]


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ClassGraph:
    """A weighted, signed graph over classes.

    Edge ``e`` joins classes ``source[e] < target[e]`` with weight ``weight[e] = r_e`` (the
    correlation, sign kept). Its row of the edge-incidence matrix is

    .. math::

        C_{e,:} = |r_e| \\, (\\mathbf{e}_{m} - \\operatorname{sign}(r_e)\\, \\mathbf{e}_{l}),

    so that ``(C b)_e = |r_e| (b_m - sign(r_e) b_l)`` and the graph-guided fusion penalty of a
    coefficient row ``b`` is ``gamma * ||C b||_1``.

    Attributes:
        source: ``(E,)`` int32, first class of each edge.
        target: ``(E,)`` int32, second class of each edge.
        weight: ``(E,)`` float, signed edge weight ``r_e`` (``|r_e|`` is the fusion strength).
        sq_norm: scalar, ``||C||_2^2`` (largest eigenvalue of ``C^T C``), the Lipschitz factor
            of the smoothed penalty and of the prox's dual problem.
        n_classes: number of classes (static).
    """

    source: jax.Array
    target: jax.Array
    weight: jax.Array
    sq_norm: jax.Array
    n_classes: int = _static()

    @property
    def n_edges(self) -> int:
        return int(np.shape(self.source)[0])

    def incidence(self) -> jax.Array:
        """The dense ``(E, n_classes)`` edge-incidence matrix ``C`` (jit-safe)."""
        e = jnp.arange(self.n_edges)
        w = jnp.asarray(self.weight)
        c = jnp.zeros((self.n_edges, self.n_classes), w.dtype)
        c = c.at[e, self.source].add(jnp.abs(w))
        return c.at[e, self.target].add(-w)

    def edges(self) -> list[tuple[int, int, float]]:
        """The edge list ``[(m, l, r_ml), ...]`` as Python numbers."""
        return [(int(src), int(dst), float(r))
                for src, dst, r in zip(np.asarray(self.source), np.asarray(self.target), np.asarray(self.weight))]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ClassTree:
    """Tree-structured groups over classes, with one weight per node.

    ``masks[v]`` is the set of classes under node ``v`` (its group ``G_v``). Nodes are ordered
    so that every node comes after all of its descendants (leaves first, root last), the order
    in which :func:`ib_lasso_jax.lasso.prox.prox_tree_group_lasso` applies group soft-thresholding.
    The tree penalty of a coefficient row ``b`` is

    .. math::

        \\Omega(b) = \\sum_{v} w_v \\, \\|b_{G_v}\\|_2 .

    Attributes:
        masks: ``(n_nodes, n_classes)`` bool membership of each node's group.
        weights: ``(n_nodes,)`` float node weights ``w_v >= 0``.
        heights: ``(n_nodes,)`` float node heights in ``[0, 1]`` (0 for leaves, 1 for the
            root of a built tree; zeros for a tree given by its groups).
        parents: ``(n_nodes,)`` int32 index of each node's parent, -1 for roots.
        n_classes: number of classes (static).
    """

    masks: jax.Array
    weights: jax.Array
    heights: jax.Array
    parents: jax.Array
    n_classes: int = _static()

    @property
    def n_nodes(self) -> int:
        return int(np.shape(self.masks)[0])

    def groups(self) -> list[np.ndarray]:
        """The groups as index arrays, in the stored (leaves -> root) order."""
        return [np.flatnonzero(m) for m in np.asarray(self.masks)]


def _float_dtype():
    # arrays follow JAX's default float width (float64 only under jax_enable_x64)
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _check_profiles(profiles) -> np.ndarray:
    x = np.asarray(profiles, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(
            f"profiles must be a (features, classes) matrix with at least 2 features and 1 class; "
            f"got shape {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("profiles must be finite; got NaN or inf entries")
    sd = x.std(axis=0)
    flat = np.flatnonzero(sd <= 1e-12 * max(1.0, float(np.abs(x).max())))
    if flat.size:
        raise ValueError(
            f"profiles has constant columns (classes {flat.tolist()}); their correlation with "
            f"other classes is undefined -- drop them or use other profiles"
        )
    return x


def class_correlation(profiles) -> np.ndarray:
    """Pearson correlation between the columns (class profiles) of ``profiles``.

    Args:
        profiles: ``(features, classes)`` array; column ``c`` is class ``c``'s profile.

    Returns:
        ``(classes, classes)`` float64 correlation matrix (unit diagonal).
    """
    x = _check_profiles(profiles)
    x = x - x.mean(axis=0)
    x = x / np.linalg.norm(x, axis=0)
    r = np.clip(x.T @ x, -1.0, 1.0)
    np.fill_diagonal(r, 1.0)
    return r


def class_graph_from_edges(source, target, weight, n_classes: int) -> ClassGraph:
    """A :class:`ClassGraph` from an explicit edge list.

    Args:
        source, target: ``(E,)`` class indices of each edge (``source[e] != target[e]``).
        weight: ``(E,)`` signed edge weights ``r_e``.
        n_classes: number of classes.

    Returns:
        The graph, with ``sq_norm = ||C||_2^2`` computed exactly (eigenvalues of ``C^T C``).
    """
    src = np.asarray(source, dtype=np.int32).reshape(-1)
    dst = np.asarray(target, dtype=np.int32).reshape(-1)
    w = np.asarray(weight, dtype=np.float64).reshape(-1)
    if not (src.shape == dst.shape == w.shape):
        raise ValueError(f"source, target and weight must have the same length; got {src.shape}, {dst.shape}, "
                         f"{w.shape}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1; got {n_classes}")
    bad = (src < 0) | (src >= n_classes) | (dst < 0) | (dst >= n_classes) | (src == dst)
    if bad.any():
        e = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"edge {e} = ({src[e]}, {dst[e]}) is invalid: endpoints must be distinct classes in "
            f"[0, {n_classes})"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError("weight must be finite; got NaN or inf")
    c = np.zeros((src.size, n_classes))
    c[np.arange(src.size), src] += np.abs(w)
    c[np.arange(src.size), dst] -= w
    sq_norm = float(np.linalg.eigvalsh(c.T @ c)[-1]) if src.size else 0.0
    f = _float_dtype()
    return ClassGraph(
        source=jnp.asarray(src), target=jnp.asarray(dst), weight=jnp.asarray(w, f),
        sq_norm=jnp.asarray(sq_norm, f), n_classes=int(n_classes),
    )


def class_graph(profiles, rho: float = 0.6, keep_negative: bool = False) -> ClassGraph:
    """Class graph: an edge between two classes whose profiles are strongly correlated.

    .. math::

        E = \\{(m, l) : m < l,\\ r_{ml} > \\rho\\} \\quad
        (\\text{or } |r_{ml}| > \\rho \\text{ with } \\texttt{keep\\_negative}),

    each edge weighted by its correlation ``r_ml`` (sign kept). The graph-guided fusion penalty
    is then ``gamma * sum_{(m,l) in E} |r_ml| * sum_k |B[k,m] - sign(r_ml) B[k,l]|``: positively
    correlated classes are pulled to equal coefficients, negatively correlated ones (only with
    ``keep_negative``) to opposite ones. The first author's code used ``rho = 0.6`` and dropped
    negative correlations (the default here).

    Args:
        profiles: ``(features, classes)`` array; column ``c`` is class ``c``'s profile.
        rho: correlation threshold in ``[0, 1)``.
        keep_negative: keep edges with ``r < -rho`` (with their negative sign).

    Returns:
        A :class:`ClassGraph`; ``.edges()`` gives ``[(m, l, r)]`` and ``.incidence()`` gives ``C``.

    References:
        Kim & Xing (2009), PLoS Genetics 5(8); Chen et al. (2012), Ann. Appl. Stat. 6(2).
    """
    if not (0.0 <= float(rho) < 1.0):
        raise ValueError(f"rho must be in [0, 1); got {rho!r}")
    r = class_correlation(profiles)
    rows, cols = np.triu_indices(r.shape[0], k=1)
    rv = r[rows, cols]
    keep = (np.abs(rv) > rho) if keep_negative else (rv > rho)
    return class_graph_from_edges(rows[keep], cols[keep], rv[keep], r.shape[0])


def _kim_xing_weights(parents: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """``w_v = g_v * prod_{a in ancestors(v)} s_a`` with ``s_v = h_v`` and ``g_v = 1 - h_v``."""
    n = parents.size
    w = np.empty(n)
    for v in range(n):
        prod, a = 1.0, parents[v]
        while a >= 0:
            prod *= heights[a]
            a = parents[a]
        w[v] = (1.0 - heights[v]) * prod
    return w


def class_tree(profiles, method: str = "average") -> ClassTree:
    """Class tree by agglomerative clustering of class profiles, with Kim & Xing's weights.

    Distances are ``1 - r_ml`` (correlation distance); ``scipy.cluster.hierarchy.linkage`` with
    ``method`` merges classes bottom-up. Node ``v``'s height ``h_v`` is its merge distance divided
    by the root's (leaves 0, root 1). Kim & Xing (2010) split each internal node's weight between
    "select the group jointly" (``g_v = 1 - h_v``) and "select the children separately"
    (``s_v = h_v``), which unrolls to the explicit node weights

    .. math::

        w_v = g_v \\prod_{a \\in \\operatorname{anc}(v)} s_a , \\qquad s_v = h_v,\\ g_v = 1 - h_v,

    (leaves have ``h_v = 0``, so a leaf's weight is the product of its ancestors' ``s``; the
    root, at ``h = 1``, has weight 0). Tightly related classes (low merge height) get a strong
    joint group penalty; loosely related ones are mostly penalised separately. Every class's
    weights along its root path sum to 1.

    Args:
        profiles: ``(features, classes)`` array; column ``c`` is class ``c``'s profile.
        method: linkage rule, one of :data:`LINKAGE_METHODS` (rules valid for an arbitrary
            dissimilarity; ``ward``/``centroid``/``median`` assume Euclidean distances).

    Returns:
        A :class:`ClassTree` with ``2 * classes - 1`` nodes: leaves ``0..classes-1`` (singleton
        groups), then the internal nodes in merge order, root last.

    References:
        Kim, S. and Xing, E. P. (2010). Tree-guided group lasso for multi-task regression with
        structured sparsity. ICML.
    """
    if method not in LINKAGE_METHODS:
        raise ValueError(f"method must be one of {', '.join(LINKAGE_METHODS)}; got {method!r}")
    r = class_correlation(profiles)
    c = r.shape[0]
    n = 2 * c - 1
    masks = np.zeros((n, c), bool)
    masks[np.arange(c), np.arange(c)] = True
    parents = np.full(n, -1, np.int32)
    heights = np.zeros(n)
    if c > 1:
        dist = np.clip(1.0 - r, 0.0, 2.0)
        np.fill_diagonal(dist, 0.0)
        z = scipy.cluster.hierarchy.linkage(scipy.spatial.distance.squareform(dist, checks=False), method=method)
        for i, (a, b, h, _) in enumerate(z):
            v = c + i
            a, b = int(a), int(b)
            masks[v] = masks[a] | masks[b]
            parents[a] = parents[b] = v
            heights[v] = h
        top = heights[-1]
        # identical profiles everywhere (every merge at distance ~0): all heights 0, i.e. a
        # pure group lasso on the root, which then carries weight 1
        flat = top <= 1e-12
        heights = np.zeros(n) if flat else heights / top
        heights[-1] = 0.0 if flat else 1.0
    weights = _kim_xing_weights(parents, heights)
    return _make_tree(masks, weights, heights, parents)


def _make_tree(masks, weights, heights, parents) -> ClassTree:
    f = _float_dtype()
    return ClassTree(
        masks=jnp.asarray(masks), weights=jnp.asarray(weights, f), heights=jnp.asarray(heights, f),
        parents=jnp.asarray(parents, jnp.int32), n_classes=int(masks.shape[1]),
    )


def class_tree_from_groups(groups, weights, n_classes: int) -> ClassTree:
    """A :class:`ClassTree` from explicit groups and weights.

    Args:
        groups: sequence of class-index collections; any two must be nested or disjoint (a
            tree-structured family). Order does not matter: they are sorted by size (stable),
            which puts every group after all groups it contains.
        weights: one non-negative weight per group.
        n_classes: number of classes.

    Returns:
        The tree (heights are zeros; parents are the smallest strict supersets).
    """
    groups = [np.unique(np.asarray(g, dtype=np.int64).reshape(-1)) for g in groups]
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(groups) != w.size:
        raise ValueError(f"weights must have one entry per group ({len(groups)}); got {w.size}")
    if (w < 0).any() or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite and >= 0; got {w.tolist()}")
    masks = np.zeros((len(groups), n_classes), bool)
    for i, g in enumerate(groups):
        if g.size == 0 or g.min() < 0 or g.max() >= n_classes:
            raise ValueError(f"groups[{i}] = {g.tolist()} must be a non-empty subset of range({n_classes})")
        masks[i, g] = True
    order = np.argsort(masks.sum(1), kind="stable")
    masks, w = masks[order], w[order]
    parents = np.full(len(groups), -1, np.int32)
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            inter = (masks[i] & masks[j]).any()
            if inter and not (masks[i] <= masks[j]).all():
                raise ValueError(
                    f"groups {np.flatnonzero(masks[i]).tolist()} and {np.flatnonzero(masks[j]).tolist()} "
                    f"overlap without being nested; tree-structured groups must be nested or disjoint"
                )
            if inter and parents[i] < 0:
                parents[i] = j
    return _make_tree(masks, w, np.zeros(len(groups)), parents)


def with_output_node(structure: ClassGraph | ClassTree) -> ClassGraph | ClassTree:
    """The structure over ``1 + classes`` nodes: node 0 is the whole output, classes shift by one.

    Node 0 stands for the response column of the consumer's whole-output kernel (APIB's HSIC
    lasso response) placed beside the class-wise columns, so that every channel's coefficient
    row reads "kept for the network, refined per class" [choice, docs/sglp-ib.md]:

    - a :class:`ClassGraph` gains an edge ``(0, c + 1)`` of weight ``1 / classes`` to every
      class, so the fusion pulls each class's coefficient toward the whole-output one (the
      strong-fusion limit is one coefficient per channel fitted to all responses together);
      the hub's edges together weigh as much as one edge of weight 1: at weight 1 each they
      would multiply the whole-output coefficient's penalty by ``1 + gamma * classes`` and
      starve the layers whose class columns disagree with it (docs/design-decisions.md);
    - a :class:`ClassTree` gains node 0 as a leaf directly under the root, whose group then
      holds every column; its weight is Kim & Xing's for a leaf under the root,
      ``s_root = h_root`` (1 for a tree from :func:`class_tree`), and every other node keeps
      its weight.
    """
    if isinstance(structure, ClassGraph):
        k = structure.n_classes
        src = np.concatenate([np.zeros(k, np.int32), np.asarray(structure.source) + 1])
        dst = np.concatenate([np.arange(1, k + 1, dtype=np.int32), np.asarray(structure.target) + 1])
        w = np.concatenate([np.full(k, 1.0 / k), np.asarray(structure.weight, np.float64)])
        return class_graph_from_edges(src, dst, w, k + 1)
    if not isinstance(structure, ClassTree):
        raise TypeError(f"structure must be a ClassGraph or a ClassTree; got {type(structure).__name__}")
    masks = np.asarray(structure.masks)
    parents = np.asarray(structure.parents)
    roots = np.flatnonzero(parents < 0)
    if roots.size != 1:
        raise ValueError(f"with_output_node needs a tree with one root; this one has {roots.size}")
    n = masks.shape[0]
    new_masks = np.zeros((n + 1, masks.shape[1] + 1), bool)
    new_masks[0, 0] = True
    new_masks[1:, 1:] = masks
    new_masks[1 + roots[0], 0] = True  # the root's group now holds every column
    new_parents = np.concatenate([[1 + roots[0]], np.where(parents < 0, -1, parents + 1)]).astype(np.int32)
    heights = np.concatenate([[0.0], np.asarray(structure.heights, np.float64)])
    # Kim & Xing's weight of a leaf under the root: g_leaf * s_root = h_root (1 for a built tree)
    weights = np.concatenate([[heights[1 + roots[0]]], np.asarray(structure.weights, np.float64)])
    return _make_tree(new_masks, weights, heights, new_parents)
