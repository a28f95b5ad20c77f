"""`keras.ops` operations that join, cut or index tensors: concatenation on
the last axis lays layouts end to end and a split of it cuts the channel
group into parts (rebuilt with the new part sizes); stacks, unstacks,
gathers and `x[key]` pass the axes they leave whole and freeze channels
they index."""

from __future__ import annotations

import keras
import numpy as np
from keras.src.ops import core
from keras.src.ops import numpy as knp

from keras_csgd import graph
from keras_csgd.graph.layout import Axes
from keras_csgd.layers.ops.common import _freeze, _rank
from keras_csgd.layers.registry import LayerHandler, register_layer
from keras_csgd.layers.structure import (
    MergeHandler,
    concatenate_axes,
    merge_axes,
)


class ConcatenateHandler(MergeHandler):
    """`ops.concatenate`: on the last axis, layouts laid end to end."""

    def channels(self, ctx, call):
        return [Axes(concatenate_axes(ctx, call, call.layer.axis))]


class StackHandler(MergeHandler):
    """`ops.stack`: the inputs merged, a new axis without channels."""

    def channels(self, ctx, call):
        rank = _rank(call.outputs[0])
        axis = call.layer.axis % rank
        if axis == rank - 1:
            return ctx.unknown(call, "stack along the last axis")
        out = merge_axes(ctx, call, skip=axis)
        return [Axes(out)]


class SplitHandler(LayerHandler):
    """`ops.split` on the last axis: the channel group splits in parts."""

    axes = "elementwise"

    def channels(self, ctx, call):
        rank = _rank(call.inputs[0])
        if call.layer.axis % rank != rank - 1:
            _freeze(ctx, [call.axes[0][call.layer.axis % rank]],
                    f"split of channels `{call.name}`")
            return [call.layouts[0]] * len(call.outputs)
        sizes = [graph.channels(t) for t in call.outputs]
        parts = ctx.split(call.layouts[0], sizes)
        if parts is None:
            return ctx.unknown(call, "split of merged channels")
        for i, part in enumerate(parts[:-1]):
            ctx.width(call, f"indices_or_sections/{i}", part)
        return parts

    def rebuild(self, config, widths):
        ends = np.cumsum([widths[f"indices_or_sections/{i}"]
                          for i in range(len(widths))])
        config["indices_or_sections"] = [int(e) for e in ends]
        return config


class UnstackHandler(LayerHandler):
    """`ops.unstack`: the tensors along an axis (channels there freeze)."""

    axes = "full"

    def channels(self, ctx, call):
        (x,), (axes,) = call.inputs, call.axes
        axis = call.layer.axis % _rank(x)
        if axis == _rank(x) - 1:
            return ctx.unknown(call, "unstack over channels")
        _freeze(ctx, [axes[axis]], f"unstacked `{call.name}`")
        out = Axes(a for i, a in enumerate(axes) if i != axis)
        return [out] * len(call.outputs)


class TakeHandler(LayerHandler):
    """`ops.take(x, indices, axis)` of positions: the other axes pass
    (a table of relative position biases gathered per pair of positions)."""

    axes = "full"

    def channels(self, ctx, call):
        args, _ = graph.call_arguments(call)
        x, indices = args[0], args[1]
        axis = call.layer.axis
        if axis is None or not any(x is t for t in call.inputs):
            return ctx.unknown(call, "gather of channels")
        axes = call.axes[[id(t) for t in call.inputs].index(id(x))]
        axis %= _rank(x)
        if axis == _rank(x) - 1:
            return ctx.unknown(call, "gather of channels")
        _freeze(ctx, [axes[axis]], f"gather of channels `{call.name}`")
        new = len(np.shape(indices)) if not isinstance(
            indices, keras.KerasTensor) else _rank(indices)
        return [Axes((*axes[:axis], *(None,) * new, *axes[axis + 1:]))]


def _index_axes(key, axes, shape):
    """The output axes of `x[key]`, and the input axes it indexes or
    slices (`None` when the key is not static)."""
    key = key if isinstance(key, tuple) else (key,)
    if any(not (k is None or k is Ellipsis or isinstance(k, (int, slice)))
           for k in key):
        return None, None
    used = sum(k is not None and k is not Ellipsis for k in key)
    rest = (slice(None),) * (len(axes) - used)
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = (*key[:at], *rest, *key[at + 1:])
    else:
        key = (*key, *rest)
    out, touched, i = [], [], 0
    for k in key:
        if k is None:
            out.append(None)
            continue
        if isinstance(k, int):
            touched.append(i)
        elif k.indices(shape[i] or 0) != (0, shape[i] or 0, 1):
            touched.append(i)
            out.append(None)
        else:
            out.append(axes[i])
        i += 1
    return out, touched


class GetItemHandler(LayerHandler):
    """`x[:, 0]`, `x[:, 1:]`, `x[..., :8]`: the axes it leaves whole pass
    (new axes hold no channels); channels it indexes or slices freeze
    (`slim` does not edit an index), on any axis, the last included (the
    half of a rotary embedding's head size leaves the heads whole)."""

    axes = "full"

    def channels(self, ctx, call):
        args, _ = graph.call_arguments(call)
        x, (axes,) = call.inputs[0], call.axes
        out, touched = _index_axes(args[1], axes, tuple(x.shape))
        if out is None or len(out) != max(_rank(call.outputs[0]), 1):
            return ctx.unknown(call, "indexing over channels")
        key = args[1] if isinstance(args[1], tuple) else (args[1],)
        if _rank(x) - 1 in touched and isinstance(key[-1], slice):
            reason = (f"slice of channels `{call.name}` (GetItem): its index "
                      f"is an argument `slim` does not edit")
        else:
            reason = f"indexed channels `{call.name}`"
        _freeze(ctx, [axes[i] for i in touched], reason)
        return [Axes(out)]


def _register_all():
    register_layer(knp.Concatenate, ConcatenateHandler())
    register_layer(knp.Stack, StackHandler())
    register_layer(knp.Split, SplitHandler())
    register_layer(core.Unstack, UnstackHandler())
    register_layer(knp.Take, TakeHandler())
    register_layer(knp.GetItem, GetItemHandler())


_register_all()
