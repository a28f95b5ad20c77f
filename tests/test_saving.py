"""A slim model saves to `.keras` and loads back computing the same.

What keras_hub's layers hold that a graph of copied layers would not save:
an `Activation` of a lambda (MobileNetV5), an operation made with NumPy
scalars (D-FINE's decoder), a layer that builds its sub-layers only when
called (DeBERTaV3's relative embedding). Each is checked on a small model
of its own, against the slim model it was saved from (no difference).
"""

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import keras_csgd as kc
from keras_csgd import graph
from keras_csgd.saving import named_activation
from utils import collapse, relative_error
from zoo import randomize


def _x(model, n=3):
    shape = (n, *model.inputs[0].shape[1:])
    return np.random.default_rng(0).normal(size=shape).astype("float32")


def _slim_and_reload(model, tmp_path, custom_objects=None):
    """The collapsed model's slim model, and that model saved and loaded
    (both checked against the model they came from)."""
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    small = kc.slim(model, plan)
    x = _x(model)
    assert relative_error(small(x), model(x)) < 1e-4
    path = tmp_path / "slim.keras"
    small.save(path)
    loaded = keras.saving.load_model(path, custom_objects=custom_objects)
    assert relative_error(loaded(x), small(x)) == 0.0
    return small, loaded


class GeluBlock(L.Layer):
    """A composite layer with keras_hub's way of holding an exact GELU."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.expand = L.Conv2D(width, 1, name="expand")
        self.act = L.Activation(
            lambda x: keras.activations.gelu(x, approximate=False),
            name="act")
        self.project = L.Conv2D(4, 1, name="project")

    def call(self, x):
        return x + self.project(self.act(self.expand(x)))


def test_a_traced_lambda_activation_saves_as_the_activation_it_equals(
        tmp_path):
    x = inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="stem")(x)
    x = GeluBlock(8, name="block")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = randomize(keras.Model(inp, L.Dense(2, name="out")(x)))
    small, loaded = _slim_and_reload(model, tmp_path)
    block = small.get_layer("block")
    assert isinstance(block, keras.Model)  # narrowed: built as its graph
    assert block.get_layer("expand").filters == 4
    act = loaded.get_layer("block").get_layer("act")
    assert act.activation is keras.activations.gelu


def test_a_narrowed_dense_with_a_lambda_activation_saves(tmp_path):
    x = inp = keras.Input((6,))
    x = L.Dense(8, activation=lambda t: ops.maximum(t, 0.0), name="d1")(x)
    model = randomize(keras.Model(inp, L.Dense(2, name="out")(x)))
    small, _ = _slim_and_reload(model, tmp_path)
    assert small.get_layer("d1").units == 4
    assert small.get_layer("d1").activation is keras.activations.relu


def _called(activation, shape=(4, 4, 8), dtype="float32"):
    layer = L.Activation(activation, dtype=dtype)
    layer(keras.Input(shape))
    return layer


@pytest.mark.parametrize("fn, name", [
    (lambda x: keras.activations.gelu(x, approximate=False), "gelu"),
    (lambda x: ops.tanh(x), "tanh"),
    (lambda x: keras.activations.softmax(x), "softmax"),
    # Equal to none: other arguments, other axes, other functions.
    (lambda x: keras.activations.gelu(x, approximate=True), None),
    (lambda x: keras.activations.softmax(x, axis=1), None),
    (lambda x: ops.relu(x) * 2, None),
    (lambda x: ops.minimum(ops.relu(x), 1e6), None),  # equal up to 1e6
])
def test_named_activation_is_found_by_values_only(fn, name):
    assert named_activation(_called(fn)) == name


def test_named_activation_reads_the_compute_dtype_and_leaves_named_ones():
    gelu = _called(lambda x: keras.activations.gelu(x), dtype="mixed_float16")
    assert named_activation(gelu) == "gelu"
    assert named_activation(_called("relu")) is None  # saves as it is
    assert named_activation(L.Activation(lambda x: x)) is None  # not called


class Clipped(L.Layer):
    """A composite layer calling an operation with NumPy scalars."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(8, name="dense")
        self.project = L.Dense(4, name="project")

    def call(self, x):
        top = np.finfo(np.float32).max - 1000.0  # a NumPy float32
        y = ops.clip(self.dense(x), -top, np.float32(0.5))
        return self.project(y * np.float32(2.0))


def test_operations_traced_with_numpy_scalars_save(tmp_path):
    x = inp = keras.Input((6,))
    x = Clipped(name="block")(x)
    model = randomize(keras.Model(inp, L.Dense(2, name="out")(x)))
    traced = graph.analyze(model).traced["block"]
    clip = next(op for op in traced.operations
                if type(op).__name__ == "Clip")
    assert type(clip.get_config()["x_max"]) is float
    small, _ = _slim_and_reload(model, tmp_path)
    assert isinstance(small.get_layer("block"), keras.Model)


class BuiltWhenCalled(L.Layer):
    """Like DeBERTaV3's `RelativeEmbedding`: no `build`, a sub-layer built
    by the first call, and an output shape of its own."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = L.LayerNormalization(name="norm")

    def call(self, x):
        return self.norm(x)

    def compute_output_shape(self, shape):
        return shape


def test_a_copy_built_by_its_call_loads_back(tmp_path):
    x = inp = keras.Input((6,))
    x = L.Dense(8, name="d1")(x)
    x = BuiltWhenCalled(name="odd")(x)
    model = randomize(keras.Model(inp, L.Dense(2, name="out")(x)))
    model(_x(model))
    objects = {"BuiltWhenCalled": BuiltWhenCalled}
    small = kc.slim(model, kc.PruningPlan({}))
    assert type(small.get_layer("odd")) is BuiltWhenCalled
    path = tmp_path / "slim.keras"
    small.save(path)
    loaded = keras.saving.load_model(path, custom_objects=objects)
    x = _x(model)
    assert relative_error(loaded(x), small(x)) == 0.0
