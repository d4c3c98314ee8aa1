"""Shared test helpers."""

import os

# Several CPU devices let the data-parallel code be exercised; the cheaper XLA optimisation
# level halves compile times, which dominate these tests on a 2-core machine.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def randomise_batchnorm(model, seed=0):
    """Give every BatchNorm non-trivial scale, shift and running statistics, in place.

    Freshly initialised BatchNorms are the identity, which would hide surgery bugs (a removed
    channel that still emits BatchNorm's shift, a mis-sliced running mean).
    """
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            c = m.scale.get_value().shape
            m.scale.set_value(jax.numpy.asarray(rng.uniform(0.5, 1.5, c), m.scale.get_value().dtype))
            m.bias.set_value(jax.numpy.asarray(rng.normal(0, 0.5, c), m.bias.get_value().dtype))
            m.mean.set_value(jax.numpy.asarray(rng.normal(0, 0.5, c), m.mean.get_value().dtype))
            m.var.set_value(jax.numpy.asarray(rng.uniform(0.5, 2.0, c), m.var.get_value().dtype))
    return model
