import sys

from ib_lasso_jax.cli.main import main

sys.exit(main())
