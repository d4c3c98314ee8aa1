"""Per-channel sample kernels, class-wise response kernels and their Gram statistics.

The layer problem of HSIC-lasso pruning (METHODS.md section 1) needs only two small matrices::

    Q[k, l] = <K_k, K_l>_F      (channels x channels)
    P[k, c] = <K_k, L_c>_F      (channels x responses)

where ``K_k = H k(x_ik, x_jk) H`` is the centred N x N sample kernel of channel k,
``H = I - 11^T / N``, and ``L_c`` is the c-th centred response kernel. The lasso objective
``1/2 sum_c ||L_c - sum_k B[k,c] K_k||_F^2`` equals ``1/2 tr(B^T Q B) - tr(B^T P) + const``, so
the N^2 x C design matrix ``[vec K_1, ..., vec K_C]`` is never needed, and
:func:`gram_statistics` never builds it.

**Layout.** Features are ``F`` of shape ``(N, C, D)``: N calibration samples, C channels,
``D = H*W`` values of one channel's flattened feature map (a dense layer's inputs are
``D = 1``). This is what :mod:`ib_lasso_jax.graph.features` produces. Responses are ``(R, N, N)``:
R centred (optionally unit-norm) kernels over the same N samples.

**Kernels** (:class:`Kernel`; a string names the default of each):

- ``linear``: ``k(x, y) = <x, y>``.
- ``gaussian``: ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))``, with ``sigma^2`` per channel
  from the median heuristic (``median of the non-zero pairwise squared distances / 2``, so
  ``exp(-d^2 / median)``), from the map size (``sigma^2 = D``, the APIB-like scaling
  ``exp(-(0.5/D) ||x - y||^2)``), or fixed.
- ``laplacian``: APIB's final choice ``k(x, y) = exp(-sqrt(0.5 / D) ||x - y||)``, or a fixed
  scale.
- ``polynomial``: ``k(x, y) = (<x, y> + c)^d``.

Centring never forms H: ``H K H = K - r 1^T - 1 c^T + m`` with r, c the row and column means
and m the grand mean. Unit-Frobenius normalisation (``K / ||K||_F``, the normalised HSIC of
Yamada et al.) keeps a zero kernel zero: a dead channel (the same map for every sample) has
a zero centred kernel, a zero row and column in Q and a zero row in P, never NaN.

**How Q is computed without the design matrix.** Two exact algorithms, chosen per call:

- *Kernel tiles* (any kernel). The sample index pairs ``(i, j)`` are cut into R x R tiles and
  only tiles on or above the diagonal are visited (the kernels are symmetric, so an
  off-diagonal tile counts twice). Each tile builds every channel's kernel entries once,
  ``T`` of shape ``(C, R*R)``, and adds ``T T^T`` to Q; within the tile the channels are cut
  into ``chunk_size`` blocks and only blocks on or above the block diagonal are multiplied
  (Q is symmetric), the rest mirrored at the end. Centring is folded in exactly: for any
  vectors a, ``H (K - a 1^T - 1 a^T) H = H K H``, and for symmetric A, B
  ``<HAH, HBH> = <A, B> - (2/N) (A1)^T (B1) + (1/N^2) (1^T A 1)(1^T B 1)``. The offset a is
  an estimate of the row means from a strided subsample of columns, so ``K - a1^T - 1a^T``
  is already nearly centred and the correction does not cancel catastrophically in float32.
  Memory is O(C R^2), against O(C N^2) for the design matrix.
- *Feature space* (linear kernel only). With ``X_k`` the column-centred ``(N, D)`` map,
  ``<X_k X_k^T, X_l X_l^T>_F = ||X_k^T X_l||_F^2``, so Q costs ``O(C^2 N D^2)`` instead of
  ``O(C^2 N^2)``; used when ``D^2 <= N`` (``linear_method="auto"``), in channel blocks of
  ``chunk_size`` (upper block triangle only, mirrored). P is ``sum (X_k * (L_c X_k))``.

References:
  M. Yamada, W. Jitkrittum, L. Sigal, E. Xing, M. Sugiyama, "High-dimensional feature
  selection by feature-wise kernelized Lasso", Neural Computation 26(1), 2014.
  A. Gretton, O. Bousquet, A. Smola, B. Schoelkopf, "Measuring statistical dependence with
  Hilbert-Schmidt norms", ALT 2005.
  S. Guo, L. Zhang, X. Zheng, Y. Wang, Y. Li, F. Chao, C. Wu, S. Zhang, R. Ji, "Automatic
  network pruning via Hilbert-Schmidt independence criterion lasso under information
  bottleneck principle" (APIB), ICCV 2023.

>>> import numpy as np
>>> from ib_lasso_jax.lasso import gram
>>> rng = np.random.default_rng(0)
>>> F = rng.normal(size=(40, 8, 16)).astype(np.float32)   # (N, C, D)
>>> y = np.arange(40) % 4
>>> L = gram.one_vs_rest_responses(y, 4)               # R1: (4, 40, 40)
>>> Q, P = gram.gram_statistics(F, L, kernel="laplacian")
>>> Q.shape, P.shape
((8, 8), (8, 4))
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = ("linear", "gaussian", "laplacian", "polynomial")
BANDWIDTHS = ("median", "dim", "fixed")
LINEAR_METHODS = ("auto", "features", "kernels")

__all__ = [
    "BANDWIDTHS",
    "KERNELS",
    "LINEAR_METHODS",
    "Kernel",
    "as_kernel",
    "bandwidths",
    "centre_kernel",
    "channel_kernels",
    "class_indices",
    "default_chunk_size",
    "default_tile_size",
    "delta_kernel",
    "delta_responses",
    "gaussian",
    "gram_flops",
    "gram_statistics",
    "laplacian",
    "linear",
    "logit_responses",
    "normalize_kernel",
    "one_vs_rest_responses",
    "output_responses",
    "polynomial",
    "use_feature_space",
]

# Columns used to estimate the row means that are subtracted before accumulating Q (any
# estimate is exact; a good one keeps the float32 centring correction small).
_MEAN_SAMPLES = 32


# ----------------------------------------------------------------------------------------
# Kernel specifications
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A sample kernel, hashable so it can be a static argument of a jitted function.

    Attributes:
      name: one of :data:`KERNELS`.
      bandwidth: gaussian only: ``"median"`` (per channel, ``sigma^2`` = median of the
        non-zero pairwise squared distances / 2), ``"dim"`` (``sigma^2 = D``) or ``"fixed"``.
      sigma: gaussian bandwidth when ``bandwidth == "fixed"``.
      median_samples: gaussian median heuristic: the median is taken over the pairs of at
        most this many evenly strided samples (``None``: all N; the heuristic's value barely
        moves beyond a few thousand pairs, and the exact median over N^2/2 pairs costs a sort
        per channel).
      scale: laplacian: ``k = exp(-scale ||x - y||)``; ``None`` is APIB's ``sqrt(0.5 / D)``.
      degree, coef: polynomial ``(<x, y> + coef)^degree``.
    """

    name: str
    bandwidth: str = "median"
    sigma: float | None = None
    median_samples: int | None = 128
    scale: float | None = None
    degree: int = 2
    coef: float = 1.0

    def __post_init__(self):
        if self.name not in KERNELS:
            raise ValueError(f"kernel name {self.name!r} is not one of {KERNELS}")
        if self.bandwidth not in BANDWIDTHS:
            raise ValueError(f"bandwidth {self.bandwidth!r} is not one of {BANDWIDTHS}")
        if self.bandwidth == "fixed" and not (self.sigma is not None and self.sigma > 0):
            raise ValueError(f"bandwidth='fixed' needs sigma > 0; got sigma={self.sigma!r}")
        if self.median_samples is not None and self.median_samples < 2:
            raise ValueError(f"median_samples must be >= 2 or None; got {self.median_samples!r}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"laplacian scale must be > 0 or None; got {self.scale!r}")
        if not (isinstance(self.degree, int) and self.degree >= 1):
            raise ValueError(f"polynomial degree must be an integer >= 1; got {self.degree!r}")


def linear() -> Kernel:
    """Linear kernel ``k(x, y) = <x, y>``; centred, ``K = X_c X_c^T``."""
    return Kernel("linear")


def gaussian(sigma: float | None = None, *, bandwidth: str | None = None,
             median_samples: int | None = 128) -> Kernel:
    """Gaussian kernel ``exp(-||x - y||^2 / (2 sigma^2))``.

    Args:
      sigma: a fixed bandwidth (implies ``bandwidth="fixed"``).
      bandwidth: ``"median"`` (default without sigma): per channel,
        ``sigma^2 = median_{i<j, d_ij>0} ||x_i - x_j||^2 / 2`` (the median heuristic; zero
        distances, e.g. from post-ReLU maps that are all zero for many samples, are left out
        so that the bandwidth does not collapse); ``"dim"``: ``sigma^2 = D``, the APIB-like
        scaling with the map size, ``exp(-(0.5/D) ||x - y||^2)`` [choice].
      median_samples: see :class:`Kernel`.
    """
    if bandwidth is None:
        bandwidth = "median" if sigma is None else "fixed"
    return Kernel("gaussian", bandwidth=bandwidth, sigma=None if sigma is None else float(sigma),
                  median_samples=median_samples)


def laplacian(scale: float | None = None) -> Kernel:
    """Laplacian kernel, APIB's form ``exp(-sqrt(0.5 / D) ||x - y||)`` (or ``exp(-scale ||x-y||)``)."""
    return Kernel("laplacian", scale=None if scale is None else float(scale))


def polynomial(degree: int = 2, coef: float = 1.0) -> Kernel:
    """Polynomial kernel ``(<x, y> + coef)^degree`` on the raw (uncentred) features."""
    return Kernel("polynomial", degree=int(degree), coef=float(coef))


def as_kernel(kernel: str | Kernel) -> Kernel:
    """A :class:`Kernel` from itself or from a name in :data:`KERNELS` (that kernel's defaults)."""
    if isinstance(kernel, Kernel):
        return kernel
    if isinstance(kernel, str):
        factories = {"linear": linear, "gaussian": gaussian, "laplacian": laplacian,
                     "polynomial": polynomial}
        if kernel not in factories:
            raise ValueError(f"kernel {kernel!r} is not one of {KERNELS} (or a Kernel)")
        return factories[kernel]()
    raise TypeError(f"kernel must be a name in {KERNELS} or a Kernel; got {type(kernel).__name__}")


# ----------------------------------------------------------------------------------------
# Validation (checks that need values run only on concrete arrays, so that every function
# stays jit- and vmap-safe)
# ----------------------------------------------------------------------------------------


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}")
    if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "dtype=float64 needs 64-bit mode, which is off: call "
            "jax.config.update('jax_enable_x64', True) at start-up (or run inside "
            "`with jax.enable_x64(True):`), or use dtype=float32")
    return dtype


