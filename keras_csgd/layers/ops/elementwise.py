"""Element-wise `keras.ops` operations: functions of one tensor pass every
axis; those of several tensors (`+`, `*`, `where`, ...) are merges, axis by
axis."""

from __future__ import annotations

import numpy as np
from keras.src.ops import core, nn
from keras.src.ops import math as kmath
from keras.src.ops import numpy as knp

from keras_csgd import graph
from keras_csgd.layers.ops.common import _freeze
from keras_csgd.layers.registry import LayerHandler, register_layer
from keras_csgd.layers.structure import MergeHandler

UNARY = {
    nn: ("Celu", "Elu", "Gelu", "Glu", "HardShrink", "HardSigmoid",
         "HardSilu", "HardTanh", "LeakyRelu", "LogSigmoid", "Relu", "Relu6",
         "Selu", "Sigmoid", "Silu", "SoftShrink", "Softplus", "Softsign",
         "SparsePlus", "SparseSigmoid", "Squareplus", "TanhShrink",
         "Threshold"),
    knp: ("Abs", "Absolute", "Ceil", "Clip", "Copy", "Cos", "Exp", "Exp2",
          "Expm1", "Floor", "Log", "Log1p", "Negative", "Reciprocal",
          "Round", "Sign", "Sin", "Sqrt", "Square", "Tanh", "Trunc",
          "NanToNum", "LogicalNot", "Isnan", "Isfinite", "Isinf",
          "ZerosLike", "OnesLike", "FullLike"),
    core: ("Cast", "StopGradient", "ConvertToTensor"),
    kmath: ("Erf", "Erfc", "Rsqrt"),
}
BINARY = (
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "DivideNoNan",
    "FloorDivide", "Maximum", "Minimum", "Power", "Mod", "Where", "Equal",
    "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "LogicalAnd",
    "LogicalOr", "Logaddexp",
)


class UnaryHandler(LayerHandler):
    """An element-wise function of one tensor: every axis passes."""

    axes = "elementwise"

    def channels(self, ctx, call):
        return [call.layouts[0]]


class BinaryHandler(MergeHandler):
    """`x + y`, `x * c`, `where(m, x, y)`: a merge of its tensor inputs.

    A constant argument with more than one entry on an axis of channels
    scales each channel differently, and is not narrowed by `slim`: the
    channels it meets freeze.
    """

    def channels(self, ctx, call):
        (out,) = super().channels(ctx, call)
        args, kwargs = graph.call_arguments(call)
        tensors = {id(t) for t in call.inputs}
        for value in [*args, *kwargs.values()]:
            if id(value) in tensors or value is None:
                continue
            shape = tuple(getattr(value, "shape", np.shape(value)))
            for j in range(1, min(len(shape), len(out)) + 1):
                if shape[-j] not in (1, None):
                    _freeze(ctx, [out[-j]], f"per-channel constant in "
                            f"`{call.name}`")
        return [out]


def _register_all():
    for module, names in UNARY.items():
        for name in names:
            if hasattr(module, name):
                register_layer(getattr(module, name), UnaryHandler())
    for name in BINARY:
        register_layer(getattr(knp, name), BinaryHandler())


_register_all()
