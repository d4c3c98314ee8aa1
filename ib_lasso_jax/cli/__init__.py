"""The ``ib-lasso`` command line: :func:`main` (see :mod:`ib_lasso_jax.cli.main` for the subcommands).

One module per family of subcommands: ``commands`` (models, training, the pipeline, the
compilation cache), ``prune``, ``deploy`` (export, import, latency); ``common`` holds what they
share; ``main`` builds the parser and turns user errors into one line and exit status 2.
"""

from ib_lasso_jax.cli.main import build_parser, main
from ib_lasso_jax.cli.prune import PRUNE_OUTPUTS, PRUNE_PENDING

__all__ = ["PRUNE_OUTPUTS", "PRUNE_PENDING", "build_parser", "main"]
