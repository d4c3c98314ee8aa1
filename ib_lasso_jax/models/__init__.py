"""The model zoo: Flax NNX CNNs rebuilt from explicit width specifications."""

# Importing the model files registers them.
from ib_lasso_jax.models import (
    googlenet,  # noqa: F401,E402
    lenet,  # noqa: F401,E402
    resnet_cifar,  # noqa: F401,E402
    resnet_imagenet,  # noqa: F401,E402
    vgg,  # noqa: F401,E402
)
from ib_lasso_jax.models._registry import (
    DATASETS,
    ModelSpec,
    abstract_from_spec,
    available,
    create,
    create_from_spec,
    dataset_shape,
    default_dataset,
    default_widths,
    describe,
    make_spec,
    register,
)

__all__ = [
    "DATASETS",
    "ModelSpec",
    "abstract_from_spec",
    "available",
    "create",
    "create_from_spec",
    "dataset_shape",
    "default_dataset",
    "default_widths",
    "describe",
    "make_spec",
    "register",
]
