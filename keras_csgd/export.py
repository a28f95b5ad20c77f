"""LiteRT (TFLite) export with a built-in output check, and latency timing.

`tflite_flatbuffer` converts a Keras model (through a SavedModel, the path
TensorFlow recommends for Keras 3, or directly from the traced function);
`export_tflite` writes it atomically and, by default, runs it in an
interpreter and compares it with Keras.
`benchmark_latency` times a Keras model (compiled `tf.function`) or a
`.tflite` file (interpreter) at several batch sizes.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
import warnings
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from keras_csgd import batches
from keras_csgd_cli import silenced_stderr

QUANTIZE_MODES = (None, "dynamic", "float16", "int8")

# Largest allowed |TFLite - Keras| / max(1, max |Keras|) per quantize mode.
# Float conversion only reorders float32 arithmetic; float16 rounds weights
# to 11 significant bits; "dynamic" quantizes weights (and, on the fly,
# activations) to int8; "int8" quantizes every tensor with ranges calibrated
# on `representative_data`. The int8 bounds hold for inputs drawn like the
# calibration data (tests/test_export.py checks them on trained models).
TOLERANCES = {None: 1e-4, "float16": 5e-3, "dynamic": 0.05, "int8": 0.25}

_CHECK_SAMPLES = 8
_CALIBRATION_SAMPLES = 100


class TFLiteExport(NamedTuple):
    """What `export_tflite` wrote.

    Attributes:
        path: the `.tflite` file.
        size_bytes: its size.
        max_error: `max |TFLite - Keras| / max(1, max |Keras|)` on the check
            inputs, or `None` when `check=False`.
    """

    path: str
    size_bytes: int
    max_error: float | None


def load_interpreter(path_or_bytes, threads=None):
    """A LiteRT interpreter with its tensors allocated.

    Args:
        path_or_bytes: a `.tflite` path or the flatbuffer bytes.
        threads: interpreter threads. Defaults to `None` (LiteRT default).

    Returns:
        An `ai_edge_litert` interpreter when that package is installed,
        else TensorFlow's `tf.lite.Interpreter`.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    source = (
        {"model_content": path_or_bytes} if isinstance(path_or_bytes, bytes)
        else {"model_path": str(path_or_bytes)}
    )
    # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate" on
    # the C++ stderr whenever an interpreter is made.
    with silenced_stderr():
        interpreter = Interpreter(**source, num_threads=threads)
        interpreter.allocate_tensors()
    return interpreter


def run_tflite(path_or_bytes, x, threads=None):
    """Runs a single-input `.tflite` model on the batch `x`.

    Args:
        path_or_bytes: a `.tflite` path or the flatbuffer bytes.
        x: input batch (any batch size: the input is resized).
        threads: interpreter threads. Defaults to `None` (LiteRT default).

    Returns:
        The first output as a NumPy array.
    """
    interpreter = load_interpreter(path_or_bytes, threads)
    set_input(interpreter, np.asarray(x))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def set_input(interpreter, x):
    """Resizes a single-input interpreter's input to `x.shape`, feeds `x`."""
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x.astype(detail["dtype"]))


