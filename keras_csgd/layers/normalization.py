"""Normalization layers: BatchNormalization, LayerNormalization, RMS norms,
per-channel scales."""

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


class ChannelNormHandler(LayerHandler):
    """A normalization over the channels with per-channel weights (RMS
    norms): the weights are members, and, like `LayerNormHandler`, the
    group is frozen (its statistics mix the channels)."""

    def __init__(self, what: str = "RMS normalization"):
        self.what = what

    def channels(self, ctx, call):
        (lay,) = call.layouts
        if getattr(call.layer, "data_format", None) == "channels_first":
            return ctx.unknown(call, "channels_first layer")
        for v in call.layer.weights:
            if len(v.shape) == 1:
                ctx.member(call, v, 0, lay)
        ctx.freeze(lay, f"{self.what} over channels `{call.name}`")
        return [lay]


class ScaleHandler(LayerHandler):
    """`x * scale`, one learned scale per channel (LayerScale).

    Args:
        variable: the attribute holding the scale.
        key: the config key of the width. Defaults to `None` (none).
    """

    def __init__(self, variable: str, key: str | None = None):
        self.variable = variable
        self.key = key

    def channels(self, ctx, call):
        (lay,) = call.layouts
        ctx.member(call, getattr(call.layer, self.variable), -1, lay)
        if self.key is not None:
            ctx.width(call, self.key, lay)
        return [lay]


register_layer(L.BatchNormalization, BatchNormHandler())
register_layer(L.LayerNormalization, LayerNormHandler())
register_layer(L.Normalization, NormalizationHandler())
