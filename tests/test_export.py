"""Tests for LiteRT export (`kc.export_tflite`), its check, latency timing."""

import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_csgd as kc
from keras_csgd.data import load_digits_images
from keras_csgd.latency import timing
from keras_csgd.models import small_resnet
from keras_csgd.runtimes import litert


@pytest.fixture(scope="module")
def digits():
    return load_digits_images()


@pytest.fixture(scope="module")
def trained(digits):
    """A small residual CNN trained briefly on digits (BN stats are real)."""
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = small_resnet(width=8)
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    return model


def _relative_error(actual, expected):
    scale = max(1.0, np.abs(expected).max())
    return np.abs(actual - expected).max() / scale


@pytest.fixture(scope="module")
def float_path(trained, tmp_path_factory):
    return kc.export_tflite(
        trained, tmp_path_factory.mktemp("float") / "m.tflite"
    ).path


def test_float_export_matches_keras(trained, digits, tmp_path):
    _, (x_test, _) = digits
    path = tmp_path / "m.tflite"
    result = kc.export_tflite(trained, path)
    assert result.path == str(path)
    assert result.size_bytes == os.path.getsize(path) > 0
    assert result.max_error <= 1e-4
    # Independent of the built-in check: other inputs, other batch size.
    expected = trained(x_test[:50], training=False).numpy()
    actual = litert.run_tflite(path, x_test[:50])
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]


@pytest.mark.parametrize("quantize", [None, "dynamic"])
def test_direct_conversion_equals_saved_model_path(
    trained, digits, quantize, caplog
):
    """`saved_model=False` (latency profiling's fast path) converts the
    same graph: the two flatbuffers compute the same outputs."""
    _, (x_test, _) = digits
    via_saved_model = litert.tflite_flatbuffer(trained, quantize)
    with caplog.at_level(logging.WARNING, logger="absl"):
        direct = litert.tflite_flatbuffer(trained, quantize,
                                          saved_model=False)
    # Its deprecation note (no trackable_obj) is not shown to users.
    assert not [r for r in caplog.records if r.name == "absl"]
    expected = trained(x_test[:50], training=False).numpy()
    outputs = [litert.run_tflite(b, x_test[:50])
               for b in (via_saved_model, direct)]
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    if quantize is None:
        np.testing.assert_allclose(outputs[1], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="`quantize` must be one of"):
        litert.tflite_flatbuffer(trained, "int4", saved_model=False)


@pytest.mark.parametrize("quantize", ["float16", "dynamic", "int8"])
def test_quantized_exports_within_stated_tolerance(
    quantize, trained, digits, float_path, tmp_path
):
    (x_train, _), (x_test, _) = digits
    result = kc.export_tflite(
        trained,
        tmp_path / "q.tflite",
        quantize=quantize,
        representative_data=x_train,
    )
    assert result.max_error <= litert.TOLERANCES[quantize]
    expected = trained(x_test[:200], training=False).numpy()
    actual = litert.run_tflite(result.path, x_test[:200])
    assert _relative_error(actual, expected) <= litert.TOLERANCES[quantize]
    agreement = np.mean(actual.argmax(1) == expected.argmax(1))
    assert agreement >= 0.97
    # Kernels shrink from 4 bytes per weight to 2 (float16) or 1 (int8).
    kernels = sum(
        int(np.prod(w.shape)) for w in trained.weights if len(w.shape) > 1
    )
    saved = (2 if quantize == "float16" else 3) * kernels
    float_size = os.path.getsize(float_path)
    assert float_size - result.size_bytes >= 0.6 * saved


def test_int8_accepts_a_dataset_of_labelled_batches(trained, digits, tmp_path):
    (x, y), _ = digits
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    result = kc.export_tflite(
        trained, tmp_path / "q.tflite", "int8", representative_data=dataset
    )
    assert result.max_error <= litert.TOLERANCES["int8"]


