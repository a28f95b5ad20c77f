"""`benchmark_latency`: a model or an exported file, timed per batch size."""

from __future__ import annotations

import os

import keras

from keras_csgd import checks, runtimes
from keras_csgd.latency.timing import time_calls
from keras_csgd.runtimes.base import uniform
from keras_csgd.runtimes.tensorflow import set_tf_threads

# The runtime that runs a file, by its suffix (a folder: a SavedModel).
BY_SUFFIX = {".tflite": "litert", ".onnx": "onnxruntime", ".xml": "openvino"}


def runtime_of(path: str) -> str:
    """The runtime of an exported file: by suffix, a folder is TensorFlow.

    Raises:
        ValueError: not an existing file or folder of a known kind.
    """
    suffix = os.path.splitext(path)[1]
    if os.path.isdir(path):
        return "tensorflow"
    if os.path.isfile(path) and suffix in BY_SUFFIX:
        return BY_SUFFIX[suffix]
    raise ValueError(
        "`model_or_path` must be a keras.Model, an existing "
        f"{'/'.join(BY_SUFFIX)} file or a SavedModel folder. "
        f"Received: model_or_path={path!r}"
    )


def benchmark_latency(model_or_path, input_shape=None, batch_sizes=(1, 64),
                      threads=2, runs=50, warmup=5, jit_compile=False,
                      runtime=None):
    """Times inference of a Keras model or an exported file.

    A Keras model runs on `runtime` (compiled there the way profiling does,
    `Runtime.compile`); a file on the runtime of its suffix (`.tflite`
    LiteRT, `.onnx` ONNX Runtime, `.xml` OpenVINO, a folder a TensorFlow
    SavedModel). Every call is timed on its own (wall clock) after `warmup`
    untimed calls.

    Args:
        model_or_path: a `keras.Model` or the path of an exported file.
        input_shape: one sample's shape, without the batch dimension.
            Defaults to `None` (read from the model or file).
        batch_sizes: batch sizes to time. Defaults to `(1, 64)`.
        threads: the runtime's threads; for TensorFlow, its intra-op
            threads when it has not run any op yet (a warning says when it
            cannot be changed any more). Defaults to `2`.
        runs: timed calls per batch size. Defaults to `50`.
        warmup: untimed calls first. Defaults to `5`.
        jit_compile: compile TensorFlow calls with XLA. Defaults to
            `False`.
        runtime: for a Keras model, one of `kc.latency.RUNTIMES`. Defaults
            to `None`: `"tensorflow"` (BatchNormalization folded).

    Returns:
        `{batch_size: {"median_ms", "p10_ms", "p90_ms", "runs"}}`.

    Raises:
        ValueError: on a non-positive `runs`, `threads` or batch size, an
            unknown `runtime`, or a path that is not an exported file.
        ImportError: the runtime's package is missing.

    Example:

    ```python
    kc.benchmark_latency(slim, batch_sizes=(1, 64))[1]["median_ms"]
    kc.benchmark_latency(slim, runtime="onnxruntime")
    kc.benchmark_latency("slim.tflite")
    ```
    """
    checks.positive_int("runs", runs)
    checks.positive_int("threads", threads)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(
            "`batch_sizes` must be positive integers. "
            f"Received: batch_sizes={batch_sizes!r}"
        )
    if isinstance(model_or_path, keras.Model):
        rt = runtimes.get(runtime or "tensorflow")
        rt.require()
        if rt.name == "tensorflow":
            set_tf_threads(threads)
        program = rt.compile(model_or_path, threads, jit_compile)
    else:
        path = os.fspath(model_or_path)
        rt = runtimes.get(runtime_of(path) if runtime is None else runtime)
        rt.require()
        program = rt.load(path, threads, jit_compile)
    shape = program.input_shape if input_shape is None else input_shape
    results = {}
    for batch in batch_sizes:
        x = uniform((batch, *shape))
        results[batch] = time_calls(program.bind(x), runs, warmup)
    return results
