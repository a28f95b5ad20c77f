"""Layers that move channels: Flatten, Reshape, Concatenate and merges."""

from __future__ import annotations

import math
from fractions import Fraction

import keras

from keras_csgd.graph.layout import Axes
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


def merge_axes(ctx, call, skip: int | None = None) -> list:
    """The output axes of an element-wise call of several tensors.

    Axes are aligned from the last (broadcasting); on each, the inputs
    that are not broadcast along it (size 1) are one channel space. An
    input broadcast over channels freezes them, and so does an axis of
    channels that meets one of positions (no channels). On the last axis,
    the inputs of one entry are the broadcast ones, and if all inputs have
    one entry, the first input's layout is kept.

    Args:
        ctx: the `graph.Context`.
        call: the call; its tensor inputs are merged.
        skip: an output axis left out (`None` in the result), the axis a
            concatenation lays its inputs along.

    Returns:
        One layout (or `None`) per output axis.
    """
    shape = tuple(call.outputs[0].shape) or (1,)
    rank = len(shape)
    out = [None] * rank
    where = f"`{call.name}`"
    for j in range(1, rank + 1):
        if skip is not None and rank - j == skip % rank:
            continue
        full, broadcast = [], []
        for t, axes in zip(call.inputs, call.axes):
            dims = tuple(t.shape) or (1,)
            if j > len(axes):
                continue
            lay = axes[-j]
            if j == 1:
                (full if _channels(t) != 1 else broadcast).append(lay)
            else:
                (broadcast if dims[-j] == 1 and shape[-j] != 1
                 else full).append(lay)
        for lay in broadcast if full else ():
            if lay is not None:
                ctx.freeze(lay, f"broadcast over channels in {where}")
        keep = full or broadcast[:1]
        if not keep or all(lay is None for lay in keep):
            continue
        if any(lay is None for lay in keep):
            for lay in keep:
                if lay is not None:
                    ctx.freeze(lay, f"channels meet positions in {where}")
            continue
        for other in keep[1:]:
            if not ctx.unify(keep[0], other):
                for lay in keep:
                    ctx.freeze(lay, "mismatched channel structures in "
                               f"{where}")
        out[-j] = keep[0]
    return out


class MergeHandler(LayerHandler):
    """Add, Multiply, ...: all full-width inputs are one channel space
    (on every axis, `merge_axes`)."""

    axes = "full"

    def channels(self, ctx, call):
        return [Axes(merge_axes(ctx, call))]


def reshape_axes(ctx, call):
    """The output `Axes` of a reshape of the call's first input, or `None`.

    The axes are matched from the last: the longest run of static axes
    with a common size product on both sides is regrouped
    (`Spaces.reshape`); the axes before it (the batch, and what is merged
    with it, as windows of an image) must hold no channels, and make the
    output's dynamic axis hold the matching number of examples per batch
    entry.
    """
    (x,), (y,), (axes,) = call.inputs, call.outputs, call.axes
    src, dst = tuple(x.shape) or (1,), tuple(y.shape) or (1,)
    a, b = _tail(src), _tail(dst)
    common = _suffixes(src[a:]).keys() & _suffixes(dst[b:]).keys()
    size = max(common)
    a, b = _suffixes(src[a:])[size] + a, _suffixes(dst[b:])[size] + b
    k = ctx.multiple.get(id(x), 1)
    if None in dst[:b]:  # whether or not channels pass (heads into batch)
        same = src[:a].count(None) == dst[:b].count(None) == 1
        ctx.multiple[id(y)] = k * Fraction(
            math.prod(d for d in src[:a] if d is not None),
            math.prod(d for d in dst[:b] if d is not None),
        ) if same and k is not None else None
    if any(lay is not None for lay in axes[:a]):
        return None
    out = ctx.reshape(axes[a:], src[a:], dst[b:]) if size > 1 else [
        None] * (len(dst) - b)
    if out is None:
        return None
    return Axes((None,) * b + tuple(out))


def _tail(shape) -> int:
    """Where the static axes at the end of `shape` start."""
    i = len(shape)
    while i > 0 and shape[i - 1] is not None:
        i -= 1
    return i


def _suffixes(shape) -> dict[int, int]:
    """`{product of shape[i:]: the smallest such i}` over static `shape`."""
    out, size = {1: len(shape)}, 1
    for i in reversed(range(len(shape))):
        size *= shape[i]
        out[size] = i
    return out


class ReshapeHandler(LayerHandler):
    """`keras.layers.Reshape`, `ops.reshape`: axes regrouped
    (`reshape_axes`); every axis of channels in the new shape is rebuilt
    with its new size.

    Args:
        key: the config key of the new shape.
        offset: the index of the output's axis 0 in that shape (1 where
            the shape leaves out the batch axis).
    """

    axes = "full"

    def __init__(self, key: str, offset: int = 0):
        self.key = key
        self.offset = offset

    def channels(self, ctx, call):
        out = reshape_axes(ctx, call)
        if out is None:
            return ctx.unknown(call, "reshape over channels")
        for i, lay in enumerate(out):
            if lay is not None and i >= self.offset:
                ctx.width(call, f"{self.key}/{i - self.offset}", lay)
        return [out]

    def rebuild(self, config, widths):
        shape = list(config[self.key])
        for key, width in widths.items():
            shape[int(key.rsplit("/", 1)[1])] = width
        config[self.key] = tuple(shape)
        return config


class AddHandler(MergeHandler):
    """Add: a merge that sums (a residual block's end)."""

    sums = True


def concatenate_axes(ctx, call, axis: int) -> list:
    """`merge_axes` but along `axis`, whose inputs are laid end to end:
    on the last axis, their layouts (`cat`); on another, positions (an
    axis of channels there freezes)."""
    rank = len(call.outputs[0].shape)
    axis %= rank
    out = merge_axes(ctx, call, skip=axis)
    if axis == rank - 1:
        out[axis] = ctx.cat(call.layouts)
        return out
    for axes in call.axes:
        if axes[axis] is not None:
            ctx.freeze(axes[axis], "concatenation of channels along another "
                       f"axis than the last in `{call.name}`")
    return out


class ConcatenateHandler(MergeHandler):
    """Concatenate: on the channel axis, the layouts are laid end to end."""

    def channels(self, ctx, call):
        return [Axes(concatenate_axes(ctx, call, call.layer.axis))]


register_layer(L.Flatten, FlattenHandler())
register_layer(L.Reshape, ReshapeHandler("target_shape", offset=1))
register_layer(L.Concatenate, ConcatenateHandler())
register_layer(L.Add, AddHandler())
for _cls in MERGE:
    register_layer(_cls, MergeHandler())
