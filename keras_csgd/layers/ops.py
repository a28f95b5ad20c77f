"""`keras.ops` calls: channel rules for the operations of a functional graph.

A `keras.ops` call on Keras tensors (`ops.split(x, 2, axis=-1)`, `x * 0.5`,
`x[:, 0]`, `ops.mean(x, axis=(1, 2))`) is a node of the graph, like a layer
call: in a functional model and in a traced composite layer. Each
operation class has a handler here, as layers do:

- element-wise operations of one tensor pass channels through;
- element-wise operations of several tensors (`+`, `*`, `where`, ...) are
  merges: full-width tensors share one channel space; a constant with a
  channel axis (a per-channel array) freezes it;
- reductions, indexing, padding, reshapes, transposes, squeezes and
  resizes pass channels through when they leave the last axis alone, and
  freeze them otherwise;
- concatenation on the last axis lays layouts end to end, and splitting or
  slicing it splits the channel group into parts (an index map), rebuilt
  with the new part sizes;
- anything else (`einsum`, `matmul`, softmax over channels, unregistered
  operations) freezes the channels it touches, with a reason.
"""

from __future__ import annotations

import numpy as np
from keras.src.ops import core, image, math, nn
from keras.src.ops import numpy as knp

from keras_csgd import graph
from keras_csgd.layers.registry import LayerHandler, register_layer
from keras_csgd.layers.structure import MergeHandler

UNARY = {
    nn: ("Celu", "Elu", "Gelu", "Glu", "HardShrink", "HardSigmoid",
         "HardSilu", "HardTanh", "LeakyRelu", "LogSigmoid", "Relu", "Relu6",
         "Selu", "Sigmoid", "Silu", "SoftShrink", "Softplus", "Softsign",
         "SparsePlus", "SparseSigmoid", "Squareplus", "TanhShrink",
         "Threshold"),
    knp: ("Abs", "Absolute", "Ceil", "Clip", "Copy", "Cos", "Exp", "Exp2",
          "Expm1", "Floor", "Log", "Log1p", "Negative", "Reciprocal",
          "Round", "Sign", "Sin", "Sqrt", "Square", "Tanh", "Trunc",
          "NanToNum", "LogicalNot", "Isnan", "Isfinite", "Isinf"),
    core: ("Cast", "StopGradient", "ConvertToTensor"),
    math: ("Erf", "Erfc", "Rsqrt"),
}
BINARY = (
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "DivideNoNan",
    "FloorDivide", "Maximum", "Minimum", "Power", "Mod", "Where", "Equal",
    "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "LogicalAnd",
    "LogicalOr", "Logaddexp",
)
REDUCTIONS = ("Mean", "Sum", "Max", "Min", "Amax", "Amin", "Prod", "Std",
              "Var", "Any", "All")


def _rank(t) -> int:
    return len(t.shape)


class UnaryHandler(LayerHandler):
    """An element-wise function of one tensor: channels pass through."""

    def channels(self, ctx, call):
        return [call.layouts[0]]


class BinaryHandler(MergeHandler):
    """`x + y`, `x * c`, `where(m, x, y)`: a merge of its tensor inputs.

    A constant argument with more than one entry on its last axis scales
    each channel differently, and is not narrowed by `slim`: the channels
    it meets freeze.
    """

    def channels(self, ctx, call):
        args, kwargs = graph.call_arguments(call)
        tensors = {id(t) for t in call.inputs}
        for value in [*args, *kwargs.values()]:
            if id(value) in tensors or value is None:
                continue
            shape = tuple(getattr(value, "shape", np.shape(value)))
            if shape and shape[-1] not in (1, None):
                for lay in call.layouts:
                    ctx.freeze(lay, f"per-channel constant in `{call.name}`")
        return super().channels(ctx, call)


def _axes(axis, rank: int) -> set[int]:
    """The axes an `axis` argument names (every axis for `None`)."""
    if axis is None:
        return set(range(rank))
    axes = axis if isinstance(axis, (list, tuple)) else (axis,)
    return {a % rank for a in axes}


class ReductionHandler(LayerHandler):
    """`ops.mean(x, axis=(1, 2))`: channels pass unless reduced."""

    def channels(self, ctx, call):
        rank = _rank(call.inputs[0])
        if rank - 1 in _axes(call.layer.axis, rank):
            return ctx.unknown(call, "reduction over channels")
        return [call.layouts[0]]


class LastAxisHandler(LayerHandler):
    """An operation that is channel-wise when it keeps the last axis.

    `keeps(op, rank)` says whether it does: the output's last axis is the
    input's, entry by entry.
    """

    def __init__(self, keeps, what: str):
        self.keeps = keeps
        self.what = what

    def channels(self, ctx, call):
        if not self.keeps(call.layer, _rank(call.inputs[0])):
            return ctx.unknown(call, f"{self.what} over channels")
        return [call.layouts[0]] * len(call.outputs)


