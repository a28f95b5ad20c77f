"""keras_hub's DeBERTaV3 layers: disentangled attention, relative embedding.

They are *handled*, not seen through: `DisentangledSelfAttention` gathers
its relative scores with `tf.gather(..., batch_dims=3)` on the TensorFlow
backend (no `keras.ops` call, so no node of a traced graph), builds its
relative positions with `ops.arange` of the sequence length (unknown while
tracing a text model), and `RelativeEmbedding` repeats its table to the
batch size. Their handlers state what the code does:

- `RelativeEmbedding`'s table `(2 * bucket_size, hidden_dim)` produces
  channels on its hidden axis, normalised by its LayerNormalization
  (weighed: merges exact). The encoders' query and key projections read
  them with the residual stream's rows, so they are the stream's channels.
- `DisentangledAttentionEncoder` is BERT's encoder with another attention:
  its **heads** (query, key and value kernels `(hidden, heads, head_size)`,
  the output projection's rows `heads x head_size`; heads with equal
  projections compute equal content, content-to-position and
  position-to-content scores, so merging them is exact), its MLP's
  **hidden units**, and the **residual stream** with its LayerNormalizations.

Rebuilt narrower, they become `PrunedDisentangledAttentionEncoder` (head
size pinned, norms weighed) and `PrunedRelativeEmbedding` (norm weighed).
"""

from __future__ import annotations

import keras
from keras_hub.src.models.deberta_v3.disentangled_attention_encoder import (
    DisentangledAttentionEncoder,
)
from keras_hub.src.models.deberta_v3.disentangled_self_attention import (
    DisentangledSelfAttention,
)
from keras_hub.src.models.deberta_v3.relative_embedding import (
    RelativeEmbedding,
)

from keras_csgd import graph
from keras_csgd.layers.hub import (
    StreamHandler,
    TransformerEncoderHandler,
    mlp_channels,
)
from keras_csgd.layers.hub_pruned import PinnedConfig, weigh
from keras_csgd.layers.normalization import normalized_channels
from keras_csgd.layers.registry import register_layer, times


class RelativeEmbeddingHandler(StreamHandler):
    """DeBERTaV3's `RelativeEmbedding`: its table's hidden axis, normed.

    Its input is read for its batch size only.
    """

    def channels(self, ctx, call):
        layer = call.layer
        out = ctx.produce(call, layer.rel_embeddings, 1, layer.hidden_dim,
                          key="hidden_dim")
        normalized_channels(
            ctx, call, layer.layer_norm.weights,
            f"LayerNormalization `{call.name}/{layer.layer_norm.name}`",
            out, weighed=True)
        return [out]

    def rebuild(self, config, widths):
        widths = self.take_counts(config, widths)
        config["hidden_dim"] = widths["hidden_dim"]
        return PrunedRelativeEmbedding.from_config(config)


class DisentangledEncoderHandler(TransformerEncoderHandler):
    """DeBERTaV3's `DisentangledAttentionEncoder`: heads, MLP, stream."""

    def channels(self, ctx, call):
        layer = call.layer
        args, kwargs = graph.call_arguments(call)
        bound = dict(zip(("inputs", "rel_embeddings"), args), **kwargs)
        x, rel = bound["inputs"], bound["rel_embeddings"]
        lay_of = {id(t): lay for t, lay in zip(call.inputs, call.layouts)}
        for t, lay in zip(call.inputs, call.layouts):
            if t is not x and t is not rel:
                ctx.freeze(lay, f"attention mask of `{call.name}`")
        lay = lay_of[id(x)]
        # The query and key kernels read the relative embeddings' rows as
        # the stream's: one channel space.
        if not ctx.unify(lay, lay_of[id(rel)]):
            raise ValueError(
                "`rel_embeddings` must be as wide as the residual stream. "
                f"Received: rel_embeddings.shape={rel.shape}, "
                f"inputs.shape={x.shape}")
        for norm in (layer._self_attention_layer_norm,
                     layer._feedforward_layer_norm):
            normalized_channels(ctx, call, norm.weights,
                                f"LayerNormalization `{call.name}/"
                                f"{norm.name}`", lay, weighed=True)
        ctx.width(call, "hidden_dim", lay)
        _attention(ctx, call, layer._self_attention_layer, lay,
                   ctx.positions(x), ctx.positions(rel))
        mlp_channels(ctx, call, layer._feedforward_intermediate_dense,
                     layer._feedforward_output_dense, lay,
                     f"{call.name}/feedforward_intermediate_dense",
                     "intermediate_dim")
        return [lay]

    def pruned(self) -> type:
        return PrunedDisentangledAttentionEncoder


