"""Tests of `kc.fold_batchnorm`: outputs kept, the right BNs folded."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc
from utils import relative_error
from zoo import ZOO, randomize


def bn_names(model):
    return {
        layer.name for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }


def depthwise_separable_dense():
    x = inp = keras.Input((10, 10, 4))
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU()(x)
    x = L.SeparableConv2D(6, 3, use_bias=False, name="sep")(x)
    x = L.BatchNormalization(name="sep_bn", scale=False)(x)
    x = L.Conv2D(5, 1, activation="relu", name="relu_conv")(x)
    x = L.BatchNormalization(name="after_relu_bn")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(7, name="fc")(x)
    x = L.BatchNormalization(name="fc_bn", center=False)(x)
    return keras.Model(inp, x)


def other_axis():
    x = inp = keras.Input((8, 3))
    x = L.Conv1D(4, 3, name="c")(x)
    x = L.BatchNormalization(axis=1, name="time_bn")(x)  # not channels
    return keras.Model(inp, L.Flatten()(x))


CASES = {**ZOO, "separable": depthwise_separable_dense,
         "other_axis": other_axis}


@pytest.mark.parametrize("name", sorted(CASES))
def test_folded_model_computes_the_same(name):
    model = randomize(CASES[name]())
    folded = kc.fold_batchnorm(model)
    x = np.random.default_rng(1).normal(
        size=(4, *model.inputs[0].shape[1:])
    ).astype("float32")
    expected = model.predict(x, verbose=0)
    assert relative_error(folded.predict(x, verbose=0), expected) < 1e-5
    assert len(bn_names(folded)) <= len(bn_names(model))


def test_which_batchnorms_fold():
    model = randomize(depthwise_separable_dense())
    folded = kc.fold_batchnorm(model)
    # After an activation a BN is not a function of the linear output.
    assert bn_names(folded) == {"after_relu_bn"}
    assert folded.get_layer("sep").use_bias
    assert [layer.name for layer in folded.layers] == [
        layer.name for layer in model.layers
        if layer.name not in {"dw_bn", "sep_bn", "fc_bn"}
    ]
    preact = kc.fold_batchnorm(randomize(ZOO["preact"]()))
    assert "final_bn" in bn_names(preact) and "p0_bn1" in bn_names(preact)
    resnet = kc.fold_batchnorm(randomize(ZOO["resnet20"]()))
    assert not bn_names(resnet)
    time = kc.fold_batchnorm(randomize(other_axis()))
    assert bn_names(time) == {"time_bn"}


def test_shared_output_is_not_folded():
    x = inp = keras.Input((6,))
    h = L.Dense(4, name="fc")(x)
    out = L.Add()([L.BatchNormalization(name="bn")(h), h])
    folded = kc.fold_batchnorm(randomize(keras.Model(inp, out)))
    assert bn_names(folded) == {"bn"}


def test_model_is_left_untouched():
    model = randomize(ZOO["resnet20"]())
    before = [v.numpy().copy() for v in model.weights]
    kc.fold_batchnorm(model)
    for v, old in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), old)


def test_bad_inputs():
    with pytest.raises(TypeError, match="must be a keras.Model"):
        kc.fold_batchnorm("model.keras")
    with pytest.raises(ValueError, match="must be built"):
        kc.fold_batchnorm(keras.Sequential([L.Dense(2)]))

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed model"):
        kc.fold_batchnorm(Sub())