def _transpose_keeps(op, rank):
    if op.axes is None:  # reverses the axes
        return rank == 1
    return op.axes[-1] % rank == rank - 1


def _pad_keeps(op, rank):
    return len(op.pad_width) == rank and tuple(op.pad_width[-1]) == (0, 0)


def _expand_keeps(op, rank):
    return all(a % (rank + 1) != rank for a in _axes(op.axis, rank + 1))


def _squeeze_keeps(op, rank):
    return op.axis is not None and rank - 1 not in _axes(op.axis, rank)


def _resize_keeps(op, rank):
    return op.data_format == "channels_last"


def _moveaxis_keeps(op, rank):
    src = [a % rank for a in np.atleast_1d(op.source)]
    dst = [a % rank for a in np.atleast_1d(op.destination)]
    return rank - 1 not in src and rank - 1 not in dst


class ReshapeHandler(LayerHandler):
    """`ops.reshape` that keeps the last axis: channels pass through."""

    def channels(self, ctx, call):
        src, dst = call.inputs[0].shape[1:], call.outputs[0].shape[1:]
        if not (src and dst and src[-1] == dst[-1] and None not in src[-1:]):
            return ctx.unknown(call, "reshape over channels")
        if call.layer.newshape[-1] != -1:
            ctx.width(call, "newshape", call.layouts[0])
        return [call.layouts[0]]

    def rebuild(self, config, widths):
        shape = config["newshape"]
        config["newshape"] = (*shape[:-1], widths["newshape"])
        return config


class ConcatenateHandler(MergeHandler):
    """`ops.concatenate`: on the last axis, layouts laid end to end."""

    def channels(self, ctx, call):
        rank = _rank(call.outputs[0])
        if call.layer.axis % rank == rank - 1:
            return [ctx.cat(call.layouts)]
        return super().channels(ctx, call)


class SplitHandler(LayerHandler):
    """`ops.split` on the last axis: the channel group splits in parts."""

    def channels(self, ctx, call):
        rank = _rank(call.inputs[0])
        if call.layer.axis % rank != rank - 1:
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


def _last_key(key, rank):
    """What an index `key` does to the last axis of a rank-`rank` tensor.

    Returns:
        A `slice` (the last axis stays last, sliced), or `None` (the last
        axis is indexed away, moved, or the key is not static).
    """
    key = key if isinstance(key, tuple) else (key,)
    if any(k is None for k in key) and key[-1] is None:
        return None
    used = [k for k in key if k is not None and k is not Ellipsis]
    if any(not isinstance(k, (int, slice)) for k in used):
        return None
    if Ellipsis in key or len(used) == rank:
        last = key[-1]
        return last if isinstance(last, slice) else None
    return slice(None) if len(used) < rank else None


class GetItemHandler(LayerHandler):
    """`x[:, 0]`, `x[:, 1:]`: channels pass when the last axis is whole."""

    def channels(self, ctx, call):
        args, _ = graph.call_arguments(call)
        x = call.inputs[0]
        last = _last_key(args[1], _rank(x))
        if last is None:
            return ctx.unknown(call, "indexing over channels")
        n = graph.channels(x)
        if last.indices(n) == (0, n, 1):
            return [call.layouts[0]]
        return ctx.unknown(call, "slice of channels",
                           "its index is an argument `slim` does not edit")


def _register_all():
    for module, names in UNARY.items():
        for name in names:
            if hasattr(module, name):
                register_layer(getattr(module, name), UnaryHandler())
    for name in BINARY:
        register_layer(getattr(knp, name), BinaryHandler())
    for name in REDUCTIONS:
        register_layer(getattr(knp, name), ReductionHandler())
    keeps = {
        knp.Transpose: (_transpose_keeps, "transpose"),
        knp.Pad: (_pad_keeps, "padding"),
        knp.ExpandDims: (_expand_keeps, "new axis"),
        knp.Squeeze: (_squeeze_keeps, "squeeze"),
        knp.Moveaxis: (_moveaxis_keeps, "moved axis"),
        image.Resize: (_resize_keeps, "resize"),
    }
    for cls, (rule, what) in keeps.items():
        register_layer(cls, LastAxisHandler(rule, what))
    register_layer(knp.Reshape, ReshapeHandler())
    register_layer(knp.Concatenate, ConcatenateHandler())
    register_layer(knp.Split, SplitHandler())
    register_layer(knp.GetItem, GetItemHandler())


_register_all()
