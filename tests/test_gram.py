"""Kernels and Gram statistics against brute force: explicit H, explicit kernels, explicit
Frobenius products, in NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ib_lasso_jax.lasso import gram as kk

# ---------------------------------------------------------------------------------------
# Brute-force references (NumPy, float64, nothing clever)
# ---------------------------------------------------------------------------------------


def ref_kernel(X, kernel: kk.Kernel):
    """Uncentred N x N kernel of one channel's (N, D) features, pair by pair formulas."""
    X = np.asarray(X, np.float64)
    n, d = X.shape
    diff = X[:, None, :] - X[None, :, :]
    d2 = (diff ** 2).sum(-1)
    if kernel.name == "linear":
        return X @ X.T
    if kernel.name == "polynomial":
        return (X @ X.T + kernel.coef) ** kernel.degree
    if kernel.name == "laplacian":
        scale = np.sqrt(0.5 / d) if kernel.scale is None else kernel.scale
        return np.exp(-scale * np.sqrt(d2))
    if kernel.bandwidth == "fixed":
        s2 = kernel.sigma ** 2
    elif kernel.bandwidth == "dim":
        s2 = d
    else:
        iu = np.triu_indices(n, 1)
        pos = d2[iu][d2[iu] > 0]
        s2 = np.median(pos) / 2 if pos.size else 1.0
    return np.exp(-d2 / (2 * s2))


def ref_centred(K):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return H @ K @ H


def ref_channel_kernels(F, kernel, normalize):
    out = []
    for k in range(F.shape[1]):
        K = ref_centred(ref_kernel(F[:, k], kernel))
        if np.all(F[:, k] == F[0, k]):  # dead channel
            K = np.zeros_like(K)
        nrm = np.linalg.norm(K)
        out.append(K / nrm if normalize and nrm > 0 else K)
    return np.stack(out)


def ref_gram(F, L, kernel, normalize):
    K = ref_channel_kernels(F, kernel, normalize)
    C = K.shape[0]
    L = np.asarray(L, np.float64)
    Q = np.array([[np.sum(K[k] * K[j]) for j in range(C)] for k in range(C)])
    P = np.array([[np.sum(K[k] * L[c]) for c in range(L.shape[0])] for k in range(C)])
    return Q, P


def features(seed, n=23, c=7, d=5, dead=()):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(n, c, d)) * rng.uniform(0.5, 2.0, size=(1, c, 1))
    F = F + rng.normal(size=(1, c, d))  # non-zero means: centring matters
    for k in dead:
        F[:, k] = 0.3
    return F


KERNELS = {
    "linear": kk.linear(),
    "gaussian-median": kk.gaussian(median_samples=None),
    "gaussian-dim": kk.gaussian(bandwidth="dim"),
    "gaussian-fixed": kk.gaussian(1.7),
    "laplacian": kk.laplacian(),
    "laplacian-scale": kk.laplacian(0.4),
    "polynomial": kk.polynomial(3, 0.5),
}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def close(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-300)
    assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("normalize", [False, True])
def test_channel_kernels_match_bruteforce_float64(x64, name, normalize):
    F = features(0, dead=(2,))
    K = kk.channel_kernels(F, KERNELS[name], normalize=normalize, dtype=jnp.float64)
    assert K.dtype == jnp.float64
    close(K, ref_channel_kernels(F, KERNELS[name], normalize), 1e-10)


@pytest.mark.parametrize("name", ["linear", "gaussian-median", "laplacian", "polynomial"])
def test_channel_kernels_float32(name):
    F = features(1)
    K = kk.channel_kernels(F.astype(np.float32), KERNELS[name], normalize=True)
    assert K.dtype == jnp.float32
    close(K, ref_channel_kernels(F, KERNELS[name], True), 1e-4)


def test_median_subsample_is_strided_and_exact_when_all():
    F = features(2, n=30)
    s_all = kk.bandwidths(F, kk.gaussian(median_samples=None))
    s_big = kk.bandwidths(F, kk.gaussian(median_samples=1000))
    np.testing.assert_allclose(s_all, s_big)
    d2 = ((F[:, None, 0] - F[None, :, 0]) ** 2).sum(-1)[np.triu_indices(30, 1)]
    np.testing.assert_allclose(s_all[0], np.median(d2) / 2, rtol=1e-5)


def test_centre_and_normalize_helpers():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(9, 9))
    close(kk.centre_kernel(A), ref_centred(A), 1e-6)  # also non-symmetric
    Z = kk.normalize_kernel(np.zeros((2, 5, 5)))
    assert np.all(np.asarray(Z) == 0)
    # gradient of a normalised zero kernel is finite
    g = jax.grad(lambda k: kk.normalize_kernel(k).sum())(jnp.zeros((4, 4)))
    assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------


