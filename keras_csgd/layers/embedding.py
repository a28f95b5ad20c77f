"""Embeddings: token ids in, a new channel group out (the table's columns).

A `ReversibleEmbedding` may be called again in reverse, as the output
projection of a language model (hidden vectors to logits over the
vocabulary). That call reads the channels its forward call produced, through
the same table (tied) or its own `reverse_embeddings`, whose rows consume
the forward group (summed when channels merge: exact). Through a tied
table, removing channels is exact (the same columns go from both uses);
merging them needs, for one table, a cluster's column (the forward call)
and the column times the cluster's size (the reverse call). Where the
reverse call reads a weighing normalization with a gain and nothing else
reads that norm (a decoder's final norm), the norm's output takes the
cluster sizes (`graph.Context.absorbs`; `slim` multiplies its gain), and
merges are exact; otherwise the group is prune-only.
"""

from __future__ import annotations

import math

import keras

from keras_csgd import graph
from keras_csgd.layers.registry import (
    LayerHandler,
    handler_for,
    register_layer,
)


class EmbeddingHandler(LayerHandler):
    """`keras.layers.Embedding`: its table's last axis produces channels.

    The ids are no channels (their last axis is the sequence): their
    layout is frozen. A lookup does no multiply-accumulates.
    """

    def channels(self, ctx, call):
        layer = call.layer
        ctx.freeze(call.layouts[0], f"token ids of `{call.name}`")
        return [ctx.produce(call, layer.embeddings, 1, layer.output_dim,
                            key="output_dim")]


class ReversibleEmbeddingHandler(EmbeddingHandler):
    """`ReversibleEmbedding`, forward (token ids to vectors) and reverse
    (vectors to logits, the second call of the layer)."""

    shared = True  # its reverse call is declared with its forward call

    def channels(self, ctx, call):
        layer = call.layer
        # Its forward call, in this model: a copy of a nested model's
        # layer is another layer when `slim` rebuilds the two models.
        forward = [e.layout for e in ctx.entries
                   if e.layer is layer and e.producer]
        if any(e.lname != call.name for e in ctx.entries
               if e.layer is layer):
            return self._refuse(ctx, call, forward,
                                "called from another (nested) model")
        args, kwargs = graph.call_arguments(call)
        if not (kwargs.get("reverse") or (len(args) > 1 and args[1])):
            if forward:  # a second forward call
                return self._refuse(ctx, call, forward, "called twice")
            (out,) = super().channels(ctx, call)
            if not layer.tie_weights:
                ctx.consumer(call, layer.reverse_embeddings, 0, out)
            return [out]
        (lay,) = call.layouts
        if not self.reverse(ctx, layer, lay, call.name, call.inputs[0],
                            call.layer):
            return self._refuse(ctx, call, forward, "reversed without its "
                                "forward call's channels")
        rows = math.prod(d for d in call.inputs[0].shape[1:-1] if d)
        ctx.cost(call, rows * layer.output_dim * layer.input_dim, lay)
        return [ctx.new_group(layer.input_dim, call.name,
                              f"vocabulary logits of `{call.name}`")]

    @staticmethod
    def reverse(ctx, layer, lay, name: str, source, reader) -> bool:
        """Declares a reverse call of `layer` (named `name`) reading `lay`
        (the tensor `source`, read by `reader`: the call's layer, or `None`
        for a model output): the channels of its forward call. Through a
        tied table, the norm that writes `source` for it alone absorbs
        merged clusters' sizes; without one, the group is prune-only.
        False (nothing declared) when `lay` cannot be them."""
        forward = [e.layout for e in ctx.entries
                   if e.layer is layer and e.producer]
        if len(forward) != 1 or not ctx.unify(lay, forward[0]):
            return False
        if not layer.tie_weights:
            return True
        norm = graph.producer_of(source)
        names = [n for n, op in ctx.layers.items()
                 if op is norm and n in ctx.weighed]
        handler = handler_for(norm)
        if (len(names) == 1 and handler and handler.gain(norm)
                and graph.read_only_by(norm, reader)):
            ctx.absorbs(names[0], lay)
        else:
            ctx.prune_only(lay, f"the output projection `{name}` shares the "
                           "embedding's table, and no normalization with a "
                           "gain writes its input for it alone (merging "
                           "channels would scale its columns by cluster "
                           "sizes)")
        return True

    @staticmethod
    def _refuse(ctx, call, forward, why: str) -> list:
        for lay in forward:
            ctx.freeze(lay, f"embedding `{call.name}` {why}")
        return ctx.uncounted_call(call, f"embedding {why}")


def output_projection(model):
    """The embedding a keras_hub decoder backbone's output is read through.

    A CausalLM computes its logits as `backbone.token_embedding(x,
    reverse=True)` on the backbone's output: that output's channels are
    the embedding's, and narrowing them narrows both (the CausalLM wraps
    the slim backbone). `None` for any other model.
    """
    embedding = getattr(model, "token_embedding", None)
    if not isinstance(handler_for(embedding), ReversibleEmbeddingHandler):
        return None
    if not any(hasattr(handler_for(layer), "backbone_widths")
               for layer in model.layers):
        return None  # an encoder (BERT's masked LM reads another layer)
    return embedding


register_layer(keras.layers.Embedding, EmbeddingHandler())
if hasattr(keras.layers, "ReversibleEmbedding"):  # Keras 3.12 and later
    register_layer(keras.layers.ReversibleEmbedding,
                   ReversibleEmbeddingHandler())
