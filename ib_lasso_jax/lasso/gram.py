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

Sample kernels (:class:`Kernel`: linear, gaussian, laplacian, polynomial) are
:mod:`~ib_lasso_jax.lasso.sample_kernels`; response constructors are
:mod:`~ib_lasso_jax.lasso.responses`. Both are re-exported here, so ``gram.<name>`` reaches
every kernel and response function.

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

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ib_lasso_jax.lasso.responses import (
    class_indices,
    delta_kernel,
    delta_responses,
    logit_responses,
    one_vs_rest_responses,
    output_responses,
)
from ib_lasso_jax.lasso.sample_kernels import (
    BANDWIDTHS,
    KERNELS,
    Kernel,
    _check_dtype,
    _check_features,
    _check_finite,
    _concrete,
    _kernel_block,
    _prepare,
    _strided,
    as_kernel,
    bandwidths,
    centre_kernel,
    channel_kernels,
    gaussian,
    laplacian,
    linear,
    normalize_kernel,
    polynomial,
)

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