def test_one_vs_rest_and_delta(x64):
    y = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1])
    N, ncls = len(y), 3
    L = kk.one_vs_rest_responses(y, ncls, normalize=False, dtype=jnp.float64)
    ref = []
    for c in range(ncls):
        u = (y == c).astype(float)
        ref.append(ref_centred(np.outer(u, u) / u.sum()))
    close(L, np.stack(ref), 1e-12)
    Ln = kk.one_vs_rest_responses(y, ncls, dtype=jnp.float64)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(Ln).reshape(ncls, -1), axis=1), 1.0)
    delta = kk.delta_kernel(y, ncls, dtype=jnp.float64)
    ref_delta = np.array([[float(y[i] == y[j]) / np.sum(y == y[i]) for j in range(N)]
                          for i in range(N)])
    close(delta, ref_delta, 1e-12)
    D = kk.delta_responses(y, ncls, normalize=False, dtype=jnp.float64)
    close(D[0], np.stack(ref).sum(0), 1e-12)  # the delta kernel is the sum of R1
    plain = kk.delta_kernel(y, ncls, per_class_scale=False)
    np.testing.assert_array_equal(plain, (y[:, None] == y[None, :]).astype(np.float32))


def test_output_and_logit_responses(x64):
    rng = np.random.default_rng(4)
    y = np.array([0, 1, 1, 0, 2, 2, 1, 0, 2, 1])
    G = rng.normal(size=(10, 3, 4))
    L = kk.output_responses(G, y, 3, "laplacian", dtype=jnp.float64)
    Lraw = ref_kernel(G.reshape(10, -1), kk.laplacian())
    for c in range(3):
        Dc = np.diag((y == c).astype(float))
        R = ref_centred(Dc @ Lraw @ Dc)
        close(L[c], R / np.linalg.norm(R), 1e-10)
    # Each kind of kernel (one compiled program each), against the pair-by-pair formulas on
    # the features centred over samples (the polynomial kernel sees them raw; centring changes
    # no distance kernel): the bandwidth from D, inner products raw and centred.
    Gf = G.reshape(10, -1)
    for name in ("gaussian-dim", "linear", "polynomial"):
        kernel = KERNELS[name]
        X = Gf if kernel.name == "polynomial" else Gf - Gf.mean(0)
        L = kk.output_responses(G, y, 3, kernel, normalize=False, dtype=jnp.float64)
        for c in range(3):
            Dc = np.diag((y == c).astype(float))
            close(L[c], ref_centred(Dc @ ref_kernel(X, kernel) @ Dc), 1e-10)
    # The median of a strided subsample of the pairs, as for channels (gram.bandwidths).
    sub = kk.gaussian(median_samples=4)
    s2 = float(kk.bandwidths(Gf[:, None, :], sub)[0])
    assert s2 != float(kk.bandwidths(Gf[:, None, :], KERNELS["gaussian-median"])[0])
    X = Gf - Gf.mean(0)
    K = np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / (2 * s2))
    L = kk.output_responses(G, y, 3, sub, normalize=False, dtype=jnp.float64)
    for c in range(3):
        Dc = np.diag((y == c).astype(float))
        close(L[c], ref_centred(Dc @ K @ Dc), 1e-10)
    z = rng.normal(size=(10, 3))
    Lz = kk.logit_responses(z, dtype=jnp.float64)
    for c in range(3):
        R = ref_centred(ref_kernel(z[:, c:c + 1], kk.gaussian(median_samples=None)))
        close(Lz[c], R / np.linalg.norm(R), 1e-10)


def test_class_indices_and_missing_class():
    y = np.array([2, 0, 2, 0, 1])
    idx = kk.class_indices(y, 3)
    assert [i.tolist() for i in idx] == [[1, 3], [4], [0, 2]]
    for fn in (lambda: kk.class_indices(y, 4), lambda: kk.one_vs_rest_responses(y, 4),
               lambda: kk.output_responses(np.ones((5, 2)), y, 4),
               lambda: kk.delta_responses(y, 4)):
        with pytest.raises(ValueError, match="class 3 has no samples"):
            fn()
    with pytest.raises(ValueError, match="outside"):
        kk.one_vs_rest_responses(np.array([0, 5]), 3)


# ---------------------------------------------------------------------------------------
# Gram statistics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KERNELS))
def test_gram_statistics_match_bruteforce_float64(x64, name):
    for seed in (0, 1, 2):  # same shapes: one compilation
        _check_gram_float64(name, seed)


