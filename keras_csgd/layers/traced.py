"""Layers a traced graph is made of besides the traced layer's own.

`graph.trace` reads a composite layer's `call` as a functional model. What
that call computes with besides its sub-layers and `keras.ops` becomes a
layer of the graph, so that the graph computes what the layer does and
`slim` can narrow it:

- `Weight`: a variable the layer owns and uses directly (`ops.add(x,
  self.position_embedding)`, a class token, a LayerScale's vector, a table
  of relative position biases). The traced graph holds the variable itself
  (one object with the layer's: the analysis and the plan name it by its
  path); its last axis is a member of the channels it meets, like a
  BatchNormalization's vectors, and `slim` rebuilds it narrower.
- `BatchTile`: a tile or broadcast to the batch size, which the call reads
  as a Python number (`ops.tile(self.class_token, (batch_size, 1, 1))`);
  the graph reads it from the tensor it was read from.
- `Constant`: an output of the call that is no tensor of the graph (`None`,
  or a constant such as DeiT's empty stack of attention scores).

All three save and load as `.keras` (`keras_csgd>Weight`, ...).
"""

from __future__ import annotations

from fractions import Fraction

import keras
import numpy as np
from keras import ops

from keras_csgd.graph.layout import Axes
from keras_csgd.layers.registry import LayerHandler, register_layer


@keras.saving.register_keras_serializable(package="keras_csgd")
class Weight(keras.layers.Layer):
    """A variable as a tensor: its value, whatever the input.

    Args:
        value_shape: the variable's shape.
        variable: a variable to hold (a traced layer's own). Defaults to
            `None` (a new variable of zeros, built on first call).
        **kwargs: other `keras.layers.Layer` arguments (`name`,
            `trainable`, `dtype`).

    Example:

    ```python
    token = Weight((1, 1, 16), name="class_token")(images)  # (1, 1, 16)
    ```
    """

    def __init__(self, value_shape, variable=None, **kwargs):
        super().__init__(**kwargs)
        self.value_shape = tuple(int(d) for d in value_shape)
        if variable is not None:
            self.value = variable
            self.built = True

    def build(self, input_shape=None):
        self.value = self.add_weight(
            shape=self.value_shape, initializer="zeros",
            trainable=self.trainable, name="value",
        )

    def call(self, inputs):
        return ops.convert_to_tensor(self.value)

    def compute_output_shape(self, input_shape):
        return self.value_shape

    def get_config(self):
        return {**super().get_config(), "value_shape": self.value_shape}


@keras.saving.register_keras_serializable(package="keras_csgd")
class BatchTile(keras.layers.Layer):
    """`ops.tile` (or `ops.broadcast_to`) to the batch size of a tensor.

    Args:
        sizes: the repeats (`tile`) or the shape (`broadcast`) of every
            axis; the first is replaced by the batch size.
        multiple: `(numerator, denominator)`: the first axis is the
            reference's batch size times `numerator // denominator`.
            Defaults to `(1, 1)`.
        mode: `"tile"` or `"broadcast"`. Defaults to `"tile"`.
        **kwargs: other `keras.layers.Layer` arguments.

    Example:

    ```python
    tokens = BatchTile((1, 1, 1))(token, images)  # (batch, 1, 16)
    ```
    """

    def __init__(self, sizes, multiple=(1, 1), mode="tile", **kwargs):
        super().__init__(**kwargs)
        self.sizes = [int(d) for d in sizes]
        self.multiple = tuple(int(m) for m in multiple)
        self.mode = mode

    def call(self, x, reference):
        num, den = self.multiple
        sizes = [ops.shape(reference)[0] * num // den, *self.sizes[1:]]
        if self.mode == "tile":
            return ops.tile(x, sizes)
        return ops.broadcast_to(x, sizes)

    def compute_output_shape(self, x_shape, reference_shape=None):
        if self.mode == "tile":
            rank = max(len(x_shape), len(self.sizes))
            dims = (1,) * (rank - len(x_shape)) + tuple(x_shape)
            return (None, *(d * r for d, r in zip(dims[1:], self.sizes[1:])))
        return (None, *self.sizes[1:])

    def get_config(self):
        return {**super().get_config(), "sizes": self.sizes,
                "multiple": self.multiple, "mode": self.mode}


@keras.saving.register_keras_serializable(package="keras_csgd")
class Constant(keras.layers.Layer):
    """A constant output (an empty one for `None`), whatever the input.

    Args:
        value: a nested list. Defaults to `None` (an empty float tensor).
        **kwargs: other `keras.layers.Layer` arguments.

    Example:

    ```python
    nothing = Constant()(x)  # shape (0,)
    ```
    """

    def __init__(self, value=None, **kwargs):
        super().__init__(**kwargs)
        self.value = np.zeros((0,), "float32") if value is None else (
            np.asarray(value, dtype=self.dtype))

    def call(self, inputs):
        return ops.convert_to_tensor(self.value)

    def compute_output_shape(self, input_shape):
        return self.value.shape

    def get_config(self):
        return {**super().get_config(), "value": self.value.tolist()}


class WeightHandler(LayerHandler):
    """`Weight`: its last axis holds new channels, the variable's entries a
    member of them (they join the channels it is added to, multiplied
    with or concatenated beside); rebuilt at the new width."""

    axes = "full"

    def channels(self, ctx, call):
        variable = call.layer.value
        rank = len(variable.shape)
        if not rank:
            return [Axes((None,))]
        lay = ctx.new_group(variable.shape[-1], call.name)
        ctx.weak(lay)
        ctx.member(call, variable, rank - 1, lay)
        ctx.width(call, "value_shape", lay)
        return [Axes((*(None,) * (rank - 1), lay))]

    def rebuild(self, config, widths):
        config["value_shape"] = (*config["value_shape"][:-1],
                                 widths["value_shape"])
        return config


class BatchTileHandler(LayerHandler):
    """`BatchTile`: the first axis is the batch; an axis of channels tiled
    `r` times holds `r` copies of its layout."""

    axes = "full"

    def channels(self, ctx, call):
        layer, axes = call.layer, call.axes[0]
        rank = max(len(axes), len(layer.sizes))
        axes = (None,) * (rank - len(axes)) + tuple(axes)
        out = [None]
        for lay, n in zip(axes[1:], layer.sizes[1:]):
            if lay is not None and layer.mode == "tile":
                lay = ctx.tile(lay, n)
            out.append(lay)
        k = ctx.multiple.get(id(call.inputs[1]), 1)
        ctx.multiple[id(call.outputs[0])] = None if k is None else (
            k * Fraction(*layer.multiple))
        return [Axes(out)]


class ConstantHandler(LayerHandler):
    """`Constant`: no channels."""

    axes = "full"

    def channels(self, ctx, call):
        return [Axes((None,) * max(1, len(call.outputs[0].shape)))]


register_layer(Weight, WeightHandler())
register_layer(BatchTile, BatchTileHandler())
register_layer(Constant, ConstantHandler())
