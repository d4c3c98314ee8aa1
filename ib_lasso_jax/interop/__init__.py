"""Interoperability with other frameworks: PyTorch checkpoints in and out, Flax Linen models.

* :mod:`ib_lasso_jax.interop.torch_files` reads ``.pt`` / ``.pth`` (zip and legacy formats) with
  a restricted unpickler and ``.safetensors``, without PyTorch.
* :mod:`ib_lasso_jax.interop.torch_models` maps published PyTorch state dicts (torchvision,
  HRank, APIB) onto zoo models and back.
* :mod:`ib_lasso_jax.interop.linen` prunes Flax Linen modules through the NNX path and returns
  the Linen module and variables at the pruned widths.
"""
