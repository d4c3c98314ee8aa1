"""One process of the two-process test in test_multihost.py (not collected by pytest)."""

import json
import os

# Two CPU devices per process, and the test suite's compile-time flags (conftest.FAST_COMPILE_FLAGS).
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           + os.environ.get("IB_LASSO_TEST_XLA_FLAGS", ""))
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ib_lasso_jax.train import parallel  # noqa: E402

parallel.maybe_initialize_distributed()
mesh = parallel.data_mesh()
index, count = parallel.process_shard()
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 3)).astype(np.float32)  # the global batch, the same on every host
w = rng.normal(size=(3,)).astype(np.float32)
per_host = x.shape[0] // count
local = x[index * per_host:(index + 1) * per_host]  # each host reads only its slice
batch = parallel.shard_batch(local, mesh)
weights = parallel.replicate(jnp.asarray(w), mesh)
loss = jax.jit(lambda w, b: jnp.mean((b @ w) ** 2))
grad = jax.jit(jax.grad(lambda w, b: jnp.mean((b @ w) ** 2)))
print(json.dumps({
    "process": index, "processes": count, "devices": jax.device_count(), "local_devices": jax.local_device_count(),
    "loss": float(loss(weights, batch)), "grad": np.asarray(grad(weights, batch)).tolist(),
}), flush=True)
