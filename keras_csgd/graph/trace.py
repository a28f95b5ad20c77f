"""Seeing through composite layers: a layer's `call` run on Keras tensors.

A composite layer (keras_hub's `InvertedResidualBlock`, `FusedMBConvBlock`,
a user's block) computes in Python over sub-layers and `keras.ops`. Called
on symbolic `keras.KerasTensor`s instead of values, its `call` leaves the
same node structure a functional model has: every sub-layer call and every
`keras.ops` call becomes a node. `trace` wraps that in a functional model
(named like the layer, its inputs the tensors of the layer's call) that the
analysis walks like a nested model, and `slim` rebuilds in the layer's
place when the plan narrows it.

A layer is not traced when its `call` cannot be replayed as a graph of its
sub-layers: it owns variables itself (they would enter the graph as
constants, and the flat model would not carry them), the call fails on
symbolic tensors (Python branching on values, a dynamic shape it needs),
or the traced graph does not compute what the layer does on random inputs
(checked on every trace: a size read while tracing is a constant of the
graph). Those layers freeze the channels they touch, with the reason.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np

from keras_csgd.graph.nodes import call_arguments
from keras_csgd.graph.shapes import (
    batch_sizes_inferred,
    einsum_shapes_resolved,
)

_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def own_variables(layer) -> list:
    """The variables of `layer` that none of its sub-layers owns."""
    inner = {id(v) for sub in layer._flatten_layers(include_self=False)
             for v in sub.weights}
    return [v for v in layer.weights if id(v) not in inner]


def trace(call):
    """The functional model of one composite layer call, or why not.

    Args:
        call: the `graph.Call` of a layer (not a functional model).

    Returns:
        A functional `keras.Model` named like the layer, with one input per
        input tensor of the call (in `call.inputs` order) and the call's
        outputs, sharing the layer's sub-layers; or a string saying why the
        layer cannot be traced. Traced once per layer and call.
    """
    layer = call.layer
    key = tuple(id(t) for t in call.inputs)
    cached = _TRACES.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    result = _trace(call)
    _TRACES[layer] = (key, result)
    return result


def _trace(call):
    layer = call.layer
    own = own_variables(layer)
    if own:
        return (f"it owns variables ({', '.join(v.name for v in own[:3])}), "
                "which its call would use as constants")
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype)
              for t in call.inputs]
    new_of = {id(t): x for t, x in zip(call.inputs, inputs)}
    args, kwargs = keras.tree.map_structure(
        lambda a: new_of.get(id(a), a), call_arguments(call)
    )
    try:
        with batch_sizes_inferred(), einsum_shapes_resolved():
            outputs = layer.call(*args, **kwargs)
        model = keras.Model(inputs if len(inputs) > 1 else inputs[0],
                            outputs, name=layer.name)
    except Exception as e:  # the call is not a graph of its sub-layers
        return f"its call does not trace ({type(e).__name__}: {e})"[:240]
    return _differs(call, model) or model


def _differs(call, model, batch: int = 2) -> str | None:
    """Why the traced `model` does not compute the layer's call, or `None`.

    Both run on the same random inputs (unknown sizes: `batch`).
    """
    rng = np.random.default_rng(0)
    feeds = []
    for t in call.inputs:
        shape = [d if d is not None else batch for d in t.shape]
        if "float" in str(t.dtype):
            feeds.append(rng.normal(size=shape).astype(t.dtype))
        else:
            feeds.append(rng.integers(0, 2, shape).astype(t.dtype))
    value_of = {id(t): v for t, v in zip(call.inputs, feeds)}
    args, kwargs = keras.tree.map_structure(
        lambda a: value_of.get(id(a), a), call_arguments(call)
    )
    try:
        expected = keras.tree.flatten(call.layer(*args, **kwargs))
        actual = keras.tree.flatten(
            model(feeds if len(feeds) > 1 else feeds[0]))
    except Exception as e:  # the traced graph does not run
        return f"its traced graph fails ({type(e).__name__}: {e})"[:240]
    for a, b in zip(actual, expected):
        a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        if a.shape != b.shape or np.abs(a - b).max() > 1e-4 * (
                1 + np.abs(b).max()):
            return "its traced graph computes something else"
    return None
