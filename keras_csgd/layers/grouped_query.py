"""`keras.layers.GroupQueryAttention`: grouped-query heads as two groups.

Its key/value heads are one group (`<layer>/kv_heads`: the key and value
kernels' head axis and biases), and the positions of the query heads
within a key/value group another (`<layer>/query_heads`). The query (and
gate) kernels' head axis and the output projection's read them as a grid:
query head `k * g + j` reads key/value head `k` (the layer repeats each
key/value head `g` times, `ops.repeat(..., axis=2)`), so every key/value
group keeps the same query positions and a removed key/value head takes
its query heads. Heads with equal projections merge exactly (the output
projection sums them); the head size never changes. The output has the
query input's width (the layer sets it from the query's shape): the
output projection's last axis is a member of the query's layout. Rebuilt
with fewer `num_query_heads` and `num_key_value_heads`.
"""

from __future__ import annotations

import keras

from keras_csgd import graph
from keras_csgd.layers.attention import attention_inputs, known_prod
from keras_csgd.layers.registry import LayerHandler, register_layer, times


class GroupQueryAttentionHandler(LayerHandler):
    """`keras.layers.GroupQueryAttention` (module docstring)."""

    def channels(self, ctx, call):
        layer = call.layer
        _, kwargs = graph.call_arguments(call)
        if kwargs.get("return_attention_scores"):
            return ctx.uncounted_call(call, "attention scores returned")
        (query, value, _), (q_lay, v_lay, k_lay) = attention_inputs(ctx, call)
        n_kv = layer.num_key_value_heads
        kv = ctx.new_group(n_kv, f"{call.name}/kv_heads")
        positions = ctx.new_group(layer.num_query_heads // n_kv,
                                  f"{call.name}/query_heads")
        heads = ctx.grid(kv, positions)
        tq, tv = known_prod(query.shape[1:-1]), known_prod(value.shape[1:-1])
        projections = [(layer._query_dense, q_lay, heads, tq),
                       (layer._key_dense, k_lay, kv, tv),
                       (layer._value_dense, v_lay, kv, tv)]
        if layer.use_gate:
            projections.append((layer._gate_dense, q_lay, heads, tq))
        for dense, lay, out, rows in projections:
            ctx.consumer(call, dense.kernel, 0, lay)
            ctx.member(call, dense.kernel, 1, out, producer=True)
            if dense.bias is not None:
                ctx.member(call, dense.bias, 0, out)
            ctx.cost(call, times(rows, *dense.kernel.shape), lay,
                     *((kv, positions) if out is heads else (kv,)))
        o = layer._output_dense
        ctx.consumer(call, o.kernel, 0, heads)
        ctx.member(call, o.kernel, 2, q_lay)
        if o.bias is not None:
            ctx.member(call, o.bias, 0, q_lay)
        ctx.cost(call, times(tq, *o.kernel.shape), kv, positions, q_lay)
        # Scores (query . key) and the weighted sum of the values, per head.
        pairs = None if tq is None or tv is None else tq * tv
        ctx.cost(call, times(pairs, 2 * layer.num_query_heads,
                              layer.head_dim), kv, positions)
        ctx.width(call, "num_query_heads", heads)
        ctx.width(call, "num_key_value_heads", kv)
        return [q_lay]


if hasattr(keras.layers, "GroupQueryAttention"):  # Keras 3.4 and later
    register_layer(keras.layers.GroupQueryAttention,
                   GroupQueryAttentionHandler())
