"""keras_hub's small layers: drop paths, embeddings, norms and scales.

keras_hub's drop-path layers (stochastic depth, one per family) scale each
example of a batch as a whole while training and are the identity at
inference: channels pass through. They own a seed generator, so they
cannot be traced (`keras_csgd.graph.trace`), and are called twice in a
block, which would freeze a traced stateless layer as shared.

`ReversibleEmbedding` and `PositionEmbedding` are embeddings: their
tables' last axis produces (or is a member of) the output channels. The
RMS norms of each family and the LayerScales own their weights (so are
not traced): the norms' scales are members, weighed when channels merge
(`ChannelNormHandler`), the LayerScales' are per-channel members
(`ScaleHandler`).

This module imports keras_hub; the registry imports it the first time it
looks up a keras_hub layer.
"""

from __future__ import annotations

import importlib

from keras_hub.layers import PositionEmbedding, ReversibleEmbedding

from keras_csgd.layers.elementwise import PassThroughHandler
from keras_csgd.layers.embedding import ReversibleEmbeddingHandler
from keras_csgd.layers.normalization import ChannelNormHandler, ScaleHandler
from keras_csgd.layers.registry import LayerHandler, register_layer

DROP_PATHS = {
    "keras_hub.src.models.mit.mit_layers": "DropPath",
    "keras_hub.src.models.swin_transformer.swin_transformer_layers":
        "DropPath",
    "keras_hub.src.models.mobilenetv5.mobilenetv5_layers": "DropPath",
    "keras_hub.src.models.dinov2.dinov2_layers": "DINOV2DropPath",
    "keras_hub.src.models.dinov3.dinov3_layers": "DINOV3DropPath",
}
M = "keras_hub.src.models."
RMS_NORMS = {  # (module, class): (scale attribute, offset added to it)
    ("keras_hub.src.layers.modeling.rms_normalization", "RMSNormalization"):
        ("scale", 0.0),
    (M + "llama.llama_layernorm", "LlamaLayerNorm"): ("scale", 0.0),
    (M + "qwen.qwen_layernorm", "QwenLayerNorm"): ("scale", 0.0),
    (M + "qwen3.qwen3_layernorm", "Qwen3LayerNorm"): ("scale", 0.0),
    (M + "gemma.rms_normalization", "RMSNormalization"): ("scale", 1.0),
    (M + "gemma3.gemma3_layers", "RMSNormalization"): ("scale", 1.0),
    (M + "mistral.mistral_layer_norm", "MistralLayerNormalization"):
        ("scale", 0.0),
    (M + "phi3.phi3_layernorm", "Phi3LayerNorm"): ("scale", 0.0),
    (M + "mixtral.mixtral_layer_norm", "MixtralLayerNormalization"):
        ("scale", 0.0),
    (M + "t5.t5_layer_norm", "T5LayerNorm"): ("weight", 0.0),
    (M + "mobilenetv5.mobilenetv5_layers", "RmsNorm2d"): ("gamma", 0.0),
}
SCALES = {  # (module, class): (scale attribute, width config key)
    (M + "dinov2.dinov2_layers", "DINOV2LayerScale"): ("lambda1", "hidden_dim"),
    (M + "dinov3.dinov3_layers", "DINOV3LayerScale"): ("lambda1", "hidden_dim"),
    (M + "mobilenetv5.mobilenetv5_layers", "LayerScale2d"): ("gamma", "dim"),
}


class PositionEmbeddingHandler(LayerHandler):
    """`PositionEmbedding`: one learned vector per position, per channel.

    Its output is added to the token embeddings, whose group it joins at
    the addition; its table's last axis is a member of its input's layout.
    """

    def channels(self, ctx, call):
        lay = call.layouts[0]
        ctx.member(call, call.layer.position_embeddings, 1, lay)
        return [lay]


def _class(module: str, name: str):
    """A keras_hub class, or `None` (another keras_hub version)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _register_all():
    handlers = [(_class(m, n), PassThroughHandler())
                for m, n in DROP_PATHS.items()]
    handlers += [(_class(*where), ChannelNormHandler(*how))
                 for where, how in RMS_NORMS.items()]
    handlers += [(_class(*where), ScaleHandler(*how))
                 for where, how in SCALES.items()]
    for cls, handler in dict(handlers).items():  # one per class
        if cls is not None:
            register_layer(cls, handler)
    register_layer(ReversibleEmbedding, ReversibleEmbeddingHandler())
    register_layer(PositionEmbedding, PositionEmbeddingHandler())


_register_all()
