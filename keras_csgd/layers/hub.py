"""keras_hub's composite layers: TransformerEncoder, ViT's encoder and MLP.

keras_hub builds its backbones from layers that call sub-layers in Python
(`TransformerEncoder.call`, `ViTEncoderBlock.call`). They are *handled*,
not seen through: their `call` is Python code (masks merged in it, loops
over blocks, `x + residual` on backend tensors) that leaves no graph to
read, and tracing it would recover a graph only for the code paths that
ran. A handler states what the code does, from the sub-layers it built:

- each `MultiHeadAttention`'s **heads** are a group (`.../heads`), see
  `keras_csgd.layers.attention`;
- each MLP's **hidden units** (its first Dense) are a group;
- the **residual stream** (the layer's input and output channels, its
  `hidden_dim`) is the group of the layer's input, with the attention and
  MLP output projections and the LayerNormalizations' `gamma`/`beta` as
  members. Removing its channels changes the norms' statistics (methods
  that recover by training do it); merged channels are weighed by the
  rebuilt norms (`norm_counts`: `ClusterNormalization`), so merges are
  exact.

Rebuilt narrower, these layers become the subclasses of
`keras_csgd.layers.hub_pruned` (`PrunedTransformerEncoder`,
`PrunedViTEncoderBlock`, `PrunedViTEncoder`, with the head size pinned;
`PrunedViTPatchingAndEmbedding`, whose config loads back).

This module imports keras_hub; the registry imports it the first time it
looks up a keras_hub layer, so keras_hub stays an optional dependency.
"""

from __future__ import annotations

import numpy as np
from keras_hub.layers import TransformerEncoder
from keras_hub.src.models.vit.vit_layers import (
    MLP,
    ViTEncoder,
    ViTEncoderBlock,
    ViTPatchingAndEmbedding,
)

from keras_csgd import graph
from keras_csgd.layers.attention import attention_channels, dense_channels
from keras_csgd.layers.hub_pruned import (
    PrunedTransformerEncoder,
    PrunedViTEncoder,
    PrunedViTEncoderBlock,
    PrunedViTPatchingAndEmbedding,
)
from keras_csgd.layers.normalization import normalized_channels
from keras_csgd.layers.registry import LayerHandler, register_layer


def residual_input(ctx, call):
    """A block's first input and its layout, the residual stream; its
    other inputs (attention masks) are frozen."""
    args, kwargs = graph.call_arguments(call)
    x = args[0] if args else next(iter(kwargs.values()))
    lay = None
    for t, other in zip(call.inputs, call.layouts):
        if t is x:
            lay = other
        else:
            ctx.freeze(other, f"attention mask of `{call.name}`")
    return x, lay


def _stream(ctx, call, norms):
    """The call's first input and its layout, the residual stream.

    The `norms` (the LayerNormalizations over it) weigh merged channels
    once rebuilt (`norm_counts` of the pruned classes).
    """
    x, lay = residual_input(ctx, call)
    for norm in norms:
        normalized_channels(ctx, call, norm.weights,
                            f"LayerNormalization `{call.name}/{norm.name}`",
                            lay, weighed=True)
    ctx.width(call, "hidden_dim", lay)
    return x, lay


class StreamHandler(LayerHandler):
    """What the handlers of blocks on a weighed residual stream share
    (the encoders', the decoder LLMs'): their norms' counts."""

    def counts(self, layer) -> np.ndarray | None:
        """How many channels each stream channel stands for (the
        `norm_counts` of a pruned class), or `None`: one each."""
        counts = getattr(layer, "norm_counts", None)
        return None if counts is None else np.asarray(counts)

    @staticmethod
    def take_counts(config, widths) -> dict:
        """`widths` without `counts`, which goes to `norm_counts`."""
        widths = dict(widths)
        counts = widths.pop("counts", None)
        if counts is not None:
            config["norm_counts"] = [int(c) for c in counts]
        return widths


def mlp_channels(ctx, call, first, second, lay, origin, key):
    """First Dense: a new group (`key`); second: back into `lay`."""
    hidden = dense_channels(ctx, call, first, lay, origin, key)
    dense_channels(ctx, call, second, hidden, out=lay)


def _block(ctx, call, block, x, lay, prefix="", suffix=""):
    """A ViTEncoderBlock's heads and MLP, as sub-layer of `call`."""
    origin = f"{call.name}/{prefix}"
    attention_channels(ctx, call, block.mha, [lay] * 3, (x.shape, x.shape),
                       origin + "mha", "num_heads" + suffix, out=lay)
    mlp_channels(ctx, call, block.mlp.dense_1, block.mlp.dense_2, lay,
         origin + "mlp/dense_1", "mlp_dim" + suffix)