def input_spec(model):
    """The `tf.TensorSpec` of a single-input model, with a free batch size.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: if it is not built or has more than one input.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r}"
        )
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs or len(inputs) != 1:
        raise ValueError(
            "`model` must be a built Keras model with exactly one input "
            "(a functional or Sequential model with an `Input`). "
            f"Received: model={model!r}"
        )
    return tf.TensorSpec((None,) + tuple(inputs[0].shape[1:]), inputs[0].dtype)


def _check_quantize(quantize, representative_data):
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"`quantize` must be one of {QUANTIZE_MODES}. "
            f"Received: quantize={quantize!r}"
        )
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            '`representative_data` is required for quantize="int8" (it '
            "calibrates activation ranges). Received: representative_data=None"
        )


def tflite_flatbuffer(
    model,
    quantize=None,
    representative_data=None,
    sparse=False,
    *,
    saved_model=True,
) -> bytes:
    """Converts `model` to a LiteRT (TFLite) flatbuffer, in memory.

    The model is traced with `training=False` and a free batch dimension
    and converted by `tf.lite.TFLiteConverter` with builtin ops only (no
    Flex delegate needed). `export_tflite` writes and checks what this
    returns.

    Args:
        model: a built single-input Keras model.
        quantize: `None`, `"dynamic"`, `"float16"` or `"int8"` (see
            `export_tflite`). Defaults to `None` (float32).
        representative_data: inputs that calibrate `"int8"` ranges, in any
            form `keras_csgd.batches` reads (first 100 samples). Defaults
            to `None`.
        sparse: store sparse kernels compressed (see `export_tflite`).
            Defaults to `False`.
        saved_model: convert through a SavedModel (the path TensorFlow
            recommends for Keras 3); `False` converts the traced function
            directly, the same graph without the SavedModel round trip
            (about 2 s instead of 9 s for a ResNet-56: latency profiling
            converts dozens of variants). Defaults to `True`.

    Returns:
        The flatbuffer bytes.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: on an unknown `quantize`, `"int8"` without
            `representative_data`, or a model without exactly one input.
    """
    _check_quantize(quantize, representative_data)
    spec = input_spec(model)
    calibration = None
    if representative_data is not None:
        calibration = batches.fixed_arrays(
            representative_data, _CALIBRATION_SAMPLES, "representative_data"
        )
    call = functools.partial(model.__call__, training=False)
    absl = logging.getLogger("absl")  # the direct path's deprecation note
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        return _convert(model, spec, call, quantize, calibration, sparse,
                        saved_model)
    finally:
        absl.setLevel(level)


def _convert(model, spec, call, quantize, calibration, sparse, saved_model):
    with tempfile.TemporaryDirectory() as saved_model_dir:
        if saved_model:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint("serve", call, input_signature=[spec])
            archive.write_out(saved_model_dir, verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(
                saved_model_dir
            )
        else:
            function = tf.function(call).get_concrete_function(spec)
            converter = tf.lite.TFLiteConverter.from_concrete_functions(
                [function]
            )
            converter.experimental_lower_to_saved_model = False
        if quantize is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if sparse:
            converter.optimizations = [
                *converter.optimizations,
                tf.lite.Optimize.EXPERIMENTAL_SPARSITY,
            ]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            ]
            converter.representative_dataset = lambda: (
                [sample[None].astype(np.float32)] for sample in calibration
            )
        return converter.convert()


def export_tflite(
    model,
    path,
    quantize=None,
    representative_data=None,
    check=True,
    sparse=False,
):
    """Writes `model` as a LiteRT (TFLite) flatbuffer and checks it.

    The model is traced with `training=False` and a free batch dimension,
    saved as a SavedModel in a temporary folder and converted with
    `tf.lite.TFLiteConverter` using builtin ops only (no Flex delegate
    needed). The file is first written next to `path` under a temporary
    name, checked, then moved into place: on any failure no file (and no
    partial file) is left at `path`.

    Args:
        model: a built single-input Keras model.
        path: output `.tflite` file; its folder must exist.
        quantize: `None` (float32), `"dynamic"` (int8 weights, float
            activations), `"float16"` (float16 weights) or `"int8"` (full
            integer kernels with a float32 interface; needs
            `representative_data`). Defaults to `None`.
        representative_data: NumPy array of inputs `(N, ...)`, an iterable
            of batches `x` or `(x, y)` (e.g. a `tf.data.Dataset`), or any
            other form `keras_csgd.batches` reads (an `.npz`, an image
            folder); its first 100 samples calibrate int8 ranges and its
            first 8 samples are the check inputs. Defaults to `None`
            (check on uniform `[0, 1)` inputs).
        check: compare the file's outputs with the model's and raise when
            `max |TFLite - Keras| / max(1, max |Keras|)` exceeds
            `TOLERANCES[quantize]` (1e-4 float32, 5e-3 float16, 0.05 dynamic,
            0.25 int8). Defaults to `True`.
        sparse: store sparse kernels in a compressed (block-sparse) format,
            for models pruned with `kc.GSM` + `kc.sparsify`: the file
            shrinks; latency only improves where the runtime has sparse
            kernels (XNNPACK, for some ops). Defaults to `False`.

    Returns:
        A `TFLiteExport(path, size_bytes, max_error)`.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: on an unknown `quantize`, `"int8"` without
            `representative_data`, a model without exactly one input, or a
            missing output folder.
        RuntimeError: if the check fails (nothing is written then).

    Example:

    ```python
    result = kc.export_tflite(slim_model, "slim.tflite")
    print(result.size_bytes, result.max_error)
    ```
    """
    _check_quantize(quantize, representative_data)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(
            f"`path` must be in an existing folder. Received: path={path!r}"
        )
    input_spec(model)
    samples = None
    if representative_data is not None:
        samples = batches.fixed_arrays(
            representative_data, _CALIBRATION_SAMPLES, "representative_data"
        )
    flatbuffer = tflite_flatbuffer(model, quantize, samples, sparse)
    fd, tmp = tempfile.mkstemp(suffix=".tflite.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(flatbuffer)
        max_error = None
        if check:
            max_error = _check(model, tmp, quantize, samples)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return TFLiteExport(path, os.path.getsize(path), max_error)


def _check(model, tflite_path, quantize, samples):
    if samples is None:
        rng = np.random.default_rng(0)
        shape = (_CHECK_SAMPLES,) + tuple(input_spec(model).shape[1:])
        samples = rng.uniform(size=shape)
    x = np.asarray(samples[:_CHECK_SAMPLES], np.float32)
    expected = np.asarray(model(x, training=False))
    actual = run_tflite(tflite_path, x)
    scale = max(1.0, float(np.max(np.abs(expected))))
    max_error = float(np.max(np.abs(actual - expected))) / scale
    if not max_error <= TOLERANCES[quantize]:
        raise RuntimeError(
            f"The TFLite file (quantize={quantize!r}) differs from the Keras "
            f"model by {max_error:.3g} (relative to max(1, max |output|)), "
            f"more than the tolerance {TOLERANCES[quantize]}. Nothing was "
            "written; pass check=False to write it anyway."
        )
    return max_error


def time_calls(fn, runs, warmup):
    """Wall-clock times of `runs` calls of `fn` after `warmup` untimed ones.

    Returns:
        `{"median_ms", "p10_ms", "p90_ms", "runs"}`.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return {
        "median_ms": float(median),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
        "runs": runs,
    }


