"""The layer registry: registering handlers, subclasses, failing handlers."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc
from keras_csgd import layers
from utils import collapse, relative_error
from zoo import randomize


class ChannelScale(L.Layer):
    """A user layer: one learned scale per channel."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), name="scale")

    def call(self, x):
        return x * self.scale


class ChannelScaleHandler(layers.LayerHandler):
    def channels(self, ctx, call):
        (lay,) = call.layouts
        ctx.member(call, call.layer.scale, 0, lay)
        return [lay]


class FailingHandler(layers.LayerHandler):
    def channels(self, ctx, call):
        (lay,) = call.layouts
        ctx.member(call, call.layer.scale, 0, lay)
        raise RuntimeError("cannot read this layer")


class PlainConv(L.Conv2D):
    """A Conv2D subclass that keeps Conv2D's computation."""


class ShiftedConv(L.Conv2D):
    """A Conv2D subclass with its own computation."""

    def call(self, x):
        return super().call(x) + 1.0


@pytest.fixture
def registered():
    """Registers `ChannelScale` with `handler` for one test."""
    def register(handler):
        kc.register_layer(ChannelScale, handler)
    yield register
    layers.unregister_layer(ChannelScale)


def _scale_model():
    x = inp = keras.Input((6,))
    x = L.Dense(8, name="d1")(x)
    x = ChannelScale(name="scale")(x)
    x = L.Dense(8, activation="relu", name="d2")(x)
    return keras.Model(inp, L.Dense(3, name="out")(x))


def _conv_model(conv):
    x = inp = keras.Input((8, 8, 3))
    x = conv(6, 3, name="c1")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(2, name="out")(x))


def _groups(model):
    return {g.name: g for g in kc.channel_groups(model)}


def _x(shape, n=4):
    return np.random.default_rng(1).normal(size=(n, *shape)).astype("float32")


def test_registered_custom_layer_slims_exactly(registered):
    registered(ChannelScaleHandler())
    model = randomize(_scale_model())
    g = _groups(model)["d1"]
    assert g.prunable
    assert ("scale", "scale/scale", 0) in g.members
    plan = kc.make_plan(model, keep=0.5)
    collapse(model, plan)
    small = kc.slim(model, plan)
    x = _x((6,))
    assert relative_error(small(x), model(x)) < 1e-4
    assert small.get_layer("scale").scale.shape == (4,)
    assert kc.count_macs(small) < kc.count_macs(model)
    assert small.count_params() < model.count_params()


def test_unregistered_custom_layer_is_traced_with_its_variable():
    # Its call reads `self.scale`: the traced graph reads it as a `Weight`.
    model = randomize(_scale_model())
    g = _groups(model)["d1"]
    assert g.prunable
    assert ("scale/scale", "scale/scale", 0) in g.members
    plan = kc.make_plan(model, keep=0.5)
    collapse(model, plan)
    small = kc.slim(model, plan)
    x = _x((6,))
    assert relative_error(small(x), model(x)) < 1e-4


def test_failing_handler_freezes_with_reason_and_never_slims(registered):
    registered(FailingHandler())
    model = randomize(_scale_model())
    groups = _groups(model)
    assert not groups["d1"].prunable
    assert "handler failed (cannot read this layer)" in groups["d1"].reason
    # Its partial declarations were dropped: no entry of `scale` remains.
    assert all(m[0] != "scale" for g in groups.values() for m in g.members)
    plan = kc.make_plan(model, keep=0.5)
    assert set(plan.clusters) == {"d2"}
    collapse(model, plan)
    small = kc.slim(model, plan)
    x = _x((6,))
    assert relative_error(small(x), model(x)) < 1e-4
    assert small.get_layer("scale").scale.shape == (8,)


def test_register_layer_validates_its_arguments(registered):
    class NoFold:
        def channels(self, ctx, call):
            return call.layouts

        def rebuild(self, config, widths):
            return config

    with pytest.raises(TypeError, match="lacks fold.*Received: handler="):
        kc.register_layer(ChannelScale, NoFold())
    with pytest.raises(TypeError, match="`layer_class` must be a class"):
        kc.register_layer(ChannelScale(), ChannelScaleHandler())
    registered(ChannelScaleHandler())
    with pytest.raises(ValueError, match="already registered.*override=True"):
        kc.register_layer(ChannelScale, FailingHandler())
    replacement = FailingHandler()
    assert kc.register_layer(ChannelScale, replacement, override=True) is (
        replacement
    )
    assert layers.handler_for(ChannelScale()) is replacement


def test_subclass_without_call_is_handled_as_its_base():
    model = randomize(_conv_model(PlainConv))
    assert _groups(model)["c1"].prunable
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    collapse(model, plan)
    small = kc.slim(model, plan)
    x = _x((8, 8, 3))
    assert relative_error(small(x), model(x)) < 1e-4
    assert type(small.get_layer("c1")) is PlainConv
    assert small.get_layer("c1").filters == 3


def test_subclass_overriding_call_is_not_handled_as_its_base():
    # Traced instead: its convolution is an operation on its kernel.
    groups = _groups(_conv_model(ShiftedConv))
    assert not groups["c1/_kernel"].prunable
    assert "unsupported operation `c1/conv` (Conv)" in groups[
        "c1/_kernel"].reason


def test_keras_hub_stays_optional():
    """Without keras_hub, none of its handlers is imported."""
    code = (
        "import sys; sys.modules['keras_hub'] = None; import keras_csgd; "
        "assert 'keras_csgd.layers.hub' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slim_keras_hub_model_loads_in_a_fresh_process(tmp_path):
    """Its `Pruned...` layer classes are registered by `import keras_csgd`
    alone (no keras_hub layer looked up yet)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from hub_zoo import FAMILIES, inputs

    model = FAMILIES["BERT"].build()
    small = kc.slim(model, kc.make_plan(model, keep=0.5, method="kmeans"))
    assert any(type(layer).__name__.startswith("Pruned")
               for layer in small._flatten_layers())
    small.save(tmp_path / "slim.keras")
    x = inputs(model, FAMILIES["BERT"].kind)
    np.savez(tmp_path / "x.npz", **x)
    code = (
        "import sys, numpy as np, keras, keras_csgd; "
        f"m = keras.saving.load_model({str(tmp_path / 'slim.keras')!r}); "
        f"x = dict(np.load({str(tmp_path / 'x.npz')!r})); "
        f"np.save({str(tmp_path / 'y.npy')!r}, "
        "keras.ops.convert_to_numpy(m(x)['sequence_output']))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_array_equal(
        np.load(tmp_path / "y.npy"),
        keras.ops.convert_to_numpy(small(x)["sequence_output"]))
