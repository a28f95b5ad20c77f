"""Convolutions: Conv1D/2D/3D, their transposes, separable and depthwise."""

from __future__ import annotations

import math

import keras

from keras_csgd.layers.registry import LayerHandler, register_layer, times

L = keras.layers


class _ConvFamily(LayerHandler):
    """Refuses `channels_first` layers, then `conv_channels`."""

    def channels(self, ctx, call):
        layer = call.layer
        if getattr(layer, "data_format", None) == "channels_first":
            return ctx.uncounted_call(call, "channels_first layer")
        return self.conv_channels(ctx, call, layer, call.layouts[0])


class ConvHandler(_ConvFamily):
    """Conv1D/2D/3D and Conv*Transpose: consume input, produce `filters`."""

    def __init__(self, transpose: bool = False, patches: str | None = None):
        self.transpose = transpose
        self.patches = patches

    def conv_channels(self, ctx, call, layer, lay):
        groups = getattr(layer, "groups", 1)
        if groups == 1:
            return self.dense_channels(ctx, call, layer, lay)
        if groups == layer.filters == call.inputs[0].shape[-1]:
            return self.depthwise_channels(ctx, call, layer, lay)
        return ctx.unknown(
            call, "grouped convolution",
            f"groups={groups} with {layer.filters} filters (only "
            "groups == channels, a depthwise convolution, is handled)",
        )

    def depthwise_channels(self, ctx, call, layer, lay):
        """`groups == filters == channels`: one filter per input channel."""
        rank = len(layer.kernel.shape)
        ctx.member(call, layer.kernel, rank - 1, lay)
        if layer.use_bias:
            ctx.member(call, layer.bias, 0, lay)
        ctx.width(call, "filters", lay)
        ctx.width(call, "groups", lay)
        taps = math.prod(layer.kernel.shape[:-1])
        ctx.cost(call, times(ctx.positions(call.outputs[0]), taps,
                              layer.filters), lay)
        return [lay]

    def dense_channels(self, ctx, call, layer, lay):
        """Every filter reads every input channel."""
        rank = len(layer.kernel.shape)
        taps = math.prod(layer.kernel.shape[:-2])
        if self.transpose:
            in_axis, out_axis = rank - 1, rank - 2
            macs = times(ctx.positions(call.inputs[0]), taps)
        else:
            in_axis, out_axis = rank - 2, rank - 1
            macs = times(ctx.positions(call.outputs[0]), taps)
        ctx.consumer(call, layer.kernel, in_axis, lay)
        out = ctx.produce(call, layer.kernel, out_axis, layer.filters,
                          key="filters")
        if layer.use_bias:
            ctx.member(call, layer.bias, 0, out)
        ctx.cost(call, times(macs, call.inputs[0].shape[-1], layer.filters),
                 lay, out)
        return [out]

    def fold(self, layer):
        return None if self.transpose else "kernel"


class SeparableHandler(_ConvFamily):
    """SeparableConv1D/2D: depthwise members, pointwise consumer/producer."""

    def conv_channels(self, ctx, call, layer, lay):
        m = layer.depth_multiplier
        rank = len(layer.depthwise_kernel.shape)
        ctx.member(call, layer.depthwise_kernel, rank - 2, lay)
        ctx.consumer(call, layer.pointwise_kernel, rank - 2, ctx.rep(lay, m))
        out = ctx.produce(call, layer.pointwise_kernel, rank - 1,
                          layer.filters, key="filters")
        if layer.use_bias:
            ctx.member(call, layer.bias, 0, out)
        taps = math.prod(layer.depthwise_kernel.shape[:-2])
        cin = call.inputs[0].shape[-1]
        n = ctx.positions(call.outputs[0])
        ctx.cost(call, times(n, cin, m, taps), lay)
        ctx.cost(call, times(n, cin, m, layer.filters), lay, out)
        return [out]

    def fold(self, layer):
        return "pointwise_kernel"


class DepthwiseHandler(_ConvFamily):
    """DepthwiseConv1D/2D: per-channel kernels, outputs `rep` by multiplier."""

    def conv_channels(self, ctx, call, layer, lay):
        rank = len(layer.kernel.shape)
        out = ctx.rep(lay, layer.depth_multiplier)
        ctx.member(call, layer.kernel, rank - 2, lay)
        if layer.use_bias:
            ctx.member(call, layer.bias, 0, out)
        taps = math.prod(layer.kernel.shape[:-2])
        ctx.cost(call, times(ctx.positions(call.outputs[0]), taps,
                              *layer.kernel.shape[-2:]), lay)
        return [out]

    def fold(self, layer):
        return "kernel"


for _cls in (L.Conv1D, L.Conv2D):
    register_layer(_cls, ConvHandler(patches="conv"))
register_layer(L.Conv3D, ConvHandler())
for _cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register_layer(_cls, ConvHandler(transpose=True))
for _cls in (L.SeparableConv1D, L.SeparableConv2D):
    register_layer(_cls, SeparableHandler())
for _cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
    register_layer(_cls, DepthwiseHandler())
