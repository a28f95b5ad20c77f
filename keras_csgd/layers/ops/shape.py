"""`keras.ops` operations on a tensor's shape: transposes permute the axes,
a reshape regroups them (`Spaces.reshape`, rebuilt with the new sizes);
new axes, squeezes, rolls, tiles, broadcasts, padding and resizes pass the
axes they leave alone and freeze channels they squeeze, pad or roll."""

from __future__ import annotations

import numpy as np
from keras.src.ops import image
from keras.src.ops import numpy as knp

from keras_csgd.graph.layout import Axes
from keras_csgd.layers.ops.common import _axes, _freeze, _rank
from keras_csgd.layers.registry import LayerHandler, register_layer
from keras_csgd.layers.structure import ReshapeHandler


class LastAxisHandler(LayerHandler):
    """An operation that is channel-wise when it keeps the last axis
    (padding, image resizing); other axes of channels pass unless it
    changes their size.

    `keeps(op, rank)` says whether it does: the output's last axis is the
    input's, entry by entry.
    """

    axes = "elementwise"

    def __init__(self, keeps, what: str):
        self.keeps = keeps
        self.what = what

    def channels(self, ctx, call):
        if not self.keeps(call.layer, _rank(call.inputs[0])):
            return ctx.unknown(call, f"{self.what} over channels")
        return [call.layouts[0]] * len(call.outputs)


def _pad_keeps(op, rank):
    return len(op.pad_width) == rank and tuple(op.pad_width[-1]) == (0, 0)


def _resize_keeps(op, rank):
    return op.data_format == "channels_last"


class PermuteHandler(LayerHandler):
    """`transpose`, `moveaxis`, `swapaxes`: the axes' layouts, permuted.

    `order(op, rank)` gives the input axis of every output axis.
    """

    axes = "full"

    def __init__(self, order):
        self.order = order

    def channels(self, ctx, call):
        (axes,) = call.axes
        order = self.order(call.layer, len(axes))
        return [Axes(axes[i] for i in order)]


def _transpose_order(op, rank):
    if op.axes is None:  # reverses the axes
        return list(range(rank))[::-1]
    return [a % rank for a in op.axes]


def _moveaxis_order(op, rank):
    src = [a % rank for a in np.atleast_1d(op.source)]
    dst = [a % rank for a in np.atleast_1d(op.destination)]
    order = [i for i in range(rank) if i not in src]
    for d, s in sorted(zip(dst, src)):
        order.insert(d, s)
    return order


def _swapaxes_order(op, rank):
    order = list(range(rank))
    a, b = op.axis1 % rank, op.axis2 % rank
    order[a], order[b] = order[b], order[a]
    return order


class ExpandDimsHandler(LayerHandler):
    """`expand_dims`: new axes without channels."""

    axes = "full"

    def channels(self, ctx, call):
        (x,), (axes,) = call.inputs, call.axes
        rank = _rank(call.outputs[0])
        new = _axes(call.layer.axis, rank)
        rest = iter(axes if _rank(x) else ())
        return [Axes(None if i in new else next(rest) for i in range(rank))]


class SqueezeHandler(LayerHandler):
    """`squeeze`: the axes of one entry go (a group there freezes)."""

    axes = "full"

    def channels(self, ctx, call):
        (x,), (axes,) = call.inputs, call.axes
        rank = _rank(x)
        gone = ({i for i, d in enumerate(x.shape) if d == 1}
                if call.layer.axis is None else _axes(call.layer.axis, rank))
        if rank - 1 in gone:
            return ctx.unknown(call, "squeeze over channels")
        _freeze(ctx, [axes[i] for i in gone], f"squeezed `{call.name}`")
        return [Axes(a for i, a in enumerate(axes) if i not in gone)]


class RollHandler(LayerHandler):
    """`roll` of positions (a shifted window): channels it rolls freeze."""

    axes = "full"

    def channels(self, ctx, call):
        (x,), (axes,) = call.inputs, call.axes
        rolled = _axes(call.layer.axis, _rank(x))
        if _rank(x) - 1 in rolled:
            return ctx.unknown(call, "roll over channels")
        _freeze(ctx, [axes[i] for i in rolled], f"rolled `{call.name}`")
        return [Axes(None if i in rolled else a for i, a in enumerate(axes))]


class TileHandler(LayerHandler):
    """`ops.tile`: an axis of channels repeated `r` times holds `r` copies
    of its layout (`tile`); new axes hold no channels."""

    axes = "full"

    def channels(self, ctx, call):
        (axes,) = call.axes
        repeats = call.layer.repeats
        repeats = [repeats] if isinstance(repeats, int) else list(repeats)
        rank = max(len(repeats), len(axes))
        repeats = [1] * (rank - len(repeats)) + repeats
        axes = (None,) * (rank - len(axes)) + tuple(axes)
        return [Axes(a if a is None else ctx.tile(a, r)
                     for a, r in zip(axes, repeats))]


class BroadcastToHandler(LayerHandler):
    """`ops.broadcast_to`: axes of one entry broadcast, new axes without
    channels."""

    axes = "full"

    def channels(self, ctx, call):
        (x,), (axes,) = call.inputs, call.axes
        shape = tuple(call.outputs[0].shape)
        dims = tuple(x.shape)
        out = [None] * (len(shape) - len(axes))
        for d, lay, n in zip(dims, axes, shape[len(out):]):
            if lay is not None and d != n:
                ctx.freeze(lay, f"broadcast over channels `{call.name}`")
                lay = None
            out.append(lay)
        return [Axes(out)]


def _register_all():
    register_layer(knp.Pad, LastAxisHandler(_pad_keeps, "padding"))
    register_layer(image.Resize, LastAxisHandler(_resize_keeps, "resize"))
    for cls, order in ((knp.Transpose, _transpose_order),
                       (knp.Moveaxis, _moveaxis_order),
                       (knp.Swapaxes, _swapaxes_order)):
        register_layer(cls, PermuteHandler(order))
    register_layer(knp.ExpandDims, ExpandDimsHandler())
    register_layer(knp.Squeeze, SqueezeHandler())
    register_layer(knp.Roll, RollHandler())
    register_layer(knp.Reshape, ReshapeHandler("newshape"))
    register_layer(knp.Tile, TileHandler())
    register_layer(knp.BroadcastTo, BroadcastToHandler())


_register_all()
