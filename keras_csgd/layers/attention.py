"""Attention: MultiHeadAttention heads as a channel group, and EinsumDense.

A `MultiHeadAttention` layer has two channel spaces of its own:

- its **heads**: the query, key and value kernels `(dim, heads, head_dim)`
  (axis 1, the producers of the group), their biases `(heads, head_dim)`
  (axis 0) and the output projection `(heads, head_dim, out)` (axis 0, the
  consumer). Heads with equal query, key and value slices compute equal
  outputs, so merging them sums their output-projection slices: exact.
  The rebuilt layer has fewer `num_heads`, the same `key_dim`.
- its **output** channels: the output projection's last axis and bias, a
  new group (like a Dense layer's units), rebuilt as `output_shape`.

The query, key and value kernels consume their inputs on axis 0. The
helpers `attention_channels` and `dense_channels` declare the same for a
sub-layer of a composite layer (`keras_csgd.layers.hub`).
"""

from __future__ import annotations

import math

import keras

from keras_csgd import graph
from keras_csgd.graph.layout import Axes
from keras_csgd.layers.registry import LayerHandler, register_layer, times


def known_prod(dims) -> int | None:
    """Product of `dims`, or `None` when one is unknown."""
    dims = tuple(dims)
    return None if None in dims else math.prod(dims)


def attention_channels(ctx, call, mha, layouts, shapes, origin: str,
                       heads_key: str | None = "num_heads", out=None):
    """Declares a built `MultiHeadAttention`'s heads and projections.

    Args:
        ctx: the `graph.Context`.
        call: the call whose layer owns `mha` (`mha` itself or a composite).
        mha: the `keras.layers.MultiHeadAttention`.
        layouts: the `(query, value, key)` input layouts.
        shapes: the `(query, value)` input shapes (for the MACs).
        origin: the name of the new groups (`origin/heads`, `origin`).
        heads_key: the config key of `call.layer` that holds the number of
            heads. Defaults to `"num_heads"`.
        out: the layout the output projection writes (a residual stream);
            `None` for a new group with width key `output_shape`.

    Returns:
        `(heads layout, output layout)`.
    """
    q_lay, v_lay, k_lay = layouts
    heads = ctx.new_group(mha.num_heads, origin + "/heads")
    projections = [(mha.query_dense, q_lay), (mha.key_dense, k_lay),
                   (mha.value_dense, v_lay)]
    if mha._use_gate:
        projections.append((mha._gate_dense, q_lay))
    for dense, lay in projections:
        ctx.consumer(call, dense.kernel, 0, lay)
        ctx.member(call, dense.kernel, 1, heads, producer=True)
        if dense.bias is not None:
            ctx.member(call, dense.bias, 0, heads)
    if heads_key is not None:
        ctx.width(call, heads_key, heads)
    o = mha.output_dense
    ctx.consumer(call, o.kernel, 0, heads)
    if out is None:
        out = ctx.new_group(o.kernel.shape[-1], origin)
        ctx.member(call, o.kernel, 2, out, producer=True)
        ctx.width(call, "output_shape", out)
    else:
        ctx.member(call, o.kernel, 2, out)
    if o.bias is not None:
        ctx.member(call, o.bias, 0, out)
    _attention_costs(ctx, call, mha, projections, shapes, heads, out)
    return heads, out


def _attention_costs(ctx, call, mha, projections, shapes, heads, out):
    q_shape, v_shape = shapes
    tq, tv = known_prod(q_shape[1:-1]), known_prod(v_shape[1:-1])
    keys = known_prod(v_shape[a] for a in mha.attention_axes)
    n = mha.num_heads
    for dense, lay in projections:
        rows = tv if dense in (mha.key_dense, mha.value_dense) else tq
        dim, _, head_dim = dense.kernel.shape
        ctx.cost(call, times(rows, dim, n, head_dim), lay, heads)
    # Scores (query . key) and the weighted sum of the values.
    pairs = None if tq is None or keys is None else tq * keys
    ctx.cost(call, times(pairs, n, mha.key_dim + mha.value_dim), heads)
    ctx.cost(call, times(tq, *mha.output_dense.kernel.shape), heads, out)


def dense_channels(ctx, call, dense, lay, origin: str | None = None,
                   key: str | None = None, out=None):
    """Declares a sub-layer `Dense` of a composite layer.

    Args:
        ctx: the `graph.Context`.
        call: the composite layer's call.
        dense: the built `keras.layers.Dense`.
        lay: the layout of its input.
        origin: the name of its new group (when `out` is `None`).
        key: the composite's config key that holds `dense.units`.
        out: the layout its units write (a residual stream); `None` for a
            new group.

    Returns:
        The layout of its output.
    """
    ctx.consumer(call, dense.kernel, 0, lay)
    if out is None:
        out = ctx.new_group(dense.units, origin)
        ctx.member(call, dense.kernel, 1, out, producer=True)
        if key is not None:
            ctx.width(call, key, out)
    else:
        ctx.member(call, dense.kernel, 1, out)
    if dense.use_bias:
        ctx.member(call, dense.bias, 0, out)
    rows = known_prod(call.inputs[0].shape[1:-1])
    ctx.cost(call, times(rows, *dense.kernel.shape), lay, out)
    return out


def attention_inputs(ctx, call) -> tuple[tuple, list]:
    """The `(query, value, key)` tensors of an attention call (the key is
    the value when not given) and their layouts; the layouts of its other
    inputs (masks) are frozen."""
    args, kwargs = graph.call_arguments(call)
    bound = dict(zip(("query", "value", "key"), args))
    bound.update(kwargs)
    lay_of = {id(t): lay for t, lay in zip(call.inputs, call.layouts)}
    query, value = bound["query"], bound["value"]
    key = bound.get("key")
    tensors = (query, value, value if key is None else key)
    for t, lay in zip(call.inputs, call.layouts):
        if all(t is not x for x in tensors):
            ctx.freeze(lay, f"attention mask of `{call.name}`")
    return tensors, [lay_of[id(t)] for t in tensors]