def test_bad_arguments_write_nothing(trained, tmp_path):
    path = tmp_path / "m.tflite"
    with pytest.raises(ValueError, match="`representative_data` is required"):
        kc.export_tflite(trained, path, quantize="int8")
    with pytest.raises(ValueError, match="`quantize` must be one of"):
        kc.export_tflite(trained, path, quantize="int4")
    with pytest.raises(ValueError, match="existing folder"):
        kc.export_tflite(trained, tmp_path / "no" / "m.tflite")
    with pytest.raises(TypeError, match="`model` must be a keras.Model"):
        kc.export_tflite("model.keras", path)
    a = keras.Input((3,))
    b = keras.Input((3,))
    two = keras.Model([a, b], keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="exactly one input"):
        kc.export_tflite(two, path)
    for empty in ([], np.zeros((0, 8, 8, 1), np.float32)):
        with pytest.raises(ValueError, match="at least one sample"):
            kc.export_tflite(trained, path, "int8", representative_data=empty)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_previous_file(trained, tmp_path, monkeypatch):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"previous")
    monkeypatch.setitem(litert.TOLERANCES, None, -1.0)
    with pytest.raises(RuntimeError, match="differs from the Keras model"):
        kc.export_tflite(trained, path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]
    result = kc.export_tflite(trained, path, check=False)
    assert result.max_error is None and path.read_bytes() != b"previous"


class _Clock:
    """Stands in for `time` in `keras_csgd.latency.timing`: call k lasts k ms.

    `perf_counter` is read twice per timed call (start, end), never for the
    warm-up calls.
    """

    def __init__(self):
        self.reads, self.calls = 0, 0

    def perf_counter(self):
        self.reads += 1
        if self.reads % 2:
            return 0.0
        self.calls += 1
        return self.calls / 1e3


def _check_timings(results, clock, batch_sizes, runs):
    """Batch `i` was timed `i * runs + 1, ..., (i + 1) * runs` ms."""
    assert list(results) == list(batch_sizes)
    assert clock.calls == runs * len(batch_sizes)
    for i, r in enumerate(results.values()):
        first = i * runs + 1
        np.testing.assert_allclose(
            [r["p10_ms"], r["median_ms"], r["p90_ms"]],
            [first + q * (runs - 1) for q in (0.1, 0.5, 0.9)],
            rtol=1e-9,
        )
        assert r["runs"] == runs


def _timed(monkeypatch, *args, **kwargs):
    """`kc.benchmark_latency(*args, warmup=1, **kwargs)` on a `_Clock`."""
    clock = _Clock()
    monkeypatch.setattr(timing, "time", clock)
    return kc.benchmark_latency(*args, warmup=1, **kwargs), clock


@pytest.mark.filterwarnings("ignore:TensorFlow is already initialised")
def test_benchmark_keras_and_tflite(trained, float_path, monkeypatch):
    _check_timings(
        *_timed(monkeypatch, trained, batch_sizes=(1, 4), runs=3), (1, 4), 3
    )
    _check_timings(
        *_timed(monkeypatch, trained, (8, 8, 1), (2,), runs=3,
                jit_compile=True),
        (2,),
        3,
    )
    _check_timings(
        *_timed(monkeypatch, float_path, batch_sizes=(1, 16), runs=5),
        (1, 16),
        5,
    )


def test_benchmark_bad_arguments(trained, tmp_path):
    with pytest.raises(ValueError, match="`runs` must be a positive"):
        kc.benchmark_latency(trained, runs=0)
    with pytest.raises(ValueError, match="`batch_sizes`"):
        kc.benchmark_latency(trained, batch_sizes=(0,))
    with pytest.raises(ValueError, match="existing .tflite"):
        kc.benchmark_latency(str(tmp_path / "missing.tflite"))


def test_sparse_export_is_smaller_and_equal(tmp_path):
    inp = keras.Input((64,))
    model = keras.Model(inp, keras.layers.Dense(256)(inp))
    kc.sparsify(model, density=0.1)
    dense = kc.export_tflite(model, tmp_path / "d.tflite")
    sparse = kc.export_tflite(model, tmp_path / "s.tflite", sparse=True)
    assert sparse.size_bytes < 0.5 * dense.size_bytes
    assert sparse.max_error < 1e-4