def _check_gram_float64(name, seed):
    F = features(seed, n=21, c=6, d=4, dead=(1,))
    y = np.random.default_rng(seed).permutation(np.arange(21) % 3)
    L = kk.one_vs_rest_responses(y, 3, dtype=jnp.float64)
    Q, P, norms = kk.gram_statistics(F, L, KERNELS[name], normalize=True, dtype=jnp.float64,
                                     tile_size=8, chunk_size=4, return_norms=True)
    Qr, Pr = ref_gram(F, L, KERNELS[name], True)
    close(Q, Qr, 1e-9)
    close(P, Pr, 1e-9)
    Ku = ref_channel_kernels(F, KERNELS[name], False)
    close(norms, np.linalg.norm(Ku.reshape(6, -1), axis=1), 1e-9)
    Q, P = kk.gram_statistics(F, L, KERNELS[name], normalize=False, dtype=jnp.float64)
    Qr, Pr = ref_gram(F, L, KERNELS[name], False)
    close(Q, Qr, 1e-9)
    close(P, Pr, 1e-9)


@pytest.mark.parametrize("name", ["gaussian-median", "laplacian", "linear"])
def test_gram_statistics_float32(name):
    F = features(5, n=40, c=9, d=6, dead=(4,))
    rng = np.random.default_rng(5)
    L = kk.output_responses(rng.normal(size=(40, 12)), np.arange(40) % 4, 4)
    Q, P = kk.gram_statistics(F.astype(np.float32), L, KERNELS[name])
    assert Q.dtype == P.dtype == jnp.float32
    Qr, Pr = ref_gram(F, L, KERNELS[name], True)
    close(Q, Qr, 2e-5)
    close(P, Pr, 2e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_feature_space_equals_kernel_path(x64, normalize):
    F = features(6, n=30, c=10, d=3, dead=(0,))
    L = kk.one_vs_rest_responses(np.arange(30) % 5, 5, dtype=jnp.float64)
    assert kk.use_feature_space("linear", 30, 3)
    assert not kk.use_feature_space("linear", 30, 4)
    a = kk.gram_statistics(F, L, "linear", normalize=normalize, dtype=jnp.float64,
                           linear_method="features", chunk_size=3, return_norms=True)
    b = kk.gram_statistics(F, L, "linear", normalize=normalize, dtype=jnp.float64,
                           linear_method="kernels", tile_size=7, chunk_size=4, return_norms=True)
    for u, v in zip(a, b):
        close(u, v, 1e-10)


@pytest.mark.parametrize("name", ["laplacian", "linear"])
def test_chunk_and_tile_sizes_do_not_change_the_result(x64, name):
    F = features(7, n=19, c=11, d=5)
    L = kk.one_vs_rest_responses(np.arange(19) % 2, 2, dtype=jnp.float64)
    base = kk.gram_statistics(F, L, name, dtype=jnp.float64, chunk_size=11, tile_size=19,
                              linear_method="kernels")
    for chunk, tile, method in [(1, 19, "kernels"), (3, 5, "kernels"), (4, 8, "kernels"),
                                (7, 1, "kernels"), (2, None, "features"), (5, None, "features")]:
        if method == "features" and name != "linear":
            continue
        Q, P = kk.gram_statistics(F, L, name, dtype=jnp.float64, chunk_size=chunk,
                                  tile_size=tile, linear_method=method)
        close(Q, base[0], 1e-11)
        close(P, base[1], 1e-11)


@pytest.mark.parametrize("name", ["gaussian-median", "laplacian", "polynomial", "linear"])
def test_q_symmetric_psd_unit_diagonal_and_dead_channel(name):
    F = features(8, n=33, c=8, d=4, dead=(3,))
    F[:, 6] = 0.0  # an all-zero (post-ReLU dead) channel
    L = kk.one_vs_rest_responses(np.arange(33) % 3, 3)
    for method in ("auto", "kernels"):
        Q, P, norms = kk.gram_statistics(F.astype(np.float32), L, KERNELS[name],
                                         linear_method=method, return_norms=True)
        Q, P = np.asarray(Q, np.float64), np.asarray(P)
        assert np.all(np.isfinite(Q)) and np.all(np.isfinite(P))
        np.testing.assert_array_equal(Q, Q.T)
        assert np.linalg.eigvalsh(Q).min() > -1e-5
        for k in (3, 6):
            assert np.all(Q[k] == 0) and np.all(Q[:, k] == 0) and np.all(P[k] == 0)
            assert norms[k] == 0
        alive = [k for k in range(8) if k not in (3, 6)]
        np.testing.assert_allclose(np.diag(Q)[alive], 1.0, rtol=1e-5)
    K = kk.channel_kernels(F, KERNELS[name], normalize=True)
    nrm = np.linalg.norm(np.asarray(K).reshape(8, -1), axis=1)
    np.testing.assert_allclose(nrm[alive], 1.0, rtol=1e-5)
    assert np.all(np.asarray(K[3]) == 0) and np.all(np.asarray(K[6]) == 0)


def test_single_response_is_apib_hsic_lasso(x64):
    """One response, no structure: Q and P give HSIC Lasso's objective exactly,
    1/2 ||Lbar - sum_k b_k Kbar_k||_F^2 = 1/2 b'Qb - b'P + 1/2 ||Lbar||^2 (Yamada et al.)."""
    F = features(9, n=24, c=6, d=4)
    y = np.arange(24) % 4
    L = kk.delta_responses(y, 4, dtype=jnp.float64)  # centred, normalised delta kernel
    Q, P = kk.gram_statistics(F, L, "laplacian", dtype=jnp.float64)
    Kbar = ref_channel_kernels(F, kk.laplacian(), True).reshape(6, -1)  # the design, (C, N^2)
    Lbar = np.asarray(L[0]).reshape(-1)
    rng = np.random.default_rng(9)
    for _ in range(3):
        b = rng.uniform(0, 1, size=6)
        direct = 0.5 * np.sum((Lbar - b @ Kbar) ** 2)
        gram = 0.5 * b @ np.asarray(Q) @ b - b @ np.asarray(P)[:, 0] + 0.5 * Lbar @ Lbar
        np.testing.assert_allclose(gram, direct, rtol=1e-10)
    # P is the normalised HSIC of each channel with the labels
    Kd = ref_centred(np.asarray(kk.delta_kernel(y, 4, dtype=jnp.float64)))
    close(P[:, 0], Kbar @ (Kd / np.linalg.norm(Kd)).reshape(-1), 1e-10)


def test_jit_and_vmap_safe():
    F = features(10, n=16, c=5, d=4).astype(np.float32)
    L = kk.one_vs_rest_responses(np.arange(16) % 2, 2)
    Q, P = kk.gram_statistics(F, L)
    Qj, Pj = jax.jit(lambda f, lab: kk.gram_statistics(f, lab))(F, L)
    np.testing.assert_allclose(Qj, Q, rtol=1e-5, atol=1e-6)
    Fs = np.stack([F, 2 * F[::-1]])
    Qv, Pv = jax.vmap(lambda f: kk.gram_statistics(f, L))(Fs)
    np.testing.assert_allclose(Qv[0], Q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(Pv[1], kk.gram_statistics(Fs[1], L)[1], rtol=1e-5, atol=1e-6)


def test_flop_count():
    f = kk.gram_flops(500, 512, 16, 10, "laplacian")
    assert f["Q"] == 512 * 513 // 2 * 500 * 501
    assert f["total"] == f["kernels"] + f["Q"] + f["P"]
    g = kk.gram_flops(500, 512, 16, 10, "linear", linear_method="features")
    assert g["Q"] == 512 * 513 // 2 * (2 * 500 * 256 + 2 * 256)


# ---------------------------------------------------------------------------------------
# Errors speak to the user
# ---------------------------------------------------------------------------------------


def test_input_validation():
    F = features(11, n=10, c=3, d=2).astype(np.float32)
    L = kk.one_vs_rest_responses(np.arange(10) % 2, 2)
    bad = F.copy()
    bad[0, 0, 0], bad[3, 1, 1], bad[4, 2, 0] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match="F has 3 non-finite entries"):
        kk.gram_statistics(bad, L)
    with pytest.raises(ValueError, match="F has 3 non-finite"):
        kk.channel_kernels(bad)
    with pytest.raises(ValueError, match=r"\(N, C, D\)"):
        kk.gram_statistics(F[:, :, 0], L)
    with pytest.raises(ValueError, match="N = F.shape\\[0\\] = 10"):
        kk.gram_statistics(F, L[:, :9, :9])
    Lz = np.asarray(L).copy()
    Lz[1] = 0.0
    with pytest.raises(ValueError, match=r"responses\[1\] is identically zero"):
        kk.gram_statistics(F, Lz)
    with pytest.raises(ValueError, match="not one of"):
        kk.gram_statistics(F, L, "cosine")
    with pytest.raises(ValueError, match="linear_method"):
        kk.gram_statistics(F, L, "linear", linear_method="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        kk.gram_statistics(F, L, chunk_size=0)
    with pytest.raises(ValueError, match="sigma > 0"):
        kk.gaussian(bandwidth="fixed")
    if not jax.config.read("jax_enable_x64"):
        with pytest.raises(ValueError, match="jax_enable_x64"):
            kk.gram_statistics(F, L, dtype=jnp.float64)
