"""Per-channel sample kernels: their specifications, evaluation and explicit centred kernels.

Features are ``F`` of shape ``(N, C, D)``: N calibration samples, C channels, ``D = H*W``
values of one channel's flattened feature map (see :mod:`ib_lasso_jax.lasso.gram`).

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
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BANDWIDTHS",
    "KERNELS",
    "Kernel",
    "as_kernel",
    "bandwidths",
    "centre_kernel",
    "channel_kernels",
    "gaussian",
    "laplacian",
    "linear",
    "normalize_kernel",
    "polynomial",
]

KERNELS = ("linear", "gaussian", "laplacian", "polynomial")
BANDWIDTHS = ("median", "dim", "fixed")


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
        # fusing the exp into the distance matmul, which makes the tiled Gram program far slower
        # to compile.
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
