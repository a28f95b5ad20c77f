"""Tests for the global top-Q selection, `kc.sparsify` and the report."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_csgd as kc
from keras_csgd.sparsity import top_q_threshold


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(12, activation="relu")(x)
    outputs = keras.layers.Dense(4)(x)
    return keras.Model(inputs, outputs)


def _kernels(model):
    return [v for v in model.trainable_weights if len(v.shape) >= 2]


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("density", [0.001, 0.1, 0.5, 0.99])
def test_threshold_is_exact_qth_largest(density, jit_compile):
    rng = np.random.default_rng(1)
    # Magnitudes spread over many octaves, down to subnormals.
    scores = (rng.random(5000) * 10.0 ** rng.integers(-40, 3, 5000)).astype(
        np.float32
    )
    q = int(scores.size * density)
    fn = tf.function(lambda s: top_q_threshold(s, q), jit_compile=jit_compile)
    threshold = fn(tf.constant(scores)).numpy()
    assert threshold == np.sort(scores)[-q]
    assert np.sum(scores >= threshold) == q


def test_threshold_keeps_ties_and_edge_budgets():
    scores = tf.constant([0.5, 1.0, 1.0, 1.0, 0.0])
    assert top_q_threshold(scores, 2).numpy() == 1.0  # 3 kept: ties
    assert top_q_threshold(scores, 0).numpy() == np.inf
    assert top_q_threshold(scores, 5).numpy() == 0.0


@pytest.mark.parametrize("density", [0.05, 0.3])
def test_sparsify_keeps_exactly_the_q_largest(density):
    model = _model()
    kernels = _kernels(model)
    before = [v.numpy() for v in kernels]
    others = [v.numpy() for v in model.weights if len(v.shape) < 2]
    magnitudes = np.concatenate([np.abs(w).ravel() for w in before])
    q = int(magnitudes.size * density)
    keep = np.zeros(magnitudes.size, bool)
    keep[np.argsort(-magnitudes)[:q]] = True

    report = kc.sparsify(model, density)

    after = np.concatenate([v.numpy().ravel() for v in kernels])
    np.testing.assert_array_equal(after != 0, keep)
    np.testing.assert_array_equal(
        after[keep], np.concatenate([w.ravel() for w in before])[keep]
    )
    for v, w in zip([v for v in model.weights if len(v.shape) < 2], others):
        np.testing.assert_array_equal(v.numpy(), w)
    assert report["nonzero"] == q
    assert report["size"] == magnitudes.size
    start = 0
    for v in kernels:
        n = int(np.prod(v.shape))
        entry = report["kernels"][v.path]
        assert entry["nonzero"] == keep[start : start + n].sum()
        assert entry["density"] == pytest.approx(entry["nonzero"] / n)
        start += n


def test_sparsity_report_prints_table():
    model = _model()
    lines = []
    report = kc.sparsity_report(model, print_fn=lines.append)
    kernels = _kernels(model)
    assert list(report["kernels"]) == [v.path for v in kernels]
    assert report["density"] == 1.0
    assert len(lines) == len(kernels) + 2
    assert lines[-1].split()[0] == "global"
    assert kc.sparsity_report(model, print_fn=None) == report


@pytest.mark.parametrize("density", [0, 1.5, "0.1", None])
def test_sparsify_rejects_bad_density(density):
    with pytest.raises(ValueError, match="Received: density="):
        kc.sparsify(_model(), density)


def test_sparsify_needs_a_kernel():
    model = keras.Sequential([keras.Input((3,)), keras.layers.ReLU()])
    with pytest.raises(ValueError, match="kernel"):
        kc.sparsify(model, 0.5)
