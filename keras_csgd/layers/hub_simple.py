"""keras_hub's per-sample and lookup layers: drop paths and embeddings.

keras_hub's drop-path layers (stochastic depth, one per family) scale each
example of a batch as a whole while training and are the identity at
inference: channels pass through. They own a seed generator, so they
cannot be traced (`keras_csgd.graph.trace`), and are called twice in a
block, which would freeze a traced stateless layer as shared.

`ReversibleEmbedding` and `PositionEmbedding` are embeddings: their
tables' last axis produces (or is a member of) the output channels.

This module imports keras_hub; the registry imports it the first time it
looks up a keras_hub layer.
"""

from __future__ import annotations

import importlib

from keras_hub.layers import PositionEmbedding, ReversibleEmbedding

from keras_csgd.layers.elementwise import PassThroughHandler
from keras_csgd.layers.embedding import ReversibleEmbeddingHandler
from keras_csgd.layers.registry import LayerHandler, register_layer

DROP_PATHS = {
    "keras_hub.src.models.mit.mit_layers": "DropPath",
    "keras_hub.src.models.swin_transformer.swin_transformer_layers":
        "DropPath",
    "keras_hub.src.models.mobilenetv5.mobilenetv5_layers": "DropPath",
    "keras_hub.src.models.dinov2.dinov2_layers": "DINOV2DropPath",
    "keras_hub.src.models.dinov3.dinov3_layers": "DINOV3DropPath",
}


class PositionEmbeddingHandler(LayerHandler):
    """`PositionEmbedding`: one learned vector per position, per channel.

    Its output is added to the token embeddings, whose group it joins at
    the addition; its table's last axis is a member of its input's layout.
    """

    def channels(self, ctx, call):
        lay = call.layouts[0]
        ctx.member(call, call.layer.position_embeddings, 1, lay)
        return [lay]


def _register_all():
    for module, name in DROP_PATHS.items():
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # another keras_hub version
            continue
        register_layer(cls, PassThroughHandler())
    register_layer(ReversibleEmbedding, ReversibleEmbeddingHandler())
    register_layer(PositionEmbedding, PositionEmbeddingHandler())


_register_all()