def _attention(ctx, call, attention, lay, tokens, relative) -> None:
    """A `DisentangledSelfAttention`'s heads, projections and MACs.

    `tokens` and `relative`: the positions of one example's stream and of
    its relative embeddings (the key and query kernels project both).
    """
    n, size = attention.num_heads, attention.attn_head_size
    heads = ctx.new_group(n, f"{call.name}/{attention.name}/heads")
    ctx.width(call, "num_heads", heads)
    ctx.width(call, "attention_dim", ctx.rep(heads, size))
    both = None if tokens is None else tokens + relative
    for dense, rows in ((attention._query_dense, both),
                        (attention._key_dense, both),
                        (attention._value_dense, tokens)):
        ctx.consumer(call, dense.kernel, 0, lay)
        ctx.member(call, dense.kernel, 1, heads, producer=True)
        ctx.member(call, dense.bias, 0, heads)
        ctx.cost(call, times(rows, *dense.kernel.shape), lay, heads)
    out = attention._output_dense
    ctx.consumer(call, out.kernel, 0, ctx.rep(heads, size))
    ctx.member(call, out.kernel, 1, lay)
    ctx.member(call, out.bias, 0, lay)
    ctx.cost(call, times(tokens, *out.kernel.shape), heads, lay)
    # Content scores and the weighted sum (tokens x tokens), content to
    # position and position to content (tokens x relative), every head.
    pairs = None if tokens is None else 2 * tokens * both
    ctx.cost(call, times(pairs, n, size), heads)


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedRelativeEmbedding(RelativeEmbedding):
    """A `RelativeEmbedding` whose norm weighs merged channels.

    Args:
        hidden_dim: the width of the table.
        bucket_size: the size of the relative position buckets.
        norm_counts: how many channels each channel stands for in the
            LayerNormalization's statistics (`ClusterNormalization`), or
            `None` (one each). Defaults to `None`.
        **kwargs: the other `RelativeEmbedding` arguments.

    Example:

    ```python
    layer = PrunedRelativeEmbedding(16, 4, norm_counts=[2] * 16)
    ```
    """

    def __init__(self, hidden_dim, bucket_size, norm_counts=None, **kwargs):
        super().__init__(hidden_dim, bucket_size, **kwargs)
        self.norm_counts = norm_counts

    def build(self, input_shape):
        # keras_hub's class builds its norm in its first call; this one
        # here, so that a saved model loads its weights before calling it.
        shape = (1, 2 * self.bucket_size, self.hidden_dim)
        self.layer_norm.build(shape)
        weigh(self, ("layer_norm",), shape)
        self.built = True

    def get_config(self):
        return {**super().get_config(), "norm_counts": self.norm_counts}


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedDisentangledSelfAttention(DisentangledSelfAttention):
    """A `DisentangledSelfAttention` whose heads span `hidden_dim` and
    whose output projection writes `output_dim` channels.

    keras_hub's class derives the head size as `hidden_dim // num_heads`
    and projects back to `hidden_dim`; with fewer heads or a narrower
    stream the two widths differ.

    Args:
        num_heads: the number of heads.
        hidden_dim: the attention width, `num_heads` times the head size.
        output_dim: the width of the residual stream it writes.
        **kwargs: the other `DisentangledSelfAttention` arguments.

    Example:

    ```python
    layer = PrunedDisentangledSelfAttention(2, hidden_dim=16, output_dim=12)
    ```
    """

    def __init__(self, num_heads, hidden_dim, output_dim, **kwargs):
        super().__init__(num_heads, hidden_dim, **kwargs)
        self.output_dim = output_dim

    def build(self, inputs_shape, rel_embeddings_shape=None):
        super().build(inputs_shape, rel_embeddings_shape)
        derived = self._output_dense
        config = {**derived.get_config(), "output_shape": (
            None, self.output_dim)}
        self._layers.remove(derived)  # untrack the derived-size projection
        self._output_dense = type(derived).from_config(config)
        self._output_dense.build((None, None, self.hidden_dim))

    def get_config(self):
        return {**super().get_config(), "output_dim": self.output_dim}


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedDisentangledAttentionEncoder(PinnedConfig,
                                         DisentangledAttentionEncoder):
    """A `DisentangledAttentionEncoder` whose head size is `key_dim`.

    Args:
        intermediate_dim: the feedforward width.
        num_heads: the number of attention heads.
        key_dim: the size of each head.
        norm_counts: see `PrunedRelativeEmbedding`. Defaults to `None`.
        **kwargs: the other `DisentangledAttentionEncoder` arguments.

    Example:

    ```python
    layer = PrunedDisentangledAttentionEncoder(48, num_heads=3, key_dim=8)
    ```
    """

    def __init__(self, intermediate_dim, num_heads, key_dim,
                 norm_counts=None, **kwargs):
        super().__init__(intermediate_dim, num_heads, **kwargs)
        self.key_dim = key_dim
        self.norm_counts = norm_counts

    def build(self, inputs_shape):
        super().build(inputs_shape)
        weigh(self, ("_self_attention_layer_norm", "_feedforward_layer_norm"),
              inputs_shape)
        derived = self._self_attention_layer
        width = self.num_heads * self.key_dim
        if derived.hidden_dim == width:
            return
        config = {**derived.get_config(), "hidden_dim": width,
                  "output_dim": inputs_shape[-1]}
        self._layers.remove(derived)  # untrack the derived-size attention
        attention = PrunedDisentangledSelfAttention.from_config(config)
        attention.build(inputs_shape)
        self._self_attention_layer = attention


register_layer(RelativeEmbedding, RelativeEmbeddingHandler())
register_layer(DisentangledAttentionEncoder, DisentangledEncoderHandler())
