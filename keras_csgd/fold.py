"""Folds inference-mode BatchNormalization into the preceding layer.

At inference a BatchNormalization is a per-channel affine map,
`y = s * (x - mean) + beta` with `s = gamma / sqrt(var + eps)`. When `x` is
the linear output of a Conv/Dense, the map folds into its weights:
`kernel' = s * kernel` (along the output channels) and
`bias' = s * (bias - mean) + beta`. The BN layer then disappears from the
graph. LiteRT's converter already does this; TensorFlow does not, and its
CPU kernels fuse a convolution with a following bias add and ReLU
(`_FusedConv2D`), which a BN in between prevents.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_csgd import graph, layers
from keras_csgd.rebuild import rebuild, with_bias


def _channel_axis(layer, rank: int) -> int:
    fmt = getattr(layer, "data_format", "channels_last")
    return 1 if fmt == "channels_first" else rank - 1


def _foldable_pairs(model) -> dict[str, str]:
    """`{producer name: bn name}` of every BN that folds into its input."""
    outputs = {id(t) for t in model.outputs}
    pairs = {}
    for producer in model.layers:
        handler = layers.handler_for(producer)
        if handler is None or handler.fold(producer) is None:
            continue
        bn = graph.sole_reader(producer)
        if (
            bn is None or not layers.attribute(bn, "normalizes")
            or graph.call_inputs(bn) is None
            or id(producer.output) in outputs
            or producer.activation is not keras.activations.linear
            or getattr(producer, "lora_enabled", False)
        ):
            continue
        rank = len(producer.output.shape)
        axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
        if len(axis) == 1 and axis[0] % rank == _channel_axis(producer, rank):
            pairs[producer.name] = bn.name
    return pairs


def _folded_weights(producer, bn) -> dict[str, np.ndarray]:
    """The producer's kernel and bias with `bn` folded in."""
    mean = bn.moving_mean.numpy().astype(np.float64)
    var = bn.moving_variance.numpy().astype(np.float64)
    scale = 1.0 / np.sqrt(var + bn.epsilon)
    if bn.gamma is not None:
        scale = scale * bn.gamma.numpy()
    shift = -scale * mean
    if bn.beta is not None:
        shift = shift + bn.beta.numpy()
    key = layers.handler_for(producer).fold(producer)
    kernel = getattr(producer, key).numpy().astype(np.float64)
    # The output channels are the kernel's trailing axes: (..., out), or
    # (..., in, m) behind a depth multiplier (channel in * m + k).
    k = next(k for k in range(1, kernel.ndim + 1)
             if np.prod(kernel.shape[-k:]) == scale.size)
    folded = kernel * scale.reshape(kernel.shape[-k:])
    bias = shift
    if producer.use_bias:
        bias = bias + scale * producer.bias.numpy()
    return {key: folded, "bias": bias}


def _functional(model):
    """`model` as a functional model (a built Sequential's graph)."""
    graph.check_functional(model)
    if isinstance(model, keras.Sequential):
        if not model.built:
            raise ValueError(
                "`model` must be built (give it an `Input`). "
                f"Received: model={model!r}"
            )
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def folds_any(model) -> bool:
    """Whether `fold_batchnorm(model)` would fold any BatchNormalization
    (without copying the model)."""
    return bool(_foldable_pairs(_functional(model)))


def fold_batchnorm(model):
    """Returns a copy of `model` with its BatchNormalization folded away.

    Every top-level BatchNormalization whose input is the linear output of
    a Conv, Dense, DepthwiseConv or SeparableConv layer (used by nothing
    else, normalising its channel axis) is folded into that layer's kernel
    and bias (a bias is created where absent) and removed. Other BNs (after
    an activation, an Add, a Concatenate, inside nested models) stay. The
    copy computes the model's inference outputs (`training=False`) up to
    float32 rounding; it is for inference: training it would no longer
    normalise batches.

    Use it for TensorFlow/Keras inference: TensorFlow's CPU kernels then
    fuse each convolution with its bias and ReLU. The LiteRT converter
    folds BN by itself, so `kc.export_tflite` needs no folding.

    Args:
        model: a functional or Sequential `keras.Model`.

    Returns:
        A new, uncompiled functional `keras.Model` with the same inputs,
        outputs and names of the layers it keeps.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: on a subclassed or unbuilt model.

    Example:

    ```python
    fast = kc.fold_batchnorm(kc.slim(model, plan))
    fast.predict(x)  # same outputs as the slim model, fewer ops
    ```
    """
    model = _functional(model)
    pairs = _foldable_pairs(model)
    skipped = set(pairs.values())

    def call(name, layer, args, kwargs):
        return args[0] if name in skipped else NotImplemented

    values = {
        p: _folded_weights(model.get_layer(p), model.get_layer(b))
        for p, b in pairs.items()
    }
    return rebuild(model, dict.fromkeys(pairs, with_bias), call, values)
