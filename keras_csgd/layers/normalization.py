"""Normalization layers: BatchNormalization, LayerNormalization, ..."""

from __future__ import annotations

import keras

from keras_csgd.layers.registry import LayerHandler, register_layer

L = keras.layers


class BatchNormHandler(LayerHandler):
    """BatchNormalization over the channel axis: all variables per channel."""

    normalizes = True

    def channels(self, ctx, call):
        layer, (lay,) = call.layer, call.layouts
        if layer.axis not in (-1, len(call.inputs[0].shape) - 1):
            return ctx.unknown(call, "BatchNormalization not over the last "
                               "axis")
        for v in layer.weights:
            ctx.member(call, v, 0, lay)
        return [lay]


class LayerNormHandler(LayerHandler):
    """LayerNormalization: over the channels, its statistics mix them.

    Removing or merging channels changes the mean and variance every other
    channel is normalised with, so a group that passes a LayerNormalization
    over its channel axis is frozen. Exact pruning there would need the
    statistics of the removed channels folded into the layer (possible only
    for channels that are constant per example).
    """

    def channels(self, ctx, call):
        rank = len(call.inputs[0].shape)
        axis = call.layer.axis
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        if any(a % rank == rank - 1 for a in axes):
            ctx.freeze(call.layouts[0], "LayerNormalization over channels "
                       f"`{call.name}`")
        return [call.layouts[0]]


class NormalizationHandler(LayerHandler):
    """`keras.layers.Normalization`: fixed per-channel statistics."""

    def channels(self, ctx, call):
        ctx.freeze(call.layouts[0],
                   f"per-channel Normalization `{call.name}`")
        return [call.layouts[0]]


register_layer(L.BatchNormalization, BatchNormHandler())
register_layer(L.LayerNormalization, LayerNormHandler())
register_layer(L.Normalization, NormalizationHandler())
