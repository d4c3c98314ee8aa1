"""The model zoo: Flax NNX CNNs rebuilt from explicit width specifications."""

from ib_lasso_jax.models._registry import DATASETS
from ib_lasso_jax.models._registry import ModelSpec
from ib_lasso_jax.models._registry import abstract_from_spec
from ib_lasso_jax.models._registry import available
from ib_lasso_jax.models._registry import create
from ib_lasso_jax.models._registry import create_from_spec
from ib_lasso_jax.models._registry import dataset_shape
from ib_lasso_jax.models._registry import default_dataset
from ib_lasso_jax.models._registry import default_widths
from ib_lasso_jax.models._registry import describe
from ib_lasso_jax.models._registry import make_spec
from ib_lasso_jax.models._registry import register

# Importing the model files registers them.
from ib_lasso_jax.models import lenet  # noqa: F401,E402
from ib_lasso_jax.models import vgg  # noqa: F401,E402
from ib_lasso_jax.models import resnet_cifar  # noqa: F401,E402
from ib_lasso_jax.models import resnet_imagenet  # noqa: F401,E402
from ib_lasso_jax.models import googlenet  # noqa: F401,E402

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
