"""`keras.ops` operations over an axis: reductions, softmax and selections
by value. The axes they leave alone pass; channels they reduce, normalise
over or select by value freeze."""

from __future__ import annotations

import keras
from keras.src.ops import math as kmath
from keras.src.ops import nn
from keras.src.ops import numpy as knp

from keras_csgd.graph.layout import Axes
from keras_csgd.layers.ops.common import _axes, _freeze, _rank
from keras_csgd.layers.registry import LayerHandler, register_layer

REDUCTIONS = ("Mean", "Sum", "Max", "Min", "Amax", "Amin", "Prod", "Std",
              "Var", "Any", "All")
# Selections by value: no multiply-accumulates, and no channel rule.
SELECTIONS = {kmath: ("TopK",),
              knp: ("Argmax", "Argmin", "Argsort", "Sort", "TakeAlongAxis")}


class SelectionHandler(LayerHandler):
    """`top_k`, `sort`, `argmax`: entries picked by value. They compute no
    multiply-accumulates; the channels they see freeze."""

    def channels(self, ctx, call):
        return ctx.unknown(call, "selection by value")


class ReductionHandler(LayerHandler):
    """`ops.mean(x, axis=(1, 2))`: the axes it keeps pass; channels it
    reduces freeze."""

    axes = "full"

    def channels(self, ctx, call):
        (x,), (axes,) = call.inputs, call.axes
        rank, op = _rank(x), call.layer
        reduced = _axes(op.axis, rank)
        if rank - 1 in reduced:
            return ctx.unknown(call, "reduction over channels")
        _freeze(ctx, [axes[i] for i in reduced],
                f"reduction over channels `{call.name}`")
        if getattr(op, "keepdims", False):
            out = [None if i in reduced else a for i, a in enumerate(axes)]
        else:
            out = [a for i, a in enumerate(axes) if i not in reduced]
        return [Axes(out or [call.layouts[0]])]


class SoftmaxHandler(LayerHandler):
    """Softmax (`ops.softmax`, `keras.layers.Softmax`): it mixes the axis
    it normalises over (channels there freeze); the others pass."""

    axes = "full"

    def channels(self, ctx, call):
        (x,), (axes,) = call.inputs[:1], call.axes[:1]
        over = _axes(call.layer.axis, max(_rank(x), 1))
        if len(call.inputs) > 1:  # a mask
            _freeze(ctx, [lay for a in call.axes[1:] for lay in a],
                    f"mask of `{call.name}`")
        _freeze(ctx, [axes[i] for i in over], f"channel-mixing softmax "
                f"`{call.name}`")
        return [Axes(None if i in over else a for i, a in enumerate(axes))]


def _register_all():
    for name in REDUCTIONS:
        register_layer(getattr(knp, name), ReductionHandler())
    for module, names in SELECTIONS.items():
        for name in names:
            register_layer(getattr(module, name), SelectionHandler())
    register_layer(nn.Softmax, SoftmaxHandler())
    register_layer(keras.layers.Softmax, SoftmaxHandler())
    register_layer(nn.LogSoftmax, SoftmaxHandler())


_register_all()
