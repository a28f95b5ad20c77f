"""`count_macs` never lies: checked against an independent count, warns on
work it cannot count, and takes the shape a dynamic model is counted at."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc
from keras_csgd import graph
from mac_reference import reference_macs
from zoo import ZOO


def _example(model):
    shape = (1, *model.inputs[0].shape[1:])
    return np.random.default_rng(0).normal(size=shape).astype("float32")


def _counted(model, **kwargs):
    """`count_macs` and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        macs = kc.count_macs(model, **kwargs)
    return macs, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_count_macs_equals_the_independent_count(name):
    model = ZOO[name]()
    macs, messages = _counted(model)
    assert not messages
    assert macs == reference_macs(model, _example(model))


def test_keras_applications_mobilenet_v2_count_matches_reference():
    model = keras.applications.MobileNetV2(
        input_shape=(64, 64, 3), alpha=0.35, weights=None)
    macs, _ = _counted(model)
    assert macs == pytest.approx(reference_macs(model, _example(model)),
                                 rel=0.05)


class Opaque(keras.layers.Layer):
    """A custom layer the registry does not know and the analysis does not
    trace (its `call` reads a weight of its own that no attribute holds),
    doing real work."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(16)

    def build(self, shape):
        self.scales = [self.add_weight(shape=(16,), initializer="ones")]

    def call(self, x):
        return self.dense(x) * self.scales[0]


def test_work_the_registry_cannot_count_is_named_in_a_warning():
    x = inp = keras.Input((10,))
    x = L.Dense(8, name="known")(x)
    x = Opaque(name="opaque")(x)
    model = keras.Model(inp, L.Dense(2, name="head")(x))
    with pytest.warns(UserWarning, match="not counted: opaque"):
        macs = kc.count_macs(model)
    assert macs == 10 * 8 + 16 * 2
    assert reference_macs(model, np.ones((1, 10), "float32")) == (
        macs + 8 * 16)
    plan = kc.make_plan(model, keep=0.5)
    with pytest.warns(UserWarning, match="opaque"):
        kc.macs_under(model, plan)


def _sequence_model():
    x = inp = keras.Input((None, 6), name="seq")
    x = L.Conv1D(8, 3, padding="same", name="conv")(x)
    x = L.Dense(4, name="dense")(x)
    return keras.Model(inp, L.GlobalAveragePooling1D()(x))


def test_a_dynamic_length_is_taken_as_input_shape():
    model = _sequence_model()
    with pytest.raises(ValueError, match="input_shape=None"):
        kc.count_macs(model)
    expected = 10 * (3 * 6 * 8) + 10 * 8 * 4
    assert kc.count_macs(model, input_shape=(10, None)) == expected
    assert kc.count_macs(model, input_shape=[(10, 6)]) == expected
    assert kc.count_macs(model, input_shape={"seq": (10, 6)}) == expected
    plan = kc.PruningPlan({"conv": [[0], [1], [2], [3]]},
                          groups=kc.channel_groups(model))
    assert kc.macs_under(model, plan, input_shape=(10, 6)) == expected // 2
    # The model is left as it was: one call per layer.
    assert all(graph.call_inputs(layer) is not None
               for layer in model.layers[1:])


@pytest.mark.parametrize("bad", [(10,), (10, 7), [(10, 6), (10, 6)]])
def test_an_input_shape_that_does_not_fit_is_refused(bad):
    with pytest.raises(ValueError, match="Received: input_shape="):
        kc.count_macs(_sequence_model(), input_shape=bad)


def test_nested_model_with_dynamic_shapes_counts_on_the_outer_input():
    inner_in = keras.Input((None, None, 3))
    inner = keras.Model(inner_in, L.Conv2D(4, 3, name="ic")(inner_in),
                        name="inner")
    inp = keras.Input((8, 8, 3))
    x = L.GlobalAveragePooling2D()(inner(inp))
    model = keras.Model(inp, L.Dense(2, name="head")(x))
    assert kc.count_macs(model) == 6 * 6 * 27 * 4 + 4 * 2
    assert graph.call_inputs(inner.get_layer("ic")) is not None


def test_nested_sequential_with_dynamic_shapes_counts():
    seq = keras.Sequential([keras.Input((None, None, 3)),
                            L.Conv2D(4, 1, name="sc")], name="seq")
    inp = keras.Input((5, 5, 3))
    x = L.GlobalAveragePooling2D()(seq(inp))
    model = keras.Model(inp, L.Dense(2, name="head")(x))
    assert kc.count_macs(model) == 25 * 3 * 4 + 4 * 2
    assert graph.call_inputs(seq.get_layer("sc")) is not None