class MultiHeadAttentionHandler(LayerHandler):
    """`keras.layers.MultiHeadAttention`: heads and output as groups."""

    def channels(self, ctx, call):
        layer = call.layer
        out_shape = layer._output_shape
        if isinstance(out_shape, (list, tuple)) and len(out_shape) != 1:
            return ctx.uncounted_call(call, "multi-axis `output_shape`")
        (query, value, _), layouts = attention_inputs(ctx, call)
        _, out = attention_channels(
            ctx, call, layer, layouts, (query.shape, value.shape), call.name,
        )
        return [out]

    def rebuild(self, config, widths):
        config["num_heads"] = widths["num_heads"]
        config["output_shape"] = (widths["output_shape"],)
        return config


def einsum_dense_spec(layer) -> str | None:
    """Why an EinsumDense is not a Dense on its last axis, or `None`.

    Handled: `"...b,bc->...c"`, `"abc,cd->abd"` and the like: the input's
    last axis is contracted with the kernel's first, the kernel's second is
    the output's last, the other axes pass through, the bias (if any) is
    on the output axis.
    """
    inputs, out = layer.equation.split("->")
    lhs, kernel = inputs.split(",")
    if len(kernel) != 2:
        return f"EinsumDense kernel {kernel!r} is not a matrix"
    if lhs[-1] != kernel[0] or out != lhs[:-1] + kernel[1]:
        return f"EinsumDense equation {layer.equation!r}"
    if layer.bias_axes not in (None, kernel[1]):
        return f"EinsumDense bias axes {layer.bias_axes!r}"
    return None


class EinsumDenseHandler(LayerHandler):
    """`keras.layers.EinsumDense`: as a Dense on the last axis, or by its
    equation (`einsum_dense_channels`)."""

    axes = "elementwise"

    def channels(self, ctx, call):
        why = einsum_dense_spec(call.layer)
        if why:
            if "." in call.layer.equation:
                return ctx.uncounted_call(call, why)
            return einsum_dense_channels(ctx, call)
        layer, (lay,) = call.layer, call.layouts
        ctx.consumer(call, layer.kernel, 0, lay)
        out = ctx.produce(call, layer.kernel, 1, layer.kernel.shape[1],
                          key="output_shape")
        if layer.bias is not None:
            ctx.member(call, layer.bias, 0, out)
        # The other axes pass through (the output's may read `None`).
        rows = ctx.positions(call.inputs[0])
        ctx.cost(call, times(rows, *layer.kernel.shape), lay, out)
        return [out]

    def rebuild(self, config, widths):
        shape = config["output_shape"]
        if "output_shape" in widths:
            width = widths["output_shape"]
            config["output_shape"] = (
                (*shape[:-1], width) if isinstance(shape, (list, tuple))
                else width
            )
            return config
        shape = [shape] if isinstance(shape, int) else list(shape)
        for key, width in widths.items():
            shape[int(key.rsplit("/", 1)[1])] = width
        config["output_shape"] = tuple(shape)
        return config


def einsum_dense_channels(ctx, call) -> list:
    """An `EinsumDense` of any equation (`"abc,cde->abde"`: a projection
    to heads and head size), index by index:

    - in the input and the kernel, not the output (contracted): the
      kernel's axis consumes the input's channels there;
    - in the kernel and the output only: new channels the kernel's axis
      produces (a group per index, rebuilt in `output_shape`);
    - in the input, the kernel and the output: the kernel's axis is a
      member of the input's channels, which pass;
    - in the input and the output only: they pass; in the input only: a
      sum over them (channels there freeze).

    The bias is a member of the output's channels on its axes.
    """
    layer, (x,), (axes,) = call.layer, call.inputs, call.axes
    given, out_spec = layer.equation.replace(" ", "").split("->")
    lhs, spec = given.split(",")
    kernel = layer.kernel
    layout = {letter: axes[i] for i, letter in enumerate(lhs)}
    size = {letter: d for letter, d in zip(lhs, x.shape)}
    for i, letter in enumerate(spec):
        size[letter] = kernel.shape[i]
        lay = layout.get(letter)
        if letter in lhs and letter not in out_spec:
            if lay is not None:
                ctx.consumer(call, kernel, i, lay)
        elif letter not in lhs:
            k = out_spec.index(letter)
            lay = layout[letter] = ctx.new_group(kernel.shape[i],
                                                 f"{call.name}/axis{k}")
            ctx.member(call, kernel, i, lay, producer=True)
            ctx.width(call, f"output_shape/{k - 1}", lay)
        elif lay is not None:
            ctx.member(call, kernel, i, lay)
    for letter in set(lhs) - set(spec) - set(out_spec):
        if layout[letter] is not None:
            ctx.freeze(layout[letter], f"summed over by `{call.name}`")
    if layer.bias is not None:
        first = min(out_spec.index(c) for c in layer.bias_axes)
        for j, letter in enumerate(out_spec[first:]):
            if letter in layer.bias_axes and layout[letter] is not None:
                ctx.member(call, layer.bias, j, layout[letter])
    held = {id(lay): lay for letter, lay in layout.items()
            if lay is not None and (letter in spec or letter in out_spec)}
    ctx.cost(call, ctx.per_example(size.values(), call.inputs),
             *held.values())
    return [Axes(layout[letter] for letter in out_spec)]


register_layer(keras.layers.MultiHeadAttention, MultiHeadAttentionHandler())
register_layer(keras.layers.EinsumDense, EinsumDenseHandler())
