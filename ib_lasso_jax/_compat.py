"""The module paths of release 0.1.0, kept for one release as aliases of their new homes.

``import ib_lasso_jax.kernels`` (or ``from ib_lasso_jax import kernels``) still works and gives
the module itself (``ib_lasso_jax.lasso.gram``), so monkeypatching and pickles see one object;
each old path warns once with its new name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# old path (under ib_lasso_jax) -> new path
MOVED = {
    "coupling": "graph.coupling",
    "features": "graph.features",
    "counting": "graph.counting",
    "surgery": "graph.surgery",
    "kernels": "lasso.gram",
    "structures": "lasso.structures",
    "prox": "lasso.prox",
    "solvers": "lasso.solvers",
    "_jaxopt": "lasso._jaxopt",
    "methods": "pruning.methods",
    "methods.baselines": "pruning.methods.baselines",
    "methods.dwgl": "pruning.methods.dwgl",
    "methods.entropic": "pruning.methods.entropic",
    "methods.ib_lasso": "pruning.methods.ib_lasso",
    "methods.ic_shapley": "pruning.methods.ic_shapley",
    "shapley": "pruning.methods.shapley",
    "training": "train.training",
    "parallel": "train.parallel",
    "workdir_lock": "experiment.workdir_lock",
    "pipeline": "experiment.pipeline",
    "export": "deploy.export",
    "latency": "deploy.latency",
}

_PACKAGE = __name__.rpartition(".")[0]


class MovedModuleWarning(DeprecationWarning):
    """An ib_lasso_jax module was imported by its 0.1.0 path."""


def resolve(old: str):
    """The module now at ``MOVED[old]``, with a MovedModuleWarning naming its new path."""
    new = f"{_PACKAGE}.{MOVED[old]}"
    warnings.warn(f"{_PACKAGE}.{old} moved to {new}; the old path goes in the next release",
                  MovedModuleWarning, stacklevel=3)
    return importlib.import_module(new)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        return resolve(self.old)  # the import system keeps this module object as is

    def exec_module(self, module):
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        prefix = _PACKAGE + "."
        if fullname.startswith(prefix) and fullname[len(prefix):] in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname[len(prefix):]))
        return None


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
