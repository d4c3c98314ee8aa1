"""Response kernels: what the channel kernels are fitted to, one centred kernel per response.

Responses are stacked ``(R, N, N)``: R centred (optionally unit-norm) kernels over the same N
calibration samples. The constructors give the response families of the layer problem:
R1 one-vs-rest label kernels (:func:`one_vs_rest_responses`), R2 the layer output restricted
to each class (:func:`output_responses`), R3 per-class problems (:func:`class_indices`), R4
kernels on each class's logit (:func:`logit_responses`), and plain HSIC Lasso's centred delta
kernel (:func:`delta_responses`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ib_lasso_jax.lasso.sample_kernels import (
    Kernel,
    _check_dtype,
    _check_finite,
    _check_labels,
    _concrete,
    _kernel_values,
    _median_of_pairs,
    _sigma2,
    _strided,
    as_kernel,
    centre_kernel,
    channel_kernels,
    normalize_kernel,
)

__all__ = [
    "class_indices",
    "delta_kernel",
    "delta_responses",
    "logit_responses",
    "one_vs_rest_responses",
    "output_responses",
]


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
    # whatever the layer, compiled once for all layers: it holds the median bandwidth's
    # bisection loop, the costly part to compile.
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
