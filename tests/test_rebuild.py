"""`rebuild` re-creates only what changes; everything else is copied.

A layer the plan leaves alone keeps its class and values through a copy
made without its config (`copy_layer`): a config that does not load back
never makes `slim` fail, and the slim model shares nothing with the
original.
"""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc
from keras_csgd import graph
from keras_csgd.layer_copy import copy_layer
from keras_csgd.runtimes import litert
from utils import collapse, relative_error
from zoo import ZOO, randomize


class Unloadable(keras.layers.Layer):
    """A layer with a sub-layer whose config does not load back."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = L.Dense(units, name="inner")

    def build(self, shape):
        self.dense.build(shape)
        # In a list, which tracing does not read: the layer stays opaque.
        self.scales = [self.add_weight(shape=(self.units,), name="scale")]

    def call(self, x):
        return self.dense(x) * self.scales[0]

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "derived": 2 * self.units}  # __init__ rejects it


def _with_unloadable():
    x = inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 1, name="c2")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = Unloadable(5, name="odd")(x)
    return randomize(keras.Model(inp, L.Dense(2, name="out")(x)))


def _x(model, n=3):
    shape = (n, *model.inputs[0].shape[1:])
    return np.random.default_rng(0).normal(size=shape).astype("float32")


def test_copy_layer_has_its_own_variables_and_sub_layers():
    model = _with_unloadable()
    odd = model.get_layer("odd")
    twin = copy_layer(odd)
    assert type(twin) is Unloadable and twin.name == "odd"
    assert twin.dense is not odd.dense
    x = np.ones((2, 6), "float32")
    np.testing.assert_array_equal(twin(x), odd(x))
    old = {id(v) for v in odd.weights}
    assert not old & {id(v) for v in twin.weights}
    twin.scales[0].assign(np.zeros(5, "float32"))
    assert np.abs(odd.scales[0].numpy()).sum() > 0
    assert [v.path for v in twin.weights] == [v.path for v in odd.weights]


class Lazy(keras.layers.Layer):
    """A layer whose sub-layer is built at its first call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add = L.Add()

    def call(self, x):
        return self.add([x, x])


def test_copy_of_an_unbuilt_sub_layer_builds_itself_not_the_original():
    lazy = Lazy()
    twin = copy_layer(lazy)
    twin(np.ones((2, 3), "float32"))
    assert twin.add.built and not lazy.add.built


def test_copy_layer_refuses_a_functional_model():
    with pytest.raises(TypeError, match="functional or Sequential"):
        copy_layer(ZOO["nested"]())


def test_slim_copies_a_layer_whose_config_does_not_load_back():
    model = _with_unloadable()
    with pytest.raises(TypeError):
        Unloadable.from_config(model.get_layer("odd").get_config())
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    assert set(plan.clusters) == {"c1"}  # c2 feeds the unknown layer
    collapse(model, plan)
    x = _x(model)
    small = kc.slim(model, plan)
    assert relative_error(small(x), model(x)) < 1e-4
    assert small.get_layer("c1").filters == 4
    assert type(small.get_layer("odd")) is Unloadable
    identity = kc.slim(model, kc.PruningPlan({}))
    np.testing.assert_array_equal(identity(x), model(x))


def test_a_copy_whose_config_fails_saves_its_constructor_arguments(
        tmp_path):
    model = _with_unloadable()
    small = kc.slim(model, kc.make_plan(model, keep=0.5))
    path = tmp_path / "slim.keras"
    small.save(path)
    loaded = keras.saving.load_model(
        path, custom_objects={"Unloadable": Unloadable})
    x = _x(model)
    np.testing.assert_array_equal(loaded(x), small(x))


def test_slim_model_shares_no_layer_or_variable_with_the_original():
    model = randomize(ZOO["resnet20"]())
    small = kc.slim(model, kc.make_plan(model, keep=0.5))
    assert not {id(layer) for layer in model.layers} & {
        id(layer) for layer in small.layers}
    assert not {id(v) for v in model.weights} & {id(v) for v in small.weights}
    # Every layer of both models keeps a single call of its own.
    for m in (model, small):
        assert all(graph.call_inputs(layer) is not None
                   for layer in m.layers[1:])


def test_training_the_slim_model_leaves_the_original_alone():
    model = randomize(ZOO["plain_cnn"]())
    before = [w.copy() for w in model.get_weights()]
    small = kc.slim(model, kc.PruningPlan({}))
    small.compile(optimizer="sgd", loss="mse")
    x = _x(model, 8)
    small.fit(x, np.ones((8, 4)), epochs=1, verbose=0)
    assert any(np.abs(a - b).max() > 0
               for a, b in zip(small.get_weights(), before))
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_only_changed_layers_are_rebuilt_from_their_config(monkeypatch):
    model = randomize(ZOO["plain_cnn"]())
    plan = kc.PruningPlan({"c2": [[0], [1], [2]]},
                          groups=kc.channel_groups(model))
    configs = []
    for layer in model.layers:
        original = layer.get_config
        monkeypatch.setattr(
            layer, "get_config",
            lambda o=original, n=layer.name: configs.append(n) or o())
    kc.slim(model, plan)
    # c2 is narrowed, prelu's alpha too, fc1 reads fewer inputs; the
    # others (c1, bn1, out, ...) are copies.
    assert sorted(configs) == ["c2", "fc1", "prelu"]


def test_fold_batchnorm_of_a_slim_model_folds_every_pair():
    model = randomize(ZOO["bottleneck"]())
    small = kc.slim(model, kc.make_plan(model, keep=0.5))
    folded = kc.fold_batchnorm(small)
    names = {layer.name for layer in folded.layers}
    assert not {n for n in names if "bn" in n}
    x = _x(model)
    assert relative_error(folded(x), small(x)) < 1e-4


def test_slim_model_with_a_copied_custom_layer_saves_and_exports(tmp_path):
    model = randomize(ZOO["mbv2"]())
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    small = kc.slim(model, plan)
    x = _x(model, 8)
    path = tmp_path / "slim.keras"
    small.save(path)
    np.testing.assert_array_equal(keras.saving.load_model(path)(x), small(x))
    result = kc.export_tflite(small, tmp_path / "slim.tflite")
    actual = litert.run_tflite(result.path, x)
    assert relative_error(actual, small(x)) <= litert.TOLERANCES[None]
