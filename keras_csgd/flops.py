"""`count_macs`: multiply-accumulates of one forward pass of a model."""

from __future__ import annotations

import math

import keras

from keras_csgd import graph

L = keras.layers


def _spatial(shape) -> int:
    dims = shape[1:-1]
    if any(d is None for d in dims):
        raise ValueError(
            "`count_macs` needs static spatial shapes; build the model on a "
            f"`keras.Input` with a full shape. Received: shape={shape}"
        )
    return math.prod(dims)


def layer_macs(layer, in_shape, out_shape) -> int:
    """MACs of one call of `layer` (0 for layers that are not counted)."""
    if isinstance(layer, graph.CONV):
        k = math.prod(layer.kernel.shape[:-2])
        cin = layer.kernel.shape[-2]
        return _spatial(out_shape) * k * cin * layer.filters
    if isinstance(layer, graph.TRANSPOSE):
        k = math.prod(layer.kernel.shape[:-2])
        return _spatial(in_shape) * k * in_shape[-1] * layer.filters
    if isinstance(layer, graph.SEPARABLE):
        k = math.prod(layer.depthwise_kernel.shape[:-2])
        cin, m = layer.depthwise_kernel.shape[-2:]
        return _spatial(out_shape) * cin * m * (k + layer.filters)
    if isinstance(layer, graph.DEPTHWISE):
        k = math.prod(layer.kernel.shape[:-2])
        cin, m = layer.kernel.shape[-2:]
        return _spatial(out_shape) * k * cin * m
    if isinstance(layer, L.Dense):
        rows = math.prod(d for d in out_shape[1:-1] if d is not None)
        return rows * layer.kernel.shape[0] * layer.units
    return 0


def count_macs(model) -> int:
    """Multiply-accumulates of one forward pass of one example.

    Counts convolutions (1D/2D/3D, transposed, depthwise, separable) and dense
    layers, nested models included; element-wise layers (BN, activations,
    additions) are not counted, as is usual.

    Args:
        model: a built functional or Sequential `keras.Model` with static
            spatial input shapes.

    Returns:
        The number of multiply-accumulates (int).

    Raises:
        ValueError: for a subclassed model or dynamic spatial shapes.

    Example:

    ```python
    kc.count_macs(kc.models.resnet_cifar(56))  # about 125.5 million
    ```
    """
    graph.check_functional(model)
    total = 0
    for node in graph.topological_nodes(model):
        op = node.operation
        if graph.is_graph_model(op):
            total += count_macs(op)
            continue
        total += layer_macs(
            op, node.input_tensors[0].shape, node.outputs[0].shape
        )
    return total
