"""`keras.ops` calls: channel rules for the operations of a functional graph.

A `keras.ops` call on Keras tensors (`ops.split(x, 2, axis=-1)`, `x * 0.5`,
`x[:, 0]`, `ops.mean(x, axis=(1, 2))`) is a node of the graph, like a layer
call: in a functional model and in a traced composite layer. Each
operation class has a handler here, as layers do. Channels are followed on
every axis (`graph.Axes`), not only the last: an attention reshapes its
projections to heads and head size and moves the heads to their own axis.

- element-wise operations of one tensor pass every axis through;
- element-wise operations of several tensors (`+`, `*`, `where`, ...) are
  merges, axis by axis (`structure.merge_axes`): full-size tensors share
  one channel space; a constant with more than one entry on an axis of
  channels (a per-channel array) freezes it;
- reductions, indexing, padding, squeezes, new axes, rolls, tiles and
  resizes pass the axes they leave alone, and freeze channels they reduce,
  index, pad or roll;
- transposes permute the axes; a reshape regroups them (`Spaces.reshape`:
  an axis of channels cut into several is a product of factors of its
  group, and axes merged into one make the product of their layouts), and
  is rebuilt with the new sizes;
- `matmul` and `einsum`: an axis in both operands and the output (batch)
  or in one operand and the output (free) keeps its layout, and one
  contracted between the operands joins their groups; such a group is
  prune-only (its channels may be removed from both operands, but merging
  two would add their products, which a slim model does not compute).
  Softmax passes every axis but the one it normalises over;
  `dot_product_attention` is the two contractions it computes, with heads
  as one group;
- concatenation on the last axis lays layouts end to end, and splitting it
  splits the channel group into parts (an index map), rebuilt with the new
  part sizes;
- selections by value (`top_k`, `sort`, `argmax`) freeze the channels they
  see and cost nothing; anything else (unregistered operations, `map` of a
  Python function) freezes the channels it touches, with a reason, and its
  MACs are not counted (`count_macs` says so).
"""

from __future__ import annotations

import string

import keras
import numpy as np
from keras.src.ops import core, image, nn
from keras.src.ops import math as kmath
from keras.src.ops import numpy as knp

from keras_csgd import graph
from keras_csgd.graph.layout import Axes
from keras_csgd.layers.registry import LayerHandler, register_layer
from keras_csgd.layers.structure import (
    MergeHandler,
    ReshapeHandler,
    concatenate_axes,
    merge_axes,
)

UNARY = {
    nn: ("Celu", "Elu", "Gelu", "Glu", "HardShrink", "HardSigmoid",
         "HardSilu", "HardTanh", "LeakyRelu", "LogSigmoid", "Relu", "Relu6",
         "Selu", "Sigmoid", "Silu", "SoftShrink", "Softplus", "Softsign",
         "SparsePlus", "SparseSigmoid", "Squareplus", "TanhShrink",
         "Threshold"),
    knp: ("Abs", "Absolute", "Ceil", "Clip", "Copy", "Cos", "Exp", "Exp2",
          "Expm1", "Floor", "Log", "Log1p", "Negative", "Reciprocal",
          "Round", "Sign", "Sin", "Sqrt", "Square", "Tanh", "Trunc",
          "NanToNum", "LogicalNot", "Isnan", "Isfinite", "Isinf",
          "ZerosLike", "OnesLike", "FullLike"),
    core: ("Cast", "StopGradient", "ConvertToTensor"),
    kmath: ("Erf", "Erfc", "Rsqrt"),
}
BINARY = (
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "DivideNoNan",
    "FloorDivide", "Maximum", "Minimum", "Power", "Mod", "Where", "Equal",
    "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "LogicalAnd",
    "LogicalOr", "Logaddexp",
)
REDUCTIONS = ("Mean", "Sum", "Max", "Min", "Amax", "Amin", "Prod", "Std",
              "Var", "Any", "All")
# Selections by value: no multiply-accumulates, and no channel rule.
SELECTIONS = {kmath: ("TopK",),
              knp: ("Argmax", "Argmin", "Argsort", "Sort", "TakeAlongAxis")}
CONTRACTED = ("contracted between two computed tensors by `{}` (merging "
              "its channels would add their products)")


def _rank(t) -> int:
    return len(t.shape)


def _axes(axis, rank: int) -> set[int]:
    """The axes an `axis` argument names (every axis for `None`)."""
    if axis is None:
        return set(range(rank))
    axes = axis if isinstance(axis, (list, tuple)) else (axis,)
    return {a % rank for a in axes}


def _freeze(ctx, lays, reason: str) -> None:
    for lay in lays:
        if lay is not None:
            ctx.freeze(lay, reason)


