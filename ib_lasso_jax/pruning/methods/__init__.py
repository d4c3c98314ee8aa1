"""Pruning methods: each a small scoring or selection rule registered with
:func:`ib_lasso_jax.pruning.register_method`."""
