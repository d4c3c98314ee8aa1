import sys

from ib_lasso_jax.cli import main

sys.exit(main())
