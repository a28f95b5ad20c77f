"""Embeddings: token ids in, a new channel group out (the table's columns)."""

from __future__ import annotations

import keras

from keras_csgd import graph
from keras_csgd.layers.registry import LayerHandler, register_layer


class EmbeddingHandler(LayerHandler):
    """`keras.layers.Embedding`: its table's last axis produces channels.

    The ids are no channels (their last axis is the sequence): their
    layout is frozen. A lookup does no multiply-accumulates.
    """

    def channels(self, ctx, call):
        layer = call.layer
        ctx.freeze(call.layouts[0], f"token ids of `{call.name}`")
        return [ctx.produce(call, layer.embeddings, 1, layer.output_dim,
                            key="output_dim")]


class ReversibleEmbeddingHandler(EmbeddingHandler):
    """`ReversibleEmbedding` called forward (token ids to vectors)."""

    def channels(self, ctx, call):
        args, kwargs = graph.call_arguments(call)
        if kwargs.get("reverse") or (len(args) > 1 and args[1]):
            return ctx.unknown(call, "reversed embedding")
        (out,) = super().channels(ctx, call)
        reverse = getattr(call.layer, "reverse_embeddings", None)
        if not call.layer.tie_weights and reverse is not None:
            ctx.member(call, reverse, 0, out)
        return [out]



register_layer(keras.layers.Embedding, EmbeddingHandler())
if hasattr(keras.layers, "ReversibleEmbedding"):  # Keras 3.12 and later
    register_layer(keras.layers.ReversibleEmbedding,
                   ReversibleEmbeddingHandler())