class UnaryHandler(LayerHandler):
    """An element-wise function of one tensor: every axis passes."""

    axes = "elementwise"

    def channels(self, ctx, call):
        return [call.layouts[0]]


class BinaryHandler(MergeHandler):
    """`x + y`, `x * c`, `where(m, x, y)`: a merge of its tensor inputs.

    A constant argument with more than one entry on an axis of channels
    scales each channel differently, and is not narrowed by `slim`: the
    channels it meets freeze.
    """

    def channels(self, ctx, call):
        (out,) = super().channels(ctx, call)
        args, kwargs = graph.call_arguments(call)
        tensors = {id(t) for t in call.inputs}
        for value in [*args, *kwargs.values()]:
            if id(value) in tensors or value is None:
                continue
            shape = tuple(getattr(value, "shape", np.shape(value)))
            for j in range(1, min(len(shape), len(out)) + 1):
                if shape[-j] not in (1, None):
                    _freeze(ctx, [out[-j]], f"per-channel constant in "
                            f"`{call.name}`")
        return [out]


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


class MatmulHandler(LayerHandler):
    """`ops.matmul` (and `@`): batch axes merged, free axes passed, the
    contracted axis's groups joined and prune-only (`CONTRACTED`)."""

    axes = "full"

    def channels(self, ctx, call):
        args, _ = graph.call_arguments(call)
        a, b = (_operand(call, v) for v in args[:2])
        if min(len(a.shape), len(b.shape)) < 2:
            return ctx.unknown(call, "matmul of vectors")
        spec_a = "".join(string.ascii_letters[i]
                         for i in range(len(a.shape) - 2)) + "xy"
        batch = spec_a[:-2]
        spec_b = batch[len(batch) - (len(b.shape) - 2):] + "yz"
        out = batch[:max(len(a.shape), len(b.shape)) - 2] + "xz"
        if len(b.shape) > len(a.shape):
            return ctx.unknown(call, "matmul broadcast of the first operand")
        return contract(ctx, call, [(spec_a, a), (spec_b, b)], out)


class EinsumHandler(LayerHandler):
    """`ops.einsum`: `contract` by its equation."""

    axes = "full"

    def channels(self, ctx, call):
        args, _ = graph.call_arguments(call)
        equation = call.layer.subscripts.replace(" ", "")
        if "->" not in equation:
            return ctx.unknown(call, "einsum without an output")
        given, out = equation.split("->")
        operands = [_operand(call, v) for v in args]
        specs = given.split(",")
        if len(specs) != len(operands) or "." in equation.replace(
                "...", ""):
            return ctx.unknown(call, "einsum equation")
        specs = [_expand(s, len(o.shape)) for s, o in zip(specs, operands)]
        if "..." in out:
            most = max(len(o.shape) - len(s.replace("...", ""))
                       for s, o in zip(given.split(","), operands))
            out = _expand(out, len(out) - 3 + most)
        return contract(ctx, call, list(zip(specs, operands)), out)


class DotProductAttentionHandler(LayerHandler):
    """`ops.dot_product_attention(query, key, value)` on `(batch,
    positions, heads, head size)` tensors: two contractions, the scores
    (`btnh,bsnh->bnts`) and the weighted sum of the values
    (`bnts,bsnh->btnh`), with a softmax over the key positions between
    them. The heads are one group across the three tensors, the query and
    key head size is contracted (prune-only). The value head size freezes:
    Keras gives the output the query's shape, so a narrower value would
    leave the slim model's graph with a wrong one. A bias or a mask
    freezes what it meets; grouped heads (fewer key than query heads) and
    other ranks are not read (uncounted)."""

    axes = "full"

    def channels(self, ctx, call):
        args, kwargs = graph.call_arguments(call)
        q, k, v = (_operand(call, t) for t in args[:3])
        if {len(o.shape) for o in (q, k, v)} != {4}:
            return ctx.uncounted_call(call, "attention not on 4-D tensors")
        if not q.shape[2] == k.shape[2] == v.shape[2]:
            return ctx.uncounted_call(call, "grouped-query attention")
        for extra in (*args[3:], *kwargs.values()):
            if isinstance(extra, keras.KerasTensor):
                _freeze(ctx, _operand(call, extra).axes or (),
                        f"bias or mask of `{call.name}`")
        if v.axes is not None:  # Keras gives the output the query's shape
            _freeze(ctx, [v.axes[3]], f"value head size of `{call.name}` "
                    "(Keras infers the output's from the query's)")
        (scores,) = contract(ctx, call, [("btnh", q), ("bsnh", k)], "bnts")
        _freeze(ctx, [scores[3]], f"channel-mixing softmax `{call.name}`")
        weights = _Operand((q.shape[0], q.shape[2], q.shape[1], k.shape[1]),
                           Axes((*scores[:3], None)))
        return contract(ctx, call, [("bnts", weights), ("bsnh", v)], "btnh")