class TransformerEncoderHandler(StreamHandler):
    """`keras_hub.layers.TransformerEncoder` (BERT's encoder layers)."""

    def channels(self, ctx, call):
        layer = call.layer
        x, lay = _stream(ctx, call, [layer._self_attention_layer_norm,
                                     layer._feedforward_layer_norm])
        mha = layer._self_attention_layer
        heads, _ = attention_channels(
            ctx, call, mha, [lay] * 3, (x.shape, x.shape),
            f"{call.name}/{mha.name}", out=lay,
        )
        # The attention width (heads x head size) carries the head size
        # to `rebuild`, whose config lacks it.
        ctx.width(call, "attention_dim", ctx.rep(heads, mha.key_dim))
        mlp_channels(ctx, call, layer._feedforward_intermediate_dense,
             layer._feedforward_output_dense, lay,
             f"{call.name}/feedforward_intermediate_dense",
             "intermediate_dim")
        return [lay]

    def rebuild(self, config, widths):
        # Its config has no hidden width: it is built from its input's.
        widths = self.take_counts(config, widths)
        heads = widths["num_heads"]
        config.update(num_heads=heads,
                      intermediate_dim=widths["intermediate_dim"],
                      key_dim=widths["attention_dim"] // heads)
        return self.pruned().from_config(config)

    def pruned(self) -> type:
        """The class `rebuild` returns (GPT-2's decoder has its own)."""
        return PrunedTransformerEncoder


class ViTEncoderBlockHandler(StreamHandler):
    """keras_hub's `ViTEncoderBlock`: one heads and one MLP group."""

    def channels(self, ctx, call):
        block = call.layer
        x, lay = _stream(ctx, call, [block.layer_norm_1, block.layer_norm_2])
        _block(ctx, call, block, x, lay)
        return [lay]

    def rebuild(self, config, widths):
        config.update(key_dim=config.get("key_dim") or _key_dim(config),
                      **self.take_counts(config, widths))
        return PrunedViTEncoderBlock.from_config(config)


class ViTEncoderHandler(StreamHandler):
    """keras_hub's `ViTEncoder`: the groups of every block, per block."""

    def channels(self, ctx, call):
        encoder = call.layer
        norms = [encoder.layer_norm]
        for block in encoder.encoder_layers:
            norms += [block.layer_norm_1, block.layer_norm_2]
        x, lay = _stream(ctx, call, norms)
        for i, block in enumerate(encoder.encoder_layers):
            _block(ctx, call, block, x, lay, f"{block.name}/", f"/{i}")
        return [lay]

    def rebuild(self, config, widths):
        n = config["num_layers"]
        widths = self.take_counts(config, widths)
        config.update(
            key_dim=config.get("key_dim") or _key_dim(config),
            hidden_dim=widths["hidden_dim"],
            num_heads=[widths[f"num_heads/{i}"] for i in range(n)],
            mlp_dim=[widths[f"mlp_dim/{i}"] for i in range(n)],
        )
        return PrunedViTEncoder.from_config(config)


def _key_dim(config) -> int:
    return config["hidden_dim"] // config["num_heads"]


class MLPHandler(LayerHandler):
    """keras_hub's ViT `MLP`: its hidden units, and its output units."""

    def channels(self, ctx, call):
        layer, (lay,) = call.layer, call.layouts
        hidden = dense_channels(ctx, call, layer.dense_1, lay,
                                f"{call.name}/dense_1", "mlp_dim")
        return [dense_channels(ctx, call, layer.dense_2, hidden,
                               call.name, "hidden_dim")]


class PatchingHandler(LayerHandler):
    """ViT's patch embedding: a patch Conv2D, class token, positions."""

    replaces = True  # keras_hub's class does not load back

    def channels(self, ctx, call):
        layer, (lay,) = call.layer, call.layouts
        if layer.data_format == "channels_first":
            return ctx.uncounted_call(call, "channels_first layer")
        conv = layer.patch_embedding
        ctx.consumer(call, conv.kernel, 2, lay)
        out = ctx.produce(call, conv.kernel, 3, layer.hidden_dim,
                          key="hidden_dim")
        extra = [(conv.bias, 0), (layer.position_embedding.embeddings, 1)]
        if layer.use_class_token:
            extra.append((layer.class_token, 2))
        for variable, axis in extra:
            if variable is not None:
                ctx.member(call, variable, axis, out)
        ctx.cost(call, layer.num_patches * conv.kernel.numpy().size, lay,
                 out)
        return [out]

    def rebuild(self, config, widths):
        config.update(widths)
        return PrunedViTPatchingAndEmbedding.from_config(config)


register_layer(TransformerEncoder, TransformerEncoderHandler())
register_layer(ViTEncoderBlock, ViTEncoderBlockHandler())
register_layer(ViTEncoder, ViTEncoderHandler())
register_layer(MLP, MLPHandler())
register_layer(ViTPatchingAndEmbedding, PatchingHandler())
