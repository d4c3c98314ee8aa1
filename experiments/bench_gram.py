"""Benchmark: Gram statistics (Q, P) of one layer against this machine's dense matmul rate.

One layer: C = 512 channels, 4x4 maps (D = 16), N = 500 samples, 10 classes (R1 responses),
random post-ReLU-like features. For each kernel it prints the time (median of repeats, after
compilation), the *useful* FLOPs (:func:`ib_lasso_jax.lasso.gram.gram_flops`: every distinct
quantity once, both symmetries taken, so this is a lower bound on any implementation's work),
the achieved GFLOP/s, and that rate as a fraction of a jitted float32 matmul measured in the
same run (target: >= 0.5). It also prints the temporary memory XLA allocates for the chunked
computation (from the compiled program) against the N^2 x C float32 design matrix.

    .venv/bin/python experiments/bench_gram.py
    .venv/bin/python experiments/bench_gram.py --sweep    # also sweep tile / chunk sizes

No assertions: it prints ratios measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ib_lasso_jax.lasso import gram as kk


def timed(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile + warm up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_rate(m, k, n, repeats=7):
    a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
    t = timed(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2.0 * m * k * n / t / 1e9


def temp_bytes(F, L, kernel, chunk, tile, feature_space):
    """Temporary memory of the compiled Gram computation (XLA's own accounting)."""
    if feature_space:
        lowered = kk._gram_features.lower(F, L, normalize=True, chunk=chunk)
    else:
        lowered = kk._gram_tiles.lower(F, L, kernel=kernel, normalize=True, tile=tile, chunk=chunk)
    stats = lowered.compile().memory_analysis()
    return None if stats is None else stats.temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--c", type=int, default=512)
    ap.add_argument("--hw", type=int, default=4)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also sweep tile and chunk sizes")
    args = ap.parse_args()
    n, c, d, r = args.n, args.c, args.hw * args.hw, args.classes

    rng = np.random.default_rng(0)
    F = np.maximum(rng.normal(size=(n, c, d)) + rng.normal(size=(1, c, 1)), 0).astype(np.float32)
    y = np.arange(n) % r
    L = kk.one_vs_rest_responses(y, r)
    F, L = jnp.asarray(F), jnp.asarray(L)
    design = 4 * n * n * c

    print(f"devices: {jax.devices()}  N={n} C={c} D={d} responses={r}")
    ref_sq = matmul_rate(2048, 2048, 2048)
    ref_q = matmul_rate(c, 16384, c)
    print(f"float32 matmul: 2048^3 {ref_sq:.1f} GFLOP/s; ({c} x 16384) @ (16384 x {c}) "
          f"{ref_q:.1f} GFLOP/s  -> reference rate = the larger")
    ref = max(ref_sq, ref_q)

    cases = [
        ("laplacian", kk.laplacian(), {}),
        ("gaussian (median, 128 samples)", kk.gaussian(), {}),
        ("gaussian (sigma^2 = D)", kk.gaussian(bandwidth="dim"), {}),
        ("linear (auto)", kk.linear(), {}),
        ("linear (feature space forced)", kk.linear(), {"linear_method": "features"}),
        ("linear (kernel tiles forced)", kk.linear(), {"linear_method": "kernels"}),
    ]
    print(f"\n{'kernel':44s} {'time s':>8s} {'useful GFLOP':>12s} {'GFLOP/s':>8s} "
          f"{'/matmul':>8s} {'temp MiB':>9s} {'/design':>8s}")
    for label, kernel, kw in cases:
        fs = kk.use_feature_space(kernel, n, d, kw.get("linear_method", "auto"), c)
        if kernel.name == "linear":
            label = f"{label} -> {'features' if fs else 'tiles'}"
        chunk = kk.default_chunk_size(c, d, fs)
        tile = kk.default_tile_size(n, c)
        t = timed(lambda f, lab, kernel=kernel, kw=kw: kk.gram_statistics(f, lab, kernel, **kw), F, L,
                  repeats=args.repeats)
        flops = kk.gram_flops(n, c, d, r, kernel, **kw)["total"]
        mem = temp_bytes(F, L, kernel, chunk, tile, fs)
        rate = flops / t / 1e9
        print(f"{label:44s} {t:8.3f} {flops / 1e9:12.2f} {rate:8.1f} {rate / ref:8.2f} "
              f"{mem / 2**20:9.1f} {mem / design:8.3f}")
    print(f"\nfull design matrix N^2 x C float32: {design / 2**20:.0f} MiB; default tile "
          f"{kk.default_tile_size(n, c)} samples, chunk {kk.default_chunk_size(c, d, False)} "
          f"channels (tiles), {kk.default_chunk_size(c, d, True)} (feature space)")
    ref2 = max(matmul_rate(2048, 2048, 2048), matmul_rate(c, 16384, c))
    print(f"matmul reference re-measured after the runs: {ref2:.1f} GFLOP/s (machine noise)")

    if args.sweep:
        print("\nsweep (laplacian, kernel tiles): tile, chunk -> time s")
        for tile in (63, 84, 100, 125, 167, 250):
            for chunk in (64, 128, 256, 512):
                t = timed(lambda f, lab, tile=tile, chunk=chunk: kk.gram_statistics(
                    f, lab, "laplacian", tile_size=tile, chunk_size=chunk), F, L, repeats=3)
                print(f"  tile {tile:4d} chunk {chunk:4d}: {t:.3f}")
        print("sweep (linear, feature space): chunk -> time s")
        for chunk in (16, 32, 64, 128, 256, 512):
            t = timed(lambda f, lab, chunk=chunk: kk.gram_statistics(f, lab, "linear", chunk_size=chunk), F, L,
                      repeats=3)
            print(f"  chunk {chunk:4d}: {t:.3f}")


if __name__ == "__main__":
    main()