_ELLIPSIS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _expand(spec: str, rank: int) -> str:
    """An einsum spec with its `...` spelled out (as many axes as
    `rank` leaves)."""
    if "..." not in spec:
        return spec
    n = rank - len(spec) + 3
    return spec.replace("...", _ELLIPSIS[len(_ELLIPSIS) - n:])


class _Operand:
    """An operand of a contraction: its shape and axes (`None` for a
    constant)."""

    def __init__(self, shape, axes):
        self.shape, self.axes = shape, axes


def _operand(call, value) -> _Operand:
    for t, axes in zip(call.inputs, call.axes):
        if t is value:
            return _Operand(tuple(t.shape), axes)
    shape = tuple(np.shape(value))
    return _Operand(shape, None)


def contract(ctx, call, operands, out: str) -> list:
    """Channels and MACs of a contraction of `operands` into `out`.

    Args:
        ctx: the `graph.Context`.
        call: the call.
        operands: `(spec, _Operand)`, one index letter per axis.
        out: the output spec.

    Each index's axes (in the operands it appears in, where not broadcast
    from one entry) are one channel space. An index summed over (not in
    `out`) that holds channels in two computed tensors makes them
    prune-only (`CONTRACTED`); in a constant (a kernel `slim` does not
    narrow) or in one tensor alone (a sum over channels), it freezes them.
    The others keep their layout in the output. Two operands cost the
    product of every index's size.
    """
    size = {}
    for spec, op in operands:
        for letter, dim in zip(spec, op.shape):
            seen = size.get(letter, 1)
            size[letter] = None if None in (seen, dim) else max(seen, dim)
    layout, constant = {}, set()
    for spec, op in operands:
        for i, (letter, dim) in enumerate(zip(spec, op.shape)):
            lay = None if op.axes is None else op.axes[i]
            if dim == 1 and size[letter] != 1:
                _freeze(ctx, [lay], f"broadcast over channels `{call.name}`")
            elif op.axes is None:
                constant.add(letter)
            else:
                layout.setdefault(letter, []).append(lay)
    result = {letter: _join(ctx, call, letter, lays, out,
                            letter in constant)
              for letter, lays in layout.items()}
    axes = Axes(result.get(letter) for letter in out)
    kept = [lay for lay in {id(v): v for v in result.values()
                            if v is not None}.values()]
    if len(operands) == 2:
        ctx.cost(call, ctx.per_example(size.values(), call.inputs), *kept)
    return [axes]


def _join(ctx, call, letter, lays, out, constant: bool):
    """The one layout of index `letter` (or `None`), frozen where summed."""
    held = [lay for lay in lays if lay is not None]
    if not held:
        return None
    if len(held) < len(lays) or constant:
        _freeze(ctx, held, f"channels meet positions or a constant in "
                f"`{call.name}`")
        return None
    for other in held[1:]:
        if not ctx.unify(held[0], other):
            _freeze(ctx, held, f"mismatched channel structures in "
                    f"`{call.name}`")
            return None
    if letter in out:
        return held[0]
    if len(held) > 1:
        ctx.prune_only(held[0], CONTRACTED.format(call.name))
    else:
        ctx.freeze(held[0], f"summed over by `{call.name}`")
    return held[0]


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
    for module, names in UNARY.items():
        for name in names:
            if hasattr(module, name):
                register_layer(getattr(module, name), UnaryHandler())
    for name in BINARY:
        register_layer(getattr(knp, name), BinaryHandler())
    for name in REDUCTIONS:
        register_layer(getattr(knp, name), ReductionHandler())
    for module, names in SELECTIONS.items():
        for name in names:
            register_layer(getattr(module, name), SelectionHandler())
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
    register_layer(knp.Concatenate, ConcatenateHandler())
    register_layer(knp.Stack, StackHandler())
    register_layer(knp.Split, SplitHandler())
    register_layer(core.Unstack, UnstackHandler())
    register_layer(knp.Take, TakeHandler())
    register_layer(knp.Tile, TileHandler())
    register_layer(knp.BroadcastTo, BroadcastToHandler())
    register_layer(knp.GetItem, GetItemHandler())
    register_layer(knp.Matmul, MatmulHandler())
    register_layer(knp.Einsum, EinsumHandler())
    register_layer(nn.DotProductAttention, DotProductAttentionHandler())
    register_layer(nn.Softmax, SoftmaxHandler())
    register_layer(keras.layers.Softmax, SoftmaxHandler())
    register_layer(nn.LogSoftmax, SoftmaxHandler())


_register_all()
