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

Rebuilt narrower, these layers need their head size pinned: keras_hub
derives it as `hidden_dim // num_heads`, which fewer heads or a narrower
stream would change.
So the narrower layer is a subclass (`PrunedTransformerEncoder`,
`PrunedViTEncoderBlock`, `PrunedViTEncoder`: serializable, same weights
names, same computation) with `key_dim` in its config, and per-block head
and MLP widths for the ViT encoder. ViT's patch embedding is rebuilt as
`PrunedViTPatchingAndEmbedding`, whose config loads back (keras_hub's
does not).

This module imports keras_hub; the registry imports it the first time it
looks up a keras_hub layer, so keras_hub stays an optional dependency.
"""

from __future__ import annotations

import keras
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
from keras_csgd.layers.cluster_norm import ClusterNormalization
from keras_csgd.layers.normalization import normalized_channels
from keras_csgd.layers.registry import LayerHandler, register_layer


def _stream(ctx, call, norms):
    """The call's first input and its layout, the residual stream.

    The `norms` (the LayerNormalizations over it) weigh merged channels
    once rebuilt (`norm_counts` of the pruned classes); any other input
    (an attention mask) is frozen.
    """
    args, kwargs = graph.call_arguments(call)
    x = args[0] if args else kwargs["inputs"]
    lay = None
    for t, other in zip(call.inputs, call.layouts):
        if t is x:
            lay = other
        else:
            ctx.freeze(other, f"attention mask of `{call.name}`")
    for norm in norms:
        normalized_channels(ctx, call, norm.weights,
                            f"LayerNormalization `{call.name}/{norm.name}`",
                            lay, weighed=True)
    ctx.width(call, "hidden_dim", lay)
    return x, lay


class _EncoderHandler(LayerHandler):
    """What the encoder handlers share: their norms' counts."""

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


def _mlp(ctx, call, first, second, lay, origin, key):
    """First Dense: a new group (`key`); second: back into `lay`."""
    hidden = dense_channels(ctx, call, first, lay, origin, key)
    dense_channels(ctx, call, second, hidden, out=lay)


def _block(ctx, call, block, x, lay, prefix="", suffix=""):
    """A ViTEncoderBlock's heads and MLP, as sub-layer of `call`."""
    origin = f"{call.name}/{prefix}"
    attention_channels(ctx, call, block.mha, [lay] * 3, (x.shape, x.shape),
                       origin + "mha", "num_heads" + suffix, out=lay)
    _mlp(ctx, call, block.mlp.dense_1, block.mlp.dense_2, lay,
         origin + "mlp/dense_1", "mlp_dim" + suffix)


