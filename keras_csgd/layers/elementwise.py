"""Layers that act on each channel alone: activations, pooling, padding."""

from __future__ import annotations

import keras
import numpy as np

from keras_csgd.layers.registry import (
    LayerHandler,
    mixes_channels,
    register_layer,
)

L = keras.layers

PASS_THROUGH = (
    L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D,
    L.SpatialDropout2D, L.SpatialDropout3D, L.GaussianNoise,
    L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D,
    L.AveragePooling2D, L.AveragePooling3D, L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D, L.GlobalMaxPooling3D, L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D, L.GlobalAveragePooling3D, L.ZeroPadding1D,
    L.ZeroPadding2D, L.ZeroPadding3D, L.UpSampling1D, L.UpSampling2D,
    L.UpSampling3D, L.Cropping1D, L.Cropping2D, L.Cropping3D, L.Identity,
    L.Rescaling, L.Resizing,
)


class PassThroughHandler(LayerHandler):
    """A layer whose output channel `c` depends on input channel `c` only."""

    axes = "elementwise"

    def channels(self, ctx, call):
        layer = call.layer
        if getattr(layer, "data_format", None) == "channels_first":
            return ctx.unknown(call, "channels_first layer")
        if isinstance(layer, L.Rescaling) and np.ndim(layer.scale) > 0:
            ctx.freeze(call.layouts[0], f"per-channel Rescaling `{call.name}`")
        return [call.layouts[0]]


class ActivationHandler(LayerHandler):
    """`keras.layers.Activation`: passes channels unless it mixes them."""

    axes = "elementwise"

    def channels(self, ctx, call):
        if mixes_channels(call.layer.activation):
            return ctx.unknown(call, "channel-mixing activation")
        return list(call.layouts)


class PReLUHandler(LayerHandler):
    """PReLU: one slope per channel, unless shared over the channels."""

    def channels(self, ctx, call):
        layer, (lay,) = call.layer, call.layouts
        if layer.alpha.shape[-1] not in (1, None) or (
            call.inputs[0].shape[-1] == 1
        ):
            ctx.member(call, layer.alpha, -1, lay)
        return [lay]


for _cls in PASS_THROUGH:
    register_layer(_cls, PassThroughHandler())
register_layer(L.Activation, ActivationHandler())
register_layer(L.PReLU, PReLUHandler())
