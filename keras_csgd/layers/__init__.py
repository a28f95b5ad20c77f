"""The layer registry (see `registry`): one handler per layer type.

Importing this package registers the built-in Keras layers.
"""

from keras_csgd.layers import (
    conv,
    dense,
    elementwise,
    normalization,
    structure,
)
from keras_csgd.layers.registry import (
    LayerHandler,
    attribute,
    handler_for,
    register_layer,
    unregister_layer,
)
