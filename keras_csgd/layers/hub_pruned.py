"""keras_hub's encoder classes, rebuilt narrower by `keras_csgd.layers.hub`.

keras_hub derives a head's size as `hidden_dim // num_heads`, which fewer
heads or a narrower residual stream would change; its ViT patch embedding's
config does not load back. So the narrower layers are subclasses
(serializable, same weight names, same computation) that pin `key_dim`,
take a head count and an MLP width per block (`PrunedViTEncoder`), and
with `norm_counts` build their LayerNormalizations as
`ClusterNormalization`s, which weigh merged channels (exact merges of the
stream).
"""

from __future__ import annotations

import keras
from keras_hub.layers import TransformerEncoder
from keras_hub.src.models.vit.vit_layers import (
    ViTEncoder,
    ViTEncoderBlock,
    ViTPatchingAndEmbedding,
)

from keras_csgd.layers.cluster_norm import ClusterNormalization


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


class PinnedConfig:
    """The config of a pruned keras_hub class: its pinned head size and its
    norms' counts."""

    def get_config(self):
        return {**super().get_config(), "key_dim": self.key_dim,
                "norm_counts": self.norm_counts}


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedTransformerEncoder(PinnedConfig, TransformerEncoder):
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


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedViTEncoderBlock(PinnedConfig, ViTEncoderBlock):
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


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedViTEncoder(PinnedConfig, ViTEncoder):
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
