"""The layer registry (see `registry`): one handler per layer type.

Importing this package registers the built-in Keras layers, and the
handlers of keras_hub's layers (`hub`, `hub_simple`, `hub_decoder`,
`hub_deberta`, `hub_dfine`, `decoders`) when keras_hub is installed: they
register the `Pruned...` classes of slim keras_hub models, which
`keras.saving.load_model` must find in a fresh process. keras_hub stays
optional.
"""

from keras_csgd.layers import (
    attention,
    conv,
    dense,
    elementwise,
    embedding,
    grouped_query,
    normalization,
    ops,
    structure,
    traced,
)
from keras_csgd.layers.cluster_norm import ClusterNormalization
from keras_csgd.layers.registry import (
    LayerHandler,
    attribute,
    handler_for,
    load_installed,
    mixes_channels,
    register_layer,
    unregister_layer,
)

load_installed()
