"""The layer registry (see `registry`): one handler per layer type.

Importing this package registers the built-in Keras layers; the handlers
of keras_hub's layers (`hub`) are registered when a keras_hub layer is
first looked up, so keras_hub stays optional.
"""

from keras_csgd.layers import (
    attention,
    conv,
    dense,
    elementwise,
    embedding,
    normalization,
    ops,
    structure,
)
from keras_csgd.layers.registry import (
    LayerHandler,
    attribute,
    handler_for,
    mixes_channels,
    register_layer,
    unregister_layer,
)
