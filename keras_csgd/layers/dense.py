"""Dense: consumes its input's last axis, produces `units` channels."""

from __future__ import annotations

import keras

from keras_csgd.layers.registry import LayerHandler, register_layer


class DenseHandler(LayerHandler):
    """`keras.layers.Dense` (on any rank: the last axis is contracted)."""

    axes = "elementwise"

    patches = "dense"

    def channels(self, ctx, call):
        layer, (lay,) = call.layer, call.layouts
        ctx.consumer(call, layer.kernel, 0, lay)
        out = ctx.produce(call, layer.kernel, 1, layer.units, key="units")
        if layer.use_bias:
            ctx.member(call, layer.bias, 0, out)
        rows = ctx.positions(call.outputs[0])
        ctx.cost(call, rows and rows * layer.kernel.shape[0] * layer.units,
                 lay, out)
        return [out]

    def fold(self, layer):
        return "kernel"


register_layer(keras.layers.Dense, DenseHandler())
