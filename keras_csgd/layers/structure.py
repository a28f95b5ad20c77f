"""Layers that move channels: Flatten, Reshape, Concatenate and merges."""

from __future__ import annotations

import math

import keras

from keras_csgd.layers.registry import LayerHandler, register_layer

L = keras.layers
MERGE = (L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)


def _channels(t) -> int:
    dim = t.shape[-1] if len(t.shape) else 1
    return int(dim) if dim is not None else 1


class FlattenHandler(LayerHandler):
    """Flatten: the channel block is tiled once per position."""

    def channels(self, ctx, call):
        shape = call.inputs[0].shape[1:]
        if any(d is None for d in shape):
            return ctx.unknown(call, "dynamic-shape Flatten")
        positions = math.prod(shape[:-1]) if len(shape) > 1 else 1
        return [ctx.tile(call.layouts[0], positions)]


class ReshapeHandler(LayerHandler):
    """Reshape that keeps the last axis: channels pass through."""

    def channels(self, ctx, call):
        src, dst = call.inputs[0].shape[1:], call.outputs[0].shape[1:]
        keeps_channels = (
            len(src) > 0 and len(dst) > 0 and src[-1] == dst[-1]
            and None not in src and None not in dst
            and math.prod(src[:-1]) == math.prod(dst[:-1])
        )
        if not keeps_channels:
            return ctx.unknown(call, "unmappable Reshape")
        ctx.width(call, "target_shape", call.layouts[0])
        return [call.layouts[0]]

    def rebuild(self, config, widths):
        if "target_shape" in widths:
            shape = config["target_shape"]
            config["target_shape"] = (*shape[:-1], widths["target_shape"])
        return config


class MergeHandler(LayerHandler):
    """Add, Multiply, ...: all full-width inputs are one channel space."""

    def channels(self, ctx, call):
        ins, lays = call.inputs, call.layouts
        full = [i for i, t in enumerate(ins) if _channels(t) != 1]
        keep = [lays[i] for i in full] or [lays[0]]
        if full:
            for i in range(len(ins)):
                if i not in full:
                    ctx.freeze(lays[i],
                               f"broadcast over channels in `{call.name}`")
        for other in keep[1:]:
            if not ctx.unify(keep[0], other):
                for lay in lays:
                    ctx.freeze(lay, "mismatched channel structures in "
                               f"`{call.name}`")
        return [keep[0]]


class AddHandler(MergeHandler):
    """Add: a merge that sums (a residual block's end)."""

    sums = True


class ConcatenateHandler(MergeHandler):
    """Concatenate: on the channel axis, the layouts are laid end to end."""

    def channels(self, ctx, call):
        rank = len(call.outputs[0].shape)
        if call.layer.axis % rank == rank - 1:
            return [ctx.cat(call.layouts)]
        return super().channels(ctx, call)


register_layer(L.Flatten, FlattenHandler())
register_layer(L.Reshape, ReshapeHandler())
register_layer(L.Concatenate, ConcatenateHandler())
register_layer(L.Add, AddHandler())
for _cls in MERGE:
    register_layer(_cls, MergeHandler())
