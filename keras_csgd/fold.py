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

from keras_csgd import graph

_KERNEL = {  # the kernel whose last axis (or last two) are output channels
    **{cls: "kernel" for cls in (*graph.CONV, *graph.DEPTHWISE)},
    keras.layers.Dense: "kernel",
    **{cls: "pointwise_kernel" for cls in graph.SEPARABLE},
}


def _channel_axis(layer, rank: int) -> int:
    fmt = getattr(layer, "data_format", "channels_last")
    return 1 if fmt == "channels_first" else rank - 1


def _bn_axis(bn, rank: int) -> int | None:
    axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if len(axis) != 1:
        return None
    return axis[0] % rank


def _foldable_pairs(model) -> dict[str, str]:
    """`{bn name: producer name}` of every BN that folds into its input."""
    outputs = {id(t) for t in model.outputs}
    top_level = {layer.name for layer in model.layers}
    pairs = {}
    for bn in model.layers:
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue
        if len(bn._inbound_nodes) != 1:
            continue
        x = bn._inbound_nodes[0].input_tensors[0]
        producer = x._keras_history.operation
        if (
            type(producer) not in _KERNEL
            or len(producer._inbound_nodes) != 1
            or len(producer._outbound_nodes) != 1
            or id(x) in outputs
            or producer.activation is not keras.activations.linear
            or getattr(producer, "lora_enabled", False)
            or producer.name not in top_level
        ):
            continue
        rank = len(x.shape)
        if _bn_axis(bn, rank) != _channel_axis(producer, rank):
            continue
        pairs[bn.name] = producer.name
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
    key = _KERNEL[type(producer)]
    kernel = getattr(producer, key).numpy().astype(np.float64)
    if isinstance(producer, graph.DEPTHWISE):  # (..., in, m): out = in*m + k
        folded = kernel * scale.reshape(kernel.shape[-2:])
    else:
        folded = kernel * scale
    bias = shift
    if producer.use_bias:
        bias = bias + scale * producer.bias.numpy()
    return {key: folded, "bias": bias}


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
    graph.check_functional(model)
    if isinstance(model, keras.Sequential):
        if not model.built:
            raise ValueError(
                "`model` must be built (give it an `Input`). "
                f"Received: model={model!r}"
            )
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    pairs = _foldable_pairs(model)
    producers = set(pairs.values())

    def clone_function(layer):
        config = layer.get_config()
        if layer.name in producers:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call_function(layer, *args, **kwargs):
        if layer.name in pairs:
            return args[0]
        return layer(*args, **kwargs)

    inputs = [
        keras.Input(t.shape[1:], dtype=t.dtype,
                    name=t._keras_history.operation.name)
        for t in model.inputs
    ]
    new_model = keras.models.clone_model(
        model, keras.tree.pack_sequence_as(model.input, inputs),
        clone_function=clone_function, call_function=call_function,
    )
    by_bn = {p: model.get_layer(b) for b, p in pairs.items()}
    for new in new_model.layers:
        if not new.weights:
            continue
        old = model.get_layer(new.name)
        values = {graph.short_name(v): v.numpy() for v in old.weights}
        if new.name in producers:
            values.update(_folded_weights(old, by_bn[new.name]))
        new.set_weights([
            values[graph.short_name(v)].astype(v.dtype) for v in new.weights
        ])
    return new_model