class TransformerEncoderHandler(_EncoderHandler):
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
        _mlp(ctx, call, layer._feedforward_intermediate_dense,
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


class ViTEncoderBlockHandler(_EncoderHandler):
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


class ViTEncoderHandler(_EncoderHandler):
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


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedViTPatchingAndEmbedding(ViTPatchingAndEmbedding):
    """ViT's patch embedding, loadable from its own config.

    keras_hub's `get_config` writes `num_patches` and `num_positions`,
    derived sizes that its `__init__` rejects; this subclass accepts and
    ignores them, and writes `use_patch_bias` and `data_format` too.

    Args:
        *args: the `ViTPatchingAndEmbedding` arguments.
        num_patches: ignored (derived). Defaults to `None`.
        num_positions: ignored (derived). Defaults to `None`.
        **kwargs: the other `ViTPatchingAndEmbedding` arguments.

    Example:

    ```python
    layer = PrunedViTPatchingAndEmbedding((16, 16), (4, 4), hidden_dim=24)
    ```
    """

    def __init__(self, *args, num_patches=None, num_positions=None,
                 **kwargs):
        super().__init__(*args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "use_patch_bias": self.use_patch_bias,
                "data_format": self.data_format}


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedTransformerEncoder(TransformerEncoder):
    """A `TransformerEncoder` whose head size is `key_dim`, not derived.

    Args:
        intermediate_dim: the feedforward width.
        num_heads: the number of attention heads.
        key_dim: the size of each head.
        norm_counts: how many channels each channel stands for in the
            LayerNormalizations' statistics (`ClusterNormalization`), or
            `None` (one each). Defaults to `None`.
        **kwargs: the other `TransformerEncoder` arguments.

    Example:

    ```python
    layer = PrunedTransformerEncoder(48, num_heads=3, key_dim=8)
    ```
    """

    def __init__(self, intermediate_dim, num_heads, key_dim,
                 norm_counts=None, **kwargs):
        super().__init__(intermediate_dim, num_heads, **kwargs)
        self.key_dim = key_dim
        self.norm_counts = norm_counts

    def build(self, inputs_shape):
        super().build(inputs_shape)
        weigh(self, ("_self_attention_layer_norm",
                      "_feedforward_layer_norm"), inputs_shape)
        pin_key_dim(self, inputs_shape)

    def get_config(self):
        return {**super().get_config(), "key_dim": self.key_dim,
                "norm_counts": self.norm_counts}


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedViTEncoderBlock(ViTEncoderBlock):
    """A ViT encoder block whose head size is `key_dim`, not derived.

    Args:
        num_heads: the number of attention heads.
        hidden_dim: the residual width.
        mlp_dim: the MLP hidden width.
        key_dim: the size of each head. Defaults to `None`
            (`hidden_dim // num_heads`).
        norm_counts: see `PrunedTransformerEncoder`. Defaults to `None`.
        **kwargs: the other `ViTEncoderBlock` arguments.

    Example:

    ```python
    block = PrunedViTEncoderBlock(3, hidden_dim=32, mlp_dim=40, key_dim=8)
    ```
    """

    def __init__(self, num_heads, hidden_dim, mlp_dim, key_dim=None,
                 norm_counts=None, **kwargs):
        super().__init__(num_heads, hidden_dim, mlp_dim, **kwargs)
        self.key_dim = key_dim or self.key_dim
        self.norm_counts = norm_counts

    def build(self, input_shape):
        super().build(input_shape)
        weigh(self, ("layer_norm_1", "layer_norm_2"), input_shape)

    def get_config(self):
        return {**super().get_config(), "key_dim": self.key_dim,
                "norm_counts": self.norm_counts}


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedViTEncoder(ViTEncoder):
    """A ViT encoder with a head count and an MLP width per block.

    Args:
        num_layers: the number of blocks.
        num_heads: the number of heads of each block (a list).
        hidden_dim: the residual width.
        mlp_dim: the MLP width of each block (a list).
        key_dim: the size of each head.
        norm_counts: see `PrunedTransformerEncoder`. Defaults to `None`.
        **kwargs: the other `ViTEncoder` arguments.

    Example:

    ```python
    encoder = PrunedViTEncoder(2, [3, 4], 32, [40, 64], key_dim=8)
    ```
    """

    def __init__(self, num_layers, num_heads, hidden_dim, mlp_dim, key_dim,
                 norm_counts=None, **kwargs):
        super().__init__(num_layers, num_heads, hidden_dim, mlp_dim, **kwargs)
        self.key_dim = key_dim
        self.norm_counts = norm_counts

    def build(self, input_shape):
        self.encoder_layers = []
        for i, (heads, mlp) in enumerate(zip(self.num_heads, self.mlp_dim)):
            block = PrunedViTEncoderBlock(
                heads, self.hidden_dim, mlp, key_dim=self.key_dim,
                norm_counts=self.norm_counts, use_mha_bias=self.use_mha_bias,
                use_mlp_bias=self.use_mlp_bias,
                dropout_rate=self.dropout_rate,
                attention_dropout=self.attention_dropout,
                layer_norm_epsilon=self.layer_norm_epsilon,
                dtype=self.dtype_policy, name=f"transformer_block_{i + 1}",
            )
            block.build((None, None, self.hidden_dim))
            self.encoder_layers.append(block)
        self.dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=self.dtype_policy, name="dropout"
        )
        self.layer_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy,
            name="ln",
        )
        self.layer_norm.build((None, None, self.hidden_dim))
        weigh(self, ("layer_norm",), (None, None, self.hidden_dim))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "key_dim": self.key_dim,
                "norm_counts": self.norm_counts}


def pin_key_dim(layer, shape) -> None:
    """Replaces `layer`'s self-attention, built at the head size keras_hub
    derives, by one at `layer.key_dim`."""
    derived = layer._self_attention_layer
    if derived.key_dim == layer.key_dim:
        return
    config = {**derived.get_config(), "key_dim": layer.key_dim,
              "value_dim": layer.key_dim}
    # Untrack the derived-size attention, then build the pinned one.
    layer._layers.remove(derived)
    mha = type(derived).from_config(config)
    mha.build(shape, shape)
    layer._self_attention_layer = mha


def weigh(layer, names, input_shape) -> None:
    """Replaces `layer`'s LayerNormalizations `names` by
    `ClusterNormalization`s of its `norm_counts` (if any), same names."""
    if layer.norm_counts is None:
        return
    for attr in names:
        norm = getattr(layer, attr)
        weighed = ClusterNormalization(
            layer.norm_counts, epsilon=norm.epsilon, center=norm.center,
            scale=norm.scale, name=norm.name, dtype=norm.dtype_policy)
        weighed.build(input_shape)
        layer._layers.remove(norm)  # untrack the plain norm
        setattr(layer, attr, weighed)


register_layer(TransformerEncoder, TransformerEncoderHandler())
register_layer(ViTEncoderBlock, ViTEncoderBlockHandler())
register_layer(ViTEncoder, ViTEncoderHandler())
register_layer(MLP, MLPHandler())
register_layer(ViTPatchingAndEmbedding, PatchingHandler())