def set_tf_threads(threads):
    """Pins TensorFlow's intra-op threads; warns once TF has started."""
    current = tf.config.threading.get_intra_op_parallelism_threads()
    if current == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        warnings.warn(
            f"TensorFlow is already initialised with {current or 'all'} "
            f"intra-op threads; `threads={threads}` applies only to TFLite. "
            "Call benchmark_latency before running any TensorFlow op to "
            "pin Keras threads too.",
            stacklevel=2,
        )


def benchmark_latency(
    model_or_tflite_path,
    input_shape=None,
    batch_sizes=(1, 64),
    threads=2,
    runs=50,
    warmup=5,
    jit_compile=False,
):
    """Times inference of a Keras model or a `.tflite` file.

    Keras models run through `tf.function(model(x, training=False))`
    (XLA when `jit_compile=True`); `.tflite` files through a LiteRT
    interpreter resized to each batch size. Every call is timed on its own
    (wall clock) after `warmup` untimed calls.

    Args:
        model_or_tflite_path: a `keras.Model` or a path to a `.tflite` file.
        input_shape: one sample's shape, without the batch dimension.
            Defaults to `None` (read from the model or file).
        batch_sizes: batch sizes to time. Defaults to `(1, 64)`.
        threads: interpreter threads; for Keras, TensorFlow's intra-op
            threads when TensorFlow has not run any op yet (a warning says
            when it cannot be changed any more). Defaults to `2`.
        runs: timed calls per batch size. Defaults to `50`.
        warmup: untimed calls first. Defaults to `5`.
        jit_compile: compile the Keras function with XLA. Defaults to
            `False`.

    Returns:
        `{batch_size: {"median_ms", "p10_ms", "p90_ms", "runs"}}`.

    Raises:
        ValueError: on a non-positive `runs`, `threads` or batch size, or a
            path that is not an existing file.

    Example:

    ```python
    kc.benchmark_latency(slim, batch_sizes=(1, 64))[1]["median_ms"]
    kc.benchmark_latency("slim.tflite")
    ```
    """
    for name, value in (("runs", runs), ("threads", threads)):
        if int(value) < 1:
            raise ValueError(
                f"`{name}` must be a positive integer. Received: "
                f"{name}={value!r}"
            )
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(
            "`batch_sizes` must be positive integers. "
            f"Received: batch_sizes={batch_sizes!r}"
        )
    rng = np.random.default_rng(0)
    if isinstance(model_or_tflite_path, keras.Model):
        set_tf_threads(threads)
        if input_shape is None:
            input_shape = input_spec(model_or_tflite_path).shape[1:]
        call = tf.function(
            functools.partial(model_or_tflite_path, training=False),
            jit_compile=jit_compile,
        )
        results = {}
        for batch in batch_sizes:
            x = tf.constant(rng.uniform(size=(batch, *input_shape)), tf.float32)
            results[batch] = time_calls(
                lambda x=x: call(x).numpy(), runs, warmup
            )
        return results
    path = os.fspath(model_or_tflite_path)
    if not os.path.isfile(path):
        raise ValueError(
            "`model_or_tflite_path` must be a keras.Model or an existing "
            f".tflite file. Received: model_or_tflite_path={path!r}"
        )
    interpreter = load_interpreter(path, threads)
    detail = interpreter.get_input_details()[0]
    if input_shape is None:
        input_shape = detail["shape"][1:]
    results = {}
    for batch in batch_sizes:
        set_input(interpreter, rng.uniform(size=(batch, *input_shape)))
        results[batch] = time_calls(interpreter.invoke, runs, warmup)
    return results
