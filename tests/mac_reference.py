"""An independent MAC count: every Conv, Dense and EinsumDense call, measured.

`kc.count_macs` derives MACs from the graph analysis. This reference runs
the model eagerly on one example instead and counts every call of a
convolution (of every kind), Dense and EinsumDense layer, wherever it sits
(inside composite layers too), from the shapes the call actually saw and
the layer's kernel; plus the `einsum`, `matmul` and `dot_product_attention`
calls made outside those layers (attention scores and their weighted sum):
through `keras.ops`, as operations of a functional graph (a traced layer's
graph, a slim model), and with the `@` operator on TensorFlow tensors.
"""

from __future__ import annotations

import contextlib
import math
import string
from unittest import mock

import keras
import numpy as np
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.layers.convolutional.base_conv_transpose import (
    BaseConvTranspose,
)
from keras.src.layers.convolutional.base_depthwise_conv import (
    BaseDepthwiseConv,
)
from keras.src.layers.convolutional.base_separable_conv import (
    BaseSeparableConv,
)


def _size(x) -> int:
    return math.prod(int(d) for d in keras.ops.shape(x))


def _conv(layer, x, y):
    return _size(y) // layer.filters * _size(layer.kernel)


def _transpose(layer, x, y):
    return _size(x) // int(x.shape[-1]) * _size(layer.kernel)


def _depthwise(layer, x, y):
    return _size(y) * math.prod(layer.kernel.shape[:-2])


def _separable(layer, x, y):
    spatial = _size(y) // layer.filters
    return spatial * (_size(layer.depthwise_kernel)
                      + _size(layer.pointwise_kernel))


def _dense(layer, x, y):
    return _size(y) // layer.units * _size(layer.kernel)


def _einsum_dense(layer, x, y):
    inputs, out = layer.equation.split("->")
    kernel = inputs.split(",")[1]
    kept = math.prod(d for c, d in zip(kernel, layer.kernel.shape)
                     if c in out)
    return _size(y) * _size(layer.kernel) // kept


LAYERS = [
    (BaseConv, _conv), (keras.layers.Conv1D, _conv),
    (BaseConvTranspose, _transpose), (BaseDepthwiseConv, _depthwise),
    (BaseSeparableConv, _separable), (keras.layers.Dense, _dense),
    (keras.layers.EinsumDense, _einsum_dense),
]


def _einsum(equation, *operands):
    """MACs of a two-operand einsum: the product of every index's size."""
    ins = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for spec, x in zip(ins, operands):
        shape = keras.ops.shape(x)
        if "..." in spec:
            free = iter(string.ascii_uppercase)
            n = len(shape) - len(spec) + 3
            spec = spec.replace("...", "".join(next(free) for _ in range(n)))
        sizes.update(zip(spec, (int(d) for d in shape)))
    return math.prod(sizes.values())


def _matmul(a, b):
    a_shape, b_shape = keras.ops.shape(a), keras.ops.shape(b)
    batch = np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
    return math.prod(batch) * math.prod(a_shape[-2:]) * int(b_shape[-1])


def _attention(query, key, value, *args, **kwargs):
    b, t, n, h = (int(d) for d in keras.ops.shape(query))
    s, hv = int(keras.ops.shape(key)[1]), int(keras.ops.shape(value)[-1])
    return b * t * n * s * (h + hv)


OPS = {"einsum": _einsum, "matmul": _matmul,
       "dot_product_attention": _attention}
# The same work as operations of a functional graph: `Operation.call`.
OPERATIONS = {keras.src.ops.numpy.Matmul: _matmul,
              keras.src.ops.numpy.Einsum: lambda op, *a: _einsum(
                  op.subscripts, *a),
              keras.src.ops.nn.DotProductAttention: lambda op, *a, **k: (
                  _attention(*a, **k))}


def reference_macs(model, x) -> int:
    """MACs of `model(x)` on one example `x`, counted call by call."""
    total, depth = [0], [0]

    def layer_call(cls, count):
        original = cls.call

        def call(self, *args, **kwargs):
            depth[0] += 1
            try:
                y = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                total[0] += count(self, args[0], y)
            return y

        return call

    def op_call(original, count):
        def call(*args, **kwargs):
            if depth[0] == 0:
                total[0] += count(*args, **kwargs)
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        return call

    def operation_call(cls, count):
        original = cls.call

        def call(self, *args, **kwargs):
            if depth[0] == 0:
                total[0] += (count(*args, **kwargs) if cls is
                             keras.src.ops.numpy.Matmul
                             else count(self, *args, **kwargs))
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return call

    with contextlib.ExitStack() as stack:
        for cls, count in LAYERS:
            stack.enter_context(
                mock.patch.object(cls, "call", layer_call(cls, count)))
        modules = [keras.ops, keras.src.ops, keras.ops.nn,
                   keras.src.ops.numpy, keras.src.ops.nn]
        for module in modules:
            for name, count in OPS.items():
                if hasattr(module, name):
                    stack.enter_context(mock.patch.object(
                        module, name, op_call(getattr(module, name), count)))
        for cls, count in OPERATIONS.items():
            stack.enter_context(
                mock.patch.object(cls, "call", operation_call(cls, count)))
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            stack.enter_context(mock.patch.object(
                tf.Tensor, "__matmul__",
                op_call(tf.Tensor.__matmul__, _matmul)))
        model(x, training=False)
    return total[0]
