"""Tests of `kc.methods.functionality_plan` on filters built to respond to
one class each."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

import keras_csgd as kc
from keras_csgd.methods.functionality import functionality_profiles

CLASSES = 3
# Filter f of `c1` reads input channel CLASS_OF[f] with weight SCALE[f]:
# filters {0, 2} respond to class 0, {1, 4} to class 1, {3, 5} to class 2.
CLASS_OF = [0, 1, 0, 2, 1, 2]
SCALE = [1.0, 2.0, 3.0, 1.0, 0.5, 2.0]
KEPT = [1, 2, 5]  # the most active filter of each class


def make_data(n=90, seed=0):
    """Class k lights input channel k (plus small non-negative noise)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = rng.uniform(0, 0.05, size=(n, 4, 4, CLASSES))
    x[np.arange(n), :, :, y] += rng.uniform(0.8, 1.2, size=(n, 1))[:, :, None]
    return x.astype("float32"), y


@pytest.fixture(scope="module")
def model():
    x = inp = keras.Input((4, 4, CLASSES))
    x = L.Conv2D(6, 1, use_bias=False, name="c1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(4, 1, name="c2")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(CLASSES, name="out")(x))
    kernel = np.zeros((1, 1, CLASSES, 6), "float32")
    kernel[0, 0, CLASS_OF, np.arange(6)] = SCALE
    model.get_layer("c1").kernel.assign(kernel)
    return model


def reference_profiles(model, x, y):
    """NumPy: per-class mean of the spatially averaged relu(BN output)."""
    probe = keras.Model(model.inputs, model.get_layer("bn1").output)
    act = np.maximum(probe.predict(x, verbose=0), 0).mean(axis=(1, 2))
    prof = np.stack([act[y == k].mean(0) for k in range(CLASSES)], axis=1)
    return prof / np.linalg.norm(prof, axis=1, keepdims=True), act.mean(0)


def test_profiles_match_numpy(model):
    x, y = make_data()
    prof, activity = functionality_profiles(model, (x, y), batch_size=32)[
        "c1"
    ]
    ref_prof, ref_activity = reference_profiles(model, x, y)
    np.testing.assert_allclose(prof, ref_prof, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(activity, ref_activity, rtol=1e-5)


def test_same_class_filters_grouped_and_repeats_removed(model):
    x, y = make_data()
    plan = kc.methods.functionality_plan(model, (x, y), keep=0.5)
    assert plan.bound
    assert plan.clusters["c1"] == [[i] for i in KEPT]
    prof, _ = functionality_profiles(model, (x, y))["c1"]
    for a, b in [(0, 2), (1, 4), (3, 5)]:
        assert np.linalg.norm(prof[a] - prof[b]) < 1e-3
    slim = kc.slim(model, plan)
    assert slim.get_layer("c1").filters == 3
    np.testing.assert_array_equal(
        slim.get_layer("c1").kernel.numpy(),
        model.get_layer("c1").kernel.numpy()[..., KEPT],
    )


def test_dataset_one_hot_labels_give_same_plan(model):
    x, y = make_data()
    ds = tf.data.Dataset.from_tensor_slices((x, np.eye(CLASSES)[y])).batch(16)
    plan = kc.methods.functionality_plan(model, ds, keep=0.5)
    assert plan.clusters["c1"] == [[i] for i in KEPT]


def test_per_example_profiles_without_labels(model):
    x, _ = make_data()
    plan = kc.methods.functionality_plan(model, x, keep=0.5, per_class=False)
    assert plan.clusters["c1"] == [[i] for i in KEPT]
    with pytest.raises(ValueError, match="needs labelled `data`"):
        kc.methods.functionality_plan(model, x, keep=0.5)


def test_bad_arguments(model):
    x, y = make_data()
    with pytest.raises(ValueError, match="`keep` must be"):
        kc.methods.functionality_plan(model, (x, y), keep=0)
    with pytest.raises(ValueError, match="`linkage` must be one of"):
        kc.methods.functionality_plan(model, (x, y), keep=0.5, linkage="ward")
