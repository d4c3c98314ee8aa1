"""The structured-lasso core, pure JAX (no nnx): Gram statistics of feature maps (``gram``),
class structures (``structures``), proximal operators (``prox``), solvers (``solvers``) and the
one jaxopt adapter (``_jaxopt``)."""

from ib_lasso_jax.lasso.solvers import StructuredLasso
from ib_lasso_jax.lasso.structures import ClassGraph, ClassTree

__all__ = ["ClassGraph", "ClassTree", "StructuredLasso"]
