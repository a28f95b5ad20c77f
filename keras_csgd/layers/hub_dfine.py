"""keras_hub's D-FINE deformable attention: counted, its channels frozen.

`DFineMultiscaleDeformableAttention` projects its queries to sampling
offsets and attention weights (two `EinsumDense`s), samples the encoder's
features at those offsets (bilinear `grid_sample`, slicing with tensor
offsets: its call does not trace) and sums the samples by the weights.
Its handler counts that work and freezes its channels: pruning the values
would need the head size of each head to stay even (the call reshapes
them to `hidden_dim // heads`), which no handler states yet.

This module imports keras_hub; the registry imports it the first time it
looks up a keras_hub layer.
"""

from __future__ import annotations

import math

from keras_hub.src.models.d_fine.d_fine_attention import (
    DFineMultiscaleDeformableAttention,
)

from keras_csgd import graph
from keras_csgd.layers.registry import LayerHandler, register_layer, times


class DeformableAttentionHandler(LayerHandler):
    """D-FINE's multi-scale deformable attention: MACs, frozen channels.

    It costs its two projections of every query and the weighted sum of
    the sampled values (`queries x points x hidden_dim`); the bilinear
    sampling counts 0, like a resize.
    """

    def channels(self, ctx, call):
        layer = call.layer
        args, kwargs = graph.call_arguments(call)
        queries = ctx.positions(
            dict(zip(("hidden_states",), args), **kwargs)["hidden_states"])
        for dense in (layer.sampling_offsets, layer.attention_weights):
            ctx.cost(call, times(queries, math.prod(dense.kernel.shape)))
        ctx.cost(call, times(queries, sum(layer.num_points),
                             layer.hidden_dim))
        return ctx.unknown(
            call, "deformable attention",
            "it samples its values at offsets it computes (not traced); "
            "its channels are frozen")


register_layer(DFineMultiscaleDeformableAttention,
               DeformableAttentionHandler())
