"""Contractions: `matmul`, `einsum` and `dot_product_attention`.

An axis in both operands and the output (batch) or in one operand and the
output (free) keeps its layout, and one contracted between the operands
joins their groups; such a group is prune-only (its channels may be
removed from both operands, but merging two would add their products,
which a slim model does not compute). `dot_product_attention` is the two
contractions it computes, with heads as one group.
"""

from __future__ import annotations

import string

import keras
import numpy as np
from keras.src.ops import nn
from keras.src.ops import numpy as knp

from keras_csgd import graph
from keras_csgd.graph.layout import Axes
from keras_csgd.layers.ops.common import _freeze
from keras_csgd.layers.registry import LayerHandler, register_layer

CONTRACTED = ("contracted between two computed tensors by `{}` (merging "
              "its channels would add their products)")


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


def _register_all():
    register_layer(knp.Matmul, MatmulHandler())
    register_layer(knp.Einsum, EinsumHandler())
    register_layer(nn.DotProductAttention, DotProductAttentionHandler())


_register_all()
