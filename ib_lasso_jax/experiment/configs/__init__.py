"""The experiment configs that ship with the package: one importable module per experiment.

* :mod:`~ib_lasso_jax.experiment.configs.papers`: one ``get_config() -> PipelineConfig`` per
  published table row, run by ``ib-lasso run NAME``;
* :mod:`~ib_lasso_jax.experiment.configs.examples`: ``get_config() -> TrainConfig`` training
  recipes (the baselines the paper configs share), run by ``ib-lasso train --config NAME``.

``ib-lasso configs`` lists both. A config is found by its module name (``importlib``), so the
names work from an installed wheel; a path to a ``.py`` file of one's own works too.

>>> from ib_lasso_jax.experiment.configs import papers
>>> "mnist5k_vgg_sglp" in papers.available()
True
>>> papers.load("mnist5k_vgg_sglp").prune.method
'sglp-ib'
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from pathlib import Path
from types import ModuleType

__all__ = ["available", "load", "load_module"]


def available(package: str) -> list[str]:
    """Names of the config modules of ``package`` (a dotted package name), sorted."""
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def load_module(package: str, name_or_path: str | os.PathLike) -> ModuleType:
    """The config module ``name_or_path``: a name from :func:`available` or a path to a ``.py`` file.

    Raises:
      ValueError: an unknown name, or a path that is not a file.
    """
    text = os.fspath(name_or_path)
    if text.endswith(".py"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"config={text!r} is not valid: no such file; valid configs: {available(package)} or "
                             "a path to a .py file")
        spec = importlib.util.spec_from_file_location(f"ib_lasso_user_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if text not in available(package):
        raise ValueError(f"config={text!r} is not valid; valid configs: {available(package)} or a path to a .py file")
    return importlib.import_module(f"{package}.{text}")


def load(package: str, name_or_path: str | os.PathLike, kind: type):
    """``get_config()`` of config ``name_or_path`` of ``package``, which must be a ``kind``.

    Raises:
      ValueError: an unknown name, or a module without a ``get_config`` returning a ``kind``.
    """
    module = load_module(package, name_or_path)
    get_config = getattr(module, "get_config", None)
    config = get_config() if callable(get_config) else None
    if not isinstance(config, kind):
        where = getattr(module, "__file__", None) or module.__name__
        raise ValueError(f"config {str(where)!r} must define get_config() returning a {kind.__name__}; "
                         f"got {type(config).__name__}")
    return config
