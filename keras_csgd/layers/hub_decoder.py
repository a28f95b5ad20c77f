"""keras_hub's `TransformerDecoder` (GPT-2's decoder layers).

Without cross-attention it is BERT's `TransformerEncoder` made causal:
the same self-attention heads, MLP and LayerNormalizations under the same
names, so its handler is the encoder's (`keras_csgd.layers.hub`), with
its own narrower class, `PrunedTransformerDecoder` (head size pinned,
norms weighed). Its backbone's widths (`backbone_widths`) let `slim` keep
`GPT2Backbone` for a plan that leaves the heads whole (`keras_csgd.llm`;
GPT-2 derives the head size as `hidden_dim // num_heads`).
"""

from __future__ import annotations

import keras
from keras_hub.layers import TransformerDecoder

from keras_csgd.layers.hub import TransformerEncoderHandler
from keras_csgd.layers.hub_pruned import PinnedConfig, pin_key_dim, weigh
from keras_csgd.layers.registry import register_layer


class TransformerDecoderHandler(TransformerEncoderHandler):
    """`keras_hub.layers.TransformerDecoder` without cross-attention."""

    def channels(self, ctx, call):
        if call.layer._cross_attention_layer is not None:
            raise ValueError("a decoder with cross-attention")
        return super().channels(ctx, call)

    def pruned(self) -> type:
        return PrunedTransformerDecoder

    def rebuild(self, config, widths):
        # Its config holds the input shape it builds from.
        shape = config.get("decoder_sequence_shape")
        if shape is not None:
            config["decoder_sequence_shape"] = (*shape[:-1],
                                                widths["hidden_dim"])
        return super().rebuild(config, widths)

    def backbone_widths(self, layer) -> dict[str, int]:
        """The block's widths by its backbone's config keys (`kc.llm`)."""
        return {"num_heads": layer.num_heads,
                "intermediate_dim": layer.intermediate_dim,
                "head_dim": layer._self_attention_layer.key_dim}


@keras.saving.register_keras_serializable(package="keras_csgd")
class PrunedTransformerDecoder(PinnedConfig, TransformerDecoder):
    """A `TransformerDecoder` whose head size is `key_dim`, not derived.

    Args:
        intermediate_dim, num_heads, key_dim, norm_counts: as
            `PrunedTransformerEncoder`'s.
        **kwargs: the other `TransformerDecoder` arguments.

    Example:

    ```python
    layer = PrunedTransformerDecoder(48, num_heads=3, key_dim=8)
    ```
    """

    def __init__(self, intermediate_dim, num_heads, key_dim,
                 norm_counts=None, **kwargs):
        # keras_hub builds from a config's shape in `__init__`; here, once
        # `key_dim` is set.
        shape = kwargs.pop("decoder_sequence_shape", None)
        kwargs.pop("encoder_sequence_shape", None)
        super().__init__(intermediate_dim, num_heads, **kwargs)
        self.key_dim = key_dim
        self.norm_counts = norm_counts
        if shape:
            self.build(shape)

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        if encoder_sequence_shape is not None:
            raise ValueError(
                "`PrunedTransformerDecoder` has no cross-attention. "
                f"Received: encoder_sequence_shape={encoder_sequence_shape}"
            )
        super().build(decoder_sequence_shape)
        weigh(self, ("_self_attention_layer_norm", "_feedforward_layer_norm"),
              decoder_sequence_shape)
        pin_key_dim(self, decoder_sequence_shape)


register_layer(TransformerDecoder, TransformerDecoderHandler())