def _check_finite(x, name: str):
    if _concrete(x):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x))))
        if bad:
            raise ValueError(f"{name} has {bad} non-finite entries (NaN or inf) out of "
                             f"{np.size(x)}; clean the calibration features first")


def _check_features(F, name: str = "F"):
    if getattr(F, "ndim", None) != 3:
        raise ValueError(f"{name} must have shape (N, C, D) (samples, channels, H*W); got shape "
                         f"{getattr(F, 'shape', None)}")
    if F.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples along axis 0; got shape {F.shape}")
    if F.shape[1] < 1 or F.shape[2] < 1:
        raise ValueError(f"{name} has an empty channel or map axis; got shape {F.shape}")
    _check_finite(F, name)


def _check_labels(y, num_classes: int, name: str = "y"):
    if getattr(y, "ndim", None) != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels; got shape "
                         f"{getattr(y, 'shape', None)}")
    if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    if _concrete(y):
        yv = np.asarray(y)
        if not np.issubdtype(yv.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class labels; got dtype {yv.dtype}")
        out = yv[(yv < 0) | (yv >= num_classes)]
        if out.size:
            raise ValueError(f"{name} has labels outside [0, {num_classes}): "
                             f"{sorted(set(out.tolist()))[:10]}")
        counts = np.bincount(yv, minlength=num_classes)
        missing = np.flatnonzero(counts == 0)
        if missing.size:
            raise ValueError(
                f"class {int(missing[0])} has no samples in {name} (classes without samples: "
                f"{missing.tolist()}; counts per class: {counts.tolist()}); class-wise "
                f"responses need every class in the calibration set")


# ----------------------------------------------------------------------------------------
# Kernel evaluation on (C, n, D) channel-major blocks
# ----------------------------------------------------------------------------------------


def _sq_dists(a, b):
    """``||a_i - b_j||^2`` for channel-major ``a (C, n, D)``, ``b (C, m, D)`` -> ``(C, n, m)``.

    The Gram form ``|a|^2 + |b|^2 - 2 a.b`` runs on the matrix units; features are centred
    beforehand, which keeps its cancellation small; clipped at 0.
    """
    g = jnp.einsum("cnd,cmd->cnm", a, b)
    d2 = jnp.sum(a * a, -1)[:, :, None] + jnp.sum(b * b, -1)[:, None, :] - 2.0 * g
    return jnp.maximum(d2, 0.0)


def _safe_sqrt(x):
    # sqrt with a finite gradient at 0 (the diagonal of a distance matrix)
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _kernel_block(kernel: Kernel, a, b, sigma2, dim: int, same=None):
    """Kernel entries ``k(a_i, b_j)`` per channel: ``a (C, n, D)``, ``b (C, m, D)`` -> ``(C, n, m)``.

    ``sigma2`` is the per-channel gaussian ``sigma^2`` (``(C,)``), unused otherwise; ``dim`` is D.
    ``same`` (``(n, m)`` bool) marks pairs of a sample with itself, whose distance is set to
    exactly 0: the Gram form leaves ``~eps |x|^2`` there, which the laplacian's sqrt would
    amplify to ``~sqrt(eps) |x|``.
    """
    if kernel.name in ("linear", "polynomial"):
        return _kernel_values(kernel, jnp.einsum("cnd,cmd->cnm", a, b), None, sigma2, dim)
    d2 = _sq_dists(a, b)
    if same is not None:
        d2 = jnp.where(same, 0.0, d2)
    return _kernel_values(kernel, None, d2, sigma2, dim)


def _kernel_values(kernel: Kernel, inner, d2, sigma2, dim):
    """Kernel entries from inner products (linear, polynomial) or squared distances (the
    others), ``(C, n, m)``; ``dim`` (D, a number or a traced scalar) sets the laplacian's
    default scale."""
    if kernel.name == "linear":
        return inner
    if kernel.name == "polynomial":
        return (inner + kernel.coef) ** kernel.degree
    if kernel.name == "gaussian":
        # Clamping the round-off negatives of the Gram-form distances also keeps XLA:CPU from
        # fusing the exp into the distance matmul: the tiled Gram program compiled in 5.0 s
        # without it, 0.74 s with it (200 samples x 64 channels x 16x16 maps).
        d2 = jnp.where(d2 > 0, d2, 0.0)
        return jnp.exp(-d2 * (0.5 / sigma2)[:, None, None])
    scale = jnp.sqrt(0.5 / jnp.asarray(dim, d2.dtype)) if kernel.scale is None else kernel.scale
    return jnp.exp(-scale * _safe_sqrt(d2))


def _strided(n: int, m: int) -> np.ndarray:
    """``m`` evenly strided indices in ``[0, n)`` (static); strided rather than the first m so
    that class-sorted calibration sets are represented."""
    return np.unique(np.round(np.linspace(0, n - 1, min(n, m))).astype(np.int32))


def _kth_smallest(v, k):
    """Exact k-th smallest (0-based, ``k (C,)``) of each row of non-negative ``v (C, M)``.

    Bisection on the float's bit pattern (monotone for non-negative floats): 32 (64) passes
    of compare-and-count, far cheaper than XLA's CPU sort, and exact.
    """
    ity = jnp.int32 if v.dtype == jnp.float32 else jnp.int64
    bits = jax.lax.bitcast_convert_type(v, ity)
    lo = jnp.zeros(v.shape[0], ity) - 1  # count(bits <= lo) <= k < count(bits <= hi)
    hi = jnp.max(bits, axis=-1)

    def step(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid[:, None], axis=-1) > k
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    _, hi = jax.lax.fori_loop(0, 8 * jnp.dtype(ity).itemsize, step, (lo, hi))
    return jax.lax.bitcast_convert_type(hi, v.dtype)


def _median_sigma2(x, median_samples):
    """Median heuristic per channel on ``x (C, N, D)``: ``median(d^2 > 0) / 2`` -> ``(C,)``."""
    n = x.shape[1]
    idx = _strided(n, n if median_samples is None else median_samples)
    xs = x[:, idx]
    iu = np.triu_indices(len(idx), 1)
    return _median_of_pairs(_sq_dists(xs, xs)[:, iu[0], iu[1]])


def _median_of_pairs(d2):
    """``median(d^2 > 0) / 2`` of each row of pair distances ``d2 (C, M)`` -> ``(C,)``."""
    npos = jnp.sum(d2 > 0, axis=-1)
    v = jnp.where(d2 > 0, d2, jnp.inf)
    lo_k, hi_k = (npos - 1) // 2, npos // 2
    a = _kth_smallest(v, jnp.maximum(lo_k, 0))
    nxt = jnp.min(jnp.where(v > a[:, None], v, jnp.inf), axis=-1)
    b = jnp.where(jnp.sum(v <= a[:, None], axis=-1) > hi_k, a, nxt)
    # No non-zero distance: the channel is constant, its kernel is constant, any sigma works.
    return jnp.where(npos > 0, 0.5 * (a + b), 1.0) / 2.0


def _prepare(F, kernel: Kernel):
    """Channel-major features ``(C, N, D)``, per-channel ``sigma^2`` and the alive mask.

    Distance kernels and the linear kernel are invariant to (resp. centred away from) a shift
    of the features, so those are centred over samples (better conditioned); the polynomial
    kernel is not, so it sees the raw features. A dead channel (every sample's map identical)
    gets exactly zero features, hence exactly a constant kernel and a zero centred kernel.
    """
    x = jnp.swapaxes(F, 0, 1)  # (C, N, D)
    alive = jnp.any(x != x[:, :1], axis=(1, 2))
    if kernel.name != "polynomial":
        x = x - jnp.mean(x, axis=1, keepdims=True)
    x = jnp.where(alive[:, None, None], x, 0.0)
    sigma2 = _sigma2(kernel, x.shape[0], float(x.shape[2]), x.dtype,
                     lambda: _median_sigma2(x, kernel.median_samples))
    return x, sigma2, alive


def _sigma2(kernel: Kernel, c: int, dim, dtype, median):
    """The per-channel gaussian ``sigma^2`` ``(C,)`` by the kernel's bandwidth rule: fixed, D
    (``dim``, a number or a traced scalar), or ``median()``; ones for the other kernels."""
    if kernel.name != "gaussian":
        return jnp.ones(c, dtype)
    if kernel.bandwidth == "fixed":
        return jnp.full(c, kernel.sigma ** 2, dtype)
    if kernel.bandwidth == "dim":
        return jnp.full(c, dim, dtype)
    return median()


def bandwidths(F, kernel: str | Kernel = "gaussian"):
    """The per-channel gaussian ``sigma^2`` that :func:`channel_kernels` and
    :func:`gram_statistics` use for ``F (N, C, D)`` -> ``(C,)`` (ones for other kernels)."""
    kernel = as_kernel(kernel)
    _check_features(F)
    return _prepare(jnp.asarray(F), kernel)[1]


# ----------------------------------------------------------------------------------------
# Explicit kernels (small problems, responses, tests)
# ----------------------------------------------------------------------------------------


def centre_kernel(K):
    """``H K H`` with ``H = I - 11^T/N``, without forming H, on the last two axes.

    ``(HKH)_ij = K_ij - r_i - c_j + m``, with r the row means, c the column means and m the
    grand mean of K. Batched over leading axes.
    """
    K = jnp.asarray(K)
    r = jnp.mean(K, axis=-1, keepdims=True)
    c = jnp.mean(K, axis=-2, keepdims=True)
    return K - r - c + jnp.mean(r, axis=-2, keepdims=True)


def normalize_kernel(K):
    """``K / ||K||_F`` over the last two axes; a zero kernel stays zero (no NaN, finite grads)."""
    K = jnp.asarray(K)
    s = jnp.sum(K * K, axis=(-2, -1), keepdims=True)
    pos = s > 0
    return K * jnp.where(pos, jax.lax.rsqrt(jnp.where(pos, s, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("kernel", "normalize"))
def _channel_kernels(F, kernel: Kernel, normalize: bool):
    x, sigma2, alive = _prepare(F, kernel)
    eye = np.eye(F.shape[0], dtype=bool)
    K = centre_kernel(_kernel_block(kernel, x, x, sigma2, F.shape[2], eye))
    K = jnp.where(alive[:, None, None], K, 0.0)
    return normalize_kernel(K) if normalize else K


def channel_kernels(F, kernel: str | Kernel = "laplacian", *, normalize: bool = False,
                    dtype=jnp.float32):
    """Every channel's centred sample kernel, explicitly: ``F (N, C, D)`` -> ``(C, N, N)``.

    ``K_k = H [k(x_ik, x_jk)]_ij H``, optionally divided by ``||K_k||_F``. This *is* the
    design matrix (C N^2 floats): use it for responses, small problems and tests, and
    :func:`gram_statistics` for Q and P.

    Args:
      F: features ``(N, C, D)``.
      kernel: a :class:`Kernel` or a name in :data:`KERNELS`.
      normalize: divide each centred kernel by its Frobenius norm (zero stays zero).
      dtype: float32 or float64 (float64 needs ``jax_enable_x64``).
    """
    kernel = as_kernel(kernel)
    dtype = _check_dtype(dtype)
    _check_features(F)
    return _channel_kernels(jnp.asarray(F, dtype), kernel, bool(normalize))


# ----------------------------------------------------------------------------------------
# Responses: one centred (optionally unit-norm) kernel per class, stacked (R, N, N)
# ----------------------------------------------------------------------------------------


def _one_hot(y, num_classes, dtype):
    return (jnp.asarray(y)[None, :] == jnp.arange(num_classes)[:, None]).astype(dtype)


def delta_kernel(y, num_classes: int, *, per_class_scale: bool = True, dtype=jnp.float32):
    """The (uncentred) delta label kernel ``(N, N)``.

    ``L_ij = 1[y_i = y_j] / n_{y_i}`` (HSIC Lasso's normalised delta kernel, Yamada et al.
    2014), or ``1[y_i = y_j]`` with ``per_class_scale=False``. Equals ``sum_c u_c u_c^T / n_c``
    with u_c the class indicator: the sum of the R1 responses before centring.
    """
    _check_labels(y, num_classes)
    dtype = _check_dtype(dtype)
    U = _one_hot(y, num_classes, dtype)
    w = 1.0 / jnp.maximum(U.sum(-1), 1.0) if per_class_scale else jnp.ones(num_classes, dtype)
    return jnp.einsum("cn,c,cm->nm", U, w, U)


def delta_responses(y, num_classes: int, *, per_class_scale: bool = True,
                    normalize: bool = True, dtype=jnp.float32):
    """One response, the centred delta label kernel: ``(1, N, N)``.

    With it, :func:`gram_statistics` gives the Q and P of plain HSIC Lasso (one response, no
    class structure): ``min_b 1/2 ||L - sum_k b_k K_k||_F^2 + lam ||b||_1``.
    """
    L = centre_kernel(delta_kernel(y, num_classes, per_class_scale=per_class_scale, dtype=dtype))
    return (normalize_kernel(L) if normalize else L)[None]


def one_vs_rest_responses(y, num_classes: int, *, normalize: bool = True, dtype=jnp.float32):
    """R1: one centred one-vs-rest label kernel per class, ``H u_c u_c^T H / n_c``: ``(Cls, N, N)``.

    ``u_c`` is the indicator of class c and ``n_c`` its count; ``H u_c = u_c - n_c/N``, so the
    centred kernel is an outer product and costs N^2 per class.

    Raises:
      ValueError: a class has no samples (naming it).
    """
    _check_labels(y, num_classes)
    dtype = _check_dtype(dtype)
    U = _one_hot(y, num_classes, dtype)
    n_c = U.sum(-1, keepdims=True)
    V = U - n_c / U.shape[1]
    L = V[:, :, None] * V[:, None, :] / jnp.maximum(n_c, 1.0)[:, :, None]
    return normalize_kernel(L) if normalize else L


def output_responses(G, y, num_classes: int, kernel: str | Kernel = "laplacian", *,
                     normalize: bool = True, dtype=jnp.float32):
    """R2: the layer-output kernel restricted to each class, ``H D_c L D_c H``: ``(Cls, N, N)``.

    ``L = [k(g_i, g_j)]`` is the kernel on the consumer's flattened outputs ``G (N, ...)``
    (not centred before the restriction [choice]; the laplacian's D is the flattened output
    size), ``D_c = diag(1[y = c])``: "preserve the output", class by class.

    Raises:
      ValueError: a class has no samples (naming it), or G and y disagree on N.
    """
    kernel = as_kernel(kernel)
    dtype = _check_dtype(dtype)
    G = jnp.asarray(G, dtype)
    if G.ndim < 2 or G.shape[0] != np.shape(y)[0]:
        raise ValueError(f"G must be (N, ...) with N = len(y) = {np.shape(y)[0]}; got shape "
                         f"{G.shape}")
    _check_labels(y, num_classes)
    _check_finite(G, "G")
    inner = _output_inner(G, kernel.name != "polynomial")
    return _output_responses(inner, jnp.asarray(y), jnp.asarray(math.prod(G.shape[1:]), G.dtype), kernel,
                             num_classes, normalize)


@functools.partial(jax.jit, static_argnames=("centre",))
def _output_inner(G, centre: bool):
    """Inner products ``(N, N)`` of the flattened outputs (centred over samples as in
    :func:`_prepare`, which also zeroes an output identical for every sample)."""
    x = G.reshape(G.shape[0], -1)
    alive = jnp.any(x != x[:1])
    if centre:
        x = x - jnp.mean(x, axis=0, keepdims=True)
    x = jnp.where(alive, x, 0.0)
    return x @ x.T


@functools.partial(jax.jit, static_argnames=("kernel", "num_classes", "normalize"))
def _output_responses(inner, y, dim, kernel: Kernel, num_classes: int, normalize: bool):
    # Two programs: the inner products, one per layer shape (small), and this one, on (N, N)
    # whatever the layer, compiled once for all layers (holding the median bandwidth's
    # bisection loop; per layer shape it was 0.6-0.8 s of compiling each on 2 CPU cores).
    n = inner.shape[0]
    sq = jnp.diagonal(inner)
    d2 = jnp.where(np.eye(n, dtype=bool), 0.0, jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * inner, 0.0))[None]

    def median():  # over the pairs of the strided subsample, as _median_sigma2
        idx = _strided(n, n if kernel.median_samples is None else kernel.median_samples)
        iu = np.triu_indices(len(idx), 1)
        return _median_of_pairs(d2[:, idx[iu[0]], idx[iu[1]]])

    sigma2 = _sigma2(kernel, 1, dim, inner.dtype, median)
    L = _kernel_values(kernel, inner[None], d2, sigma2, dim)[0]
    U = _one_hot(y, num_classes, inner.dtype)
    Lc = centre_kernel(U[:, :, None] * L[None] * U[:, None, :])
    return normalize_kernel(Lc) if normalize else Lc


def logit_responses(logits, kernel: str | Kernel = "gaussian", *, normalize: bool = True,
                    dtype=jnp.float32):
    """R4: a centred kernel on each class's logit, ``H [k(z_ic, z_jc)] H``: ``(Cls, N, N)``.

    ``logits (N, Cls)`` are the network's outputs on the calibration samples; each class's
    logit is treated as a one-value "channel" (D = 1), so the gaussian median bandwidth is per
    class.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, Cls); got shape {logits.shape}")
    _check_finite(logits, "logits")
    return channel_kernels(logits[:, :, None], kernel, normalize=normalize, dtype=dtype)


def class_indices(y, num_classes: int) -> tuple[np.ndarray, ...]:
    """R3: the sample indices of each class, for per-class problems on each class's own samples.

    ``F[idx[c]]`` and the matching responses give class c's problem. Needs concrete labels
    (the sizes differ per class).

    Raises:
      ValueError: a class has no samples (naming it).
    """
    if not _concrete(y):
        raise ValueError("class_indices needs concrete labels y (per-class sizes differ), not a "
                         "traced array")
    y = np.asarray(y)
    _check_labels(y, num_classes)
    return tuple(np.flatnonzero(y == c) for c in range(num_classes))


# ----------------------------------------------------------------------------------------
# Gram statistics
# ----------------------------------------------------------------------------------------


def use_feature_space(kernel: str | Kernel, n: int, d: int, linear_method: str = "auto",
                      c: int = 512) -> bool:
    """Whether the linear feature-space algorithm runs: linear kernel, and under ``"auto"``
    when it needs fewer useful flops than the kernel tiles (:func:`gram_flops`: per channel
    pair ``2 N D^2`` against ``N(N+1)`` plus the kernel entries; roughly ``2 D^2 < N``)."""
    if linear_method not in LINEAR_METHODS:
        raise ValueError(f"linear_method {linear_method!r} is not one of {LINEAR_METHODS}")
    if as_kernel(kernel).name != "linear" or linear_method == "kernels":
        return False
    if linear_method == "features":
        return True
    return (gram_flops(n, c, d, 1, "linear", linear_method="features")["total"]
            < gram_flops(n, c, d, 1, "linear", linear_method="kernels")["total"])


def default_tile_size(n: int, c: int, budget_bytes: int = 32 << 20) -> int:
    """Samples per tile side: as few tiles as a ``(C, R, R)`` float32 tile within
    ``budget_bytes`` allows, then balanced (``R = ceil(N / tiles)``) to waste no padding."""
    r_max = max(8, int(math.sqrt(budget_bytes / (4 * max(c, 1)))))
    tiles = -(-n // r_max)
    return -(-n // tiles)


def default_chunk_size(c: int, d: int, feature_space: bool) -> int:
    """Channels per block. Feature space: blocks of ``B*D ~ 1024`` feature columns (one
    ``(B*D) x (B*D)`` matmul per block pair). Kernel tiles: blocks of 128 channels (above that
    the matmuls are large enough; below, mirroring saves little)."""
    b = max(1, 1024 // d) if feature_space else 128
    return max(1, min(c, b))


def _finish(Q, P, alive, normalize):
    """Symmetrise, zero dead channels, and normalise with the diagonal norms."""
    Q = 0.5 * (Q + Q.T)
    Q = jnp.where(alive[:, None] & alive[None, :], Q, 0.0)
    P = jnp.where(alive[:, None], P, 0.0)
    sq = jnp.diagonal(Q)
    pos = sq > 0
    norms = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    if normalize:
        inv = jnp.where(pos, 1.0 / jnp.where(pos, norms, 1.0), 0.0)
        Q = Q * jnp.outer(inv, inv)  # inv_k inv_l == inv_l inv_k: stays exactly symmetric
        P = P * inv[:, None]
    return Q, P, norms


def _mirror_blocks(rows, nb: int, b: int):
    """Assemble the full symmetric ``(nb*b, nb*b)`` matrix from its upper block rows.

    ``rows[a]`` is ``(b, (nb - a) * b)``: block row a from block column a onwards."""
    U = jnp.concatenate(
        [jnp.pad(r, ((0, 0), (a * b, 0))) for a, r in enumerate(rows)], axis=0)
    blk = np.arange(nb * b) // b
    upper = blk[:, None] <= blk[None, :]
    return jnp.where(upper, U, U.T)


@functools.partial(jax.jit, static_argnames=("kernel", "normalize", "tile", "chunk"))
def _gram_tiles(F, L, kernel: Kernel, normalize: bool, tile: int, chunk: int):
    n, c, d = F.shape
    x, sigma2, alive = _prepare(F, kernel)
    nt = -(-n // tile)
    n_pad = nt * tile
    nb = -(-c // chunk)
    c_pad = nb * chunk
    # Padded samples and channels are zero features masked out of every tile.
    x = jnp.pad(x, ((0, c_pad - c), (0, n_pad - n), (0, 0)))
    sigma2 = jnp.pad(sigma2, (0, c_pad - c), constant_values=1.0)
    live = jnp.pad(alive, (0, c_pad - c))
    valid = (jnp.arange(n_pad) < n).astype(x.dtype)
    Lp = jnp.pad(L, ((0, 0), (0, n_pad - n), (0, n_pad - n)))

    # Offsets a ~ row means from strided columns (any a is exact, see the module docstring).
    cols = _strided(n, _MEAN_SAMPLES)
    ks = _kernel_block(kernel, x, x[:, cols], sigma2, d,
                       np.arange(n_pad)[:, None] == cols[None, :])  # (Cp, Np, m)
    offset = jnp.mean(ks, -1) - 0.5 * jnp.mean(ks[:, cols], (-2, -1))[:, None]

    ti, tj = np.triu_indices(nt)

    def body(carry, ij):
        rows, P, rs = carry
        i, j = ij[0] * tile, ij[1] * tile
        xi = jax.lax.dynamic_slice_in_dim(x, i, tile, axis=1)
        xj = jax.lax.dynamic_slice_in_dim(x, j, tile, axis=1)
        oi = jax.lax.dynamic_slice_in_dim(offset, i, tile, axis=1)
        oj = jax.lax.dynamic_slice_in_dim(offset, j, tile, axis=1)
        vi = jax.lax.dynamic_slice_in_dim(valid, i, tile)
        vj = jax.lax.dynamic_slice_in_dim(valid, j, tile)
        same = (i + jnp.arange(tile))[:, None] == (j + jnp.arange(tile))[None, :]
        K = _kernel_block(kernel, xi, xj, sigma2, d, same)
        mask = vi[:, None] * vj[None, :] * live[:, None, None].astype(x.dtype)
        T = (K - oi[:, :, None] - oj[:, None, :]) * mask  # (Cp, R, R)
        # An off-diagonal tile stands for itself and its transpose.
        w = jnp.where(ij[0] == ij[1], 1.0, 2.0).astype(x.dtype)
        Tf = T.reshape(c_pad, tile * tile)
        rows = tuple(
            r + w * (Tf[a * chunk:(a + 1) * chunk] @ Tf[a * chunk:].T) for a, r in enumerate(rows))
        Lt = jax.lax.dynamic_slice(Lp, (0, i, j), (Lp.shape[0], tile, tile))
        P = P + w * (Tf @ Lt.reshape(Lp.shape[0], -1).T)
        # Row sums of the symmetric offset kernel: this tile's rows, and its columns when the
        # tile also stands for its transpose.
        rsi = jax.lax.dynamic_slice_in_dim(rs, i, tile, axis=1) + T.sum(-1)
        rs = jax.lax.dynamic_update_slice_in_dim(rs, rsi, i, axis=1)
        rsj = jax.lax.dynamic_slice_in_dim(rs, j, tile, axis=1) + (w - 1.0) * T.sum(-2)
        rs = jax.lax.dynamic_update_slice_in_dim(rs, rsj, j, axis=1)
        return (rows, P, rs), None

    rows0 = tuple(jnp.zeros((chunk, c_pad - a * chunk), x.dtype) for a in range(nb))
    P0 = jnp.zeros((c_pad, L.shape[0]), x.dtype)
    rs0 = jnp.zeros((c_pad, n_pad), x.dtype)
    (rows, P, rs), _ = jax.lax.scan(body, (rows0, P0, rs0), jnp.asarray(np.stack([ti, tj], 1)))
    Q = _mirror_blocks(rows, nb, chunk)
    # <HAH, HBH> = <A, B> - (2/N) (A1).(B1) + (1/N^2) (1'A1)(1'B1); P needs nothing as every
    # response is centred (<HAH, L> = <A, HLH> = <A, L>).
    t = rs.sum(-1)
    Q = Q - (2.0 / n) * (rs @ rs.T) + jnp.outer(t, t) / (n * n)
    return _finish(Q[:c, :c], P[:c], alive, normalize)


@functools.partial(jax.jit, static_argnames=("normalize", "chunk"))
def _gram_features(F, L, normalize: bool, chunk: int):
    n, c, d = F.shape
    x, _, alive = _prepare(F, linear())  # (C, N, D), centred over samples
    nb = -(-c // chunk)
    c_pad = nb * chunk
    x = jnp.pad(x, ((0, c_pad - c), (0, 0), (0, 0)))
    xf = jnp.transpose(x, (1, 0, 2)).reshape(n, c_pad * d)  # (N, Cp*D)

    # Q[k, l] = ||X_k^T X_l||_F^2: one (B*D) x ((nb-a)*B*D) feature Gram per block row.
    rows = []
    for a in range(nb):
        G = xf[:, a * chunk * d:(a + 1) * chunk * d].T @ xf[:, a * chunk * d:]
        G = G.reshape(chunk, d, c_pad - a * chunk, d)
        rows.append(jnp.sum(G * G, axis=(1, 3)))
    Q = _mirror_blocks(rows, nb, chunk)

    # P[k, c] = <X_k X_k^T, L_c> = sum(X_k * (L_c X_k)), one class at a time.
    def per_class(Lc):
        return jnp.sum((xf * (Lc @ xf)).reshape(n, c_pad, d), axis=(0, 2))

    P = jax.lax.map(per_class, L).T
    return _finish(Q[:c, :c], P[:c], alive, normalize)


def gram_statistics(F, responses, kernel: str | Kernel = "laplacian", *,
                    normalize: bool = True, chunk_size: int | None = None,
                    tile_size: int | None = None, linear_method: str = "auto",
                    dtype=jnp.float32, return_norms: bool = False):
    """Q and P of the layer problem, without the N^2 x C design matrix.

    .. math::

        Q_{kl} = \\langle \\bar K_k, \\bar K_l \\rangle_F, \\quad
        P_{kc} = \\langle \\bar K_k, L_c \\rangle_F, \\quad
        \\bar K_k = H K_k H / \\|H K_k H\\|_F \\ (\\text{normalize}) \\text{ or } H K_k H

    so that ``1/2 sum_c ||L_c - sum_k B[k,c] Kbar_k||_F^2 = 1/2 tr(B^T Q B) - tr(B^T P) +
    const``. Algorithms and costs are in the module docstring; both are exact.

    Args:
      F: features ``(N, C, D)``: samples, channels, flattened ``H*W`` map.
      responses: ``(R, N, N)`` response kernels (e.g. :func:`one_vs_rest_responses`) or one
        ``(N, N)`` kernel. They are used as given except for centring (``H L H``, a no-op on
        the constructors' outputs) and symmetrising; normalise them when you build them.
      kernel: a :class:`Kernel` or a name in :data:`KERNELS`.
      normalize: unit-Frobenius normalise every channel kernel (zero stays zero).
      chunk_size: channels per block (the upper block triangle of Q is computed and mirrored);
        ``None``: :func:`default_chunk_size`. Any value in ``[1, C]``; it need not divide C.
      tile_size: kernel tiles only: samples per tile side; ``None``:
        :func:`default_tile_size` (a (C, R, R) tile within 32 MiB).
      linear_method: ``"auto"``, ``"features"`` or ``"kernels"`` (see :func:`use_feature_space`).
      dtype: float32 (default) or float64 (needs ``jax_enable_x64``).
      return_norms: also return the centred kernels' Frobenius norms ``||H K_k H||_F`` (C,),
        before normalisation (0 for a dead channel).

    Returns:
      ``(Q, P)``: ``(C, C)`` symmetric positive semi-definite and ``(C, R)``; or
      ``(Q, P, norms)``.

    Raises:
      ValueError: wrong shapes, non-finite features or responses (with the count), a response
        that is identically zero after centring (naming it: a class with no samples), float64
        without 64-bit mode, or an option outside its valid values.
    """
    kernel = as_kernel(kernel)
    dtype = _check_dtype(dtype)
    _check_features(F)
    n, c, d = F.shape
    L = responses
    if getattr(L, "ndim", None) == 2:
        L = L[None]
    if getattr(L, "ndim", None) != 3 or L.shape[1:] != (n, n) or L.shape[0] < 1:
        raise ValueError(f"responses must be (R, N, N) or (N, N) with N = F.shape[0] = {n}; got "
                         f"shape {getattr(responses, 'shape', None)}")
    _check_finite(L, "responses")
    L, nonzero = _prepare_responses(jnp.asarray(L, dtype))
    if _concrete(L):
        zero = np.flatnonzero(~np.asarray(nonzero))
        if zero.size:
            raise ValueError(
                f"responses[{int(zero[0])}] is identically zero after centring (zero responses: "
                f"{zero.tolist()}): class {int(zero[0])} has no samples, or its response is "
                f"constant; every response needs samples of its class")
    feature_space = use_feature_space(kernel, n, d, linear_method, c)
    chunk = default_chunk_size(c, d, feature_space) if chunk_size is None else chunk_size
    if not (isinstance(chunk, (int, np.integer)) and 1 <= chunk):
        raise ValueError(f"chunk_size must be a positive integer (or None); got {chunk_size!r}")
    chunk = int(min(chunk, c))
    F = jnp.asarray(F, dtype)
    if feature_space:
        Q, P, norms = _gram_features(F, L, bool(normalize), chunk)
    else:
        tile = default_tile_size(n, c) if tile_size is None else tile_size
        if not (isinstance(tile, (int, np.integer)) and tile >= 1):
            raise ValueError(f"tile_size must be a positive integer (or None); got {tile_size!r}")
        tile = int(min(tile, n))
        Q, P, norms = _gram_tiles(F, L, kernel, bool(normalize), tile, chunk)
    return (Q, P, norms) if return_norms else (Q, P)


@jax.jit
def _prepare_responses(L):
    """Symmetrised, centred responses and which of them are not identically zero."""
    L = centre_kernel(0.5 * (L + jnp.swapaxes(L, 1, 2)))
    return L, jnp.any(L != 0, axis=(1, 2))


def gram_flops(n: int, c: int, d: int, r: int, kernel: str | Kernel = "laplacian", *,
               linear_method: str = "auto") -> dict[str, int]:
    """Useful floating-point operations of :func:`gram_statistics`, counted strictly.

    Every distinct quantity is counted once, with both symmetries taken (a kernel has
    ``N(N+1)/2`` distinct entries; Q has ``C(C+1)/2``; a Frobenius product of two symmetric
    matrices is ``N(N+1)/2`` multiply-adds = ``N(N+1)`` flops); a multiply-add is 2 flops and a
    transcendental (exp, sqrt) 1. Work an implementation does beyond this (padding, mirrored
    blocks on the diagonal, row-mean offsets, the median) is not useful and not counted.

    Kernel tiles:
      - features: centring ``2 N C D``;
      - kernel entries: per entry ``2D`` (inner product) plus, for distance kernels, 3
        (``|a|^2 + |b|^2 - 2ab``) + 3 (sqrt/scale/exp or scale/exp and clip), polynomial 2,
        plus centring 3 and the dead-channel/normalisation scaling 1: ``C N(N+1)/2 * that``;
      - Q: ``C(C+1)/2 * N(N+1)``; P: ``C R N(N+1)``.
    Feature space (linear):
      - Q: ``C(C+1)/2 * (2 N D^2 + 2 D^2)`` (``X_k^T X_l``, then its squared norm);
      - P: per response ``2 N^2 C D`` (``L_c X``) + ``2 N C D``.

    Returns:
      dict with ``"kernels"``, ``"Q"``, ``"P"`` and ``"total"``.
    """
    k = as_kernel(kernel)
    pairs = c * (c + 1) // 2
    if linear_method not in LINEAR_METHODS:
        raise ValueError(f"linear_method {linear_method!r} is not one of {LINEAR_METHODS}")
    if k.name == "linear" and (linear_method == "features" or (
            linear_method == "auto" and use_feature_space(k, n, d, "auto", c))):
        out = {"kernels": 2 * n * c * d, "Q": pairs * (2 * n * d * d + 2 * d * d),
               "P": r * (2 * n * n * c * d + 2 * n * c * d)}
    else:
        per_entry = 2 * d + 4 + {"linear": 0, "polynomial": 2, "gaussian": 5, "laplacian": 6}[k.name]
        out = {"kernels": 2 * n * c * d + c * (n * (n + 1) // 2) * per_entry,
               "Q": pairs * n * (n + 1), "P": c * r * n * (n + 1)}
    out["total"] = sum(out.values())
    return out
